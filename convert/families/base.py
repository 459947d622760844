"""What every language-backbone module provides to the converter."""

from __future__ import annotations

from gguf import GGMLQuantizationType as QType
from gguf import GGUFWriter

from ..checkpoint import Checkpoint
from ..errors import ConvertError
from ..gguf_out import TensorSpec, copy_spec, weight_type


class TextFamily:
    name: str = ""  # family name, also the prompt family written to the GGUF
    arch: str = ""  # llama.cpp architecture
    # Reported by the converter: the context length, the config key it came from, and which
    # tokenizer files the vocabulary was read from.
    n_ctx: int = 0
    context_from: str = ""
    tokenizer_from: str = ""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt

    @classmethod
    def matches(cls, ckpt: Checkpoint) -> bool:
        raise NotImplementedError

    @property
    def embedding_length(self) -> int:
        raise NotImplementedError

    def add_metadata(self, writer: GGUFWriter) -> None:
        raise NotImplementedError

    def tensors(self) -> list[TensorSpec]:
        raise NotImplementedError

    # -- helpers shared by families ------------------------------------------------------------
    def require(self, *names: str) -> None:
        missing = [n for n in names if n not in self.ckpt.tensors]
        if missing:
            raise ConvertError(
                f"{self.ckpt.folder}: checkpoint is missing tensor {missing[0]}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )

    def copy(self, out: str, src: str, shape: tuple[int, ...], want: QType = QType.F16) -> TensorSpec:
        return copy_spec(self.ckpt, out, src, shape, weight_type(shape, want))

    def config_int(self, keys: tuple[str, ...], actual: int | None, default: int | None) -> int:
        """A size from config.json (any of `keys`, e.g. the HF and phi-msft names), checked against
        what the tensors say; without the keys, what the tensors say, else `default`."""
        value, _ = self.config_value(keys, None, int)
        if value is None:
            value = default if actual is None else actual
        if value is None:
            raise ConvertError(f"config.json lacks {keys[0]} and it cannot be derived from the weights")
        if actual is not None and value != actual:
            key = next(k for k in keys if self.ckpt.config.get(k) is not None)
            raise ConvertError(f"config.json says {key}={value} but the weights have {actual}")
        return int(value)

    def config_value(self, keys: tuple[str, ...], default, kind: type = int, agree: bool = True):
        """(value, key it came from) of the first of `keys` set in config.json, else (default,
        None). With `agree`, every other key of `keys` that is set must say the same."""
        found = []
        for key in keys:
            v = self.ckpt.config.get(key)
            if v is None:
                continue
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or float(v).is_integer())
            if not ok or not (v > 0):
                what = "a positive integer" if kind is int else "a positive number"
                raise ConvertError(f"config.json: {key} must be {what}, not {v!r}")
            found.append((kind(v), key))
        if not found:
            return default, None
        if agree and len({v for v, _ in found}) > 1:
            (a, ka), (b, kb) = found[0], next(f for f in found if f[0] != found[0][0])
            raise ConvertError(f"config.json disagrees with itself: {ka}={a} but {kb}={b}")
        return found[0]
