//! The binary frame codec ("MCPW", version 1): a fixed 24-byte header in front
//! of a JSON-RPC message, so that an agent connection can skip text framing,
//! compress large messages, check them with a CRC32 and pack several messages
//! into one WebSocket frame.
//!
//! # Layout
//!
//! All integers are big-endian.
//!
//! | offset | size | field     | meaning                                                   |
//! |-------:|-----:|-----------|-----------------------------------------------------------|
//! | 0      | 4    | magic     | `0x4D435057` ("MCPW")                                      |
//! | 4      | 1    | version   | `1`                                                       |
//! | 5      | 1    | type      | [`FrameType`] code, 0 to 7                                |
//! | 6      | 2    | flags     | [`flags`]: 0x1 compressed, 0x2 encrypted, 0x4 batch, 0x8 checksum |
//! | 8      | 8    | sequence  | sender's frame number                                     |
//! | 16     | 2    | method    | [`Method`] code, 0 = named in the payload                 |
//! | 18     | 2    | reserved  | must be 0                                                 |
//! | 20     | 4    | data size | length of the payload on the wire                         |
//!
//! # Wire rules
//!
//! - The data size is the length of the payload as it is on the wire,
//!   including the 4-byte checksum trailer when flag 0x8 is set.
//! - With flag 0x8 the payload's last 4 bytes are the CRC32 (IEEE, big-endian)
//!   of the wire bytes before them, i.e. of the payload *after* compression.
//! - With flag 0x1 the payload (without the trailer) is gzip; zlib is accepted
//!   on decode too. The encoder compresses a message (or a batch encoding) of
//!   at least [`EncodeOptions::compress_threshold`] bytes, and only keeps the
//!   result when it is strictly smaller.
//! - With flag 0x4 (and only on a batch frame, type 6, which must carry it) the
//!   payload after decompression is a u32 message count, then per message a u32
//!   length and that many bytes. A batch holds at least one message and
//!   nothing after its last entry.
//! - Flag 0x2 (encrypted) is reserved: frames carrying it are refused.
//!
//! [`decode`] checks in this order: header (magic, version, type, flags,
//! method, reserved), the data size against [`Limits::max_payload`] (before
//! anything else is read), the data size against the bytes present, the
//! checksum, decompression (capped at [`Limits::max_decompressed`]), the
//! batch layout. Decoding never panics, never copies an uncompressed payload,
//! and never allocates more than the limits allow: decompression output grows
//! step by step up to the limit plus one byte, and a batch count is checked
//! against the bytes present before entries are walked (no per-entry
//! allocation at all).
//!
//! [`encode`] and [`encode_batch`] refuse to produce a frame whose wire payload
//! exceeds [`Limits::max_payload`], so what they produce, [`decode`] accepts
//! with the same limits.

use std::borrow::Cow;
use std::fmt;
use std::io::{ErrorKind, Read};

use serde::Deserialize;
use serde::de::{Deserializer, IgnoredAny};
use thiserror::Error;

/// The first four bytes of every frame: "MCPW".
pub const MAGIC: u32 = 0x4D43_5057;
/// The only frame version this codec speaks.
pub const VERSION: u8 = 1;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 24;
/// Length of the CRC32 trailer that flag 0x8 appends to the payload.
pub const CHECKSUM_LEN: usize = 4;
/// The WebSocket subprotocol that starts a connection in binary mode.
pub const SUBPROTOCOL: &str = "mcpw.v1";

/// The kind of message a frame carries (header byte 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameType {
    /// 0: a JSON-RPC request (`method` and `id`).
    Request,
    /// 1: a JSON-RPC response with a `result`.
    Response,
    /// 2: a JSON-RPC notification (`method`, no `id`).
    Notification,
    /// 3: a JSON-RPC response with an `error`.
    Error,
    /// 4: a frame-level ping; answered with a pong carrying the same sequence id.
    Ping,
    /// 5: the answer to a ping.
    Pong,
    /// 6: several messages in one frame (requires flag 0x4).
    Batch,
    /// 7: a progress notification.
    Progress,
}

impl FrameType {
    /// Every frame type, in code order.
    pub const ALL: [FrameType; 8] = [
        FrameType::Request,
        FrameType::Response,
        FrameType::Notification,
        FrameType::Error,
        FrameType::Ping,
        FrameType::Pong,
        FrameType::Batch,
        FrameType::Progress,
    ];

    /// The code in the header.
    pub fn code(self) -> u8 {
        match self {
            FrameType::Request => 0,
            FrameType::Response => 1,
            FrameType::Notification => 2,
            FrameType::Error => 3,
            FrameType::Ping => 4,
            FrameType::Pong => 5,
            FrameType::Batch => 6,
            FrameType::Progress => 7,
        }
    }

    /// The frame type of a header code; `None` for unknown codes.
    pub fn from_code(code: u8) -> Option<FrameType> {
        FrameType::ALL.get(usize::from(code)).copied()
    }

    /// Lower-case name: "request", "response", "notification", "error",
    /// "ping", "pong", "batch" or "progress".
    pub fn name(self) -> &'static str {
        match self {
            FrameType::Request => "request",
            FrameType::Response => "response",
            FrameType::Notification => "notification",
            FrameType::Error => "error",
            FrameType::Ping => "ping",
            FrameType::Pong => "pong",
            FrameType::Batch => "batch",
            FrameType::Progress => "progress",
        }
    }
}

impl fmt::Display for FrameType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The flag bits of the header (bytes 6 and 7).
pub mod flags {
    /// The payload is gzip (zlib accepted on decode).
    pub const COMPRESSED: u16 = 0x1;
    /// Reserved for encryption; frames carrying it are refused.
    pub const ENCRYPTED: u16 = 0x2;
    /// The payload is a batch of messages (only on batch frames).
    pub const BATCH: u16 = 0x4;
    /// The payload ends with the CRC32 of the wire bytes before it.
    pub const CHECKSUM: u16 = 0x8;
    /// Every bit this version knows.
    pub const KNOWN: u16 = 0xF;

    /// Names of the set bits, e.g. `["compressed", "checksum"]`; unknown bits
    /// as `"0x0010"`.
    pub fn names(flags: u16) -> Vec<String> {
        (0..16)
            .map(|bit| 1u16 << bit)
            .filter(|b| flags & b != 0)
            .map(|b| match b {
                COMPRESSED => "compressed".to_owned(),
                ENCRYPTED => "encrypted".to_owned(),
                BATCH => "batch".to_owned(),
                CHECKSUM => "checksum".to_owned(),
                other => format!("0x{other:04X}"),
            })
            .collect()
    }
}

/// The method code of the header (bytes 16 and 17): a short form of the
/// common JSON-RPC method names, so a receiver can route without parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// 0: the method is named in the payload (or there is none: responses).
    Named,
    /// 1: `initialize`.
    Initialize,
    /// 2: `tool.list`.
    ToolList,
    /// 3: `tool.execute`.
    ToolExecute,
    /// 4: `context.get`.
    ContextGet,
    /// 5: `context.update`.
    ContextUpdate,
    /// 6: `event.subscribe`.
    EventSubscribe,
    /// 7: `event.unsubscribe`.
    EventUnsubscribe,
    /// 8: `ping`.
    Ping,
    /// 9: `pong`.
    Pong,
}

impl Method {
    /// Every method code, in code order.
    pub const ALL: [Method; 10] = [
        Method::Named,
        Method::Initialize,
        Method::ToolList,
        Method::ToolExecute,
        Method::ContextGet,
        Method::ContextUpdate,
        Method::EventSubscribe,
        Method::EventUnsubscribe,
        Method::Ping,
        Method::Pong,
    ];

    /// The code in the header.
    pub fn code(self) -> u16 {
        match self {
            Method::Named => 0,
            Method::Initialize => 1,
            Method::ToolList => 2,
            Method::ToolExecute => 3,
            Method::ContextGet => 4,
            Method::ContextUpdate => 5,
            Method::EventSubscribe => 6,
            Method::EventUnsubscribe => 7,
            Method::Ping => 8,
            Method::Pong => 9,
        }
    }

    /// The method of a header code; `None` for unknown codes.
    pub fn from_code(code: u16) -> Option<Method> {
        Method::ALL.get(usize::from(code)).copied()
    }

