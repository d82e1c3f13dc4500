//! An incremental parser of `text/event-stream` bodies, as the WHATWG
//! "event stream interpretation" describes: lines end in LF, CRLF or CR (also
//! split across chunks), `:` starts a comment, `data:` lines of one event are
//! joined with LF, a blank line dispatches the event, an event with no data
//! is not dispatched but still sets the last event id (the MCP priming
//! event), `id` containing NUL is ignored, and `retry` takes digits only.
//!
//! A stream is untrusted input, so the parser holds at most a bounded amount
//! of it: an event whose data, or a line, grows past the parser's limit
//! ([`MAX_EVENT_BYTES`] unless given) fails the stream with [`TooLarge`]
//! instead of growing without end (a server that never sends a line end
//! would otherwise take all the reader's memory).
//!
//! Pure bytes in, events out: the caller owns the connection. Used by
//! `meshgate stdio` (Streamable HTTP answers and `GET` streams) and by the
//! server's client of 2024-11-05 HTTP+SSE upstreams (`endpoint` and
//! `message` events).

use std::time::Duration;

/// The UTF-8 byte order mark, dropped at the start of a stream.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// The largest event data (and line) a parser accepts unless told
/// otherwise: 16 MiB, shared by the gateway's SSE upstreams and the stdio
/// bridge.
pub const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;

/// Room on a line for the field name in front of a value of the full limit
/// (`retry: ` is the longest, 7 bytes).
const FIELD_ROOM: usize = 8;

/// The stream sent an event (or a single line) larger than the parser's
/// limit. The parser cannot read on: the caller closes the connection. The
/// message reads "an SSE event larger than 16 MiB", for callers to put
/// after who sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("an SSE event larger than {}", size_text(*.limit))]
pub struct TooLarge {
    /// The parser's limit, in bytes.
    pub limit: usize,
}

impl TooLarge {
    /// The limit in words ("16 MiB").
    pub fn limit_text(&self) -> String {
        size_text(self.limit)
    }
}

/// A byte count in the largest whole binary unit ("16 MiB", "512 KiB").
fn size_text(bytes: usize) -> String {
    const KIB: usize = 1024;
    const MIB: usize = 1024 * KIB;
    match bytes {
        b if b >= MIB && b % MIB == 0 => format!("{} MiB", b / MIB),
        b if b >= KIB && b % KIB == 0 => format!("{} KiB", b / KIB),
        b => format!("{b} bytes"),
    }
}

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The last event id in force when the event was dispatched.
    pub id: Option<String>,
    /// The `event` field, when one was given.
    pub event: Option<String>,
    /// The `data` lines, joined with LF.
    pub data: String,
}

/// Parses a stream of byte chunks into events.
#[derive(Debug)]
pub struct SseParser {
    /// The largest event data this parser holds; a line may hold a value
    /// of that size after its field name.
    max_event: usize,
    /// Set once the limit was exceeded: the stream cannot be read on.
    failed: bool,
    line: Vec<u8>,
    /// The previous chunk ended in CR: an LF at the start of the next one
    /// belongs to that line end.
    after_cr: bool,
    /// Past the first bytes (a leading BOM is dropped there).
    started: bool,
    /// The first bytes, held while they could still be the start of a BOM.
    head: Vec<u8>,
    data: String,
    has_data: bool,
    event: Option<String>,
    id_buffer: Option<String>,
    last_event_id: Option<String>,
    retry: Option<Duration>,
}

impl Default for SseParser {
    fn default() -> Self {
        SseParser::new()
    }
}

impl SseParser {
    /// A parser at the start of a stream, accepting events of up to
    /// [`MAX_EVENT_BYTES`].
    pub fn new() -> SseParser {
        SseParser::with_limit(MAX_EVENT_BYTES)
    }

    /// A parser at the start of a stream, accepting events whose data is at
    /// most `max_event` bytes (and lines of that much after the field name).
    pub fn with_limit(max_event: usize) -> SseParser {
        SseParser {
            max_event,
            failed: false,
            line: Vec::new(),
            after_cr: false,
            started: false,
            head: Vec::new(),
            data: String::new(),
            has_data: false,
            event: None,
            id_buffer: None,
            last_event_id: None,
            retry: None,
        }
    }

    /// A parser for a new connection that resumes this one: it keeps the
    /// last event id, the reconnection time and the limit, nothing else.
    pub fn resumed(&self) -> SseParser {
        SseParser {
            id_buffer: self.last_event_id.clone(),
            last_event_id: self.last_event_id.clone(),
            retry: self.retry,
            ..SseParser::with_limit(self.max_event)
        }
    }

