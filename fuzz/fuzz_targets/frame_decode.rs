//! Any bytes fed to `frame::decode` give a frame or a typed error, never a
//! panic; a frame that decodes re-encodes to the same messages.

#![no_main]

use libfuzzer_sys::fuzz_target;
use meshgate_protocol::frame::{self, EncodeOptions, Frame, FrameError, Limits, Method};

fuzz_target!(|data: &[u8]| {
    let small = Limits {
        max_payload: 256,
        max_decompressed: 1024,
    };
    for limits in [Limits::default(), small] {
        if let Ok(frame) = frame::decode(data, &limits) {
            check_round_trip(&frame, &limits);
        }
    }
});

/// Re-encodes the messages of `decoded` the way it came (compressed or not,
/// with or without checksum) and checks the result decodes to the same.
fn check_round_trip(decoded: &Frame<'_>, limits: &Limits) {
    let messages: Vec<&[u8]> = decoded.messages().collect();
    assert_eq!(messages.len(), decoded.message_count());
    let h = decoded.header;
    let opts = EncodeOptions {
        compress_threshold: decoded.is_compressed().then_some(0),
        checksum: decoded.has_checksum(),
        level: 6,
    };
    let encoded = if decoded.is_batch() {
        frame::encode_batch(h.sequence, &messages, &opts, limits)
    } else {
        frame::encode(
            h.frame_type,
            h.method,
            h.sequence,
            messages[0],
            &opts,
            limits,
        )
    };
    let wire = match encoded {
        Ok(wire) => wire,
        // The sender may have compressed better than level 6 does.
        Err(FrameError::TooLargeToEncode { .. }) => return,
        Err(e) => panic!("a decoded frame does not re-encode: {e}"),
    };
    let again = frame::decode(&wire, limits).expect("what encode makes, decode accepts");
    assert_eq!(again.header.frame_type, h.frame_type);
    // encode_batch writes method 0; a batch's method code means nothing on decode.
    let method = if decoded.is_batch() {
        Method::Named
    } else {
        h.method
    };
    assert_eq!(again.header.method, method);
    assert_eq!(again.header.sequence, h.sequence);
    assert_eq!(again.has_checksum(), decoded.has_checksum());
    assert!(again.messages().eq(messages.iter().copied()));
}