    /// "initialize", "tool.list", ..., "pong"; `None` for Named.
    pub fn name(self) -> Option<&'static str> {
        match self {
            Method::Named => None,
            Method::Initialize => Some("initialize"),
            Method::ToolList => Some("tool.list"),
            Method::ToolExecute => Some("tool.execute"),
            Method::ContextGet => Some("context.get"),
            Method::ContextUpdate => Some("context.update"),
            Method::EventSubscribe => Some("event.subscribe"),
            Method::EventUnsubscribe => Some("event.unsubscribe"),
            Method::Ping => Some("ping"),
            Method::Pong => Some("pong"),
        }
    }

    /// The code of a JSON-RPC method name; Named for every name not in the table.
    pub fn from_method_name(name: &str) -> Method {
        Method::ALL
            .into_iter()
            .find(|m| m.name() == Some(name))
            .unwrap_or(Method::Named)
    }
}

/// The fixed 24-byte frame header (the magic is implied).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Frame version; always [`VERSION`] after a successful parse.
    pub version: u8,
    /// What the frame carries.
    pub frame_type: FrameType,
    /// The [`flags`] bits.
    pub flags: u16,
    /// The sender's frame number.
    pub sequence: u64,
    /// The method code.
    pub method: Method,
    /// Reserved; always 0 after a successful parse.
    pub reserved: u16,
    /// Length of the payload on the wire, checksum trailer included.
    pub data_size: u32,
}

impl Header {
    /// Parses and checks the first 24 bytes (magic, version, type, flags, method, reserved).
    pub fn parse(buf: &[u8]) -> Result<Header, FrameError> {
        let Some(h) = buf.first_chunk::<HEADER_LEN>() else {
            return Err(FrameError::TooShort { len: buf.len() });
        };
        let magic = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        if magic != MAGIC {
            return Err(FrameError::BadMagic { found: magic });
        }
        let version = h[4];
        if version != VERSION {
            return Err(FrameError::UnsupportedVersion { version });
        }
        let frame_type =
            FrameType::from_code(h[5]).ok_or(FrameError::UnknownType { code: h[5] })?;
        let flag_bits = u16::from_be_bytes([h[6], h[7]]);
        if flag_bits & !flags::KNOWN != 0 {
            return Err(FrameError::UnknownFlags { flags: flag_bits });
        }
        if flag_bits & flags::ENCRYPTED != 0 {
            return Err(FrameError::Encrypted);
        }
        let batch_flag = flag_bits & flags::BATCH != 0;
        if batch_flag && frame_type != FrameType::Batch {
            return Err(FrameError::BatchFlagOnNonBatch { frame_type });
        }
        if !batch_flag && frame_type == FrameType::Batch {
            return Err(FrameError::BatchWithoutFlag);
        }
        let sequence = u64::from_be_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
        let method_code = u16::from_be_bytes([h[16], h[17]]);
        let method = Method::from_code(method_code)
            .ok_or(FrameError::UnknownMethod { code: method_code })?;
        let reserved = u16::from_be_bytes([h[18], h[19]]);
        if reserved != 0 {
            return Err(FrameError::ReservedNotZero { value: reserved });
        }
        let data_size = u32::from_be_bytes([h[20], h[21], h[22], h[23]]);
        Ok(Header {
            version,
            frame_type,
            flags: flag_bits,
            sequence,
            method,
            reserved,
            data_size,
        })
    }

    /// Appends the 24 header bytes (magic first) to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC.to_be_bytes());
        out.push(self.version);
        out.push(self.frame_type.code());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.sequence.to_be_bytes());
        out.extend_from_slice(&self.method.code().to_be_bytes());
        out.extend_from_slice(&self.reserved.to_be_bytes());
        out.extend_from_slice(&self.data_size.to_be_bytes());
    }
}

/// Size limits of a decoder (and of the encoder, which never produces a
/// frame the decoder with the same limits would refuse).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload on the wire (the header's data size). Default 1 MiB.
    pub max_payload: usize,
    /// Largest payload after decompression. Default 10 MiB.
    pub max_decompressed: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_payload: 1 << 20,
            max_decompressed: 10 << 20,
        }
    }
}

/// How [`encode`] and [`encode_batch`] shape a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncodeOptions {
    /// Compress messages of at least this many bytes (when gzip makes them
    /// smaller); `None` = never.
    pub compress_threshold: Option<usize>,
    /// Append the CRC32 trailer (flag 0x8).
    pub checksum: bool,
    /// gzip level, 0..=9 (higher values count as 9).
    pub level: u32,
}

impl Default for EncodeOptions {
    fn default() -> EncodeOptions {
        EncodeOptions {
            compress_threshold: Some(1024),
            checksum: true,
            level: 1,
        }
    }
}

/// A decoded frame: its header and its payload, ready to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The parsed header.
    pub header: Header,
    /// The payload after the checksum is stripped and decompression (borrowed
    /// when not compressed: decoding an uncompressed frame copies nothing).
    pub payload: Cow<'a, [u8]>,
    /// The number of messages of a batch frame (checked at decode).
    batch_count: Option<u32>,
    /// The CRC32 trailer, when the frame has one.
    crc: Option<u32>,
}

impl<'a> Frame<'a> {
    /// The JSON-RPC messages: one for a plain frame, each entry of a batch.
    pub fn messages(&self) -> impl Iterator<Item = &[u8]> {
        match self.batch_count {
            Some(count) => Messages {
                whole: None,
                rest: self.payload.get(4..).unwrap_or_default(),
                left: count,
            },
            None => Messages {
                whole: Some(&self.payload),
                rest: &[],
                left: 0,
            },
        }
    }

    /// How many messages [`Frame::messages`] yields.
    pub fn message_count(&self) -> usize {
        self.batch_count.map_or(1, |c| c as usize)
    }

    /// Whether the payload was compressed on the wire (flag 0x1).
    pub fn is_compressed(&self) -> bool {
        self.header.flags & flags::COMPRESSED != 0
    }

    /// Whether the frame carried a CRC32 trailer (flag 0x8).
    pub fn has_checksum(&self) -> bool {
        self.header.flags & flags::CHECKSUM != 0
    }

    /// Whether the frame is a batch (flag 0x4).
    pub fn is_batch(&self) -> bool {
        self.header.flags & flags::BATCH != 0
    }

    /// The CRC32 trailer (already verified), when the frame carried one.
    pub fn crc32(&self) -> Option<u32> {
        self.crc
    }

    /// Takes the frame out of the buffer it was decoded from.
    pub fn into_owned(self) -> Frame<'static> {
        Frame {
            header: self.header,
            payload: Cow::Owned(self.payload.into_owned()),
            batch_count: self.batch_count,
            crc: self.crc,
        }
    }
}

/// Walks the messages of a frame whose layout [`decode`] has checked.
struct Messages<'p> {
    whole: Option<&'p [u8]>,
    rest: &'p [u8],
    left: u32,
}

impl<'p> Iterator for Messages<'p> {
    type Item = &'p [u8];

    fn next(&mut self) -> Option<&'p [u8]> {
        if let Some(whole) = self.whole.take() {
            return Some(whole);
        }
        if self.left == 0 {
            return None;
        }
        let (entry, rest) = split_entry(self.rest).ok()?;
        self.rest = rest;
        self.left -= 1;
        Some(entry)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = usize::from(self.whole.is_some()) + self.left as usize;
        (n, Some(n))
    }
}

