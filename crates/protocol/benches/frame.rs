//! Throughput of the binary frame codec against a plain memory copy of the
//! same bytes: decode and encode of 1 KiB, 64 KiB and 1 MiB task results,
//! with and without the CRC32 trailer and gzip.
//!
//! Run: `cargo bench -p meshgate-protocol --bench frame -- --warm-up-time 1 --measurement-time 3`.
//! Throughput is counted in message bytes (the decoded payload), so every
//! figure compares directly with the `memcpy` group.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use meshgate_protocol::frame::{self, EncodeOptions, FrameType, Limits, Method};

const SIZES: [(usize, &str); 3] = [(1 << 10, "1KiB"), (64 << 10, "64KiB"), (1 << 20, "1MiB")];

/// Room for a 1 MiB message plus its trailer (the default limit is exactly 1 MiB).
const LIMITS: Limits = Limits {
    max_payload: 4 << 20,
    max_decompressed: 16 << 20,
};

/// The four encodings measured, by name.
const VARIANTS: [(&str, bool, bool); 4] = [
    ("plain", false, false),
    ("crc", true, false),
    ("gzip", false, true),
    ("gzip+crc", true, true),
];

fn options(checksum: bool, compress: bool) -> EncodeOptions {
    EncodeOptions {
        compress_threshold: compress.then_some(0),
        checksum,
        level: 1,
    }
}

/// A JSON-RPC task result of exactly `len` bytes whose text is prose from a
/// small vocabulary in a pseudo-random order: it compresses like real output.
fn task_result(len: usize) -> Vec<u8> {
    const WORDS: [&str; 24] = [
        "the",
        "agent",
        "read",
        "configuration",
        "files",
        "and",
        "wrote",
        "a",
        "summary",
        "of",
        "changes",
        "to",
        "module",
        "tests",
        "passed",
        "after",
        "refactoring",
        "error",
        "handling",
        "in",
        "parser",
        "with",
        "benchmarks",
        "updated",
    ];
    let head = r#"{"jsonrpc":"2.0","id":42,"result":{"task_id":"task_01J9Z3","status":"completed","content":[{"type":"text","text":""#;
    let tail = r#""}],"metrics":{"tokens":1834,"duration_ms":5120}}}"#;
    let want = len.saturating_sub(head.len() + tail.len());
    let mut text = String::with_capacity(want + 16);
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    while text.len() < want {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        text.push_str(WORDS[(x % WORDS.len() as u64) as usize]);
        text.push(if x.is_multiple_of(11) { '.' } else { ' ' });
    }
    text.truncate(want);
    let out = format!("{head}{text}{tail}").into_bytes();
    assert_eq!(out.len(), len);
    out
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    for (size, label) in SIZES {
        let message = task_result(size);
        group.throughput(Throughput::Bytes(size as u64));
        for (name, checksum, compress) in VARIANTS {
            let opts = options(checksum, compress);
            let wire = frame::encode(
                FrameType::Response,
                Method::Named,
                1,
                &message,
                &opts,
                &LIMITS,
            )
            .expect("the bench frame encodes");
            group.bench_with_input(BenchmarkId::new(name, label), &wire, |b, wire| {
                b.iter(|| {
                    let frame =
                        frame::decode(black_box(wire), &LIMITS).expect("the bench frame decodes");
                    black_box(frame.messages().map(<[u8]>::len).sum::<usize>())
                })
            });
        }
    }
    group.finish();
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    for (size, label) in SIZES {
        let message = task_result(size);
        group.throughput(Throughput::Bytes(size as u64));
        for (name, checksum, compress) in VARIANTS {
            let opts = options(checksum, compress);
            group.bench_with_input(BenchmarkId::new(name, label), &message, |b, message| {
                b.iter(|| {
                    frame::encode(
                        FrameType::Response,
                        Method::Named,
                        1,
                        black_box(message),
                        &opts,
                        &LIMITS,
                    )
                    .expect("the bench frame encodes")
                })
            });
        }
    }
    group.finish();
}

/// The baseline: copying the same bytes into a buffer allocated beforehand.
fn memcpy(c: &mut Criterion) {
    let mut group = c.benchmark_group("memcpy");
    for (size, label) in SIZES {
        let message = task_result(size);
        let mut target = vec![0u8; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(BenchmarkId::new("copy_from_slice", label), |b| {
            b.iter(|| {
                target.copy_from_slice(black_box(&message));
                black_box(&mut target);
            })
        });
    }
    group.finish();
}

/// Prints the compressed size of each message once, for the record.
fn ratios(_: &mut Criterion) {
    for (size, label) in SIZES {
        let message = task_result(size);
        let wire = frame::encode(
            FrameType::Response,
            Method::Named,
            1,
            &message,
            &options(true, true),
            &LIMITS,
        )
        .expect("the bench frame encodes");
        println!(
            "gzip level 1, {label}: {} bytes on the wire ({:.1}% of {size})",
            wire.len(),
            wire.len() as f64 * 100.0 / size as f64
        );
    }
}

criterion_group!(benches, ratios, decode, encode, memcpy);
criterion_main!(benches);
