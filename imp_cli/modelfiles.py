"""Find and check a (text GGUF, mmproj GGUF) pair before llama.cpp ever sees it.

llama.cpp answers a wrong key type, a truncated file or a mismatched pair with an abort of the
whole process; everything checkable is checked here first and becomes a one-line error.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ImpError
from .prompts import FAMILIES

TEXT_ARCHS = {"phi2", "phi3", "qwen2"}  # llama.cpp architectures of the Imp backbones (3B, 4B, 2B)


@dataclass(frozen=True)
class ModelPair:
    text_path: Path
    mmproj_path: Path
    name: str
    prompt_family: str
    image_aspect: str
    image_size: int
    image_tokens: int
    n_embd: int
    n_ctx_train: int
    text_type: str
    mmproj_type: str


def _read(path: Path) -> tuple[dict, dict]:
    """The scalar and short-array key/values of a GGUF file, after checking its header as
    llama.cpp will (value types of the keys it reads, tensor directory, every tensor's data inside
    the file): llama.cpp aborts the process on a key of the wrong type. Long arrays (the
    tokenizer's) are skipped, not decoded: gguf's own reader decodes them all in Python, over a
    second per model, which llama.cpp then redoes."""
    import mmap

    if not path.is_file():
        raise ImpError(f"model file {path} not found")
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ImpError(f"{path} is not a GGUF file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                fields, kinds, tensors, end = _scan(data)
    except OSError as e:
        raise ImpError(f"cannot read {path}: {e.strerror}") from None
    except (IndexError, KeyError, UnicodeDecodeError, OverflowError, struct.error):
        raise ImpError(f"{path} is truncated or corrupt (unreadable GGUF header)") from None
    except ValueError as e:
        raise ImpError(f"{path} is truncated or corrupt (unreadable GGUF header: {e})") from None
    if end > path.stat().st_size:
        raise ImpError(f"{path} is truncated (tensor data ends past the end of the file)")
    _check_kinds(fields, kinds, path)
    return fields, tensors


# GGUF value types (gguf spec): scalar struct formats; 8 = string, 9 = array.
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY, _SHORT_ARRAY = 8, 9, 16
_U32, _I32, _F32, _BOOL = 4, 5, 6, 7
_KIND_NAMES = {0: "UINT8", 1: "INT8", 2: "UINT16", 3: "INT16", 4: "UINT32", 5: "INT32", 6: "FLOAT32",
               7: "BOOL", 8: "STRING", 9: "ARRAY", 10: "UINT64", 11: "INT64", 12: "FLOAT64"}
_MAX_DIMS, _MAX_NAME = 4, 64  # ggml's GGML_MAX_DIMS and GGML_MAX_NAME (a name must be shorter)

# The value type llama.cpp's getters require of each key it reads (a mismatch is an abort in
# ggml for the mmproj keys, a failed load for the others); (ARRAY, item type) for arrays. Keys
# of the text architecture are listed without their "<arch>." prefix.
_KINDS = {
    "general.architecture": _STRING, "general.name": _STRING, "general.alignment": _U32,
    "general.file_type": _U32,
    "imp.prompt_family": _STRING, "imp.image_aspect_ratio": _STRING, "imp.image_token_count": _U32,
    "tokenizer.ggml.model": _STRING, "tokenizer.ggml.pre": _STRING,
    "tokenizer.ggml.tokens": (_ARRAY, _STRING), "tokenizer.ggml.token_type": (_ARRAY, _I32),
    "tokenizer.ggml.scores": (_ARRAY, _F32), "tokenizer.ggml.merges": (_ARRAY, _STRING),
    "tokenizer.ggml.bos_token_id": _U32, "tokenizer.ggml.eos_token_id": _U32,
    "tokenizer.ggml.eot_token_id": _U32, "tokenizer.ggml.unknown_token_id": _U32,
    "tokenizer.ggml.padding_token_id": _U32, "tokenizer.ggml.add_bos_token": _BOOL,
    "tokenizer.ggml.add_eos_token": _BOOL,
    "clip.has_vision_encoder": _BOOL, "clip.has_text_encoder": _BOOL, "clip.has_llava_projector": _BOOL,
    "clip.projector_type": _STRING, "clip.use_gelu": _BOOL, "clip.use_silu": _BOOL,
    "clip.vision.image_size": _U32, "clip.vision.patch_size": _U32,
    "clip.vision.embedding_length": _U32, "clip.vision.feed_forward_length": _U32,
    "clip.vision.projection_dim": _U32, "clip.vision.block_count": _U32,
    "clip.vision.attention.head_count": _U32, "clip.vision.attention.layer_norm_epsilon": _F32,
    "clip.vision.image_mean": (_ARRAY, _F32), "clip.vision.image_std": (_ARRAY, _F32),
    "clip.vision.feature_layer": (_ARRAY, _I32),
}
_ARCH_KINDS = {
    "context_length": _U32, "embedding_length": _U32, "feed_forward_length": _U32, "block_count": _U32,
    "attention.head_count": _U32, "attention.head_count_kv": _U32, "rope.dimension_count": _U32,
    "attention.layer_norm_epsilon": _F32, "attention.layer_norm_rms_epsilon": _F32, "rope.freq_base": _F32,
}
_SAME_LENGTH = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")


def _kind_name(kind) -> str:
    if isinstance(kind, tuple):
        return f"ARRAY of {_KIND_NAMES.get(kind[1], kind[1])}"
    return _KIND_NAMES.get(kind, str(kind))


def _check_kinds(fields: dict, kinds: dict, path: Path) -> None:
    arch = fields.get("general.architecture")
    for key, (kind, item, n) in kinds.items():
        prefix, _, rest = key.partition(".")
        want = _ARCH_KINDS.get(rest) if prefix == arch and key not in _KINDS else _KINDS.get(key)
        have = (kind, item) if kind == _ARRAY else kind
        if want is not None and have != want:
            raise ImpError(f"{path}: GGUF key {key} is {_kind_name(have)}, expected {_kind_name(want)}")
    lengths = {key: kinds[key][2] for key in _SAME_LENGTH if key in kinds}
    if len(set(lengths.values())) > 1:
        raise ImpError(f"{path}: the tokenizer arrays differ in length ("
                       + ", ".join(f"{k.rsplit('.', 1)[1]} {n}" for k, n in lengths.items()) + ")")
    for key in ("clip.vision.image_mean", "clip.vision.image_std"):
        if key in kinds and kinds[key][2] != 3:
            raise ImpError(f"{path}: GGUF key {key} has {kinds[key][2]} values, expected 3 (R, G, B)")


def _scan(data) -> tuple[dict, dict, dict, int]:
    """Parse a GGUF header from a buffer: (fields, {key: (type, item type, length)},
    {tensor name: dims}, end of the tensor data). Checks the tensor directory as llama.cpp's
    gguf loader does."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    pos = 4

    def take(fmt: str):
        nonlocal pos
        value = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return value[0]

    def string(keep: bool = True):
        nonlocal pos
        n = take("Q")
        if pos + n > len(data):
            raise ValueError("string past the end")
        pos += n
        return bytes(data[pos - n:pos]).decode("utf-8") if keep else None

    def value(kind: int, keep: bool = True):
        if kind in _SCALAR:
            return take(_SCALAR[kind])
        if kind == _STRING:
            return string(keep)
        raise ValueError(f"unknown GGUF value type {kind}")

    version = take("I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version}, expected 2 or 3")
    n_tensors, n_kv = take("Q"), take("Q")
    fields, kinds = {}, {}
    for _ in range(n_kv):
        key = string()
        if key in fields:
            raise ValueError(f"duplicate key {key!r}")
        kind, item, n = take("I"), None, None
        if kind == _ARRAY:  # arrays of scalars or strings (llama.cpp reads no nested arrays)
            item, n = take("I"), take("Q")
            keep = n <= _SHORT_ARRAY
            if item in _SCALAR and not keep:  # skip fixed-size items in one step
                pos += n * struct.calcsize(_SCALAR[item])
                if pos > len(data):
                    raise ValueError(f"array {key!r} past the end")
                fields[key] = None
            elif key == "tokenizer.ggml.tokens" and item == _STRING:
                # llama.cpp aborts (GGML_ASSERT) on a vocabulary with a token listed twice
                seen, u64, end_of_data = set(), struct.Struct("<Q").unpack_from, len(data)
                for _ in range(n):
                    (size,) = u64(data, pos)
                    pos += 8 + size
                    if pos > end_of_data:
                        raise ValueError("string past the end")
                    seen.add(data[pos - size:pos])
                if len(seen) != n:
                    raise ValueError("a token appears twice in the vocabulary")
                fields[key] = None
            else:
                items = [value(item, keep) for _ in range(n)]
                fields[key] = items if keep else None
        else:
            fields[key] = value(kind)
        kinds[key] = (kind, item, n)
    align = fields.get("general.alignment", 32)
    if kinds.get("general.alignment", (_U32,))[0] != _U32 or align <= 0 or align & (align - 1):
        raise ValueError(f"general.alignment {align!r} is not a UINT32 power of two")
    tensors, expected, end = {}, 0, 0
    for _ in range(n_tensors):
        name = string()
        if len(name.encode()) >= _MAX_NAME or name in tensors:
            raise ValueError(f"tensor name {name!r} is too long or repeated")
        n_dims = take("I")
        if n_dims > _MAX_DIMS:
            raise ValueError(f"tensor {name!r} has {n_dims} dimensions")
        dims = [take("Q") for _ in range(n_dims)]
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(take("I"))]
        count = 1
        for d in dims:
            count *= d
        if any(d >= 2**63 for d in dims) or count >= 2**63 or (dims and dims[0] % block):
            raise ValueError(f"tensor {name!r} has impossible dimensions {dims}")
        tensors[name] = dims
        # llama.cpp wants the tensors' data back to back, in directory order, each aligned.
        if take("Q") != expected:
            raise ValueError(f"tensor {name!r} is not at the offset its predecessors imply")
        end = expected + count // block * size
        expected += -(-(count // block * size) // align) * align
    return fields, kinds, tensors, -(-pos // align) * align + end


def _need(fields: dict, key: str, path: Path):
    if key not in fields:
        raise ImpError(f"{path} lacks GGUF key {key}; was it made by `imp convert`?")
    return fields[key]


def _size(fields: dict, key: str, path: Path) -> int:
    """A size llama.cpp divides by or allocates from: present and positive (its type is checked)."""
    value = _need(fields, key, path)
    if value <= 0:
        raise ImpError(f"{path}: GGUF key {key} is {value}, expected a positive size")
    return value


def read_pair(text_path: Path, mmproj_path: Path) -> ModelPair:
    """The checked pair. A pair that passed the checks is remembered by the files' identities
    (path, size, mtime, ctime, inode; $IMP_HOME/pairs.json): the next process
    skips reading the headers (the vocabulary scan, ~0.14 s for a 51,200-token vocabulary, and
    importing gguf). A file changed since, or written less than a few seconds before it was
    checked (its mtime may not have moved yet: git's "racy" case), is checked again."""
    text_path, mmproj_path = Path(text_path), Path(mmproj_path)
    stamps = _stamps(text_path, mmproj_path)
    if stamps is not None:
        known = _remembered(stamps)
        if known is not None:
            return ModelPair(text_path=text_path, mmproj_path=mmproj_path, **known)
    pair = check_pair(text_path, mmproj_path)
    if stamps is not None and time.time() - max(st[1] for st in stamps[1]) / 1e9 > _SETTLED_S:
        _remember(stamps, pair)
    return pair


# -- checked pairs, remembered by file identity ------------------------------------------------------
PAIRS_FILE = "pairs.json"
_SETTLED_S = 3.0  # a file younger than this may still change without its mtime showing it
_MAX_PAIRS = 64


def _pairs_path() -> Path:
    from . import store

    return store.home() / PAIRS_FILE


def _checks_version() -> str:
    """What a remembered check depends on besides the files: this module's checks and imp."""
    import hashlib

    from .version import __version__

    return hashlib.sha256(Path(__file__).read_bytes() + __version__.encode()).hexdigest()[:16]


def _stamps(*paths: Path):
    """(key, [[size, mtime_ns, ctime_ns, inode] per file]) or None if a file cannot be stat'ed."""
    import os

    try:
        sts = [os.stat(p) for p in paths]
        key = "\n".join(os.path.realpath(p) for p in paths)
    except OSError:
        return None
    return key, [[st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino] for st in sts]


def _load_pairs() -> dict:
    import json

    try:
        data = json.loads(_pairs_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("checks") != _checks_version() or not isinstance(data.get("pairs"), dict):
        return {}
    return data["pairs"]


def _remembered(stamps) -> dict | None:
    key, files = stamps
    entry = _load_pairs().get(key)
    if not isinstance(entry, dict) or entry.get("files") != files or not isinstance(entry.get("pair"), dict):
        return None
    fields = entry["pair"]
    names = {f for f in ModelPair.__dataclass_fields__ if f not in ("text_path", "mmproj_path")}
    return fields if set(fields) == names else None


def _remember(stamps, pair: ModelPair) -> None:
    """Best effort: a failure to write costs only the check next time."""
    import json

    from convert.atomic import write_text

    key, files = stamps
    pairs = _load_pairs()
    pairs.pop(key, None)
    pairs[key] = {"files": files, "pair": {k: v for k, v in pair.__dict__.items()
                                           if k not in ("text_path", "mmproj_path")}}
    while len(pairs) > _MAX_PAIRS:
        pairs.pop(next(iter(pairs)))
    path = _pairs_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps({"checks": _checks_version(), "pairs": pairs}))
    except OSError:
        pass


def check_pair(text_path: Path, mmproj_path: Path) -> ModelPair:
    """Read both GGUF headers and check everything llama.cpp would abort on (read_pair's work)."""
    (text, _), (proj, proj_tensors) = _read(text_path), _read(mmproj_path)
    arch = text.get("general.architecture")
    if arch == "clip":
        raise ImpError(f"{text_path} is a vision projector (mmproj), not a language model")
    if arch not in TEXT_ARCHS:
        raise ImpError(f"{text_path}: unsupported model architecture {arch!r} (imp runs Imp models: {', '.join(sorted(TEXT_ARCHS))})")
    if proj.get("general.architecture") != "clip":
        raise ImpError(f"{mmproj_path} is not a vision projector (mmproj) GGUF")
    family = _need(text, "imp.prompt_family", text_path)
    if family not in FAMILIES:
        raise ImpError(f"{text_path}: unsupported prompt family {family!r}")
    if proj.get("clip.projector_type") != "mlp" or not proj.get("clip.has_vision_encoder"):
        raise ImpError(f"{mmproj_path}: not an Imp vision projector (needs an mlp projector with a vision encoder)")
    n_embd = _size(text, f"{arch}.embedding_length", text_path)
    _check_text(text, arch, n_embd, text_path)
    proj_dim = _size(proj, "clip.vision.projection_dim", mmproj_path)
    if proj_dim != n_embd:
        raise ImpError(
            f"mismatched model pair: {mmproj_path.name} projects images to width {proj_dim} but "
            f"{text_path.name} has embeddings of width {n_embd}"
        )
    image_size = _size(proj, "clip.vision.image_size", mmproj_path)
    patch = _size(proj, "clip.vision.patch_size", mmproj_path)
    image_tokens = (image_size // patch) ** 2
    _check_projector(proj, proj_tensors, image_tokens, mmproj_path)
    from .images import ASPECTS

    aspect = proj.get("imp.image_aspect_ratio", text.get("imp.image_aspect_ratio", "square"))
    if aspect not in ASPECTS:  # else Pillow code meets it mid-answer
        where = mmproj_path if "imp.image_aspect_ratio" in proj else text_path
        raise ImpError(f"{where}: unsupported imp.image_aspect_ratio {aspect!r} (expected {' or '.join(ASPECTS)})")
    return ModelPair(
        text_path=text_path,
        mmproj_path=mmproj_path,
        name=str(text.get("general.name", text_path.stem)),
        prompt_family=family,
        image_aspect=aspect,
        image_size=image_size,
        image_tokens=image_tokens,
        n_embd=n_embd,
        n_ctx_train=_size(text, f"{arch}.context_length", text_path),
        text_type=_file_type(text),
        mmproj_type=_file_type(proj),
    )


def _check_text(text: dict, arch: str, n_embd: int, path: Path) -> None:
    """Sizes llama.cpp divides by or asserts on while building the graph (it aborts on a zero
    block count, a rotary width wider than a head; it hangs on a rotary width of zero)."""
    _size(text, f"{arch}.block_count", path)
    heads = _size(text, f"{arch}.attention.head_count", path)
    kv_heads = text.get(f"{arch}.attention.head_count_kv", heads)
    if n_embd % heads or not 0 < kv_heads <= heads or heads % kv_heads:
        raise ImpError(f"{path}: {heads} attention heads ({kv_heads} for keys/values) do not divide "
                       f"the embedding width {n_embd}")
    rope = text.get(f"{arch}.rope.dimension_count")
    if rope is not None and not (0 < rope <= n_embd // heads and rope % 2 == 0):
        raise ImpError(f"{path}: rotary width {rope} does not fit heads of width {n_embd // heads}")


def _check_projector(proj: dict, tensors: dict, image_tokens: int, path: Path) -> None:
    """Every tensor llama.cpp's clip code uses, with the shape the sizes imply: it dereferences
    a missing tensor (a crash) and asserts on a shape it cannot multiply (an abort)."""
    hidden = _size(proj, "clip.vision.embedding_length", path)
    n_ff = _size(proj, "clip.vision.feed_forward_length", path)
    n_layer = _size(proj, "clip.vision.block_count", path)
    heads = _size(proj, "clip.vision.attention.head_count", path)
    out = proj["clip.vision.projection_dim"]
    patch = proj["clip.vision.patch_size"]
    if hidden % heads:
        raise ImpError(f"{path}: {heads} vision attention heads do not divide the width {hidden}")
    layers = proj.get("clip.vision.feature_layer") or []
    if not all(0 < n <= n_layer for n in layers):
        raise ImpError(f"{path}: clip.vision.feature_layer {layers} names layers outside 1..{n_layer}")
    tokens = proj.get("imp.image_token_count", image_tokens)
    if tokens != image_tokens:
        raise ImpError(f"{path}: imp.image_token_count is {tokens} but the image makes {image_tokens} patches")
    def wanted():  # (name, ggml dims), layer by layer: a bad block count stops at the first gap
        yield from {"v.patch_embd.weight": [patch, patch, 3, hidden], "v.patch_embd.bias": [hidden],
                    "v.position_embd.weight": [hidden, image_tokens], "mm.0.weight": [hidden, out],
                    "mm.0.bias": [out], "mm.2.weight": [out, out], "mm.2.bias": [out]}.items()
        for i in range(n_layer):
            for name in ("attn_q", "attn_k", "attn_v", "attn_out", "ffn_up", "ffn_down"):
                n_in, n_out = {"ffn_up": (hidden, n_ff), "ffn_down": (n_ff, hidden)}.get(name, (hidden, hidden))
                yield f"v.blk.{i}.{name}.weight", [n_in, n_out]
                yield f"v.blk.{i}.{name}.bias", [n_out]
            for name in ("ln1", "ln2"):
                yield f"v.blk.{i}.{name}.weight", [hidden]
                yield f"v.blk.{i}.{name}.bias", [hidden]

    for name, dims in wanted():
        if name not in tensors:
            raise ImpError(f"{path} lacks tensor {name}; was it made by `imp convert`?")
        if tensors[name] != dims:
            raise ImpError(f"{path}: tensor {name} has shape {tensors[name]}, expected {dims}")


def _file_type(fields: dict) -> str:
    from gguf import LlamaFileType

    ftype = fields.get("general.file_type")
    try:
        return LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_") if ftype is not None else "?"
    except ValueError:
        return str(ftype)


def find_mmproj(text_path: Path) -> Path:
    """The mmproj beside a text GGUF: the one sharing its name stem, else the only one there."""
    folder = text_path.parent
    candidates = sorted(p for p in folder.glob("*.gguf") if "mmproj" in p.name.lower())
    stem = text_path.name.rsplit("-", 1)[0]  # "imp-v1-3b-Q4_K_M.gguf" -> "imp-v1-3b"
    same = [p for p in candidates if p.name.startswith(stem + "-mmproj")]
    if len(same) == 1:
        return same[0]
    if not same and len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ImpError(f"no mmproj GGUF beside {text_path} (give it with --mmproj)")
    # e.g. an F16 and a Q8_0 projector for the same model: which one is the user's to say
    names = ", ".join(p.name for p in same or candidates)
    raise ImpError(f"several mmproj GGUFs beside {text_path} ({names}); choose one with --mmproj")


def resolve_paths(model: str, mmproj: str | None) -> tuple[Path, Path]:
    """--model is a text GGUF (mmproj found beside it) or a folder holding one pair."""
    path = Path(model).expanduser()
    if path.is_dir():
        texts = sorted(p for p in path.glob("*.gguf") if "mmproj" not in p.name.lower())
        if not texts:
            if (path / "config.json").is_file():  # a checkpoint, not converted yet
                raise ImpError(f"{path} is a checkpoint folder, not GGUF files: convert it first "
                               f"(`imp convert {model} --out DIR`, then --model DIR), or install it "
                               f"with `imp pull {model}`")
            raise ImpError(f"no language-model GGUF in {path}")
        if len(texts) > 1:
            names = ", ".join(p.name for p in texts)
            raise ImpError(f"several language-model GGUFs in {path} ({names}): name one with --model {path / texts[0].name}")
        path = texts[0]
    elif not path.exists():
        raise ImpError(f"model {model} not found")
    return path, (Path(mmproj).expanduser() if mmproj else find_mmproj(path))
