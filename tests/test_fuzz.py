"""Fuzzing every input imp reads from a user: image bytes, GGUF files, checkpoint folders.

The rule (issue 13): whatever the bytes, a run ends with a result or a one-line error, never a
traceback, a native abort (SIGABRT/SIGSEGV) or a partial output file. In process, that means the
only exception allowed out of `load_image` is ImageError, out of the GGUF pair check ImpError, and
out of `convert` ConvertError (with nothing written). A few cases of each kind also run through
the installed command, where the error line must be exactly the in-process message.

Hypothesis generates the cases, derandomized so `make test` is reproducible; IMP_FUZZ_SCALE=N
multiplies every budget by N and draws fresh random cases (a longer hunt). Each test prints
`fuzz <target>: <n> cases (<outcomes>)` (shown with -rA) and carries its budget in its id.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ggufedit import ARRAY, STRING, SCALAR, decode_gguf, encode_gguf, with_key
from helpers import assert_one_line_error, clean_env, run_imp

SCALE = int(os.environ.get("IMP_FUZZ_SCALE", "1"))
# Budgets (cases per target), sized so that all fuzz tests together take well under 60 s on the
# 2-core test machine.
IMAGE_CASES = 400 * SCALE
GGUF_SCAN_CASES = 400 * SCALE
GGUF_PAIR_CASES = 250 * SCALE
GGUF_KEY_CASES = 200 * SCALE
CONFIG_CASES = 150 * SCALE
SAFETENSORS_CASES = 150 * SCALE


def fuzz(n: int):
    return settings(max_examples=n, deadline=None, derandomize=SCALE == 1, database=None,
                    suppress_health_check=list(HealthCheck))


def report(target: str, outcomes: Counter) -> None:
    detail = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
    print(f"fuzz {target}: {sum(outcomes.values())} cases ({detail})")


def one_line(message: str) -> str:
    assert message and "\n" not in message and "\r" not in message, repr(message)
    return message


def budget(n: int):
    return pytest.mark.parametrize("cases", [n], ids=[f"{n}-cases"])


# =============================================================================================
# image bytes -> imp_cli.images.load_image
# =============================================================================================
def _image_seeds() -> dict[str, bytes]:
    """Small valid files of every format a user may give, in several modes."""
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:18, 0:26]
    rgb = np.clip(np.stack([x * 9, y * 13, (x + y) * 5], -1) + rng.normal(0, 25, (18, 26, 3)), 0, 255)
    im = Image.fromarray(rgb.astype(np.uint8))
    seeds = {}

    def save(name, image, fmt, **kw):
        buf = io.BytesIO()
        image.save(buf, fmt, **kw)
        seeds[name] = buf.getvalue()

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    save("jpeg", im, "JPEG", quality=80)
    save("jpeg-progressive-exif", im, "JPEG", progressive=True, exif=exif.tobytes())
    save("png", im, "PNG")
    save("png-rgba", im.convert("RGBA"), "PNG")
    save("png-palette", im.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG", transparency=0)
    save("png-16bit", Image.fromarray((rgb[..., 0] * 257).astype(np.uint16)), "PNG")
    save("webp", im, "WEBP", quality=80)
    save("webp-lossless", im, "WEBP", lossless=True)
    save("gif", im.convert("P"), "GIF", save_all=True, append_images=[im.rotate(90).convert("P")])
    save("tiff", im, "TIFF")
    save("tiff-deflate-cmyk", im.convert("CMYK"), "TIFF", compression="tiff_adobe_deflate")
    save("bmp", im, "BMP")
    return seeds


def _declare_size(fmt: str, data: bytearray, w: int, h: int) -> bool:
    """Rewrite the image size a file declares (keeping checksums valid); False if not found."""
    if fmt.startswith("png"):
        data[16:24] = struct.pack(">II", w % 2**32, h % 2**32)
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
        return True
    if fmt == "gif":
        data[6:10] = struct.pack("<HH", w % 2**16, h % 2**16)
        return True
    if fmt.startswith("jpeg"):
        for marker in (b"\xff\xc0", b"\xff\xc2"):
            i = data.find(marker)
            if i >= 0:
                data[i + 5:i + 9] = struct.pack(">HH", h % 2**16, w % 2**16)
                return True
        return False
    if fmt == "bmp":
        signed = [v % 2**32 - (2**32 if v % 2**32 >= 2**31 else 0) for v in (w, h)]
        data[18:26] = struct.pack("<ii", *signed)  # negative height: rows stored top-down
        return True
    if fmt.startswith("tiff") and data[:4] == b"II*\0":
        ifd = struct.unpack_from("<I", data, 4)[0]
        found = False
        for k in range(struct.unpack_from("<H", data, ifd)[0]):
            at = ifd + 2 + 12 * k
            if struct.unpack_from("<H", data, at)[0] in (256, 257):  # ImageWidth, ImageLength
                size = w if struct.unpack_from("<H", data, at)[0] == 256 else h
                data[at + 2:at + 12] = struct.pack("<HII", 4, 1, size % 2**32)  # one LONG
                found = True
        return found
    if fmt.startswith("webp") and data[12:16] == b"VP8 ":
        data[26:30] = struct.pack("<HH", w % 2**14, h % 2**14)
        return True
    return False


SIZES = st.one_of(st.sampled_from([0, 1, 2**14 - 1, 2**16 - 1, 2**31 - 1, 2**32 - 1]),
                  st.integers(1, 2**32 - 1), st.integers(1, 20000))


@st.composite
def image_bytes(draw, seeds: dict[str, bytes]) -> tuple[str, bytes]:
    fmt = draw(st.sampled_from(sorted(seeds)))
    data = bytearray(seeds[fmt])
    how = draw(st.sampled_from(["truncate", "flip", "overwrite", "random", "declare", "declare+truncate"]))
    if how == "random":
        return how, seeds[fmt][:draw(st.integers(0, 16))] + draw(st.binary(max_size=512))
    if how.startswith("declare"):
        if not _declare_size(fmt, data, draw(SIZES), draw(SIZES)):
            how = "flip"
        elif how.endswith("truncate"):
            data = data[:draw(st.integers(0, len(data)))]
    if how == "truncate":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif how == "flip":
        for _ in range(draw(st.integers(1, 8))):
            # mostly in the header, where structure lives
            i = draw(st.one_of(st.integers(0, min(len(data), 96) - 1), st.integers(0, len(data) - 1)))
            data[i] ^= 1 << draw(st.integers(0, 7))
    elif how == "overwrite":
        at = draw(st.integers(0, len(data) - 1))
        chunk = draw(st.one_of(st.binary(min_size=1, max_size=8),
                               st.sampled_from([b"\xff" * 4, b"\x00" * 4, b"\x7f\xff\xff\xff"])))
        data[at:at + len(chunk)] = chunk
    return f"{fmt}/{how}", bytes(data)


@budget(IMAGE_CASES)
def test_fuzz_image_bytes(cases, capfd, caplog):
    from imp_cli.images import ImageError, load_image, preprocess

    seeds = _image_seeds()
    outcomes = Counter()

    @fuzz(cases)
    @given(case=image_bytes(seeds), aspect=st.sampled_from(["square", "pad"]))
    def one(case, aspect):
        _, data = case
        caplog.clear()
        try:
            loaded = load_image("-", stdin=io.BytesIO(data))
        except ImageError as e:
            one_line(str(e))
            # nothing beside the one line: no native (libtiff) output, no log record to print
            assert capfd.readouterr().err == ""
            assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
            outcomes["error"] += 1
            return
        assert loaded.image.mode == "RGB" and loaded.image.size == loaded.size
        try:
            pixels = preprocess(loaded.image, size=28, aspect=aspect)
        except ImageError as e:  # a strip too long to pad to a square
            one_line(str(e))
            outcomes["refused to pad"] += 1
            return
        assert pixels.shape == (28, 28, 3) and pixels.dtype == np.uint8
        outcomes["decoded"] += 1

    one()
    report("image bytes", outcomes)
    assert outcomes["error"] and outcomes["decoded"]  # the generator reaches both outcomes


def _bad_image_files(folder: Path) -> list[Path]:
    """A handful of broken images, one per kind of damage."""
    seeds = _image_seeds()
    folder.mkdir(exist_ok=True)
    files = {}
    files["half.png"] = seeds["png"][: len(seeds["png"]) // 2]
    huge = bytearray(seeds["png"])
    _declare_size("png", huge, 100_000, 100_000)
    files["huge.png"] = bytes(huge)
    files["random.jpg"] = bytes(np.random.default_rng(5).integers(0, 256, 300, dtype=np.uint8))
    flipped = bytearray(seeds["gif"])
    _declare_size("gif", flipped, 65535, 65535)
    files["huge.gif"] = bytes(flipped)
    files["cut.webp"] = seeds["webp"][:40]
    paths = []
    for name, data in files.items():
        (folder / name).write_bytes(data)
        paths.append(folder / name)
    return paths


@pytest.fixture(scope="module")
def model(converted) -> tuple[Path, Path]:
    return converted("new", "float16", "square")


def test_fuzz_images_end_to_end(model, tmp_path):
    """Broken images through `imp ask`: exit 1 and exactly the in-process error as one line."""
    from imp_cli.images import ImageError, load_image

    for path in _bad_image_files(tmp_path / "images"):
        with pytest.raises(ImageError) as caught:
            load_image(str(path))
        p = run_imp("ask", path, "What is this?", "-m", model[0], "-n", 2, env=clean_env(tmp_path))
        assert assert_one_line_error(p) == f"error: {caught.value}"


# =============================================================================================
# GGUF headers -> imp_cli.modelfiles (_read / _scan / read_pair)
# =============================================================================================
@pytest.fixture(scope="module")
def decoded_pair(model):
    text, mmproj = model
    pair = decode_gguf(text), decode_gguf(mmproj)
    for path, (kvs, tensors, data) in zip(model, pair):
        assert encode_gguf(kvs, tensors, data) == path.read_bytes()  # the fuzzers' encoder is exact
    return pair


def _values(kind: int):
    """Values of a GGUF type, including its extremes."""
    if kind in (6, 12):
        return st.floats(allow_nan=True, allow_infinity=True, width=32 if kind == 6 else 64)
    if kind == 7:
        return st.booleans()
    if kind == STRING:
        return st.text(max_size=12)
    bits, signed = {0: (8, 0), 1: (8, 1), 2: (16, 0), 3: (16, 1), 4: (32, 0), 5: (32, 1), 10: (64, 0), 11: (64, 1)}[kind]
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return st.one_of(st.sampled_from([lo, hi, 0, 1]), st.integers(lo, hi))


KINDS = st.sampled_from(sorted(SCALAR) + [STRING])


@st.composite
def kv_value(draw):
    kind = draw(st.sampled_from(sorted(SCALAR) + [STRING, ARRAY]))
    if kind != ARRAY:
        return kind, draw(_values(kind))
    item = draw(KINDS)
    return ARRAY, (item, draw(st.lists(_values(item), max_size=draw(st.sampled_from([3, 20])))))


@st.composite
def gguf_files(draw) -> bytes:
    """Random GGUF files: well formed ones, and ones whose counts, lengths, types, dimensions and
    offsets lie, optionally truncated or bit-flipped."""
    keys = st.one_of(st.sampled_from(["general.architecture", "general.alignment", "general.name",
                                      "phi2.block_count", "clip.vision.image_size", "tokenizer.ggml.tokens"]),
                     st.text(min_size=1, max_size=10))
    kvs = draw(st.lists(st.tuples(keys, kv_value()).map(lambda t: (t[0], *t[1])), max_size=6,
                        unique_by=lambda kv: kv[0]))
    tensors, offset = [], 0
    for i in range(draw(st.integers(0, 3))):
        dims = draw(st.lists(st.integers(1, 12), min_size=1, max_size=4))  # kilobytes, not gigabytes
        ttype = draw(st.sampled_from([0, 1, 8, 30]))  # F32, F16, Q8_0, BF16
        block, size = {0: (1, 4), 1: (1, 2), 8: (32, 34), 30: (1, 2)}[ttype]
        dims[0] *= block
        tensors.append((f"t{i}", dims, ttype, offset))
        offset += -(-int(np.prod(dims)) // block * size // 32) * 32
    data = bytes(offset)
    lie = draw(st.sampled_from(["none", "count", "string", "array", "type", "dims", "offset",
                                "version", "truncate", "flip", "nested"]))
    version = draw(st.sampled_from([2, 3])) if lie != "version" else draw(st.integers(0, 2**32 - 1))
    raw = bytearray(encode_gguf(kvs, tensors, data, version=version))
    big = st.one_of(st.sampled_from([2**32 - 1, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))
    if lie == "count":  # n_tensors or n_kv
        at = draw(st.sampled_from([8, 16]))
        raw[at:at + 8] = struct.pack("<Q", draw(big))
    elif lie in ("string", "array", "type", "dims", "offset", "nested") and (kvs or tensors):
        # rebuild with one lying field
        if lie in ("string", "type", "array", "nested") and kvs:
            k = draw(st.integers(0, len(kvs) - 1))
            key, kind, v = kvs[k]
            prefix = encode_gguf(kvs[:k], [], version=version, align=1)[24:]
            at = 24 + len(prefix)
            if lie == "string":  # the key's length
                raw[at:at + 8] = struct.pack("<Q", draw(big))
            elif lie == "type":
                at += 8 + len(key.encode())
                raw[at:at + 4] = struct.pack("<I", draw(st.one_of(st.integers(0, 12), st.integers(13, 2**32 - 1))))
            elif kind == ARRAY:
                at += 8 + len(key.encode()) + 4
                if lie == "nested":
                    raw[at:at + 4] = struct.pack("<I", ARRAY)
                else:
                    raw[at + 4:at + 12] = struct.pack("<Q", draw(big))
        elif tensors:
            kv_part = len(encode_gguf(kvs, [], version=version, align=1))
            t = draw(st.integers(0, len(tensors) - 1))
            at = kv_part + len(encode_gguf([], tensors[:t], align=1)) - 24
            name, dims, _, _ = tensors[t]
            at += 8 + len(name)
            if lie == "dims":
                raw[at:at + 4] = struct.pack("<I", draw(st.integers(0, 2**32 - 1)))
            elif lie == "type":
                where = at + 4 + 8 * len(dims)
                raw[where:where + 4] = struct.pack("<I", draw(st.integers(0, 2**32 - 1)))
            else:
                where = at + 4 + 8 * len(dims) + 4
                raw[where:where + 8] = struct.pack("<Q", draw(big))
    elif lie == "truncate":
        raw = raw[:draw(st.integers(4, max(4, len(raw) - 1)))]
    elif lie == "flip":
        for _ in range(draw(st.integers(1, 6))):
            i = draw(st.integers(4, len(raw) - 1))
            raw[i] ^= 1 << draw(st.integers(0, 7))
    return bytes(raw)


@budget(GGUF_SCAN_CASES)
def test_fuzz_gguf_header_scanner(cases, tmp_path):
    """Random and lying GGUF headers through the pair check's reader. A file it accepts must
    read the same as gguf's own reader (for the values it keeps)."""
    from gguf import GGUFReader

    from imp_cli.errors import ImpError
    from imp_cli.modelfiles import _read

    path = tmp_path / "x.gguf"
    outcomes = Counter()

    @fuzz(cases)
    @given(raw=gguf_files())
    def one(raw):
        path.write_bytes(raw)
        try:
            fields, _ = _read(path)
        except ImpError as e:
            one_line(str(e))
            outcomes["refused"] += 1
            return
        outcomes["read"] += 1
        reference = GGUFReader(path)  # must agree with what we kept
        for key, value in fields.items():
            if value is not None:
                expected = reference.fields[key].contents()
                assert value == expected or (value != value and expected != expected), (key, value, expected)

    one()
    report("GGUF header scanner", outcomes)
    assert outcomes["refused"] and outcomes["read"]


