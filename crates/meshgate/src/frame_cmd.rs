//! `meshgate frame decode|encode`: look inside a binary (MCPW) frame captured
//! from an agent connection, and make frames by hand to test a peer.
//!
//! Exit codes: 0 done; 1 the frame is bad (decode) or cannot be encoded;
//! 2 the input is unusable (unreadable file, text that is neither hex nor
//! base64, invalid JSON, a bad option value).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Subcommand, ValueEnum};
use meshgate_protocol::frame::{
    self, EncodeOptions, Frame, FrameError, FrameType, HEADER_LEN, Limits, MAGIC, Method, flags,
};
use serde_json::{Value, json};

/// The `meshgate frame` subcommands.
#[derive(Subcommand)]
pub enum FrameCommand {
    /// Decode a binary frame and print its header fields and messages.
    Decode(DecodeArgs),
    /// Encode a JSON-RPC message (or, with --batch, several) as a binary frame.
    Encode(EncodeArgs),
}

/// How `frame decode` reads its input.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InputFormat {
    /// Hex text; spaces, newlines and `0x` prefixes are ignored.
    Hex,
    /// Base64 text, standard or URL-safe, padded or not.
    Base64,
    /// Raw bytes: INPUT (or --file) names a file, or stdin is the frame itself.
    File,
}

/// How `frame encode` writes the frame.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Lower-case hex on one line.
    Hex,
    /// Standard base64 with padding on one line.
    Base64,
    /// The raw bytes.
    Raw,
}

/// Size limits shared by both subcommands.
#[derive(clap::Args)]
pub struct LimitArgs {
    /// Largest payload on the wire, in bytes.
    #[arg(long, default_value_t = Limits::default().max_payload)]
    max_payload: usize,
    /// Largest payload after decompression, in bytes.
    #[arg(long, default_value_t = Limits::default().max_decompressed)]
    max_decompressed: usize,
}

impl LimitArgs {
    fn limits(&self) -> Limits {
        Limits {
            max_payload: self.max_payload,
            max_decompressed: self.max_decompressed,
        }
    }
}

/// Arguments of `meshgate frame decode`.
#[derive(clap::Args)]
pub struct DecodeArgs {
    /// The frame as hex or base64 text, `@PATH` for a file (raw bytes, or hex
    /// or base64 text), or `-` (the default) for stdin.
    input: Option<String>,
    /// Read the frame from this file (same as `@PATH`).
    #[arg(long, conflicts_with = "input")]
    file: Option<PathBuf>,
    /// How the input is written; default: raw when it starts with the frame
    /// magic "MCPW", else hex when it is only hex digits, else base64.
    #[arg(long, value_enum)]
    format: Option<InputFormat>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    limits: LimitArgs,
}

/// Arguments of `meshgate frame encode`.
#[derive(clap::Args)]
pub struct EncodeArgs {
    /// The JSON-RPC message as JSON text, `@PATH` for a file, or `-` (the
    /// default) for stdin. With --batch: a JSON array of messages.
    message: Option<String>,
    /// Encode a JSON array of messages as one batch frame (type 6).
    #[arg(long)]
    batch: bool,
    /// Compress with gzip when the message is at least --threshold bytes and
    /// gzip makes it smaller.
    #[arg(long)]
    compress: bool,
    /// Compression threshold in bytes (implies --compress); default 1024.
    #[arg(long)]
    threshold: Option<usize>,
    /// gzip level, 0 to 9.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=9))]
    level: u32,
    /// Leave out the CRC32 trailer (flag 0x8).
    #[arg(long)]
    no_checksum: bool,
    /// The frame's sequence id.
    #[arg(long, default_value_t = 1)]
    sequence: u64,
    /// Frame type by name (request, response, notification, error, ping,
    /// pong, progress) or code; default: read from the message.
    #[arg(long = "type")]
    frame_type: Option<String>,
    /// Method code by name (initialize, tool.list, ..., pong, or named) or
    /// code 0 to 9; default: from the message's `method`.
    #[arg(long)]
    method: Option<String>,
    /// How to write the frame.
    #[arg(long, value_enum, default_value = "hex")]
    output: OutputFormat,
    #[command(flatten)]
    limits: LimitArgs,
}