/// What is wrong with a frame, or why a frame cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    /// Fewer bytes than the header.
    #[error(
        "frame of {len} bytes is shorter than the 24-byte header; a binary frame starts with a full MCPW header"
    )]
    TooShort {
        /// Bytes received.
        len: usize,
    },
    /// The first four bytes are not "MCPW".
    #[error(
        "invalid magic number 0x{found:08X}, expected 0x4D435057 (\"MCPW\"); is this a binary meshgate frame?"
    )]
    BadMagic {
        /// The four bytes found, big-endian.
        found: u32,
    },
    /// A version this codec does not speak.
    #[error("unsupported version {version} (this gateway speaks version 1)")]
    UnsupportedVersion {
        /// The version byte found.
        version: u8,
    },
    /// A type code outside 0..=7.
    #[error(
        "unknown frame type {code}; known are 0 request, 1 response, 2 notification, 3 error, 4 ping, 5 pong, 6 batch, 7 progress"
    )]
    UnknownType {
        /// The type byte found.
        code: u8,
    },
    /// Flag bits this version does not define.
    #[error(
        "unknown flag bits 0x{unknown:04X} in flags 0x{flags:04X}; known are 0x1 compressed, 0x2 encrypted, 0x4 batch, 0x8 checksum",
        unknown = flags & !flags::KNOWN
    )]
    UnknownFlags {
        /// The whole flags field.
        flags: u16,
    },
    /// Flag 0x2.
    #[error("encrypted frames (flag 0x2) are reserved and not supported")]
    Encrypted,
    /// The batch flag on a frame that is not a batch.
    #[error(
        "batch flag 0x4 set on a {frame_type} frame (type {code}); only batch frames (type 6) carry it",
        code = frame_type.code()
    )]
    BatchFlagOnNonBatch {
        /// The frame's type.
        frame_type: FrameType,
    },
    /// A batch frame without the batch flag.
    #[error("batch frame (type 6) without the batch flag 0x4; batch frames must set it")]
    BatchWithoutFlag,
    /// A method code outside 0..=9.
    #[error("unknown method code {code}; known are 0 (named in the payload) to 9 (pong)")]
    UnknownMethod {
        /// The method code found.
        code: u16,
    },
    /// A non-zero reserved field.
    #[error("reserved header field is 0x{value:04X}; it must be 0 in version 1")]
    ReservedNotZero {
        /// The value found.
        value: u16,
    },
    /// The header announces more payload than the limit allows.
    #[error(
        "payload of {size} bytes exceeds the limit of {limit} bytes; send smaller messages or raise the limit"
    )]
    PayloadTooLarge {
        /// The header's data size.
        size: usize,
        /// The configured `max_payload`.
        limit: usize,
    },
    /// The header's data size differs from the bytes after the header.
    #[error(
        "size mismatch: header says {header}, got {actual} payload bytes after the 24-byte header"
    )]
    SizeMismatch {
        /// The header's data size.
        header: u32,
        /// Bytes present after the header.
        actual: usize,
    },
    /// Flag 0x8 on a payload too short to hold the trailer.
    #[error(
        "checksum flag 0x8 set but the payload has only {len} bytes, fewer than the 4-byte CRC32 trailer"
    )]
    ChecksumTooShort {
        /// The payload length.
        len: usize,
    },
    /// The CRC32 trailer does not match the payload.
    #[error(
        "checksum mismatch: the frame carries CRC32 0x{expected:08X}, the payload hashes to 0x{actual:08X}; the frame was corrupted on the way"
    )]
    ChecksumMismatch {
        /// The trailer's value.
        expected: u32,
        /// The CRC32 of the payload received.
        actual: u32,
    },
    /// Decompression would produce more than the limit.
    #[error(
        "decompressed size exceeds {limit} bytes (the max_decompressed limit); refusing the frame"
    )]
    DecompressedTooLarge {
        /// The configured `max_decompressed`.
        limit: usize,
    },
    /// The compressed stream is damaged or truncated.
    #[error("corrupt {format} data in a compressed frame: {reason}")]
    CorruptCompressed {
        /// "gzip" or "zlib".
        format: &'static str,
        /// What the decompressor reported.
        reason: String,
    },
    /// Bytes after the end of the compressed stream.
    #[error(
        "{count} bytes after the end of the {format} stream in a compressed frame; one stream per frame"
    )]
    TrailingCompressed {
        /// "gzip" or "zlib".
        format: &'static str,
        /// How many bytes follow the stream.
        count: usize,
    },
    /// Flag 0x1 on a payload that is neither gzip nor zlib.
    #[error("compressed frame (flag 0x1) holds neither gzip nor zlib data: it starts with {head}")]
    UnknownCompression {
        /// The first bytes in hex, or "nothing" for an empty payload.
        head: String,
    },
    /// A batch payload too short for its count.
    #[error("batch payload of {len} bytes is too short for its 4-byte message count")]
    BatchTooShort {
        /// The payload length.
        len: usize,
    },
    /// A batch of zero messages.
    #[error("empty batch: a batch frame must hold at least one message")]
    EmptyBatch,
    /// A batch count that the bytes present cannot hold.
    #[error(
        "batch count {count} needs at least {needed} bytes of length prefixes, only {remaining} follow",
        needed = u64::from(*count) * 4
    )]
    BatchCountTooLarge {
        /// The count found.
        count: u32,
        /// Bytes after the count.
        remaining: usize,
    },
    /// A batch entry that runs past the payload.
    #[error(
        "truncated batch: entry {index} needs {needed} bytes for its {part}, only {remaining} remain"
    )]
    TruncatedBatch {
        /// Index of the entry, from 0.
        index: u32,
        /// "length prefix" or "message".
        part: &'static str,
        /// Bytes the part needs.
        needed: usize,
        /// Bytes left in the payload.
        remaining: usize,
    },
    /// Bytes after the last entry of a batch.
    #[error("{count} trailing bytes after the last batch entry")]
    TrailingBatchBytes {
        /// How many bytes follow the last entry.
        count: usize,
    },
    /// The encoder would produce a payload over the limit.
    #[error(
        "cannot encode: the frame payload would be {size} bytes, over the max_payload limit of {limit} bytes; split the message or raise the limit"
    )]
    TooLargeToEncode {
        /// The wire payload size it would have.
        size: usize,
        /// The configured `max_payload` (or the u32 range of the data size).
        limit: usize,
    },
    /// [`encode`] asked for a batch frame.
    #[error("cannot encode a batch frame with `encode`; use `encode_batch`")]
    BatchNeedsEncodeBatch,
}

impl FrameError {
    /// A short snake_case label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            FrameError::TooShort { .. } => "too_short",
            FrameError::BadMagic { .. } => "bad_magic",
            FrameError::UnsupportedVersion { .. } => "unsupported_version",
            FrameError::UnknownType { .. } => "unknown_type",
            FrameError::UnknownFlags { .. } => "unknown_flags",
            FrameError::Encrypted => "encrypted",
            FrameError::BatchFlagOnNonBatch { .. } | FrameError::BatchWithoutFlag => {
                "batch_flag_mismatch"
            }
            FrameError::UnknownMethod { .. } => "unknown_method",
            FrameError::ReservedNotZero { .. } => "reserved_not_zero",
            FrameError::PayloadTooLarge { .. } => "payload_too_large",
            FrameError::SizeMismatch { .. } => "size_mismatch",
            FrameError::ChecksumTooShort { .. } => "checksum_too_short",
            FrameError::ChecksumMismatch { .. } => "checksum_mismatch",
            FrameError::DecompressedTooLarge { .. } => "decompressed_too_large",
            FrameError::CorruptCompressed { .. } => "corrupt_compressed",
            FrameError::TrailingCompressed { .. } => "trailing_compressed",
            FrameError::UnknownCompression { .. } => "unknown_compression",
            FrameError::BatchTooShort { .. } => "batch_too_short",
            FrameError::EmptyBatch => "empty_batch",
            FrameError::BatchCountTooLarge { .. } => "batch_count_too_large",
            FrameError::TruncatedBatch { .. } => "truncated_batch",
            FrameError::TrailingBatchBytes { .. } => "trailing_batch_bytes",
            FrameError::TooLargeToEncode { .. } => "too_large_to_encode",
            FrameError::BatchNeedsEncodeBatch => "batch_needs_encode_batch",
        }
    }
}

/// Decodes one frame: checks the header, the sizes and the checksum,
/// decompresses and checks the batch layout (see the module doc for the order).
pub fn decode<'a>(buf: &'a [u8], limits: &Limits) -> Result<Frame<'a>, FrameError> {
    let header = Header::parse(buf)?;
    let declared = header.data_size as usize;
    if declared > limits.max_payload {
        return Err(FrameError::PayloadTooLarge {
            size: declared,
            limit: limits.max_payload,
        });
    }
    let wire = buf.get(HEADER_LEN..).unwrap_or_default();
    if wire.len() != declared {
        return Err(FrameError::SizeMismatch {
            header: header.data_size,
            actual: wire.len(),
        });
    }
    let (body, crc) = if header.flags & flags::CHECKSUM != 0 {
        let Some((body, trailer)) = wire.split_last_chunk::<CHECKSUM_LEN>() else {
            return Err(FrameError::ChecksumTooShort { len: wire.len() });
        };
        let expected = u32::from_be_bytes(*trailer);
        let actual = crc32fast::hash(body);
        if expected != actual {
            return Err(FrameError::ChecksumMismatch { expected, actual });
        }
        (body, Some(expected))
    } else {
        (wire, None)
    };
    let payload = if header.flags & flags::COMPRESSED != 0 {
        Cow::Owned(inflate(body, limits.max_decompressed)?)
    } else {
        Cow::Borrowed(body)
    };
    let batch_count = if header.flags & flags::BATCH != 0 {
        Some(check_batch(&payload)?)
    } else {
        None
    };
    Ok(Frame {
        header,
        payload,
        batch_count,
        crc,
    })
}

