"""The list of language backbones: each family module registers its class here on import
(a module of its own, so the family modules never import their package back)."""

from __future__ import annotations

from .base import TextFamily

FAMILIES: list[type[TextFamily]] = []


def register(cls: type[TextFamily]) -> type[TextFamily]:
    FAMILIES.append(cls)
    return cls