/// A failure of a frame subcommand, with its exit code.
enum Failure {
    /// The frame is bad or cannot be made: exit 1.
    Frame(FrameError),
    /// The input or an option is unusable: exit 2.
    Input(String),
}

impl From<FrameError> for Failure {
    fn from(e: FrameError) -> Failure {
        Failure::Frame(e)
    }
}

/// Runs a `meshgate frame` subcommand and returns the process exit code.
pub fn run(command: FrameCommand) -> ExitCode {
    let json_errors = matches!(&command, FrameCommand::Decode(a) if a.json);
    let result = match command {
        FrameCommand::Decode(args) => decode(args),
        FrameCommand::Encode(args) => encode(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Frame(e)) => {
            if json_errors {
                println!("{}", json!({"error": e.to_string(), "kind": e.kind()}));
            }
            eprintln!("meshgate: bad frame: {e}");
            ExitCode::from(1)
        }
        Err(Failure::Input(msg)) => {
            eprintln!("meshgate: {msg}");
            ExitCode::from(2)
        }
    }
}

// ---------------------------------------------------------------------------
// decode
// ---------------------------------------------------------------------------

fn decode(args: DecodeArgs) -> Result<(), Failure> {
    let (bytes, from_file) = match (&args.file, args.input.as_deref()) {
        (Some(path), _) => (read_file(path)?, true),
        (None, Some(a)) if a.starts_with('@') => {
            (read_file(&PathBuf::from(a.trim_start_matches('@')))?, true)
        }
        (None, Some(path)) if args.format == Some(InputFormat::File) && path != "-" => {
            (read_file(&PathBuf::from(path))?, true)
        }
        (None, Some(text)) if text != "-" => (text.as_bytes().to_vec(), false),
        (None, _) => (read_stdin()?, false),
    };
    let wire = match args.format {
        Some(InputFormat::File) => bytes,
        Some(InputFormat::Hex) => parse_hex(&as_text(&bytes)?)?,
        Some(InputFormat::Base64) => parse_base64(&as_text(&bytes)?)?,
        None if bytes.starts_with(&MAGIC.to_be_bytes()) => bytes,
        None => match std::str::from_utf8(&bytes) {
            Ok(text) if looks_like_hex(text) => parse_hex(text)?,
            Ok(text) => parse_base64(text).map_err(|e| {
                Failure::Input(format!(
                    "{} is neither hex nor base64 nor a raw frame ({}); say which with --format",
                    if from_file { "the file" } else { "the input" },
                    failure_text(e)
                ))
            })?,
            Err(_) => bytes,
        },
    };
    let limits = args.limits.limits();
    let frame = frame::decode(&wire, &limits)?;
    if args.json {
        println!("{}", describe_json(&frame, &wire));
    } else {
        print!("{}", describe_text(&frame, &wire));
    }
    Ok(())
}

fn failure_text(f: Failure) -> String {
    match f {
        Failure::Input(m) => m,
        Failure::Frame(e) => e.to_string(),
    }
}

fn read_file(path: &std::path::Path) -> Result<Vec<u8>, Failure> {
    std::fs::read(path).map_err(|e| Failure::Input(format!("cannot read {}: {e}", path.display())))
}

fn read_stdin() -> Result<Vec<u8>, Failure> {
    let mut buf = Vec::new();
    std::io::stdin()
        .read_to_end(&mut buf)
        .map_err(|e| Failure::Input(format!("cannot read stdin: {e}")))?;
    Ok(buf)
}

fn as_text(bytes: &[u8]) -> Result<String, Failure> {
    String::from_utf8(bytes.to_vec()).map_err(|_| {
        Failure::Input("the input is not text; for a raw frame use --format file".into())
    })
}