@st.composite
def pair_damage(draw, decoded_pair):
    """One file of the real converted pair, damaged in its header or cut short."""
    which = draw(st.sampled_from([0, 1]))
    kvs, tensors, data = decoded_pair[which]
    raw = bytearray(encode_gguf(kvs, tensors, data))
    header = len(raw) - len(data)
    how = draw(st.sampled_from(["flip", "overwrite", "truncate"]))
    if how == "truncate":
        raw = raw[:draw(st.one_of(st.integers(0, header), st.integers(0, len(raw) - 1)))]
    elif how == "flip":
        for _ in range(draw(st.integers(1, 4))):
            raw[draw(st.integers(4, header - 1))] ^= 1 << draw(st.integers(0, 7))
    else:
        at = draw(st.integers(4, header - 8))
        raw[at:at + 8] = struct.pack("<Q", draw(st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1])))
    return which, bytes(raw)


@budget(GGUF_PAIR_CASES)
def test_fuzz_gguf_pair_check(cases, model, decoded_pair, tmp_path):
    """Bit flips, overwritten counts/lengths/offsets and truncation of the real pair."""
    from imp_cli.errors import ImpError
    from imp_cli.modelfiles import ModelPair, read_pair

    paths = [tmp_path / "x-F16.gguf", tmp_path / "x-mmproj-F16.gguf"]
    outcomes = Counter()

    @fuzz(cases)
    @given(damage=pair_damage(decoded_pair))
    def one(damage):
        which, raw = damage
        for i, path in enumerate(paths):
            shutil.copyfile(model[i], path)
        paths[which].write_bytes(raw)
        try:
            assert isinstance(read_pair(*paths), ModelPair)
            outcomes["accepted"] += 1
        except ImpError as e:
            one_line(str(e))
            outcomes["refused"] += 1

    one()
    report("GGUF pair check", outcomes)
    assert outcomes["refused"] and outcomes["accepted"]