    /// The id to send as `Last-Event-ID` when reconnecting.
    pub fn last_event_id(&self) -> Option<&str> {
        self.last_event_id.as_deref()
    }

    /// The reconnection time the server asked for with `retry:`.
    pub fn retry(&self) -> Option<Duration> {
        self.retry
    }

    /// Feeds a chunk; returns the events it completed, in order.
    ///
    /// Fails once an event's data or a line grows past the limit; the
    /// parser then drops what it held and fails every later chunk too.
    /// Events completed earlier in the failing chunk are dropped with it
    /// (the caller closes the connection anyway).
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>, TooLarge> {
        let mut events = Vec::new();
        if self.failed {
            return Err(self.too_large());
        }
        let fed = if self.started {
            self.feed(chunk, &mut events)
        } else {
            // A leading BOM can itself arrive split across chunks: hold the
            // first bytes back until they are known to be one or not.
            self.head.extend_from_slice(chunk);
            if self.head.len() < BOM.len() && BOM.starts_with(&self.head) {
                return Ok(events);
            }
            self.started = true;
            let head = std::mem::take(&mut self.head);
            self.feed(head.strip_prefix(BOM).unwrap_or(&head), &mut events)
        };
        match fed {
            Ok(()) => Ok(events),
            Err(e) => {
                // Nothing more is read from this stream: free what it sent.
                self.failed = true;
                self.line = Vec::new();
                self.data = String::new();
                Err(e)
            }
        }
    }

    fn too_large(&self) -> TooLarge {
        TooLarge {
            limit: self.max_event,
        }
    }

    fn feed(&mut self, chunk: &[u8], events: &mut Vec<SseEvent>) -> Result<(), TooLarge> {
        let max_line = self.max_event.saturating_add(FIELD_ROOM);
        for &byte in chunk {
            let after_cr = std::mem::take(&mut self.after_cr);
            match byte {
                b'\n' if after_cr => {}
                b'\n' => self.end_line(events)?,
                b'\r' => {
                    self.after_cr = true;
                    self.end_line(events)?;
                }
                _ if self.line.len() >= max_line => return Err(self.too_large()),
                _ => self.line.push(byte),
            }
        }
        Ok(())
    }

