//! `meshgate frame encode|decode`: the real binary makes frames and reads
//! them back, and names what is wrong with a damaged one.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::{Value, json};

use crate::support::{TempDir, meshgate_bin};

/// Runs `meshgate frame <args>` with `stdin` fed in.
fn frame(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(meshgate_bin())
        .arg("frame")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start meshgate frame");
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(stdin)
        .expect("write stdin");
    child.wait_with_output().expect("meshgate frame finishes")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A task result big enough to be compressed.
fn big_result() -> Value {
    let text = "the agent read the files and wrote a summary of the changes. ".repeat(60);
    json!({"jsonrpc": "2.0", "id": 17, "result": {"content": [{"type": "text", "text": text}]}})
}

/// Encodes `message` with compression and a checksum in `output` form.
fn encode_compressed(message: &Value, output: &str) -> String {
    let out = frame(
        &[
            "encode",
            "--compress",
            "--sequence",
            "99",
            "--output",
            output,
            &message.to_string(),
        ],
        b"",
    );
    assert!(out.status.success(), "encode failed: {}", stderr(&out));
    stdout(&out).trim().to_owned()
}

#[test]
fn encode_then_decode_round_trips_in_hex_and_base64() {
    let message = big_result();
    for output in ["hex", "base64"] {
        let text = encode_compressed(&message, output);
        let out = frame(&["decode", &text], b"");
        assert!(out.status.success(), "{output}: {}", stderr(&out));
        let shown = stdout(&out);
        for line in [
            "magic         0x4D435057 (MCPW)",
            "version       1",
            "type          response (1)",
            "flags         0x0009 (compressed, checksum)",
            "sequence      99",
            "method        named in the payload (0)",
            "reserved      0",
            "compressed    yes (gzip)",
            "messages      1",
        ] {
            assert!(shown.contains(line), "{output}: no {line:?} in\n{shown}");
        }
        assert!(shown.contains("checksum      CRC32 0x"), "{shown}");
        let size = message.to_string().len();
        assert!(
            shown.contains(&format!("payload size  {size} bytes (decompressed)")),
            "{shown}"
        );
        // The message comes back pretty-printed, so parse what follows its marker.
        let body = shown
            .split_once("--- message 1")
            .and_then(|(_, rest)| rest.split_once('\n'))
            .map(|(_, json)| json)
            .unwrap_or_default();
        let back: Value = serde_json::from_str(body).expect("the message is printed as JSON");
        assert_eq!(back, message);
    }
}

#[test]
fn stdin_and_raw_files_work_too() {
    let dir = TempDir::new("frame-cli");
    let out = frame(
        &["encode", "--output", "raw", "--no-checksum", "-"],
        br#"{"jsonrpc":"2.0","id":1,"method":"tool.list"}"#,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(&out.stdout[..4], b"MCPW");
    let path = dir.path().join("frame.bin");
    std::fs::write(&path, &out.stdout).expect("write the frame");
    let at = format!("@{}", path.display());
    for args in [
        vec!["decode", "--json", at.as_str()],
        vec![
            "decode",
            "--json",
            "--file",
            path.to_str().unwrap_or_default(),
        ],
    ] {
        let out = frame(&args, b"");
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        let v: Value = serde_json::from_str(&stdout(&out)).expect("--json prints JSON");
        assert_eq!(v["type"], "request");
        assert_eq!(v["method"], "tool.list");
        assert_eq!(v["method_code"], 2);
        assert_eq!(v["checksum"], false);
    }
    let out = frame(&["decode", "--json"], &out.stdout);
    assert!(out.status.success(), "raw frame on stdin: {}", stderr(&out));
}

#[test]
fn json_output_has_every_field() {
    let message = big_result();
    let hex = encode_compressed(&message, "hex");
    let out = frame(&["decode", "--json", "--format", "hex"], hex.as_bytes());
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).expect("--json prints JSON");
    assert_eq!(v["magic"], "0x4D435057");
    assert_eq!(v["version"], 1);
    assert_eq!(v["type"], "response");
    assert_eq!(v["type_code"], 1);
    assert_eq!(v["flags"], json!(["compressed", "checksum"]));
    assert_eq!(v["flags_bits"], 9);
    assert_eq!(v["sequence"], 99);
    assert_eq!(v["method"], Value::Null);
    assert_eq!(v["method_code"], 0);
    assert_eq!(v["reserved"], 0);
    assert_eq!(v["compressed"], true);
    assert_eq!(v["compression"], "gzip");
    assert_eq!(v["checksum"], true);
    assert!(v["crc32"].as_str().is_some_and(|c| c.starts_with("0x")));
    assert_eq!(v["data_size"], (hex.len() / 2 - 24) as u64);
    assert_eq!(v["decompressed_size"], message.to_string().len() as u64);
    assert_eq!(v["message_count"], 1);
    assert_eq!(v["messages"], json!([message]));
}

#[test]
fn batch_frames_carry_every_message() {
    let batch = json!([
        {"jsonrpc": "2.0", "id": 1, "method": "tool.execute", "params": {}},
        {"jsonrpc": "2.0", "method": "task.progress", "params": {"done": 3}}
    ]);
    let out = frame(
        &["encode", "--batch", "--output", "base64"],
        batch.to_string().as_bytes(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = frame(&["decode", "--json", stdout(&out).trim()], b"");
    let v: Value = serde_json::from_str(&stdout(&out)).expect("--json prints JSON");
    assert_eq!(v["type"], "batch");
    assert_eq!(v["flags"], json!(["batch", "checksum"]));
    assert_eq!(v["messages"], batch);
}

#[test]
fn corrupted_checksum_is_named_and_exits_1() {
    let mut hex = encode_compressed(&big_result(), "hex");
    // Flip the last hex digit: the CRC32 trailer no longer matches.
    let last = hex.pop().expect("a non-empty frame");
    hex.push(if last == '0' { '1' } else { '0' });
    let out = frame(&["decode", &hex], b"");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("checksum mismatch"),
        "{}",
        stderr(&out)
    );
    let out = frame(&["decode", "--json", &hex], b"");
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_str(&stdout(&out)).expect("--json prints the error as JSON");
    assert_eq!(v["kind"], "checksum_mismatch");
}

#[test]
fn bad_magic_is_named_and_exits_1() {
    let hex = encode_compressed(&big_result(), "hex");
    let bad = format!("00{}", &hex[2..]);
    let out = frame(&["decode", &bad], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("invalid magic number 0x00435057, expected 0x4D435057"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn invalid_json_and_unreadable_input_exit_2() {
    let out = frame(&["encode", "{\"jsonrpc\": "], b"");
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("not valid JSON"), "{}", stderr(&out));
    let out = frame(&["decode", "zz-not-a-frame!"], b"");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("neither hex nor base64"),
        "{}",
        stderr(&out)
    );
}