/// Hex digits only, once whitespace, `,` and `0x` prefixes are gone.
fn looks_like_hex(text: &str) -> bool {
    let digits = hex_digits(text);
    !digits.is_empty()
        && digits.len().is_multiple_of(2)
        && digits.bytes().all(|b| b.is_ascii_hexdigit())
}

fn hex_digits(text: &str) -> String {
    text.split(|c: char| c.is_whitespace() || c == ',')
        .map(|t| {
            t.strip_prefix("0x")
                .or_else(|| t.strip_prefix("0X"))
                .unwrap_or(t)
        })
        .collect()
}

fn parse_hex(text: &str) -> Result<Vec<u8>, Failure> {
    let digits = hex_digits(text);
    if let Some((i, c)) = digits.char_indices().find(|(_, c)| !c.is_ascii_hexdigit()) {
        return Err(Failure::Input(format!(
            "invalid hex: {c:?} at digit {i} is not a hex digit"
        )));
    }
    if !digits.len().is_multiple_of(2) {
        return Err(Failure::Input(format!(
            "invalid hex: {} digits, an odd number; every byte takes two",
            digits.len()
        )));
    }
    let nibble = |b: u8| match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => b - b'A' + 10,
    };
    Ok(digits
        .as_bytes()
        .chunks_exact(2)
        .map(|p| (nibble(p[0]) << 4) | nibble(p[1]))
        .collect())
}

/// Decodes standard or URL-safe base64, with or without padding; whitespace
/// is ignored.
fn parse_base64(text: &str) -> Result<Vec<u8>, Failure> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0u32;
    let mut padding = 0usize;
    let mut count = 0usize;
    for (i, c) in text.char_indices().filter(|(_, c)| !c.is_whitespace()) {
        let v = match c {
            'A'..='Z' => c as u32 - 'A' as u32,
            'a'..='z' => c as u32 - 'a' as u32 + 26,
            '0'..='9' => c as u32 - '0' as u32 + 52,
            '+' | '-' => 62,
            '/' | '_' => 63,
            '=' => {
                padding += 1;
                continue;
            }
            other => {
                return Err(Failure::Input(format!(
                    "invalid base64: {other:?} at offset {i}"
                )));
            }
        };
        if padding > 0 {
            return Err(Failure::Input(format!(
                "invalid base64: data after `=` padding at offset {i}"
            )));
        }
        count += 1;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    if count % 4 == 1 || padding > 2 || count == 0 {
        return Err(Failure::Input(format!(
            "invalid base64: {count} characters cannot be a whole number of bytes"
        )));
    }
    Ok(out)
}

fn to_base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A message as JSON when it is JSON, else as a (lossy) string.
fn message_value(message: &[u8]) -> Value {
    serde_json::from_slice(message)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(message).into_owned()))
}

fn method_label(m: Method) -> &'static str {
    m.name().unwrap_or("named in the payload")
}

fn describe_text(frame: &Frame<'_>, wire: &[u8]) -> String {
    use std::fmt::Write as _;
    let h = &frame.header;
    let mut s = String::new();
    let flag_names = flags::names(h.flags);
    let _ = writeln!(s, "magic         0x{MAGIC:08X} (MCPW)");
    let _ = writeln!(s, "version       {}", h.version);
    let _ = writeln!(
        s,
        "type          {} ({})",
        h.frame_type,
        h.frame_type.code()
    );
    let _ = writeln!(
        s,
        "flags         0x{:04X}{}",
        h.flags,
        if flag_names.is_empty() {
            " (none)".to_owned()
        } else {
            format!(" ({})", flag_names.join(", "))
        }
    );
    let _ = writeln!(s, "sequence      {}", h.sequence);
    let _ = writeln!(
        s,
        "method        {} ({})",
        method_label(h.method),
        h.method.code()
    );
    let _ = writeln!(s, "reserved      {}", h.reserved);
    let _ = writeln!(s, "data size     {} bytes", h.data_size);
    let _ = writeln!(
        s,
        "compressed    {}",
        match compression_of(frame, wire) {
            Some(codec) => format!("yes ({codec})"),
            None => "no".to_owned(),
        }
    );
    let _ = writeln!(
        s,
        "checksum      {}",
        match frame.crc32() {
            Some(crc) => format!("CRC32 0x{crc:08X} (verified)"),
            None => "none".to_owned(),
        }
    );
    let _ = writeln!(
        s,
        "payload size  {} bytes{}",
        frame.payload.len(),
        if frame.is_compressed() {
            " (decompressed)"
        } else {
            ""
        }
    );
    let _ = writeln!(s, "messages      {}", frame.message_count());
    for (i, m) in frame.messages().enumerate() {
        let _ = writeln!(s, "--- message {} ({} bytes)", i + 1, m.len());
        let shown = match serde_json::from_slice::<Value>(m) {
            Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_default(),
            Err(e) => format!("(not JSON: {e}) {}", String::from_utf8_lossy(m)),
        };
        let _ = writeln!(s, "{shown}");
    }
    s
}

