//! Any bytes fed to the JSON-RPC envelope check and to `frame::classify`
//! give an answer, never a panic; a method code `classify` reports is the
//! message's own method.

#![no_main]

use libfuzzer_sys::fuzz_target;
use meshgate_protocol::check_envelope;
use meshgate_protocol::frame::{self, FrameType, Method};

/// The one member the check below reads back.
#[derive(serde::Deserialize)]
struct Named<'a> {
    method: std::borrow::Cow<'a, str>,
}

fuzz_target!(|data: &[u8]| {
    let envelope = check_envelope(data);
    let (frame_type, method) = frame::classify(data);
    if let Some(name) = method.name() {
        assert!(matches!(
            frame_type,
            FrameType::Request | FrameType::Notification
        ));
        // Read the method the same lenient way (a Value would also refuse
        // numbers beyond f64, which JSON's grammar allows): it is the name.
        let text = std::str::from_utf8(data).expect("a classified message is UTF-8");
        let named: Named<'_> =
            serde_json::from_str(text).expect("a classified message is a JSON object");
        assert_eq!(named.method, name);
        assert_eq!(Method::from_method_name(name), method);
    }
    // Both refuse invalid UTF-8 anywhere (check_envelope checks the whole
    // body first, since serde skips ignored members unchecked), so a message
    // the check accepts without a method is an answer to classify too.
    if let Ok(env) = envelope
        && env.method.is_none()
    {
        assert!(matches!(frame_type, FrameType::Response | FrameType::Error));
    }
});
