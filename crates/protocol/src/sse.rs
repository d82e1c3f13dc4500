//! An incremental parser of `text/event-stream` bodies, as the WHATWG
//! "event stream interpretation" describes: lines end in LF, CRLF or CR (also
//! split across chunks), `:` starts a comment, `data:` lines of one event are
//! joined with LF, a blank line dispatches the event, an event with no data
//! is not dispatched but still sets the last event id (the MCP priming
//! event), `id` containing NUL is ignored, and `retry` takes digits only.
//!
//! Pure bytes in, events out: the caller owns the connection. Used by
//! `meshgate stdio` (Streamable HTTP answers and `GET` streams) and by the
//! server's client of 2024-11-05 HTTP+SSE upstreams (`endpoint` and
//! `message` events).

use std::time::Duration;

/// The UTF-8 byte order mark, dropped at the start of a stream.
const BOM: &[u8] = b"\xEF\xBB\xBF";

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
#[derive(Debug, Default)]
pub struct SseParser {
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

impl SseParser {
    /// A parser at the start of a stream.
    pub fn new() -> SseParser {
        SseParser::default()
    }

    /// A parser for a new connection that resumes this one: it keeps the
    /// last event id and the reconnection time, nothing else.
    pub fn resumed(&self) -> SseParser {
        SseParser {
            id_buffer: self.last_event_id.clone(),
            last_event_id: self.last_event_id.clone(),
            retry: self.retry,
            ..SseParser::default()
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
    pub fn push(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        let mut events = Vec::new();
        if self.started {
            self.feed(chunk, &mut events);
            return events;
        }
        // A leading BOM can itself arrive split across chunks: hold the first
        // bytes back until they are known to be one or not.
        self.head.extend_from_slice(chunk);
        if self.head.len() < BOM.len() && BOM.starts_with(&self.head) {
            return events;
        }
        self.started = true;
        let head = std::mem::take(&mut self.head);
        self.feed(head.strip_prefix(BOM).unwrap_or(&head), &mut events);
        events
    }

    fn feed(&mut self, chunk: &[u8], events: &mut Vec<SseEvent>) {
        for &byte in chunk {
            let after_cr = std::mem::take(&mut self.after_cr);
            match byte {
                b'\n' if after_cr => {}
                b'\n' => self.end_line(events),
                b'\r' => {
                    self.after_cr = true;
                    self.end_line(events);
                }
                _ => self.line.push(byte),
            }
        }
    }

    fn end_line(&mut self, events: &mut Vec<SseEvent>) {
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            if let Some(event) = self.dispatch() {
                events.push(event);
            }
            return;
        }
        if line[0] == b':' {
            return;
        }
        let line = String::from_utf8_lossy(&line);
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_ref(), ""),
        };
        match field {
            "data" => {
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
            events.extend(parser.push(chunk));
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
        let events = resumed.push(b"data: fresh\n\n");
        assert_eq!(data(&events), ["fresh"]);
        assert_eq!(events[0].id.as_deref(), Some("9"));
    }
}
