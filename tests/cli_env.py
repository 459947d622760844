"""The environment the CLI tests run `imp` in."""

from __future__ import annotations

import os
from pathlib import Path


def clean_env(tmp_path: Path, **extra: str) -> dict:
    """A user who set nothing: no IMP_* options, no forced colours, an empty model store, and
    no network use."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("IMP_") and k not in ("FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE",
                                                        "TTY_INTERACTIVE", "COLUMNS")}
    env.update(IMP_HOME=str(tmp_path / "imp-home"), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    # One thread: on a busy 2-core machine llama.cpp's spinning threads make a 1 s run take 9 s.
    env.update(IMP_THREADS="1")
    env.update(extra)
    return env