/// Encodes one message as a frame of `frame_type` (anything but
/// [`FrameType::Batch`]; use [`encode_batch`] for that).
pub fn encode(
    frame_type: FrameType,
    method: Method,
    sequence: u64,
    message: &[u8],
    opts: &EncodeOptions,
    limits: &Limits,
) -> Result<Vec<u8>, FrameError> {
    if frame_type == FrameType::Batch {
        return Err(FrameError::BatchNeedsEncodeBatch);
    }
    let head = FrameHead {
        frame_type,
        method,
        sequence,
        flags: 0,
    };
    build(head, message, opts, limits)
}

/// Encodes several messages as one batch frame (type 6, flag 0x4, method 0).
pub fn encode_batch(
    sequence: u64,
    messages: &[&[u8]],
    opts: &EncodeOptions,
    limits: &Limits,
) -> Result<Vec<u8>, FrameError> {
    if messages.is_empty() {
        return Err(FrameError::EmptyBatch);
    }
    let body_len = messages
        .iter()
        .fold(4usize, |n, m| n.saturating_add(4).saturating_add(m.len()));
    let trailer = if opts.checksum { CHECKSUM_LEN } else { 0 };
    // Beyond both limits the frame can be neither sent as it is nor compressed
    // (the receiver would refuse the decompressed size): refuse before building it.
    if body_len > limits.max_decompressed && body_len.saturating_add(trailer) > limits.max_payload {
        return Err(FrameError::TooLargeToEncode {
            size: body_len.saturating_add(trailer),
            limit: limits.max_payload,
        });
    }
    let too_large = || FrameError::TooLargeToEncode {
        size: body_len.saturating_add(trailer),
        limit: u32::MAX as usize,
    };
    let mut body = Vec::with_capacity(body_len);
    body.extend_from_slice(
        &u32::try_from(messages.len())
            .map_err(|_| too_large())?
            .to_be_bytes(),
    );
    for m in messages {
        body.extend_from_slice(
            &u32::try_from(m.len())
                .map_err(|_| too_large())?
                .to_be_bytes(),
        );
        body.extend_from_slice(m);
    }
    let head = FrameHead {
        frame_type: FrameType::Batch,
        method: Method::Named,
        sequence,
        flags: flags::BATCH,
    };
    build(head, &body, opts, limits)
}

/// The header fields the caller chooses.
struct FrameHead {
    frame_type: FrameType,
    method: Method,
    sequence: u64,
    flags: u16,
}

/// Compresses (when asked and worth it), checks the size and lays out the frame.
fn build(
    head: FrameHead,
    body: &[u8],
    opts: &EncodeOptions,
    limits: &Limits,
) -> Result<Vec<u8>, FrameError> {
    // A body over max_decompressed is never compressed: the receiver would refuse it.
    let compress = opts.compress_threshold.is_some_and(|t| body.len() >= t)
        && body.len() <= limits.max_decompressed;
    let gz = if compress {
        gzip(body, opts.level).filter(|z| z.len() < body.len())
    } else {
        None
    };
    let mut frame_flags = head.flags;
    let wire_body = match &gz {
        Some(z) => {
            frame_flags |= flags::COMPRESSED;
            z.as_slice()
        }
        None => body,
    };
    if opts.checksum {
        frame_flags |= flags::CHECKSUM;
    }
    let trailer = if opts.checksum { CHECKSUM_LEN } else { 0 };
    let size = wire_body.len().saturating_add(trailer);
    if size > limits.max_payload {
        return Err(FrameError::TooLargeToEncode {
            size,
            limit: limits.max_payload,
        });
    }
    let data_size = u32::try_from(size).map_err(|_| FrameError::TooLargeToEncode {
        size,
        limit: u32::MAX as usize,
    })?;
    let header = Header {
        version: VERSION,
        frame_type: head.frame_type,
        flags: frame_flags,
        sequence: head.sequence,
        method: head.method,
        reserved: 0,
        data_size,
    };
    let mut out = Vec::with_capacity(HEADER_LEN + size);
    header.write_to(&mut out);
    out.extend_from_slice(wire_body);
    if opts.checksum {
        out.extend_from_slice(&crc32fast::hash(wire_body).to_be_bytes());
    }
    Ok(out)
}

/// gzip of `data`; `None` if the encoder fails (it cannot, writing to memory).
fn gzip(data: &[u8], level: u32) -> Option<Vec<u8>> {
    use std::io::Write;
    let out = Vec::with_capacity(data.len() / 4 + 64);
    let mut enc = flate2::write::GzEncoder::new(out, flate2::Compression::new(level.min(9)));
    enc.write_all(data).ok()?;
    enc.finish().ok()
}

/// The compressed formats the decoder accepts.
#[derive(Clone, Copy)]
enum Codec {
    Gzip,
    Zlib,
}

impl Codec {
    /// Recognises gzip by its magic bytes and zlib by its header check.
    fn sniff(data: &[u8]) -> Option<Codec> {
        match data {
            [0x1F, 0x8B, ..] => Some(Codec::Gzip),
            [cmf, flg, ..]
                if cmf & 0x0F == 8
                    && cmf >> 4 <= 7
                    && (u16::from(*cmf) << 8 | u16::from(*flg)) % 31 == 0 =>
            {
                Some(Codec::Zlib)
            }
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Codec::Gzip => "gzip",
            Codec::Zlib => "zlib",
        }
    }
}

/// Decompresses a gzip or zlib payload of at most `limit` bytes, with no
/// bytes after the stream.
fn inflate(data: &[u8], limit: usize) -> Result<Vec<u8>, FrameError> {
    let Some(codec) = Codec::sniff(data) else {
        let head = if data.is_empty() {
            "nothing (the payload is empty)".to_owned()
        } else {
            let hex: String = data.iter().take(4).map(|b| format!("{b:02X}")).collect();
            format!("0x{hex}")
        };
        return Err(FrameError::UnknownCompression { head });
    };
    let mut out = Vec::new();
    let hint = data.len().saturating_mul(4);
    let (read, rest) = match codec {
        Codec::Gzip => {
            let mut dec = flate2::bufread::GzDecoder::new(data);
            (
                read_capped(&mut dec, limit, hint, &mut out),
                dec.get_ref().len(),
            )
        }
        Codec::Zlib => {
            let mut dec = flate2::bufread::ZlibDecoder::new(data);
            (
                read_capped(&mut dec, limit, hint, &mut out),
                dec.get_ref().len(),
            )
        }
    };
    match read {
        Ok(()) if rest == 0 => Ok(out),
        Ok(()) => Err(FrameError::TrailingCompressed {
            format: codec.name(),
            count: rest,
        }),
        Err(Capped::TooLarge) => Err(FrameError::DecompressedTooLarge { limit }),
        Err(Capped::Io(e)) => Err(FrameError::CorruptCompressed {
            format: codec.name(),
            reason: e.to_string(),
        }),
    }
}

/// Why [`read_capped`] stopped.
enum Capped {
    TooLarge,
    Io(std::io::Error),
}

/// Smallest step by which decompression output grows.
const MIN_GROWTH: usize = 8 * 1024;

/// Reads `reader` to its end into `out` through `take(limit + 1)`, so an
/// over-limit stream is noticed after one byte too many. The buffer starts
/// at `hint` bytes and doubles, each step reserved exactly and capped at
/// `limit + 1`.
fn read_capped<R: Read>(
    reader: R,
    limit: usize,
    hint: usize,
    out: &mut Vec<u8>,
) -> Result<(), Capped> {
    let cap = limit.saturating_add(1);
    let mut reader = reader.take(cap as u64);
    let mut filled = 0;
    loop {
        if filled == out.len() {
            if filled >= cap {
                break;
            }
            let step = filled.max(hint).max(MIN_GROWTH).min(cap - filled);
            out.reserve_exact(step);
            out.resize(filled + step, 0);
        }
        match reader.read(&mut out[filled..]) {
            Ok(0) => break,
            Ok(n) => filled = (filled + n).min(out.len()),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(Capped::Io(e)),
        }
    }
    out.truncate(filled);
    if filled > limit {
        return Err(Capped::TooLarge);
    }
    Ok(())
}