KEYS_READ = {  # the keys llama.cpp (or read_pair) reads, per file of the pair
    0: ["general.architecture", "general.alignment", "imp.prompt_family", "imp.image_aspect_ratio",
        "phi2.embedding_length", "phi2.context_length", "phi2.block_count", "phi2.rope.dimension_count",
        "phi2.attention.layer_norm_epsilon", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token"],
    1: ["general.architecture", "general.alignment", "imp.image_aspect_ratio", "imp.image_token_count",
        "clip.has_vision_encoder", "clip.projector_type", "clip.use_gelu", "clip.vision.image_size",
        "clip.vision.patch_size", "clip.vision.projection_dim", "clip.vision.block_count",
        "clip.vision.attention.layer_norm_epsilon", "clip.vision.image_mean", "clip.vision.feature_layer"],
}


@budget(GGUF_KEY_CASES)
def test_fuzz_gguf_key_values(cases, decoded_pair, model, tmp_path):
    """The keys llama.cpp reads, given other types, other values or removed: the pair check
    accepts (a value llama.cpp takes) or refuses in one line, never lets a wrong type through."""
    from imp_cli.errors import ImpError
    from imp_cli.modelfiles import ModelPair, read_pair

    paths = [tmp_path / "x-F16.gguf", tmp_path / "x-mmproj-F16.gguf"]
    originals = {i: {k: (kind, v) for k, kind, v in decoded_pair[i][0]} for i in (0, 1)}
    outcomes = Counter()

    @fuzz(cases)
    @given(which=st.sampled_from([0, 1]), data=st.data())
    def one(which, data):
        key = data.draw(st.sampled_from(KEYS_READ[which]))
        new = data.draw(st.one_of(st.none(), kv_value()))
        kvs, tensors, raw = decoded_pair[which]
        changed = with_key(kvs, key, *(new or (None, None)))
        for i, path in enumerate(paths):
            shutil.copyfile(model[i], path)
        paths[which].write_bytes(encode_gguf(changed, tensors, raw))
        try:
            pair = read_pair(*paths)
        except ImpError as e:
            one_line(str(e))
            outcomes["refused"] += 1
            return
        assert isinstance(pair, ModelPair)
        if new is not None and key in originals[which]:
            kind, _ = originals[which][key]
            if kind != ARRAY:  # a scalar key llama.cpp reads keeps its type
                assert new[0] == kind, (key, new)
            else:
                assert new[0] == ARRAY and new[1][0] == originals[which][key][1][0], (key, new)
        outcomes["accepted"] += 1

    one()
    report("GGUF key values", outcomes)
    assert outcomes["refused"] and outcomes["accepted"]


def _gguf_end_to_end_cases(decoded_pair) -> dict[str, tuple[int, bytes]]:
    """Damaged pairs that llama.cpp answered with an abort (SIGABRT/SIGSEGV) or a failed load
    before the pair check knew them, each found by the fuzzers (which file, its bytes)."""
    (tk, tt, td), (mk, mt, md) = decoded_pair
    mm = encode_gguf(mk, mt, md)
    tokens = next(v for k, _, v in tk if k == "tokenizer.ggml.tokens")[1]
    long_string = bytearray(mm)
    long_string[24:32] = struct.pack("<Q", 2**62)  # the first key's length
    return {
        "image_size as UINT64": (1, encode_gguf(with_key(mk, "clip.vision.image_size", 10, 56), mt, md)),
        "use_gelu as UINT32": (1, encode_gguf(with_key(mk, "clip.use_gelu", 4, 1), mt, md)),
        "layer_norm_epsilon as FLOAT64": (1, encode_gguf(with_key(mk, "clip.vision.attention.layer_norm_epsilon", 12, 1e-6), mt, md)),
        "tokens as INT32": (0, encode_gguf(with_key(tk, "tokenizer.ggml.tokens", 9, (5, list(range(10)))), tt, td)),
        "a token twice": (0, encode_gguf(with_key(tk, "tokenizer.ggml.tokens", 9, (8, [*tokens[:-1], tokens[0]])), tt, td)),
        "vision heads not dividing": (1, encode_gguf(with_key(mk, "clip.vision.attention.head_count", 4, 3), mt, md)),
        "vision tensor missing": (1, encode_gguf(mk, [(n.replace("attn_k", "attn_x"), d, t, o) for n, d, t, o in mt], md)),
        "rotary wider than a head": (0, encode_gguf(with_key(tk, "phi2.rope.dimension_count", 4, 100), tt, td)),
        "no text blocks": (0, encode_gguf(with_key(tk, "phi2.block_count", 4, 0), tt, td)),
        "five dimensions": (1, encode_gguf(mk, [(n, d + [1] * (5 - len(d)) if i == 0 else d, t, o)
                                                for i, (n, d, t, o) in enumerate(mt)], md)),
        "string length 2**62": (1, bytes(long_string)),
        "header cut": (1, mm[:200]),
    }


def test_fuzz_gguf_end_to_end(decoded_pair, model, tmp_path):
    """Through `imp ask`: exit 1 with the pair check's one line; llama.cpp never sees the file."""
    from imp_cli.errors import ImpError
    from imp_cli.modelfiles import read_pair

    for name, (which, raw) in _gguf_end_to_end_cases(decoded_pair).items():
        folder = tmp_path / name.replace(" ", "-").replace("*", "")
        folder.mkdir()
        paths = [folder / "x-F16.gguf", folder / "x-mmproj-F16.gguf"]
        for i, path in enumerate(paths):
            shutil.copyfile(model[i], path)
        paths[which].write_bytes(raw)
        with pytest.raises(ImpError) as caught:
            read_pair(*paths)
        p = run_imp("ask", _image(tmp_path), "What is this?", "-m", paths[0], "--mmproj", paths[1], "-n", 2,
                    env=clean_env(folder))
        assert p.returncode == 1, (name, p.returncode, p.stderr[-2000:])  # not -6 (SIGABRT)
        assert assert_one_line_error(p, str(paths[which])) == f"error: {caught.value}", name


def _image(folder: Path) -> Path:
    path = folder / "ok.png"
    if not path.exists():
        Image.new("RGB", (20, 14), (90, 140, 200)).save(path)
    return path


# =============================================================================================
# checkpoints -> convert.pipeline.convert
# =============================================================================================
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.sampled_from([0, -1, 1, 2**31, 2**64, 10**30, -2]),
              st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
              st.sampled_from(["square", "pad", "imp", "mlp2x_gelu", "patch", "1e-5", "64", "[]"])),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)
