"""What every language-backbone module provides to the converter."""

from __future__ import annotations

import re

from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSOR, MODEL_TENSORS, TENSOR_NAMES
from gguf import GGMLQuantizationType as QType
from gguf import GGUFWriter, LlamaFileType

from ..checkpoint import Checkpoint
from ..errors import ConvertError
from ..gguf_out import TensorSpec, copy_spec, weight_type
from ..token_attrs import added_tokens, gguf_name, needs_phi3_rstrip


class TextFamily:
    name: str = ""  # family name, also the prompt family written to the GGUF
    model_arch: MODEL_ARCH  # llama.cpp architecture, from gguf's own table
    architectures: tuple[str, ...] = ()  # config.json `architectures` naming this family
    model_types: tuple[str, ...] = ()  # config.json `model_type` naming this family
    layout: str = "hf"  # key layout, recorded in the GGUF (Phi-2 has two)
    phi3_rstrip: bool = False  # llama.cpp must rstrip special tokens (see token_attrs)
    chat_tokens: tuple[str, ...] = ()  # the special tokens of the family's prompt template
    # Reported by the converter: the context length, the config key it came from, and which
    # tokenizer files the vocabulary was read from.
    n_ctx: int = 0
    context_from: str = ""
    tokenizer_from: str = ""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt

    @property
    def arch(self) -> str:
        return MODEL_ARCH_NAMES[self.model_arch]

    @classmethod
    def named_by(cls, config: dict) -> bool:
        """config.json names this family (its architectures or model_type)."""
        archs = config.get("architectures") or []
        return config.get("model_type") in cls.model_types or any(a in cls.architectures for a in archs)

    @classmethod
    def matches(cls, ckpt: Checkpoint) -> bool:
        """The tensor names are this family's (used when config.json names no known family)."""
        raise NotImplementedError

    # Sizes every family reads (and checks against the tensors) in its __init__.
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_rot: int  # rotary dimensions per head
    rope_theta: float

    @property
    def embedding_length(self) -> int:
        return self.n_embd

    def add_metadata(self, writer: GGUFWriter) -> None:
        raise NotImplementedError

    def add_sizes(self, w: GGUFWriter) -> None:
        """The hyperparameter keys all our llama.cpp architectures share."""
        w.add_context_length(self.n_ctx)
        w.add_embedding_length(self.n_embd)
        w.add_feed_forward_length(self.n_ff)  # the real width: llama.cpp's converter may assume 4x
        w.add_block_count(self.n_layer)
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_head_kv)
        w.add_rope_dimension_count(self.n_rot)  # if absent llama.cpp rotates whole heads
        w.add_rope_freq_base(self.rope_theta)
        w.add_file_type(LlamaFileType.MOSTLY_F16)

    def check_strip(self) -> None:
        """Decide from the checkpoint's chat tokens whether llama.cpp must rstrip special tokens."""
        self.phi3_rstrip = needs_phi3_rstrip(added_tokens(self.ckpt), self.chat_tokens)

    def tensors(self) -> list[TensorSpec]:
        raise NotImplementedError

    def gguf_name(self, name: str) -> str:
        """general.name as written: llama.cpp keys a tokenizer behaviour off it."""
        return gguf_name(name, self.phi3_rstrip)

    # -- helpers shared by families ------------------------------------------------------------
    def tensor_name(self, kind: MODEL_TENSOR, bid: int | None = None, suffix: str = "weight") -> str:
        """A text tensor's GGUF name from gguf's tables, checked to belong to this architecture."""
        if kind not in MODEL_TENSORS[self.model_arch]:
            raise AssertionError(f"{kind.name} is not a tensor of llama.cpp arch {self.arch}")
        return TENSOR_NAMES[kind].format(bid=bid) + "." + suffix

    def count_layers(self, layer: str) -> int:
        """Number of layers named like `layer` ("model.layers.{}."), which must be numbered 0..N-1."""
        layer_re = re.compile(re.escape(layer).replace(r"\{\}", r"(\d+)"))
        found = {int(m.group(1)) for name in self.ckpt.tensors if (m := layer_re.match(name))}
        if not found or found != set(range(len(found))):
            raise ConvertError(f"{self.ckpt.folder}: language-model layers are missing or not numbered 0..N-1")
        return len(found)

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