    fn end_line(&mut self, events: &mut Vec<SseEvent>) -> Result<(), TooLarge> {
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            if let Some(event) = self.dispatch() {
                events.push(event);
            }
            return Ok(());
        }
        if line[0] == b':' {
            return Ok(());
        }
        let line = String::from_utf8_lossy(&line);
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_ref(), ""),
        };
        match field {
            "data" => {
                let joined = self.data.len() + usize::from(self.has_data) + value.len();
                if joined > self.max_event {
                    return Err(self.too_large());
                }
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "event" => self.event = Some(value.to_owned()),
            "id" if !value.contains('\0') => self.id_buffer = Some(value.to_owned()),
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                if let Ok(ms) = value.parse::<u64>() {
                    self.retry = Some(Duration::from_millis(ms));
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        self.last_event_id = self.id_buffer.clone();
        let event = self.event.take();
        let data = std::mem::take(&mut self.data);
        if !std::mem::take(&mut self.has_data) {
            return None;
        }
        Some(SseEvent {
            id: self.last_event_id.clone(),
            event,
            data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse_all(chunks: &[&[u8]]) -> (Vec<SseEvent>, SseParser) {
        let mut parser = SseParser::new();
        let mut events = Vec::new();
        for chunk in chunks {
            events.extend(parser.push(chunk).expect("within the limit"));
        }
        (events, parser)
    }

    fn data(events: &[SseEvent]) -> Vec<&str> {
        events.iter().map(|e| e.data.as_str()).collect()
    }

    #[test]
    fn multi_line_data_is_joined_with_newlines() {
        let (events, _) = parse_all(&[b"data: {\"a\":\ndata:  1}\n\ndata: second\n\n"]);
        assert_eq!(data(&events), ["{\"a\":\n 1}", "second"]);
    }

    #[test]
    fn ids_are_carried_by_later_events_and_kept_for_reconnection() {
        let (events, parser) = parse_all(&[b"id: 7/1\ndata: a\n\ndata: b\n\nid: 7/3\ndata: c\n\n"]);
        let ids: Vec<_> = events.iter().map(|e| e.id.as_deref()).collect();
        assert_eq!(ids, [Some("7/1"), Some("7/1"), Some("7/3")]);
        assert_eq!(parser.last_event_id(), Some("7/3"));
    }

    #[test]
    fn a_priming_event_without_data_sets_the_last_id_but_is_not_dispatched() {
        let (events, parser) = parse_all(&[b"id: 0\nretry: 3000\ndata:\n\n"]);
        assert_eq!(
            data(&events),
            [""],
            "an empty data line is still data (an empty message)"
        );
        let (events, parser2) = parse_all(&[b"id: 0\nretry: 3000\n\n"]);
        assert!(events.is_empty(), "no data field: nothing to dispatch");
        for p in [&parser, &parser2] {
            assert_eq!(p.last_event_id(), Some("0"));
            assert_eq!(p.retry(), Some(Duration::from_millis(3000)));
        }
    }

    #[test]
    fn comments_and_unknown_fields_are_skipped() {
        let (events, _) = parse_all(&[b": keep-alive\n\n:another\nfoo: bar\ndata: x\n\n"]);
        assert_eq!(data(&events), ["x"]);
    }

    #[test]
    fn crlf_and_cr_line_ends_work_even_split_across_chunks() {
        let (events, _) = parse_all(&[
            b"event: message\r",
            b"\ndata: one\r\n\r",
            b"\ndata: two\r\r",
        ]);
        assert_eq!(data(&events), ["one", "two"]);
        assert_eq!(events[0].event.as_deref(), Some("message"));
        assert_eq!(
            events[1].event, None,
            "the event type resets after dispatch"
        );
    }

    #[test]
    fn bytes_split_anywhere_give_the_same_events() {
        let text = b"id: 1\r\ndata: {\"x\":\r\ndata: \"\xC3\xA9\"}\r\n\r\n: c\n\ndata: y\n\n";
        let whole = parse_all(&[text]).0;
        for cut in 0..text.len() {
            let (a, b) = text.split_at(cut);
            assert_eq!(parse_all(&[a, b]).0, whole, "cut at {cut}");
        }
        assert_eq!(data(&whole), ["{\"x\":\n\"é\"}", "y"]);
    }

    #[test]
    fn an_incomplete_event_at_the_end_is_not_dispatched() {
        let (events, _) = parse_all(&[b"data: done\n\ndata: partial\n"]);
        assert_eq!(data(&events), ["done"]);
    }

    #[test]
    fn bad_retry_and_ids_with_nul_are_ignored_and_a_bom_is_dropped() {
        let (events, parser) =
            parse_all(&[b"\xEF\xBB\xBFid: a\nretry: 12x\ndata: 1\n\nid: b\0c\ndata: 2\n\n"]);
        assert_eq!(data(&events), ["1", "2"]);
        assert_eq!(parser.last_event_id(), Some("a"));
        assert_eq!(parser.retry(), None);
    }

    #[test]
    fn a_field_without_colon_has_an_empty_value_and_only_one_space_is_stripped() {
        let (events, _) = parse_all(&[b"data\ndata:  two spaces\n\n"]);
        assert_eq!(data(&events), ["\n two spaces"]);
    }

    /// One line of a generated stream: a field, a comment or a blank line
    /// (which dispatches), with any of the three line ends.
    fn line() -> impl Strategy<Value = Vec<u8>> {
        let body = prop_oneof![
            Just(String::new()),
            "[a-z{}\":, é]{0,12}".prop_map(|v| format!("data: {v}")),
            "[a-z]{0,6}".prop_map(|v| format!("event: {v}")),
            "[0-9a-z/]{0,4}".prop_map(|v| format!("id: {v}")),
            "[0-9x]{0,4}".prop_map(|v| format!("retry: {v}")),
            "[ -~]{0,8}".prop_map(|v| format!(":{v}")),
            Just("data".to_owned()),
        ];
        let end = prop_oneof![Just("\n"), Just("\r"), Just("\r\n")];
        (body, end).prop_map(|(b, e)| format!("{b}{e}").into_bytes())
    }

    proptest! {
        #[test]
        fn any_chunking_of_a_stream_yields_the_same_events(
            bom in any::<bool>(),
            lines in proptest::collection::vec(line(), 0..40),
            noise in proptest::collection::vec(any::<u8>(), 0..16),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let mut text: Vec<u8> = if bom { BOM.to_vec() } else { Vec::new() };
            text.extend(lines.concat());
            text.extend(noise);
            let whole = parse_all(&[&text]);
            let mut at: Vec<usize> = cuts.iter().map(|i| i.index(text.len() + 1)).collect();
            at.sort_unstable();
            let mut chunks: Vec<&[u8]> = Vec::new();
            let mut from = 0;
            for cut in at {
                chunks.push(&text[from..cut]);
                from = cut;
            }
            chunks.push(&text[from..]);
            let split = parse_all(&chunks);
            prop_assert_eq!(&split.0, &whole.0);
            prop_assert_eq!(split.1.last_event_id(), whole.1.last_event_id());
            prop_assert_eq!(split.1.retry(), whole.1.retry());
            let bytewise: Vec<&[u8]> = text.chunks(1).collect();
            prop_assert_eq!(parse_all(&bytewise).0, whole.0);
        }
    }

    #[test]
    fn a_resumed_parser_keeps_the_last_id_and_retry_only() {
        let (_, parser) = parse_all(&[b"id: 9\nretry: 250\ndata: x\n\ndata: half"]);
        let mut resumed = parser.resumed();
        assert_eq!(resumed.last_event_id(), Some("9"));
        assert_eq!(resumed.retry(), Some(Duration::from_millis(250)));
        let events = resumed.push(b"data: fresh\n\n").expect("small");
        assert_eq!(data(&events), ["fresh"]);
        assert_eq!(events[0].id.as_deref(), Some("9"));
    }
    #[test]
    fn a_line_that_never_ends_fails_at_the_limit_and_frees_what_it_held() {
        let mut parser = SseParser::with_limit(64);
        let err = (0..100)
            .find_map(|_| {
                parser
                    .push(b"data: xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx")
                    .err()
            })
            .expect("a line past the limit fails");
        assert_eq!(err, TooLarge { limit: 64 });
        assert_eq!(err.to_string(), "an SSE event larger than 64 bytes");
        assert!(parser.line.capacity() == 0 && parser.data.capacity() == 0);
        assert_eq!(
            parser.push(b"\n\ndata: x\n\n"),
            Err(err),
            "a failed stream cannot be read on"
        );
        let mut comments = SseParser::with_limit(64);
        assert!(comments.push(&[b':'; 100]).is_err(), "comments count too");
    }

    #[test]
    fn an_event_of_exactly_the_limit_passes_and_one_byte_more_fails() {
        let limit = 16;
        let exact = format!(
            "retry: {}\ndata: {}\n\n",
            "1".repeat(limit),
            "a".repeat(limit)
        );
        let mut parser = SseParser::with_limit(limit);
        assert_eq!(
            data(&parser.push(exact.as_bytes()).expect("fits")),
            ["a".repeat(limit)]
        );
        // 7 + LF + 0 + LF + 7 bytes: exactly 16.
        let lines = "data: 1234567\ndata:\ndata: 1234567\n\n";
        let mut parser = SseParser::with_limit(limit);
        assert_eq!(parser.push(lines.as_bytes()).expect("fits").len(), 1);
        let over = "data: 1234567\ndata:\ndata: 12345678\n\n";
        let mut parser = SseParser::with_limit(limit);
        assert_eq!(parser.push(over.as_bytes()), Err(TooLarge { limit }));
        let long_line = format!("data: {}\n", "a".repeat(limit + 1));
        let mut parser = SseParser::with_limit(limit);
        assert!(parser.push(long_line.as_bytes()).is_err());
    }

    #[test]
    fn the_default_limit_is_16_mib_and_named_so() {
        let err = TooLarge {
            limit: MAX_EVENT_BYTES,
        };
        assert_eq!(err.to_string(), "an SSE event larger than 16 MiB");
        assert_eq!(err.limit_text(), "16 MiB");
        assert_eq!(SseParser::new().resumed().max_event, MAX_EVENT_BYTES);
        assert_eq!(size_text(512 * 1024), "512 KiB");
    }

    proptest! {
        /// Fed a byte at a time, a limited parser never holds more than its
        /// limit, yields exactly the events of an unlimited one until it
        /// fails, and fails whenever an event is larger than the limit.
        #[test]
        fn a_limited_parser_stays_bounded_and_agrees_with_an_unlimited_one(
            limit in 0usize..48,
            lines in proptest::collection::vec(line(), 0..40),
            long in proptest::collection::vec("[a-z]{20,60}", 0..3),
        ) {
            let mut text = lines.concat();
            for (i, l) in long.iter().enumerate() {
                let at = (i * 7919) % (text.len() + 1);
                text.splice(at..at, format!("data: {l}\n").into_bytes());
            }
            let all = parse_all(&[&text]).0;
            let mut parser = SseParser::with_limit(limit);
            let mut limited = Vec::new();
            let mut failed = false;
            for byte in text.chunks(1) {
                match parser.push(byte) {
                    Ok(events) => limited.extend(events),
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
                prop_assert!(parser.line.len() <= limit + FIELD_ROOM);
                prop_assert!(parser.data.len() <= limit);
            }
            prop_assert_eq!(&all[..limited.len()], &limited[..]);
            if all.iter().any(|e| e.data.len() > limit) {
                prop_assert!(failed);
            }
            if !failed {
                prop_assert_eq!(&limited, &all);
            }
        }
    }
}