CONFIG_KEYS = ["architectures", "model_type", "eos_token_id", "image_aspect_ratio", "mm_hidden_size",
               "mm_projector_type", "mm_vision_select_feature", "mm_vision_select_layer", "vision_tower_config",
               "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "partial_rotary_factor", "rope_theta", "layer_norm_eps", "vocab_size", "max_position_embeddings",
               "rotary_dim", "n_head", "n_embd", "n_layer", "n_inner", "layer_norm_epsilon", "n_positions"]
VISION_KEYS = ["hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "image_size",
               "patch_size", "layer_norm_eps"]


@st.composite
def config_damage(draw, config: dict) -> bytes:
    how = draw(st.sampled_from(["set", "set", "set", "vision", "delete", "whole", "bytes"]))
    cfg = json.loads(json.dumps(config))
    if how == "bytes":
        return draw(st.one_of(st.binary(max_size=40), st.just(json.dumps(config).encode()[:draw(st.integers(0, 200))]),
                              st.just(b"\xff\xfe{}")))
    if how == "whole":
        cfg = draw(JSON_VALUES)
    elif how == "delete":
        for key in draw(st.lists(st.sampled_from(CONFIG_KEYS), min_size=1, max_size=4)):
            cfg.pop(key, None)
    elif how == "vision":
        key = draw(st.sampled_from(VISION_KEYS))
        if draw(st.booleans()):
            cfg["vision_tower_config"].pop(key, None)
        else:
            cfg["vision_tower_config"][key] = draw(JSON_VALUES)
        if draw(st.booleans()):  # some configs store it as a JSON string
            cfg["vision_tower_config"] = json.dumps(cfg["vision_tower_config"])
    else:
        for key in draw(st.lists(st.sampled_from(CONFIG_KEYS), min_size=1, max_size=2)):
            cfg[key] = draw(JSON_VALUES)
    return json.dumps(cfg, allow_nan=True).encode()


