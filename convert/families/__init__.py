"""Language backbones, one module each, registered by what the checkpoint says it is.

A new backbone is one new module defining a `TextFamily` subclass (its config names and a
`matches()` on tensor names) decorated with `@register`; nothing else changes.

Detection reads config.json's `architectures` / `model_type` first and the tensor names second:
key names overlap between backbones (a Qwen2 checkpoint has `self_attn.q_proj` like the HF Phi
layout), so the names alone can pick the wrong family.
"""

from __future__ import annotations

from ..checkpoint import Checkpoint
from ..errors import ConvertError
from . import phi2, phi3, qwen2  # noqa: F401  (each registers itself)
from .base import TextFamily
from .registry import FAMILIES as _FAMILIES
from .registry import register  # noqa: F401  (for new family modules' convenience)


def detect(ckpt: Checkpoint) -> TextFamily:
    named = [cls for cls in _FAMILIES if cls.named_by(ckpt.config)]
    if len(named) == 1:
        if not named[0].matches(ckpt):
            raise ConvertError(
                f"{ckpt.folder}: config.json describes a {named[0].name} model but the weights do not "
                f"have its tensors"
            )
        return named[0](ckpt)
    for cls in _FAMILIES:
        if cls.matches(ckpt):
            return cls(ckpt)
    raise ConvertError(
        f"{ckpt.folder}: unsupported language backbone (supported: "
        + ", ".join(c.name for c in _FAMILIES)
        + ")"
    )

