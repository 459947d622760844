"""`imp models import`: put an existing, checked GGUF pair into the store."""

from __future__ import annotations

import shutil
from pathlib import Path

from . import store
from .errors import ImpError
from .modelfiles import find_mmproj, read_pair


def check_free_name(name: str, force: bool) -> None:
    """An installed model, or a known model's name (`imp ask` would then answer with this pair
    where the user expects the known one), is replaced only with --force."""
    if force:
        return
    if store.get(name):
        raise ImpError(f"a model named {name!r} is already installed (use --force to replace it)")
    if name in store.KNOWN_MODELS:
        raise ImpError(f"{name!r} is the name of the known model {store.KNOWN_MODELS[name]}: choose another "
                       "name (or --force to install this pair under it)")


def import_pair(text: Path, mmproj: Path | None, name: str, force: bool = False) -> store.Entry:
    store.check_name(name)
    check_free_name(name, force)
    text = Path(text).expanduser()
    pair = read_pair(text, Path(mmproj).expanduser() if mmproj else find_mmproj(text))
    with store.Install(name) as install:
        text_copy = install.staging / f"{name}-{pair.text_type}.gguf"
        mmproj_copy = install.staging / f"{name}-mmproj-{pair.mmproj_type}.gguf"
        shutil.copyfile(pair.text_path, text_copy)
        shutil.copyfile(pair.mmproj_path, mmproj_copy)
        return install.commit(text_copy, mmproj_copy, pair.text_type, pair.mmproj_type,
                              f"import:{pair.text_path.resolve()}", None)