def _linked_copy(src: Path, dest: Path, *, replace: dict[str, bytes]) -> Path:
    """A checkpoint folder of symlinks to src's files, except the ones given in `replace`."""
    dest.mkdir(parents=True)
    for f in src.iterdir():
        if f.name in replace:
            (dest / f.name).write_bytes(replace[f.name])
        else:
            (dest / f.name).symlink_to(f)
    return dest


def _convert_outcome(folder: Path, out: Path) -> str:
    """Convert; 'converted' (two complete files) or 'refused' (one line, nothing written)."""
    from convert.errors import ConvertError
    from convert.pipeline import convert

    try:
        result = convert(str(folder), out, quant="F16", mmproj_type="F16")
    except ConvertError as e:
        one_line(str(e))
        assert not out.exists() or list(out.iterdir()) == [], list(out.iterdir())
        return "refused"
    assert sorted(p.name for p in out.iterdir()) == sorted([Path(result.text_path).name, Path(result.mmproj_path).name])
    return "converted"


@pytest.fixture(scope="module")
def ckpt(checkpoint) -> Path:
    return checkpoint("new", "float16", "square")


@budget(CONFIG_CASES)
def test_fuzz_checkpoint_config(cases, ckpt, tmp_path):
    """config.json with wrong types, missing keys, absurd values, or not JSON at all."""
    config = json.loads((ckpt / "config.json").read_text())
    outcomes = Counter()
    n = iter(range(10**9))

    @fuzz(cases)
    @given(raw=config_damage(config))
    def one(raw):
        i = next(n)
        folder = _linked_copy(ckpt, tmp_path / f"c{i}", replace={"config.json": raw})
        outcomes[_convert_outcome(folder, tmp_path / f"out{i}")] += 1

    one()
    report("checkpoint config.json", outcomes)
    assert outcomes["refused"] and outcomes["converted"]


