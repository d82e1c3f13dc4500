//! Any bytes fed to the SSE parser (an upstream's event stream, the stdio
//! bridge's answers) give events or the size error, never a panic, and
//! the events do not depend on how the bytes were split into chunks.

#![no_main]

use libfuzzer_sys::fuzz_target;
use meshgate_protocol::sse::SseParser;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the chunk size, the rest is the stream; a small
    // limit reaches the size error too.
    let Some((&first, stream)) = data.split_first() else {
        return;
    };
    let limit = 64 + usize::from(first) * 16;
    let mut whole = SseParser::with_limit(limit);
    let expected = whole.push(stream);
    let mut chunked = SseParser::with_limit(limit);
    let size = usize::from(first % 7) + 1;
    let mut events = Vec::new();
    let mut failed = false;
    for chunk in stream.chunks(size) {
        match chunked.push(chunk) {
            Ok(mut e) => events.append(&mut e),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    match expected {
        Ok(all) if !failed => assert_eq!(all, events, "chunking changed the events"),
        // The limit may trip at a different point when the bytes arrive in
        // pieces; what was delivered before it must still agree.
        Ok(all) => assert!(all.starts_with(&events)),
        Err(_) => {}
    }
});