/// What a batch entry is missing: which part, how many bytes it needs and
/// how many are left.
struct ShortEntry {
    part: &'static str,
    needed: usize,
    remaining: usize,
}

/// Splits one `u32 length + bytes` entry off the front of a batch; returns
/// the message and the rest.
fn split_entry(rest: &[u8]) -> Result<(&[u8], &[u8]), ShortEntry> {
    let Some((len, after)) = rest.split_first_chunk::<4>() else {
        return Err(ShortEntry {
            part: "length prefix",
            needed: 4,
            remaining: rest.len(),
        });
    };
    let len = u32::from_be_bytes(*len) as usize;
    after.split_at_checked(len).ok_or(ShortEntry {
        part: "message",
        needed: len,
        remaining: after.len(),
    })
}

/// Checks the layout of a batch payload and returns its message count.
fn check_batch(payload: &[u8]) -> Result<u32, FrameError> {
    let Some((count, mut rest)) = payload.split_first_chunk::<4>() else {
        return Err(FrameError::BatchTooShort { len: payload.len() });
    };
    let count = u32::from_be_bytes(*count);
    if count == 0 {
        return Err(FrameError::EmptyBatch);
    }
    // Every entry has at least its 4-byte length: a count the payload cannot
    // hold is refused before any entry is walked.
    if (count as usize).saturating_mul(4) > rest.len() {
        return Err(FrameError::BatchCountTooLarge {
            count,
            remaining: rest.len(),
        });
    }
    for index in 0..count {
        let (_, after) = split_entry(rest).map_err(|short| FrameError::TruncatedBatch {
            index,
            part: short.part,
            needed: short.needed,
            remaining: short.remaining,
        })?;
        rest = after;
    }
    if !rest.is_empty() {
        return Err(FrameError::TrailingBatchBytes { count: rest.len() });
    }
    Ok(count)
}

/// A member that is only noticed, never read.
#[derive(Default)]
struct Present(bool);

impl<'de> Deserialize<'de> for Present {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Present, D::Error> {
        IgnoredAny::deserialize(d).map(|_| Present(true))
    }
}

/// The members [`classify`] looks at.
#[derive(Deserialize)]
struct Sniff<'a> {
    #[serde(default)]
    id: Present,
    #[serde(borrow, default)]
    method: Option<Cow<'a, str>>,
    #[serde(default)]
    result: Present,
    #[serde(default)]
    error: Option<IgnoredAny>,
}