def _split_safetensors(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack_from("<Q", raw)
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join_safetensors(header, data: bytes, header_len: int | None = None) -> bytes:
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(text) if header_len is None else header_len) + text + data


@st.composite
def safetensors_damage(draw, shard: bytes) -> bytes:
    header, data = _split_safetensors(shard)
    names = sorted(k for k in header if k != "__metadata__")
    how = draw(st.sampled_from(["dtype", "shape", "reshape", "offsets", "overlap", "drop", "duplicate-range",
                                "header_len", "header", "truncate", "metadata"]))
    name = draw(st.sampled_from(names))
    entry = header[name]
    if how == "dtype":
        entry["dtype"] = draw(st.one_of(st.sampled_from(["F16", "BF16", "F32", "F64", "I8", "F8_E4M3", "", "f16"]),
                                        JSON_VALUES))
    elif how == "shape":
        entry["shape"] = draw(st.one_of(
            st.lists(st.one_of(st.integers(-3, 300), st.sampled_from([2**40, 2**63, 0])), max_size=5),
            JSON_VALUES))
    elif how == "reshape":  # the same number of values in another rank: sizes all check out
        n = int(np.prod(entry["shape"]))
        entry["shape"] = draw(st.sampled_from([[n], [1, n], [n, 1], [1] + entry["shape"], entry["shape"] + [1, 1],
                                               entry["shape"][::-1]]))
    elif how == "offsets":
        big = st.one_of(st.integers(-10, len(data) + 10), st.sampled_from([2**63, 2**64, -(2**63)]))
        entry["data_offsets"] = draw(st.one_of(st.lists(big, max_size=3), JSON_VALUES))
    elif how == "overlap":  # move a tensor onto another one's bytes (same size)
        other = header[draw(st.sampled_from(names))]
        start = other["data_offsets"][0] + draw(st.integers(0, 8))
        size = entry["data_offsets"][1] - entry["data_offsets"][0]
        entry["data_offsets"] = [start, start + size]
    elif how == "drop":
        del header[name]
    elif how == "duplicate-range":
        header[name + ".copy"] = dict(entry)
    elif how == "metadata":
        header["__metadata__"] = draw(JSON_VALUES)
    elif how == "header":
        return _join_safetensors(draw(st.one_of(JSON_VALUES.map(lambda v: json.dumps(v).encode()),
                                                st.binary(max_size=30))), data)
    elif how == "header_len":
        text = json.dumps(header).encode()
        return _join_safetensors(text, data, draw(st.one_of(st.integers(0, len(text) + len(data) + 9),
                                                            st.sampled_from([2**63, 2**64 - 1]))))
    elif how == "truncate":
        return shard[:draw(st.integers(0, len(shard) - 1))]
    return _join_safetensors(header, data)


