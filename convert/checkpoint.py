"""Read a Hugging Face checkpoint folder: config, tokenizer files, safetensors by memory map.

Safetensors are parsed here (an 8-byte header length, a JSON header, then raw data) rather than
through the `safetensors` package: it is a few lines, it lets us check every offset against the
file size (a truncated download is caught before any work), and tensors are numpy memory maps,
so a 6 GB checkpoint is never in RAM at once.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConvertError

# Files a conversion needs; the hub download fetches exactly these patterns.
NEEDED_FILES = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "special_tokens_map.json",
]

_DTYPES = {"F16": np.float16, "BF16": np.uint16, "F32": np.float32}


# The config.json keys the converter reads, by the kind of value each must hold (a null is
# dropped: the key counts as absent). Checked once here, so the families and the vision tower can use them as numbers.
_COUNTS = ("hidden_size", "n_embd", "num_hidden_layers", "n_layer", "num_attention_heads", "n_head",
           "num_key_value_heads", "intermediate_size", "n_inner", "vocab_size", "rotary_dim",
           "max_position_embeddings", "n_positions", "mm_hidden_size", "sliding_window")
_IDS = ("eos_token_id", "bos_token_id", "image_token_index")
_POSITIVE_REALS = ("layer_norm_eps", "layer_norm_epsilon", "rms_norm_eps", "rope_theta", "partial_rotary_factor")
_STRINGS = ("model_type", "mm_projector_type", "mm_vision_select_feature", "image_aspect_ratio", "mm_vision_tower")
_VISION_COUNTS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                  "image_size", "patch_size")
_LIMIT = 2**31  # no size of a real model comes near; GGUF stores them as 32-bit


def _checked_config(config: dict, path: Path) -> dict:
    def need(ok: bool, key: str, value, what: str) -> None:
        if not ok:
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise ConvertError(f"{path}: {key} is {shown}, expected {what}")

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def check(cfg: dict, counts: tuple, prefix: str = "") -> None:
        for key in counts:
            v = cfg.get(key)
            need(v is None or is_int(v) and 0 < v < _LIMIT, prefix + key, v, "a positive integer")
        reals = _POSITIVE_REALS if not prefix else ("layer_norm_eps",)
        for key in reals:
            v = cfg.get(key)
            need(v is None or (is_int(v) or isinstance(v, float)) and 0 < v < float("inf"), prefix + key, v,
                 "a positive number")

    config = {k: v for k, v in config.items() if v is not None}  # null means "use the default"
    check(config, _COUNTS)
    for key in _IDS:
        v = config.get(key)
        need(v is None or is_int(v) and 0 <= v < _LIMIT, key, v, "a token id")
    for key in _STRINGS:
        need(config.get(key) is None or isinstance(config[key], str), key, config.get(key), "a string")
    select = config.get("mm_vision_select_layer")
    need(select is None or is_int(select), "mm_vision_select_layer", select, "an integer")
    archs = config.get("architectures")
    need(archs is None or isinstance(archs, list) and all(isinstance(a, str) for a in archs),
         "architectures", archs, "a list of names")
    vision = config.get("vision_tower_config")
    if isinstance(vision, str):  # some configs store it as a JSON string
        try:
            vision = json.loads(vision)
        except ValueError:
            need(False, "vision_tower_config", vision, "a JSON object")
    need(vision is None or isinstance(vision, dict), "vision_tower_config", vision, "an object")
    if vision is not None:
        check(vision, _VISION_COUNTS, "vision_tower_config.")
        config = {**config, "vision_tower_config": vision}
    return config


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives: file, dtype name, shape and byte range."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def _tensor_ref(file: Path, name: str, info, base: int, size: int) -> TensorRef:
    """One header entry, checked: a known dtype, a shape of counts, offsets inside the file that
    span exactly the shape's bytes."""
    def is_count(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    dtype = info.get("dtype") if isinstance(info, dict) else None
    shape = info.get("shape") if isinstance(info, dict) else None
    offsets = info.get("data_offsets") if isinstance(info, dict) else None
    if not isinstance(info, dict) or not isinstance(shape, list) or not isinstance(offsets, list) \
            or len(offsets) != 2 or not all(map(is_count, shape + offsets)) or offsets[0] > offsets[1]:
        raise ConvertError(f"{file}: malformed entry for tensor {name!r}")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise ConvertError(f"{file}: tensor {name!r} has unsupported dtype {dtype!r}")
    start, end = offsets
    if end - start != np.dtype(_DTYPES[dtype]).itemsize * math.prod(shape):
        raise ConvertError(f"{file}: tensor {name!r} size does not match its shape")
    if base + end > size:
        raise ConvertError(
            f"{file}: truncated (tensor {name!r} ends at byte {base + end}, file has {size}); re-download it"
        )
    return TensorRef(file, dtype, tuple(shape), base + start, base + end)


class Checkpoint:
    """An Imp checkpoint folder: parsed config.json plus an index of every tensor."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConvertError(f"{folder}: no such folder")
        self.config = self._read_config()
        self.tensors: dict[str, TensorRef] = {}
        for file in self._safetensors_files():
            self._index_file(file)

    # -- config ---------------------------------------------------------------------------------
    def _read_config(self) -> dict:
        path = self.folder / "config.json"
        if not path.is_file():
            raise ConvertError(f"{self.folder}: not a checkpoint folder (no config.json)")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ConvertError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise ConvertError(f"{path}: expected a JSON object")
        return _checked_config(config, path)

    # -- safetensors ----------------------------------------------------------------------------
    def _safetensors_files(self) -> list[Path]:
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise ConvertError(f"{index}: not a valid safetensors index") from None
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (self.folder / n).is_file()]
            if missing:
                raise ConvertError(
                    f"{self.folder}: missing shard {missing[0]}"
                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                    + " named in model.safetensors.index.json"
                )
            return [self.folder / n for n in names]
        files = sorted(self.folder.glob("*.safetensors"))
        if files:
            return files
        if any(self.folder.glob("*.bin")) or any(self.folder.glob("*.pt")):
            raise ConvertError(
                f"{self.folder}: only pickled PyTorch weights (.bin) found; imp reads safetensors "
                "only, because unpickling a download can run arbitrary code. Use a revision of the "
                "model that ships .safetensors, or convert it yourself in a trusted environment"
            )
        raise ConvertError(f"{self.folder}: no .safetensors weights found")

    def _index_file(self, file: Path) -> None:
        size = file.stat().st_size
        try:
            with open(file, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > size - 8:
                    raise ValueError("header longer than file")
                header = json.loads(f.read(header_len))
                if not isinstance(header, dict):
                    raise ValueError("header is not a JSON object")
        except (struct.error, ValueError, UnicodeDecodeError):
            raise ConvertError(f"{file}: not a safetensors file (bad header)") from None
        refs = {name: _tensor_ref(file, name, info, 8 + header_len, size)
                for name, info in header.items() if name != "__metadata__"}
        # Each tensor owns its bytes (as the safetensors format requires): overlapping ranges are
        # a damaged or forged header, not weights.
        spans = sorted((r.start, r.end, name) for name, r in refs.items() if r.end > r.start)
        for (_, a_end, a), (b_start, _, b) in zip(spans, spans[1:]):
            if b_start < a_end:
                raise ConvertError(f"{file}: tensors {a!r} and {b!r} overlap")
        self.tensors.update(refs)

    # -- access ---------------------------------------------------------------------------------
    def shape(self, name: str, rank: int | None = None) -> tuple[int, ...]:
        """A tensor's shape; a missing tensor or (given `rank`) one of another rank is an error."""
        if name not in self.tensors:
            raise ConvertError(f"{self.folder}: checkpoint is missing tensor {name}")
        shape = self.tensors[name].shape
        if rank is not None and len(shape) != rank:
            raise ConvertError(f"tensor {name} has shape {list(shape)}, expected {rank} dimensions")
        return shape

    def load(self, name: str) -> np.ndarray:
        """The tensor as float32 (bf16 widened exactly), read through a memory map."""
        ref = self.tensors[name]
        raw = np.memmap(ref.file, dtype=_DTYPES[ref.dtype], mode="r", offset=ref.start, shape=ref.shape)
        if ref.dtype == "BF16":
            # bf16 is the top half of a float32: widen bit-exactly.
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return np.asarray(raw, dtype=np.float32)

    def read_json(self, name: str) -> dict | None:
        path = self.folder / name
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise ConvertError(f"{path}: not valid JSON") from None