fn describe_json(frame: &Frame<'_>, wire: &[u8]) -> Value {
    let h = &frame.header;
    json!({
        "magic": format!("0x{MAGIC:08X}"),
        "version": h.version,
        "type": h.frame_type.name(),
        "type_code": h.frame_type.code(),
        "flags": flags::names(h.flags),
        "flags_bits": h.flags,
        "sequence": h.sequence,
        "method": h.method.name(),
        "method_code": h.method.code(),
        "reserved": h.reserved,
        "data_size": h.data_size,
        "compressed": frame.is_compressed(),
        "compression": compression_of(frame, wire),
        "checksum": frame.has_checksum(),
        "crc32": frame.crc32().map(|c| format!("0x{c:08X}")),
        "decompressed_size": frame.payload.len(),
        "batch": frame.is_batch(),
        "message_count": frame.message_count(),
        "messages": frame.messages().map(message_value).collect::<Vec<_>>(),
    })
}

/// "gzip" or "zlib" for a compressed frame (by its first bytes).
fn compression_of(frame: &Frame<'_>, wire: &[u8]) -> Option<&'static str> {
    if !frame.is_compressed() {
        return None;
    }
    Some(match wire.get(HEADER_LEN..HEADER_LEN + 2) {
        Some([0x1F, 0x8B]) => "gzip",
        _ => "zlib",
    })
}

// ---------------------------------------------------------------------------
// encode
// ---------------------------------------------------------------------------

fn encode(args: EncodeArgs) -> Result<(), Failure> {
    let text = match args.message.as_deref() {
        Some(a) if a.starts_with('@') => read_file(&PathBuf::from(a.trim_start_matches('@')))?,
        Some(a) if a != "-" => a.as_bytes().to_vec(),
        _ => read_stdin()?,
    };
    let value: Value = serde_json::from_slice(&text).map_err(|e| {
        Failure::Input(format!(
            "the message is not valid JSON: {e}; give one JSON-RPC message (or, with --batch, a JSON array of messages)"
        ))
    })?;
    let opts = EncodeOptions {
        compress_threshold: match (args.compress, args.threshold) {
            (_, Some(t)) => Some(t),
            (true, None) => EncodeOptions::default().compress_threshold,
            (false, None) => None,
        },
        checksum: !args.no_checksum,
        level: args.level,
    };
    let limits = args.limits.limits();
    let wire = if args.batch {
        if args.frame_type.is_some() || args.method.is_some() {
            return Err(Failure::Input(
                "--batch makes a batch frame (type 6, method 0); leave out --type and --method"
                    .into(),
            ));
        }
        let Value::Array(items) = value else {
            return Err(Failure::Input(
                "--batch needs a JSON array of messages".into(),
            ));
        };
        let messages: Vec<Vec<u8>> = items.iter().map(|v| v.to_string().into_bytes()).collect();
        let refs: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
        frame::encode_batch(args.sequence, &refs, &opts, &limits)?
    } else {
        if value.is_array() {
            return Err(Failure::Input(
                "the message is a JSON array; add --batch to send its elements as a batch frame"
                    .into(),
            ));
        }
        let message = text.trim_ascii();
        let (sniffed_type, sniffed_method) = frame::classify(message);
        let frame_type = match &args.frame_type {
            Some(t) => parse_type(t)?,
            None => sniffed_type,
        };
        let method = match &args.method {
            Some(m) => parse_method(m)?,
            None => sniffed_method,
        };
        frame::encode(frame_type, method, args.sequence, message, &opts, &limits)?
    };
    let shown = frame::decode(&wire, &limits)?;
    eprintln!(
        "{} frame, sequence {}, {} bytes ({} of payload{}{})",
        shown.header.frame_type,
        shown.header.sequence,
        wire.len(),
        shown.header.data_size,
        if shown.is_compressed() {
            format!(", gzip from {}", shown.payload.len())
        } else {
            String::new()
        },
        shown
            .crc32()
            .map(|c| format!(", CRC32 0x{c:08X}"))
            .unwrap_or_default()
    );
    let mut stdout = std::io::stdout().lock();
    let written = match args.output {
        OutputFormat::Hex => writeln!(stdout, "{}", hex::encode(&wire)),
        OutputFormat::Base64 => writeln!(stdout, "{}", to_base64(&wire)),
        OutputFormat::Raw => stdout.write_all(&wire),
    };
    written
        .and_then(|()| stdout.flush())
        .map_err(|e| Failure::Input(format!("cannot write the frame: {e}")))
}

fn parse_type(s: &str) -> Result<FrameType, Failure> {
    let found = match s.parse::<u8>() {
        Ok(code) => FrameType::from_code(code),
        Err(_) => FrameType::ALL.into_iter().find(|t| t.name() == s),
    };
    match found {
        Some(FrameType::Batch) => Err(Failure::Input(
            "--type batch: use --batch with a JSON array of messages".into(),
        )),
        Some(t) => Ok(t),
        None => Err(Failure::Input(format!(
            "--type {s:?} is unknown; use request, response, notification, error, ping, pong, progress or a code 0 to 7"
        ))),
    }
}

fn parse_method(s: &str) -> Result<Method, Failure> {
    let found = match s.parse::<u16>() {
        Ok(code) => Method::from_code(code),
        Err(_) if s == "named" => Some(Method::Named),
        Err(_) => Method::ALL.into_iter().find(|m| m.name() == Some(s)),
    };
    found.ok_or_else(|| {
        Failure::Input(format!(
            "--method {s:?} is unknown; use named, initialize, tool.list, tool.execute, context.get, context.update, event.subscribe, event.unsubscribe, ping, pong or a code 0 to 9"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_both_alphabets() {
        for len in 0..40usize {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 250) as u8).collect();
            let text = to_base64(&bytes);
            if len > 0 {
                assert_eq!(parse_base64(&text).ok(), Some(bytes.clone()), "{text}");
                let url = text.replace('+', "-").replace('/', "_").replace('=', "");
                assert_eq!(parse_base64(&url).ok(), Some(bytes), "{url}");
            }
        }
        assert_eq!(to_base64(b"MCPW"), "TUNQVw==");
        assert!(parse_base64("TUNQVw=x").is_err());
        assert!(parse_base64("T").is_err());
        assert!(parse_base64("TU*Q").is_err());
    }

    #[test]
    fn hex_ignores_spaces_newlines_and_prefixes() {
        assert_eq!(parse_hex("0x4D 0x43\n50 57").ok(), Some(b"MCPW".to_vec()));
        assert_eq!(parse_hex("4d435057").ok(), Some(b"MCPW".to_vec()));
        assert!(parse_hex("4D4").is_err());
        assert!(parse_hex("4G").is_err());
        assert!(looks_like_hex("4D 43"));
        assert!(!looks_like_hex("TUNQVw=="));
    }
}
