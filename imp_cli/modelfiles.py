"""Find and check a (text GGUF, mmproj GGUF) pair before llama.cpp ever sees it.

llama.cpp answers a wrong key type, a truncated file or a mismatched pair with an abort of the
whole process; everything checkable is checked here first and becomes a one-line error.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import ImpError
from .prompts import TEMPLATES

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


def _read(path: Path) -> dict:
    """The scalar and short-array key/values of a GGUF file, after checking that every tensor's
    data lies inside the file. Long arrays (the tokenizer's) are skipped, not decoded: gguf's own
    reader decodes them all in Python, over a second per model, which llama.cpp then redoes."""
    import mmap

    if not path.is_file():
        raise ImpError(f"model file {path} not found")
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ImpError(f"{path} is not a GGUF file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                fields, end = _scan(data)
    except OSError as e:
        raise ImpError(f"cannot read {path}: {e.strerror}") from None
    except (ValueError, IndexError, KeyError, UnicodeDecodeError, OverflowError, struct.error):
        raise ImpError(f"{path} is truncated or corrupt (unreadable GGUF header)") from None
    if end > path.stat().st_size:
        raise ImpError(f"{path} is truncated (tensor data ends past the end of the file)")
    return fields


# GGUF value types (gguf spec): scalar struct formats; 8 = string, 9 = array.
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY, _SHORT_ARRAY = 8, 9, 16


def _scan(data) -> tuple[dict, int]:
    """Parse a GGUF header from a buffer: (fields, end of the last tensor's data)."""
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
        if kind == _ARRAY:
            item, n = take("I"), take("Q")
            keep = keep and n <= _SHORT_ARRAY
            if item in _SCALAR and not keep:  # skip fixed-size items in one step
                nonlocal pos
                pos += n * struct.calcsize(_SCALAR[item])
                return None
            items = [value(item, keep) for _ in range(n)]
            return items if keep else None
        raise ValueError(f"unknown GGUF value type {kind}")

    take("I")  # version
    n_tensors, n_kv = take("Q"), take("Q")
    fields = {}
    for _ in range(n_kv):
        key = string()
        fields[key] = value(take("I"))
    last = 0
    for _ in range(n_tensors):
        string(keep=False)
        dims = [take("Q") for _ in range(take("I"))]
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(take("I"))]
        offset = take("Q")
        count = 1
        for d in dims:
            count *= d
        last = max(last, offset + count // block * size)
    align = int(fields.get("general.alignment") or 32)
    return fields, -(-pos // align) * align + last


def _need(fields: dict, key: str, path: Path):
    if key not in fields:
        raise ImpError(f"{path} lacks GGUF key {key}; was it made by `imp convert`?")
    return fields[key]


def read_pair(text_path: Path, mmproj_path: Path) -> ModelPair:
    text, proj = _read(text_path), _read(mmproj_path)
    arch = text.get("general.architecture")
    if arch == "clip":
        raise ImpError(f"{text_path} is a vision projector (mmproj), not a language model")
    if arch not in TEXT_ARCHS:
        raise ImpError(f"{text_path}: unsupported model architecture {arch!r} (imp runs Imp models: {', '.join(sorted(TEXT_ARCHS))})")
    if proj.get("general.architecture") != "clip":
        raise ImpError(f"{mmproj_path} is not a vision projector (mmproj) GGUF")
    family = _need(text, "imp.prompt_family", text_path)
    if family not in TEMPLATES:
        raise ImpError(f"{text_path}: unsupported prompt family {family!r}")
    if proj.get("clip.projector_type") != "mlp" or not proj.get("clip.has_vision_encoder"):
        raise ImpError(f"{mmproj_path}: not an Imp vision projector (needs an mlp projector with a vision encoder)")
    n_embd = int(_need(text, f"{arch}.embedding_length", text_path))
    proj_dim = int(_need(proj, "clip.vision.projection_dim", mmproj_path))
    if proj_dim != n_embd:
        raise ImpError(
            f"mismatched model pair: {mmproj_path.name} projects images to width {proj_dim} but "
            f"{text_path.name} has embeddings of width {n_embd}"
        )
    image_size = int(_need(proj, "clip.vision.image_size", mmproj_path))
    patch = int(_need(proj, "clip.vision.patch_size", mmproj_path))
    return ModelPair(
        text_path=text_path,
        mmproj_path=mmproj_path,
        name=str(text.get("general.name", text_path.stem)),
        prompt_family=family,
        image_aspect=str(proj.get("imp.image_aspect_ratio", text.get("imp.image_aspect_ratio", "square"))),
        image_size=image_size,
        image_tokens=int(proj.get("imp.image_token_count", (image_size // patch) ** 2)),
        n_embd=n_embd,
        n_ctx_train=int(_need(text, f"{arch}.context_length", text_path)),
        text_type=_file_type(text),
        mmproj_type=_file_type(proj),
    )


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
    if len(same) >= 1:
        return same[0]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ImpError(f"no mmproj GGUF beside {text_path} (give it with --mmproj)")
    raise ImpError(f"several mmproj GGUFs beside {text_path}; choose one with --mmproj")


def resolve_paths(model: str, mmproj: str | None) -> tuple[Path, Path]:
    """--model is a text GGUF (mmproj found beside it) or a folder holding one pair."""
    path = Path(model).expanduser()
    if path.is_dir():
        texts = sorted(p for p in path.glob("*.gguf") if "mmproj" not in p.name.lower())
        if not texts:
            raise ImpError(f"no language-model GGUF in {path}")
        if len(texts) > 1:
            raise ImpError(f"several language-model GGUFs in {path}; name one with --model")
        path = texts[0]
    elif not path.exists():
        raise ImpError(f"model {model} not found")
    return path, (Path(mmproj).expanduser() if mmproj else find_mmproj(path))