/// Sniffs a JSON-RPC message's frame type and method code without building a Value: an "error" member → Error, "result" → Response, "method" with "id" → Request, "method" without id → Notification, except the methods "task.progress" and "notifications/progress" → Progress. Never fails: junk → (Notification, Named).
///
/// An `"error": null` member does not count (some peers send it beside a
/// `result`); an `"id"` member counts whatever its value. Progress applies to
/// notifications: a request by that name still expects its answer.
pub fn classify(message: &[u8]) -> (FrameType, Method) {
    const JUNK: (FrameType, Method) = (FrameType::Notification, Method::Named);
    // Only an object: serde would read a JSON array into the struct by position.
    if message.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return JUNK;
    }
    // serde_json skips ignored strings without checking their UTF-8; checking
    // the whole message first keeps invalid JSON out of the Request class.
    let Ok(text) = std::str::from_utf8(message) else {
        return JUNK;
    };
    let Ok(sniff) = serde_json::from_str::<Sniff<'_>>(text) else {
        return JUNK;
    };
    if sniff.error.is_some() {
        return (FrameType::Error, Method::Named);
    }
    if sniff.result.0 {
        return (FrameType::Response, Method::Named);
    }
    match sniff.method {
        Some(name) if sniff.id.0 => (FrameType::Request, Method::from_method_name(&name)),
        Some(name) if name == "task.progress" || name == "notifications/progress" => {
            (FrameType::Progress, Method::Named)
        }
        Some(name) => (FrameType::Notification, Method::from_method_name(&name)),
        None => JUNK,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;

    /// Counts the bytes each thread has allocated, so a test can bound what
    /// one decode allocates while other tests run on other threads.
    mod probe {
        use std::alloc::{GlobalAlloc, Layout, System};
        use std::cell::Cell;

        thread_local! {
            static LIVE: Cell<usize> = const { Cell::new(0) };
            static PEAK: Cell<usize> = const { Cell::new(0) };
        }

        fn grew(n: usize) {
            let _ = LIVE.try_with(|live| {
                let now = live.get().saturating_add(n);
                live.set(now);
                let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
            });
        }

        fn shrank(n: usize) {
            let _ = LIVE.try_with(|live| live.set(live.get().saturating_sub(n)));
        }

        pub struct Probe;

        // SAFETY: every call is forwarded to the system allocator unchanged.
        unsafe impl GlobalAlloc for Probe {
            unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
                let p = unsafe { System.alloc(layout) };
                if !p.is_null() {
                    grew(layout.size());
                }
                p
            }
            unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
                let p = unsafe { System.alloc_zeroed(layout) };
                if !p.is_null() {
                    grew(layout.size());
                }
                p
            }
            unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
                unsafe { System.dealloc(ptr, layout) };
                shrank(layout.size());
            }
            // A large realloc moves pages (mremap); it is counted as the
            // block changing size, not as old and new side by side.
            unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
                let p = unsafe { System.realloc(ptr, layout, new_size) };
                if !p.is_null() {
                    shrank(layout.size());
                    grew(new_size);
                }
                p
            }
        }

        /// Runs `f` and returns its result and the most bytes it had
        /// allocated at once on this thread.
        pub fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
            let base = LIVE.with(Cell::get);
            PEAK.with(|p| p.set(base));
            let out = f();
            (out, PEAK.with(Cell::get).saturating_sub(base))
        }
    }

    #[global_allocator]
    static PROBE: probe::Probe = probe::Probe;

    const REQUEST: &[u8] =
        br#"{"jsonrpc":"2.0","id":7,"method":"tool.execute","params":{"name":"echo","arguments":{"text":"hi"}}}"#;

    /// A frame with every header field chosen by the caller and a correct data size.
    fn raw(frame_type: u8, flag_bits: u16, method: u16, reserved: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_be_bytes());
        out.push(VERSION);
        out.push(frame_type);
        out.extend_from_slice(&flag_bits.to_be_bytes());
        out.extend_from_slice(&42u64.to_be_bytes());
        out.extend_from_slice(&method.to_be_bytes());
        out.extend_from_slice(&reserved.to_be_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn with_crc(body: &[u8]) -> Vec<u8> {
        let mut out = body.to_vec();
        out.extend_from_slice(&crc32fast::hash(body).to_be_bytes());
        out
    }

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn batch_body(entries: &[&[u8]]) -> Vec<u8> {
        let mut out = (entries.len() as u32).to_be_bytes().to_vec();
        for e in entries {
            out.extend_from_slice(&(e.len() as u32).to_be_bytes());
            out.extend_from_slice(e);
        }
        out
    }

    fn err(buf: &[u8]) -> FrameError {
        decode(buf, &Limits::default()).unwrap_err()
    }

    /// A task result with prose in it, the size of `len` roughly.
    fn task_result(len: usize) -> Vec<u8> {
        let words = [
            "the", "agent", "read", "files", "and", "wrote", "a", "summary", "of", "changes",
        ];
        let mut text = String::new();
        let mut i = 0usize;
        while text.len() < len {
            text.push_str(words[i % words.len()]);
            text.push(' ');
            i = i.wrapping_mul(31).wrapping_add(7);
        }
        serde_json::json!({"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": text}]}})
            .to_string()
            .into_bytes()
    }

    /// Bytes that do not compress (xorshift).
    fn noise(len: usize) -> Vec<u8> {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect()
    }

    #[test]
    fn codes_and_names_round_trip() {
        for t in FrameType::ALL {
            assert_eq!(FrameType::from_code(t.code()), Some(t));
        }
        assert_eq!(FrameType::from_code(8), None);
        assert_eq!(FrameType::Notification.name(), "notification");
        for m in Method::ALL {
            assert_eq!(Method::from_code(m.code()), Some(m));
            if let Some(name) = m.name() {
                assert_eq!(Method::from_method_name(name), m);
            }
        }
        assert_eq!(Method::from_code(10), None);
        assert_eq!(Method::ToolList.name(), Some("tool.list"));
        assert_eq!(Method::from_method_name("tools/call"), Method::Named);
        assert_eq!(flags::names(0x9), ["compressed", "checksum"]);
        assert_eq!(flags::names(0x14), ["batch", "0x0010"]);
        assert!(flags::names(0).is_empty());
    }

    #[test]
    fn header_writes_and_parses_back() {
        let h = Header {
            version: VERSION,
            frame_type: FrameType::Progress,
            flags: flags::CHECKSUM | flags::COMPRESSED,
            sequence: u64::MAX - 1,
            method: Method::EventUnsubscribe,
            reserved: 0,
            data_size: 1234,
        };
        let mut out = Vec::new();
        h.write_to(&mut out);
        assert_eq!(out.len(), HEADER_LEN);
        assert_eq!(&out[..4], b"MCPW");
        assert_eq!(Header::parse(&out), Ok(h));
    }

    #[test]
    fn plain_frame_decodes_without_copying_the_payload() {
        let buf = encode(
            FrameType::Request,
            Method::ToolExecute,
            9,
            REQUEST,
            &EncodeOptions::default(),
            &Limits::default(),
        )
        .unwrap();
        let frame = decode(&buf, &Limits::default()).unwrap();
        assert!(matches!(frame.payload, Cow::Borrowed(_)));
        assert_eq!(frame.payload.as_ptr(), buf[HEADER_LEN..].as_ptr());
        assert_eq!(frame.messages().collect::<Vec<_>>(), [REQUEST]);
        assert_eq!(frame.message_count(), 1);
        assert!(frame.has_checksum() && !frame.is_compressed() && !frame.is_batch());
        assert_eq!(frame.crc32(), Some(crc32fast::hash(REQUEST)));
        assert_eq!(frame.header.sequence, 9);
        assert_eq!(
            frame.header.data_size as usize,
            REQUEST.len() + CHECKSUM_LEN
        );
    }

    #[test]
    fn short_frame_is_refused() {
        let e = err(&[0x4D, 0x43]);
        assert_eq!(e, FrameError::TooShort { len: 2 });
        assert!(
            e.to_string()
                .contains("frame of 2 bytes is shorter than the 24-byte header"),
            "{e}"
        );
    }

    #[test]
    fn bad_magic_names_both_numbers() {
        let mut buf = raw(0, 0, 0, 0, b"{}");
        buf[..4].copy_from_slice(&0x1234_ABCDu32.to_be_bytes());
        let e = err(&buf);
        assert!(
            e.to_string()
                .contains("invalid magic number 0x1234ABCD, expected 0x4D435057"),
            "{e}"
        );
        assert_eq!(e.kind(), "bad_magic");
    }

    #[test]
    fn other_versions_are_refused() {
        let mut buf = raw(0, 0, 0, 0, b"{}");
        buf[4] = 3;
        let e = err(&buf);
        assert!(e.to_string().contains("unsupported version 3"), "{e}");
        assert!(e.to_string().contains("speaks version 1"), "{e}");
    }

    #[test]
    fn unknown_type_flags_method_and_reserved_are_refused() {
        let e = err(&raw(8, 0, 0, 0, b"{}"));
        assert!(e.to_string().starts_with("unknown frame type 8;"), "{e}");
        let e = err(&raw(0, 0x18, 0, 0, b"{}"));
        assert!(
            e.to_string()
                .starts_with("unknown flag bits 0x0010 in flags 0x0018"),
            "{e}"
        );
        let e = err(&raw(0, 0, 10, 0, b"{}"));
        assert!(e.to_string().starts_with("unknown method code 10;"), "{e}");
        let e = err(&raw(0, 0, 0, 1, b"{}"));
        assert!(
            e.to_string()
                .contains("reserved header field is 0x0001; it must be 0"),
            "{e}"
        );
    }

    #[test]
    fn encrypted_frames_are_refused() {
        let e = err(&raw(0, flags::ENCRYPTED, 0, 0, b"{}"));
        assert_eq!(
            e.to_string(),
            "encrypted frames (flag 0x2) are reserved and not supported"
        );
        assert_eq!(e.kind(), "encrypted");
    }

    #[test]
    fn batch_flag_and_batch_type_go_together() {
        let e = err(&raw(1, flags::BATCH, 0, 0, b"{}"));
        assert!(
            e.to_string()
                .contains("batch flag 0x4 set on a response frame (type 1)"),
            "{e}"
        );
        let e = err(&raw(6, 0, 0, 0, b"{}"));
        assert!(
            e.to_string()
                .contains("batch frame (type 6) without the batch flag 0x4"),
            "{e}"
        );
    }

    #[test]
    fn oversized_payload_is_refused_from_the_header_alone() {
        let mut buf = raw(0, 0, 0, 0, b"{}");
        buf[20..24].copy_from_slice(&(2u32 << 20).to_be_bytes());
        let e = err(&buf);
        assert_eq!(
            e,
            FrameError::PayloadTooLarge {
                size: 2 << 20,
                limit: 1 << 20
            }
        );
        assert!(
            e.to_string()
                .contains("payload of 2097152 bytes exceeds the limit of 1048576 bytes"),
            "{e}"
        );
        let small = Limits {
            max_payload: 1,
            max_decompressed: 10,
        };
        assert_eq!(
            decode(&raw(0, 0, 0, 0, b"{}"), &small).unwrap_err().kind(),
            "payload_too_large"
        );
    }

    #[test]
    fn size_mismatch_gives_both_sizes() {
        let mut buf = raw(0, 0, 0, 0, b"{\"a\":1}");
        buf.truncate(buf.len() - 2);
        let e = err(&buf);
        assert!(
            e.to_string()
                .contains("size mismatch: header says 7, got 5"),
            "{e}"
        );
        let mut buf = raw(0, 0, 0, 0, b"{}");
        buf.push(b' ');
        assert!(
            err(&buf)
                .to_string()
                .contains("size mismatch: header says 2, got 3")
        );
    }

    #[test]
    fn checksum_is_checked_over_the_wire_bytes() {
        let mut buf = raw(0, flags::CHECKSUM, 0, 0, &with_crc(REQUEST));
        assert!(decode(&buf, &Limits::default()).is_ok());
        buf[HEADER_LEN + 3] ^= 0x20;
        let e = err(&buf);
        assert_eq!(e.kind(), "checksum_mismatch");
        let text = e.to_string();
        assert!(
            text.starts_with("checksum mismatch: the frame carries CRC32 0x"),
            "{text}"
        );
        let expected = format!("{:08X}", crc32fast::hash(REQUEST));
        assert!(text.contains(&expected), "{text}");
        let e = err(&raw(0, flags::CHECKSUM, 0, 0, b"{}"));
        assert!(
            e.to_string()
                .contains("payload has only 2 bytes, fewer than the 4-byte CRC32 trailer"),
            "{e}"
        );
    }

    #[test]
    fn zlib_and_gzip_payloads_are_accepted() {
        let msg = task_result(4000);
        for body in [gz(&msg), zlib(&msg)] {
            let buf = raw(
                1,
                flags::COMPRESSED | flags::CHECKSUM,
                0,
                0,
                &with_crc(&body),
            );
            let frame = decode(&buf, &Limits::default()).unwrap();
            assert!(frame.is_compressed());
            assert_eq!(frame.messages().collect::<Vec<_>>(), [msg.as_slice()]);
        }
    }

    #[test]
    fn damaged_compressed_payloads_are_refused() {
        let msg = task_result(4000);
        let mut body = gz(&msg);
        body.truncate(body.len() / 2);
        let e = err(&raw(1, flags::COMPRESSED, 0, 0, &body));
        assert!(
            e.to_string()
                .starts_with("corrupt gzip data in a compressed frame:"),
            "{e}"
        );
        let mut body = zlib(&msg);
        let n = body.len();
        body[n - 1] ^= 0xFF;
        let e = err(&raw(1, flags::COMPRESSED, 0, 0, &body));
        assert!(e.to_string().starts_with("corrupt zlib data"), "{e}");
        let e = err(&raw(1, flags::COMPRESSED, 0, 0, REQUEST));
        assert!(
            e.to_string()
                .contains("neither gzip nor zlib data: it starts with 0x7B226A73"),
            "{e}"
        );
        let e = err(&raw(1, flags::COMPRESSED, 0, 0, b""));
        assert_eq!(e.kind(), "unknown_compression");
        let mut body = gz(&msg);
        body.extend_from_slice(b"junk");
        let e = err(&raw(1, flags::COMPRESSED, 0, 0, &body));
        assert!(
            e.to_string()
                .starts_with("4 bytes after the end of the gzip stream"),
            "{e}"
        );
    }

    #[test]
    fn zip_bomb_is_refused_without_allocating_past_the_limit() {
        let bomb = gz(&vec![0u8; 20 << 20]);
        assert!(bomb.len() < 1 << 20);
        let buf = raw(1, flags::COMPRESSED, 0, 0, &bomb);
        let limits = Limits::default();
        let (result, peak) = probe::peak_of(|| decode(&buf, &limits));
        let e = result.unwrap_err();
        assert!(
            e.to_string().contains("decompressed size exceeds 10485760"),
            "{e}"
        );
        assert_eq!(e.kind(), "decompressed_too_large");
        // The output buffer stops at the limit plus one byte; the rest is the
        // inflater's state and window.
        assert!(peak <= limits.max_decompressed + 256 * 1024, "peak {peak}");
        assert!(
            peak > limits.max_decompressed,
            "peak {peak}: the probe did not count"
        );
    }

    #[test]
    fn decompressed_limit_is_inclusive() {
        let msg = task_result(5000);
        let buf = raw(1, flags::COMPRESSED, 0, 0, &gz(&msg));
        let exact = Limits {
            max_payload: 1 << 20,
            max_decompressed: msg.len(),
        };
        assert!(decode(&buf, &exact).is_ok());
        let under = Limits {
            max_decompressed: msg.len() - 1,
            ..exact
        };
        let e = decode(&buf, &under).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "decompressed size exceeds {} bytes (the max_decompressed limit); refusing the frame",
                msg.len() - 1
            )
        );
    }

    #[test]
    fn batch_layout_errors_are_precise() {
        let b = |body: &[u8]| err(&raw(6, flags::BATCH, 0, 0, body)).to_string();
        assert!(
            b(b"\0\0").contains("batch payload of 2 bytes is too short"),
            "{}",
            b(b"\0\0")
        );
        assert!(b(&0u32.to_be_bytes()).starts_with("empty batch"));
        let e = b(&[0, 0, 0, 3, 0, 0, 0, 0]);
        assert!(
            e.contains("batch count 3 needs at least 12 bytes of length prefixes, only 4 follow"),
            "{e}"
        );
        let mut body = batch_body(&[b"{}", b"{\"a\":1}"]);
        body.truncate(body.len() - 1);
        let e = b(&body);
        assert!(
            e.contains("truncated batch: entry 1 needs 7 bytes for its message, only 6 remain"),
            "{e}"
        );
        let body = [0, 0, 0, 2, 0, 0, 0, 1, b'x', 0, 0, 0];
        let e = b(&body);
        assert!(
            e.contains(
                "truncated batch: entry 1 needs 4 bytes for its length prefix, only 3 remain"
            ),
            "{e}"
        );
        let mut body = batch_body(&[b"{}"]);
        body.extend_from_slice(b"zz");
        assert_eq!(b(&body), "2 trailing bytes after the last batch entry");
    }

    #[test]
    fn huge_batch_count_is_refused_before_anything_is_walked() {
        let body = [0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0];
        let (result, peak) = probe::peak_of(|| decode_owned(&raw(6, flags::BATCH, 0, 0, &body)));
        assert_eq!(result.unwrap_err().kind(), "batch_count_too_large");
        assert!(peak < 4096, "peak {peak}");
    }

    fn decode_owned(buf: &[u8]) -> Result<usize, FrameError> {
        decode(buf, &Limits::default()).map(|f| f.message_count())
    }

    #[test]
    fn batch_frames_round_trip() {
        let msgs: [&[u8]; 3] = [REQUEST, b"", b"{\"jsonrpc\":\"2.0\",\"method\":\"ping\"}"];
        let buf = encode_batch(5, &msgs, &EncodeOptions::default(), &Limits::default()).unwrap();
        let frame = decode(&buf, &Limits::default()).unwrap();
        assert!(frame.is_batch());
        assert_eq!(frame.header.frame_type, FrameType::Batch);
        assert_eq!(frame.message_count(), 3);
        assert_eq!(frame.messages().collect::<Vec<_>>(), msgs);
        assert_eq!(frame.messages().size_hint(), (3, Some(3)));
        assert_eq!(
            encode_batch(5, &[], &EncodeOptions::default(), &Limits::default()).unwrap_err(),
            FrameError::EmptyBatch
        );
    }

    #[test]
    fn compression_is_used_only_when_it_pays() {
        let opts = EncodeOptions::default();
        let limits = Limits::default();
        let big = task_result(8000);
        let buf = encode(FrameType::Response, Method::Named, 1, &big, &opts, &limits).unwrap();
        assert!(buf.len() < big.len() / 2);
        assert!(decode(&buf, &limits).unwrap().is_compressed());
        // Under the threshold: sent as it is.
        let buf = encode(
            FrameType::Response,
            Method::Named,
            1,
            &big[..1000],
            &opts,
            &limits,
        )
        .unwrap();
        assert!(!decode(&buf, &limits).unwrap().is_compressed());
        // Incompressible: gzip would be larger, so it is not used.
        let noise = noise(4096);
        let always = EncodeOptions {
            compress_threshold: Some(0),
            ..opts
        };
        let buf = encode(
            FrameType::Response,
            Method::Named,
            1,
            &noise,
            &always,
            &limits,
        )
        .unwrap();
        assert!(!decode(&buf, &limits).unwrap().is_compressed());
        let never = EncodeOptions {
            compress_threshold: None,
            checksum: false,
            level: 9,
        };
        let buf = encode(FrameType::Response, Method::Named, 1, &big, &never, &limits).unwrap();
        assert_eq!(buf.len(), HEADER_LEN + big.len());
    }

    #[test]
    fn encode_refuses_payloads_over_the_limit() {
        let limits = Limits {
            max_payload: 100,
            max_decompressed: 1000,
        };
        let plain = EncodeOptions {
            compress_threshold: None,
            ..EncodeOptions::default()
        };
        let e = encode(
            FrameType::Request,
            Method::Named,
            1,
            &[b'x'; 97],
            &plain,
            &limits,
        )
        .unwrap_err();
        assert_eq!(
            e,
            FrameError::TooLargeToEncode {
                size: 101,
                limit: 100
            }
        );
        assert!(
            e.to_string()
                .contains("would be 101 bytes, over the max_payload limit of 100 bytes"),
            "{e}"
        );
        // Compressible past max_payload, but within max_decompressed: fine.
        let eager = EncodeOptions {
            compress_threshold: Some(0),
            ..EncodeOptions::default()
        };
        let ok = encode(
            FrameType::Request,
            Method::Named,
            1,
            &[b'x'; 900],
            &eager,
            &limits,
        );
        assert!(decode(&ok.unwrap(), &limits).is_ok());
        // Past max_decompressed it may not be compressed, so it is too large.
        let e = encode(
            FrameType::Request,
            Method::Named,
            1,
            &[b'x'; 1001],
            &eager,
            &limits,
        );
        assert_eq!(e.unwrap_err().kind(), "too_large_to_encode");
        let e = encode_batch(1, &[&[b'x'; 2000]], &eager, &limits);
        assert_eq!(e.unwrap_err().kind(), "too_large_to_encode");
        let e = encode(FrameType::Batch, Method::Named, 1, b"{}", &plain, &limits).unwrap_err();
        assert_eq!(e, FrameError::BatchNeedsEncodeBatch);
    }

    #[test]
    fn classify_reads_the_kind_of_message() {
        let c = |s: &str| classify(s.as_bytes());
        assert_eq!(
            c(r#"{"jsonrpc":"2.0","id":1,"method":"tool.list"}"#),
            (FrameType::Request, Method::ToolList)
        );
        assert_eq!(
            c(r#"{"jsonrpc":"2.0","id":null,"method":"initialize"}"#),
            (FrameType::Request, Method::Initialize)
        );
        assert_eq!(
            c(r#"{"jsonrpc":"2.0","id":"a","method":"tools/call"}"#),
            (FrameType::Request, Method::Named)
        );
        assert_eq!(
            c(r#"{"method":"event.subscribe","jsonrpc":"2.0"}"#),
            (FrameType::Notification, Method::EventSubscribe)
        );
        assert_eq!(
            c(r#"{"jsonrpc":"2.0","method":"task.progress","params":{}}"#),
            (FrameType::Progress, Method::Named)
        );
        assert_eq!(
            c(r#"{"jsonrpc":"2.0","method":"notifications\/progress"}"#),
            (FrameType::Progress, Method::Named)
        );
        assert_eq!(
            c(r#"{"jsonrpc":"2.0","id":3,"result":null}"#),
            (FrameType::Response, Method::Named)
        );
        assert_eq!(
            c(r#"{"jsonrpc":"2.0","id":3,"error":{"code":1,"message":"x"}}"#),
            (FrameType::Error, Method::Named)
        );
        assert_eq!(
            c(r#"{"jsonrpc":"2.0","id":3,"result":{},"error":null}"#),
            (FrameType::Response, Method::Named)
        );
        let mut bad_utf8 =
            br#"{"jsonrpc":"2.0","id":7,"method":"ping","params":{"x":"??"}}"#.to_vec();
        let at = bad_utf8.len() - 5;
        bad_utf8[at] = 0xFF;
        assert_eq!(
            classify(&bad_utf8),
            (FrameType::Notification, Method::Named)
        );
        for junk in [
            "",
            "[1,\"ping\"]",
            "{",
            "null",
            "{\"method\":3}",
            "{\"id\":1,\"id\":2,\"method\":\"ping\"}",
            "\u{feff}{}",
        ] {
            assert_eq!(
                c(junk),
                (FrameType::Notification, Method::Named),
                "{junk:?}"
            );
        }
    }

    #[test]
    fn every_error_kind_is_snake_case() {
        let errors = [
            err(b""),
            err(&raw(9, 0, 0, 0, b"")),
            err(&raw(0, 0, 0, 0, b"{}")[..20]),
            FrameError::EmptyBatch,
        ];
        for e in errors {
            assert!(
                e.kind().chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{}",
                e.kind()
            );
        }
    }

    fn any_type() -> impl Strategy<Value = FrameType> {
        prop::sample::select(FrameType::ALL.to_vec())
    }

    fn any_method() -> impl Strategy<Value = Method> {
        prop::sample::select(Method::ALL.to_vec())
    }

    /// Messages that compress (repeated JSON), that do not (noise), and tiny ones.
    fn any_message() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            (0usize..3000).prop_map(task_result),
            prop::collection::vec(any::<u8>(), 0..3000),
            prop::collection::vec(any::<u8>(), 0..8),
        ]
    }

    fn any_options() -> impl Strategy<Value = EncodeOptions> {
        (prop::option::of(0usize..2048), any::<bool>(), 0u32..=9).prop_map(|(t, c, l)| {
            EncodeOptions {
                compress_threshold: t,
                checksum: c,
                level: l,
            }
        })
    }

    /// A valid frame of any shape, and the messages it holds.
    fn any_frame() -> impl Strategy<Value = (Vec<u8>, Vec<Vec<u8>>)> {
        (
            any_type(),
            any_method(),
            any::<u64>(),
            prop::collection::vec(any_message(), 1..4),
            any_options(),
        )
            .prop_map(|(t, m, seq, msgs, opts)| {
                let limits = Limits::default();
                if t == FrameType::Batch {
                    let refs: Vec<&[u8]> = msgs.iter().map(Vec::as_slice).collect();
                    (encode_batch(seq, &refs, &opts, &limits).unwrap(), msgs)
                } else {
                    let one = msgs.into_iter().next().unwrap_or_default();
                    (encode(t, m, seq, &one, &opts, &limits).unwrap(), vec![one])
                }
            })
    }

    proptest! {
        #[test]
        fn encode_then_decode_gives_back_every_field(
            t in any_type(),
            m in any_method(),
            seq in any::<u64>(),
            msgs in prop::collection::vec(any_message(), 1..4),
            opts in any_options(),
        ) {
            let limits = Limits::default();
            let (buf, want, method) = if t == FrameType::Batch {
                let refs: Vec<&[u8]> = msgs.iter().map(Vec::as_slice).collect();
                (encode_batch(seq, &refs, &opts, &limits).unwrap(), msgs.clone(), Method::Named)
            } else {
                (encode(t, m, seq, &msgs[0], &opts, &limits).unwrap(), vec![msgs[0].clone()], m)
            };
            let frame = decode(&buf, &limits).unwrap();
            prop_assert_eq!(frame.header.frame_type, t);
            prop_assert_eq!(frame.header.method, method);
            prop_assert_eq!(frame.header.sequence, seq);
            prop_assert_eq!(frame.header.data_size as usize, buf.len() - HEADER_LEN);
            prop_assert_eq!(frame.has_checksum(), opts.checksum);
            prop_assert_eq!(frame.is_batch(), t == FrameType::Batch);
            let got: Vec<Vec<u8>> = frame.messages().map(<[u8]>::to_vec).collect();
            prop_assert_eq!(frame.message_count(), got.len());
            prop_assert_eq!(got, want);
            let plain_len = frame.payload.len();
            let wire_body = buf.len() - HEADER_LEN - if opts.checksum { CHECKSUM_LEN } else { 0 };
            if frame.is_compressed() {
                prop_assert!(opts.compress_threshold.is_some_and(|th| plain_len >= th));
                prop_assert!(wire_body < plain_len);
            } else {
                prop_assert_eq!(wire_body, plain_len);
            }
        }

        #[test]
        fn any_bytes_decode_to_a_frame_or_an_error(
            bytes in prop::collection::vec(any::<u8>(), 0..256),
            small in any::<bool>(),
        ) {
            let limits = if small { Limits { max_payload: 64, max_decompressed: 128 } } else { Limits::default() };
            if let Ok(frame) = decode(&bytes, &limits) {
                prop_assert_eq!(frame.messages().count(), frame.message_count());
            }
        }

        #[test]
        fn any_payload_behind_a_plausible_header_decodes_or_errs(
            t in 0u8..9,
            flag_bits in 0u16..0x20,
            method in 0u16..11,
            payload in prop_oneof![
                prop::collection::vec(any::<u8>(), 0..64),
                prop::collection::vec(any::<u8>(), 0..64).prop_map(|v| gz(&v)),
                prop::collection::vec(any::<u8>(), 0..64).prop_map(|v| zlib(&v)),
                prop::collection::vec(prop::collection::vec(any::<u8>(), 0..8), 0..4)
                    .prop_map(|v| batch_body(&v.iter().map(Vec::as_slice).collect::<Vec<_>>())),
            ],
            crc in any::<bool>(),
        ) {
            let payload = if crc { with_crc(&payload) } else { payload };
            let buf = raw(t, flag_bits, method, 0, &payload);
            if let Ok(frame) = decode(&buf, &Limits::default()) {
                prop_assert_eq!(frame.messages().count(), frame.message_count());
            }
        }

        #[test]
        fn a_flipped_byte_in_a_checksummed_payload_is_always_caught(
            (buf, _) in any_frame(),
            at in any::<prop::sample::Index>(),
            xor in 1u8..,
        ) {
            let mut buf = buf;
            let checksummed = u16::from_be_bytes([buf[6], buf[7]]) & flags::CHECKSUM != 0;
            let i = at.index(buf.len());
            buf[i] ^= xor;
            let result = decode(&buf, &Limits::default());
            if checksummed && i >= HEADER_LEN {
                prop_assert_eq!(result.map(|_| ()).unwrap_err().kind(), "checksum_mismatch");
            } else if let Ok(frame) = result {
                prop_assert_eq!(frame.messages().count(), frame.message_count());
            }
        }

        #[test]
        fn truncated_or_extended_frames_are_refused(
            (buf, _) in any_frame(),
            cut in any::<prop::sample::Index>(),
            extra in prop::collection::vec(any::<u8>(), 1..16),
        ) {
            let n = cut.index(buf.len());
            let e = decode(&buf[..n], &Limits::default()).unwrap_err();
            prop_assert!(matches!(e, FrameError::TooShort { .. } | FrameError::SizeMismatch { .. }), "{}", e);
            let mut longer = buf.clone();
            longer.extend_from_slice(&extra);
            let e = decode(&longer, &Limits::default()).unwrap_err();
            prop_assert_eq!(e.kind(), "size_mismatch");
        }

        #[test]
        fn classify_never_panics_and_agrees_with_the_method_code(bytes in prop::collection::vec(any::<u8>(), 0..128)) {
            let (t, m) = classify(&bytes);
            prop_assert!(m == Method::Named || matches!(t, FrameType::Request | FrameType::Notification));
        }
    }
}
