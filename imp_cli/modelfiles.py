"""Find and check a (text GGUF, mmproj GGUF) pair before llama.cpp ever sees it.

llama.cpp answers a wrong key type, a truncated file or a mismatched pair with an abort of the
whole process; everything checkable is checked here first and becomes a one-line error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import ImpError

TEXT_ARCHS = {"phi2"}
PROMPT_FAMILIES = {"phi2"}


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
    """All key/values of a GGUF file, after checking its tensors lie inside the file."""
    from gguf import GGUFReader

    if not path.is_file():
        raise ImpError(f"model file {path} not found")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ImpError(f"cannot read {path}: {e.strerror}") from None
    if magic != b"GGUF":
        raise ImpError(f"{path} is not a GGUF file")
    try:
        reader = GGUFReader(path)
        fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except (ValueError, IndexError, KeyError, UnicodeDecodeError, OverflowError, MemoryError):
        raise ImpError(f"{path} is truncated or corrupt (unreadable GGUF header)") from None
    if end > path.stat().st_size:
        raise ImpError(f"{path} is truncated (tensor data ends past the end of the file)")
    fields["__n_tensors__"] = len(reader.tensors)
    return fields


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
    if family not in PROMPT_FAMILIES:
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