@budget(SAFETENSORS_CASES)
def test_fuzz_safetensors_headers(cases, ckpt, tmp_path):
    """Shards whose header lies: dtypes, shapes, offsets (out of range, overlapping), length."""
    shard_names = sorted(p.name for p in ckpt.glob("*.safetensors"))
    shards = {name: (ckpt / name).read_bytes() for name in shard_names}
    outcomes = Counter()
    n = iter(range(10**9))

    @fuzz(cases)
    @given(data=st.data())
    def one(data):
        name = data.draw(st.sampled_from(shard_names))
        raw = data.draw(safetensors_damage(shards[name]))
        i = next(n)
        folder = _linked_copy(ckpt, tmp_path / f"c{i}", replace={name: raw})
        outcomes[_convert_outcome(folder, tmp_path / f"out{i}")] += 1

    one()
    report("safetensors headers", outcomes)
    assert outcomes["refused"] and outcomes["converted"]


def test_fuzz_checkpoint_end_to_end(ckpt, tmp_path):
    """Through `imp convert`: exit 1, exactly the in-process error as one line, nothing written."""
    from convert.errors import ConvertError
    from convert.pipeline import convert

    config = json.loads((ckpt / "config.json").read_text())
    shard = sorted(ckpt.glob("*.safetensors"))[0]
    header, data = _split_safetensors(shard.read_bytes())
    names = sorted(k for k in header if k != "__metadata__")
    overlapping = json.loads(json.dumps(header))
    overlapping[names[1]]["data_offsets"] = [o + 2 for o in overlapping[names[0]]["data_offsets"]][:1] + \
        [overlapping[names[0]]["data_offsets"][0] + 2 + header[names[1]]["data_offsets"][1] - header[names[1]]["data_offsets"][0]]
    negative = json.loads(json.dumps(header))
    negative[names[0]]["shape"] = [-1] * len(negative[names[0]]["shape"])
    cases = {
        "heads as text": {"config.json": json.dumps({**config, "num_attention_heads": "four"}).encode()},
        "vision config not JSON": {"config.json": json.dumps({**config, "vision_tower_config": "{oops"}).encode()},
        "overlapping tensors": {shard.name: _join_safetensors(overlapping, data)},
        "negative shape": {shard.name: _join_safetensors(negative, data)},
    }
    for i, (name, replace) in enumerate(cases.items()):
        folder = _linked_copy(ckpt, tmp_path / f"case{i}" / ckpt.name, replace=replace)
        with pytest.raises(ConvertError) as caught:
            convert(str(folder), tmp_path / f"in-process{i}", quant="F16", mmproj_type="F16")
        out = tmp_path / f"out{i}"
        p = run_imp("convert", folder, "--out", out, "--quant", "F16", env=clean_env(tmp_path))
        assert assert_one_line_error(p) == f"error: {caught.value}", name
        assert not out.exists() or list(out.iterdir()) == [], name


