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
        """A size from config.json (first of `keys` set), checked against what the tensors say."""
        value = next((self.ckpt.config[k] for k in keys if self.ckpt.config.get(k) is not None), None)
        if value is None:
            value = default if actual is None else actual
        if value is None:
            raise ConvertError(f"config.json lacks {keys[0]} and it cannot be derived from the weights")
        if actual is not None and value != actual:
            raise ConvertError(f"config.json says {keys[0]}={value} but the weights have {actual}")
        return int(value)
