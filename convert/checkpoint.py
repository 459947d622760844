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

# The small top-level files a conversion reads (those present are fetched). Exact names: a Hub
# allow-pattern with a wildcard would also match inside subfolders ("*.safetensors" matches a
# tower folder's own weights), so the weights and the tower config are named by needed_files.
NEEDED_FILES = [
    "config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "special_tokens_map.json",
]


def needed_files(listing, config: dict | None, index: dict | None) -> list[str]:
    """Exactly the repo files a conversion reads, from the repo's file list (paths relative to
    its root), its config.json and its safetensors index (None when absent or not fetched yet):
    the small files, the shards the index names (else every top-level .safetensors), and the
    vision tower folder's config.json."""
    names = set(listing)
    files = [f for f in NEEDED_FILES if f in names]
    if index is not None:
        files += shards_from_index(index, "model.safetensors.index.json")
    else:
        files += sorted(f for f in names if "/" not in f and f.endswith(".safetensors"))
    tower = tower_config_file(names, config or {})
    if tower is not None:
        files.append(tower)
    return files


def shards_from_index(index, where) -> list[str]:
    """The shard files a safetensors index names, each a plain file name."""
    try:
        names = sorted(set(index["weight_map"].values()))
    except (KeyError, TypeError, AttributeError):
        raise ConvertError(f"{where}: not a valid safetensors index") from None
    if not all(isinstance(n, str) and n and "/" not in n and "\\" not in n and not n.startswith(".") for n in names):
        raise ConvertError(f"{where}: names a shard outside the checkpoint folder")
    return names


def tower_config_file(paths, config: dict) -> str | None:
    """Which `<folder>/config.json` of the repo is the vision tower's own config (Imp-v1.5-3B-196
    ships `siglip-so400m-patch14-196/`): the folder config.json's mm_vision_tower names, else the
    one folder named after SigLIP; None when there is none."""
    candidates = sorted(p for p in paths if p.count("/") == 1 and p.endswith("/config.json"))
    tower = config.get("mm_vision_tower")
    if isinstance(tower, str) and tower.strip("/."):
        named = tower.rstrip("/").rsplit("/", 1)[-1] + "/config.json"
        if named in candidates:
            return named
    siglip = [c for c in candidates if "siglip" in c.split("/")[0].lower()]
    if len(siglip) > 1:
        raise ConvertError(f"several vision tower folders ({', '.join(c.split('/')[0] for c in siglip)}) "
                           "and config.json's mm_vision_tower names none of them")
    return siglip[0] if siglip else None


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
        need(v is None or is_int(v) and 0 <= v < _LIMIT, key, v, "an integer token id")
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
            names = shards_from_index(self.read_json(index.name), index)
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

    def tower_config(self) -> tuple[str, dict] | None:
        """(relative path, SigLIP vision config) of the tower folder's config.json, if any."""
        paths = [p.relative_to(self.folder).as_posix() for p in self.folder.glob("*/config.json")]
        name = tower_config_file(paths, self.config)
        if name is None:
            return None
        data = self.read_json(name)
        if isinstance(data, dict) and isinstance(data.get("vision_config"), dict):
            data = data["vision_config"]  # a whole SiglipConfig (text + vision)
        if not isinstance(data, dict):
            raise ConvertError(f"{self.folder / name}: expected a JSON object")
        return name, data

    def read_json(self, name: str) -> dict | None:
        path = self.folder / name
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise ConvertError(f"{path}: not valid JSON") from None