# =============================================================================================
# regressions: one pinned case per bug the fuzzers found (they also stay in the fuzzers' reach)
# =============================================================================================
def test_regression_strip_too_long_to_pad_is_refused():
    """A GIF declaring a 0 x 65535 screen decodes as a 26 x 65535 strip (1.7 M pixels, within
    Pillow's limit); padding it to a square asked for 12 GB and the process was killed."""
    from imp_cli.images import ImageError, load_image, preprocess

    data = bytearray(_image_seeds()["gif"])
    _declare_size("gif", data, 0, 65535)
    strip = load_image("-", stdin=io.BytesIO(bytes(data))).image
    assert strip.size == (26, 65535)
    with pytest.raises(ImageError, match="too long and thin to pad") as caught:
        preprocess(strip, size=28, aspect="pad")
    one_line(str(caught.value))
    assert preprocess(strip, size=28, aspect="square").shape == (28, 28, 3)  # a squash needs no canvas


def test_regression_decoder_output_stays_off_stderr(capfd, caplog):
    """libtiff printed "ZIPDecode: ..." on file descriptor 2 and Pillow logged errors (printed by
    Python with no handler): beside the error line, that made two or more lines."""
    from imp_cli.images import ImageError, load_image

    tiff = bytearray(_image_seeds()["tiff-deflate-cmyk"])
    tiff[8] ^= 0x10  # inside the deflate stream
    with pytest.raises(ImageError, match="ZIPDecode") as caught:
        load_image("-", stdin=io.BytesIO(bytes(tiff)))
    one_line(str(caught.value))
    assert capfd.readouterr().err == ""
    assert not caplog.records


def test_regression_tensor_of_another_rank_is_a_convert_error(ckpt, tmp_path):
    """The patch embedding stored flat (same bytes, rank 1) raised ValueError from unpacking."""
    from convert.errors import ConvertError
    from convert.pipeline import convert

    shard = next(p for p in sorted(ckpt.glob("*.safetensors"))
                 if "patch_embedding" in json.dumps(_split_safetensors(p.read_bytes())[0]))
    header, data = _split_safetensors(shard.read_bytes())
    name = next(k for k in header if k.endswith("patch_embedding.weight"))
    header[name]["shape"] = [int(np.prod(header[name]["shape"]))]
    folder = _linked_copy(ckpt, tmp_path / "ck", replace={shard.name: _join_safetensors(header, data)})
    with pytest.raises(ConvertError, match="expected"):
        convert(str(folder), tmp_path / "out", quant="F16", mmproj_type="F16")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_regression_missing_vision_tensor_is_a_convert_error(ckpt, tmp_path):
    """A shard without the position embedding raised KeyError from Checkpoint.shape."""
    from convert.errors import ConvertError
    from convert.pipeline import convert

    for shard in sorted(ckpt.glob("*.safetensors")):
        header, data = _split_safetensors(shard.read_bytes())
        name = next((k for k in header if k.endswith("position_embedding.weight")), None)
        if name:
            del header[name]
            break
    folder = _linked_copy(ckpt, tmp_path / "ck", replace={shard.name: _join_safetensors(header, data)})
    with pytest.raises(ConvertError, match="position_embedding"):
        convert(str(folder), tmp_path / "out", quant="F16", mmproj_type="F16")
