"""Language backbones, one module each, registered by what the checkpoint's keys say it is.

A new backbone (Phi-3, Qwen2) is one new module defining a `TextFamily` subclass with
`matches()` and decorated with `@register`; nothing else changes.
"""

from __future__ import annotations

from ..checkpoint import Checkpoint
from ..errors import ConvertError
from .base import TextFamily

_FAMILIES: list[type[TextFamily]] = []


def register(cls: type[TextFamily]) -> type[TextFamily]:
    _FAMILIES.append(cls)
    return cls


def detect(ckpt: Checkpoint) -> TextFamily:
    for cls in _FAMILIES:
        if cls.matches(ckpt):
            return cls(ckpt)
    raise ConvertError(
        f"{ckpt.folder}: unsupported language backbone (supported: "
        + ", ".join(c.name for c in _FAMILIES)
        + ")"
    )


from . import phi2  # noqa: E402,F401  (registers itself)
