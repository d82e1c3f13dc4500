#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets: small valid and invalid inputs.

Run from anywhere: python3 fuzz/seeds.py. The files are committed; libFuzzer
starts from them (scripts/fuzz.sh) and keeps what it finds elsewhere.
"""
import gzip
import os
import struct
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
MAGIC = 0x4D435057
COMPRESSED, ENCRYPTED, BATCH, CHECKSUM = 0x1, 0x2, 0x4, 0x8

REQUEST = b'{"jsonrpc":"2.0","id":7,"method":"tool.execute","params":{"name":"echo","arguments":{"text":"hi"}}}'
RESULT = (b'{"jsonrpc":"2.0","id":7,"result":{"content":[{"type":"text","text":"'
          + b"the agent read the files and wrote a summary " * 30 + b'"}]}}')
PROGRESS = b'{"jsonrpc":"2.0","method":"task.progress","params":{"task_id":"t1","progress":0.5}}'


def header(ftype, flags, size, seq=1, method=0, version=1, reserved=0, magic=MAGIC):
    return struct.pack(">IBBHQHHI", magic, version, ftype, flags, seq, method, reserved, size)


def frame(ftype, payload, flags=0, method=0, crc=False, **kw):
    if crc:
        flags |= CHECKSUM
        payload = payload + struct.pack(">I", zlib.crc32(payload))
    return header(ftype, flags, len(payload), method=method, **kw) + payload


def batch(*messages):
    out = struct.pack(">I", len(messages))
    for m in messages:
        out += struct.pack(">I", len(m)) + m
    return out


def gz(data):
    return gzip.compress(data, compresslevel=9, mtime=0)


def write(target, name, data):
    path = os.path.join(HERE, "corpus", target, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def main():
    t = "frame_decode"
    write(t, "request-plain", frame(0, REQUEST, method=3))
    write(t, "request-crc", frame(0, REQUEST, method=3, crc=True))
    write(t, "response-gzip-crc", frame(1, gz(RESULT), flags=COMPRESSED, crc=True))
    write(t, "response-zlib", frame(1, zlib.compress(RESULT), flags=COMPRESSED))
    write(t, "progress-crc", frame(7, PROGRESS, crc=True))
    write(t, "ping-empty", frame(4, b"", method=8))
    write(t, "batch-3-crc", frame(6, batch(REQUEST, PROGRESS, b"{}"), flags=BATCH, crc=True))
    write(t, "batch-gzip", frame(6, gz(batch(RESULT, RESULT)), flags=BATCH | COMPRESSED))
    write(t, "bomb-gzip", frame(1, gz(bytes(64 << 10)), flags=COMPRESSED))
    bad_crc = bytearray(frame(0, REQUEST, crc=True))
    bad_crc[30] ^= 0x01
    write(t, "bad-crc", bytes(bad_crc))
    write(t, "bad-magic", frame(0, REQUEST, magic=0x4D435058))
    write(t, "version-3", frame(0, REQUEST, version=3))
    write(t, "encrypted", frame(0, REQUEST, flags=ENCRYPTED))
    write(t, "batch-trailing", frame(6, batch(REQUEST) + b"xx", flags=BATCH))
    write(t, "batch-huge-count", frame(6, b"\xff\xff\xff\xff\x00\x00\x00\x00", flags=BATCH))
    write(t, "size-mismatch", frame(0, REQUEST)[:-3])
    write(t, "short", header(0, 0, 0)[:10])
    # Found by the fuzzer: a batch frame with a method code (decoders ignore it).
    write(t, "batch-with-method-code", frame(6, batch(b""), flags=BATCH, method=4))

    t = "jsonrpc_parse"
    write(t, "request", REQUEST)
    write(t, "notification", b'{"jsonrpc":"2.0","method":"event.subscribe","params":{"events":["task.*"]}}')
    write(t, "progress", PROGRESS)
    write(t, "response", b'{"jsonrpc":"2.0","id":"a","result":{}}')
    write(t, "error", b'{"jsonrpc":"2.0","id":1,"error":{"code":-32601,"message":"no such method"}}')
    write(t, "null-id", b'{"jsonrpc":"2.0","id":null,"method":"initialize"}')
    write(t, "escaped-method", b'{"jsonrpc":"2.0","method":"notifications\\/progress"}')
    write(t, "batch-array", b'[{"jsonrpc":"2.0","id":1,"method":"ping"}]')
    write(t, "wrong-version", b'{"jsonrpc":"1.0","id":1,"method":"ping"}')
    write(t, "method-number", b'{"jsonrpc":"2.0","id":1,"method":3}')
    write(t, "duplicate-id", b'{"jsonrpc":"2.0","id":1,"id":2,"method":"ping"}')
    write(t, "truncated", b'{"jsonrpc":"2.0","id":1,"meth')
    write(t, "scalar", b"42")
    write(t, "deep", b"[" * 200 + b"]" * 200)
    # Found by the fuzzer: invalid UTF-8 inside a member serde only skips.
    write(t, "invalid-utf8-in-params", REQUEST.replace(b'"name"', b'"na\xff\xffme"'))
    write(t, "huge-number-id", b'{"jsonrpc":"2.0","id":1e999,"method":"ping"}')
    write(t, "invalid-utf8-in-error", b'{"jsonrpc":"2.0","id":1,"error":{"\x8a\x8acode":-32601,"message":"x"}}')


if __name__ == "__main__":
    main()
