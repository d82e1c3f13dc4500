//! Incremental Server-Sent Events parser, just enough for Streamable HTTP responses.
//!
//! Bytes are fed as they arrive; every complete event's `data` (multi-line data
//! joined with `\n`) is handed to a callback. `event:`, `id:`, `retry:` and
//! comment lines are accepted and ignored. Lines may end in `\n`, `\r\n` or `\r`,
//! and may be split anywhere across chunks.

/// What the event callback tells the parser to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Keep delivering events.
    Continue,
    /// Stop: the caller has what it was waiting for.
    Stop,
}

/// Streaming SSE parser that yields the data of each dispatched event.
#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes received but not yet consumed as complete lines.
    pending: Vec<u8>,
    /// Data of the event being assembled.
    data: Vec<u8>,
    /// Whether the event being assembled has seen a `data` field.
    has_data: bool,
}

impl SseParser {
    /// Creates an empty parser.
    pub fn new() -> Self {
        Self::default()
    }

    /// Clears all state so the parser can be reused for another stream.
    pub fn reset(&mut self) {
        self.pending.clear();
        self.data.clear();
        self.has_data = false;
    }

    /// Feeds a chunk; calls `on_event` for each complete event until it returns [`Flow::Stop`].
    pub fn push<E>(
        &mut self,
        chunk: &[u8],
        on_event: impl FnMut(&[u8]) -> Result<Flow, E>,
    ) -> Result<Flow, E> {
        self.pending.extend_from_slice(chunk);
        self.drain_lines(false, on_event)
    }

    /// Signals end of stream; a final event without its blank line is still delivered.
    pub fn finish<E>(
        &mut self,
        mut on_event: impl FnMut(&[u8]) -> Result<Flow, E>,
    ) -> Result<Flow, E> {
        if self.drain_lines(true, &mut on_event)? == Flow::Stop {
            return Ok(Flow::Stop);
        }
        if !self.pending.is_empty() {
            let line = std::mem::take(&mut self.pending);
            if self.line(&line, &mut on_event)? == Flow::Stop {
                return Ok(Flow::Stop);
            }
        }
        self.dispatch(&mut on_event)
    }

    fn drain_lines<E>(
        &mut self,
        eof: bool,
        mut on_event: impl FnMut(&[u8]) -> Result<Flow, E>,
    ) -> Result<Flow, E> {
        let pending = std::mem::take(&mut self.pending);
        let mut start = 0;
        let mut flow = Ok(Flow::Continue);
        while let Some(rel) = pending[start..]
            .iter()
            .position(|&b| b == b'\n' || b == b'\r')
        {
            let end = start + rel;
            let next = if pending[end] == b'\r' {
                match pending.get(end + 1) {
                    Some(b'\n') => end + 2,
                    Some(_) => end + 1,
                    // A trailing '\r' may be the first half of "\r\n": wait for more bytes.
                    None if !eof => break,
                    None => end + 1,
                }
            } else {
                end + 1
            };
            let line = &pending[start..end];
            start = next;
            flow = self.line(line, &mut on_event);
            if !matches!(flow, Ok(Flow::Continue)) {
                break;
            }
        }
        self.pending = pending;
        self.pending.drain(..start);
        flow
    }

    fn line<E>(
        &mut self,
        line: &[u8],
        on_event: &mut impl FnMut(&[u8]) -> Result<Flow, E>,
    ) -> Result<Flow, E> {
        if line.is_empty() {
            return self.dispatch(on_event);
        }
        if line[0] == b':' {
            return Ok(Flow::Continue);
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        if field == b"data" {
            if self.has_data {
                self.data.push(b'\n');
            }
            self.data.extend_from_slice(value);
            self.has_data = true;
        }
        Ok(Flow::Continue)
    }

    fn dispatch<E>(
        &mut self,
        on_event: &mut impl FnMut(&[u8]) -> Result<Flow, E>,
    ) -> Result<Flow, E> {
        if !self.has_data {
            return Ok(Flow::Continue);
        }
        self.has_data = false;
        let flow = on_event(&self.data);
        self.data.clear();
        flow
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    fn collect(chunks: &[&[u8]]) -> Vec<String> {
        let mut parser = SseParser::new();
        let mut out = Vec::new();
        let mut cb = |d: &[u8]| -> Result<Flow, Infallible> {
            out.push(String::from_utf8_lossy(d).into_owned());
            Ok(Flow::Continue)
        };
        for c in chunks {
            let _ = parser.push(c, &mut cb);
        }
        let _ = parser.finish(&mut cb);
        out
    }

    #[test]
    fn single_event() {
        let got = collect(&[b"event: message\ndata: {\"id\":1}\n\n"]);
        assert_eq!(got, vec![r#"{"id":1}"#]);
    }

    #[test]
    fn priming_event_has_empty_data() {
        // A priming event carries an id and empty data; it is delivered as empty.
        let got = collect(&[b"id: abc\ndata:\n\nid: def\ndata: {\"id\":2}\n\n"]);
        assert_eq!(got, vec!["".to_string(), r#"{"id":2}"#.to_string()]);
    }

    #[test]
    fn event_without_data_is_skipped() {
        let got = collect(&[b"id: 1\nretry: 500\n\n: comment\n\ndata: x\n\n"]);
        assert_eq!(got, vec!["x"]);
    }

    #[test]
    fn crlf_and_cr_line_endings() {
        let got = collect(&[b"data: a\r\n\r\ndata: b\r\rdata: c\n\n"]);
        assert_eq!(got, vec!["a", "b", "c"]);
    }

    #[test]
    fn split_across_chunks_everywhere() {
        let stream = b"event: message\r\ndata: {\"jsonrpc\":\"2.0\",\r\ndata: \"id\":7}\r\n\r\n";
        let whole = collect(&[stream]);
        assert_eq!(whole, vec!["{\"jsonrpc\":\"2.0\",\n\"id\":7}"]);
        for cut in 0..stream.len() {
            let (a, b) = stream.split_at(cut);
            assert_eq!(collect(&[a, b]), whole, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(collect(&bytes), whole);
    }

    #[test]
    fn trailing_event_without_blank_line() {
        assert_eq!(collect(&[b"data: last"]), vec!["last"]);
        assert_eq!(collect(&[b"data: last\r"]), vec!["last"]);
    }

    #[test]
    fn field_without_colon_and_no_space() {
        let got = collect(&[b"data\ndata:x\n\n"]);
        assert_eq!(got, vec!["\nx"]);
    }

    #[test]
    fn stop_halts_delivery_and_keeps_rest() {
        let mut parser = SseParser::new();
        let mut seen = Vec::new();
        let flow = parser.push(b"data: 1\n\ndata: 2\n\n", |d: &[u8]| {
            seen.push(d.to_vec());
            Ok::<_, Infallible>(Flow::Stop)
        });
        assert_eq!(flow, Ok(Flow::Stop));
        assert_eq!(seen, vec![b"1".to_vec()]);
        let mut rest = Vec::new();
        let _ = parser.finish(|d: &[u8]| {
            rest.push(d.to_vec());
            Ok::<_, Infallible>(Flow::Continue)
        });
        assert_eq!(rest, vec![b"2".to_vec()]);
    }

    #[test]
    fn callback_error_propagates() {
        let mut parser = SseParser::new();
        let r = parser.push(b"data: boom\n\n", |_d: &[u8]| Err("bad"));
        assert_eq!(r, Err("bad"));
    }
}
