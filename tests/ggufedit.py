"""Read a GGUF file into plain lists and write such lists back byte for byte, so a test can
change one key's type or value, or one tensor's entry, and get a file llama.cpp would read."""

from __future__ import annotations

import struct
from pathlib import Path

SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


def _enc_str(s: str | bytes) -> bytes:
    s = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(s)) + s


def _enc_value(kind: int, v) -> bytes:
    if kind in SCALAR:
        return struct.pack("<" + SCALAR[kind], v)
    if kind == STRING:
        return _enc_str(v)
    item, items = v
    return struct.pack("<IQ", item, len(items)) + b"".join(_enc_value(item, x) for x in items)


def encode_gguf(kvs, tensors, data: bytes = b"", version: int = 3, align: int = 32) -> bytes:
    """kvs: [(key, type, value)], an array value being (item type, [items]);
    tensors: [(name, dims, ggml type, offset)]; data: the tensor data section."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs)))
    for key, kind, v in kvs:
        out += _enc_str(key) + struct.pack("<I", kind) + _enc_value(kind, v)
    for name, dims, ttype, offset in tensors:
        out += _enc_str(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ttype, offset)
    out += b"\0" * (-len(out) % align)
    return bytes(out) + data


def decode_gguf(path: Path):
    """(kvs, tensors, data) of a GGUF file, for encode_gguf (checked to round-trip exactly)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    kvs = []
    for f in reader.fields.values():
        if f.name.startswith("GGUF."):
            continue
        kind, v = int(f.types[0]), f.contents()
        kvs.append((f.name, kind, (int(f.types[1]), v) if kind == ARRAY else v))
    start = min(t.data_offset for t in reader.tensors)
    tensors = [(t.name, [int(d) for d in t.shape], int(t.tensor_type), int(t.data_offset - start))
               for t in reader.tensors]
    return kvs, tensors, path.read_bytes()[start:]


def with_key(kvs, key: str, kind: int | None = None, value=None):
    """kvs with `key` replaced (or removed when kind is None)."""
    out = [kv for kv in kvs if kv[0] != key]
    return out if kind is None else out + [(key, kind, value)]
