"""The step above the Session: what the user named -> a checked model pair (pulling a known
model first when it is not installed and the caller allows it) -> llama.cpp's settings for it
here (`imp tune`'s measurement, else the CPU family's default) -> an open Session.

The Session itself neither pulls nor looks up tunings: it is given a pair and a Tuning. Imports
go one way: this module -> session, pull, tune, resolve; none of those imports it back.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ImpError
from .modelfiles import ModelPair, read_pair
from .resolve import pullable_offline, resolve
from .session import Session, default_cache
from .tune import choose

__all__ = ["open_pair", "open_session", "start_session"]


def open_pair(model: str | None, mmproj: str | None, output, *, pull: bool = True) -> ModelPair:
    """--model (a path, a store name, a known name or repo id) -> a checked pair; pulls a known
    model that is not installed yet when `pull`, else says what to run."""
    found = resolve(model, mmproj)
    if found.kind == "pull":
        from convert.hub import offline  # only here: a model that is there needs no Hub client

        if not pull:
            raise ImpError(f"model {found.spec} is not installed: run `imp pull {found.spec}`")
        if offline() and not pullable_offline(found):
            raise ImpError(f"model {found.spec} is not installed and HF_HUB_OFFLINE is set: "
                           f"run `imp pull {found.spec}` when online")
        from .pull import pull as run_pull

        output.info(f"model {found.spec} is not installed yet: pulling it first")
        entry = run_pull(found.spec, output)
        return read_pair(entry.text_path, Path(mmproj).expanduser() if mmproj else entry.mmproj_path)
    return read_pair(found.text, found.mmproj)


def open_session(model: str | None, mmproj: str | None, output, *, pull: bool = True, **kw) -> Session:
    """open_pair, then start_session on it (`kw`: start_session's)."""
    return start_session(open_pair(model, mmproj, output, pull=pull), output, **kw)


def start_session(pair: ModelPair, output, *, threads: int = 0, repack: str = "auto", flash_attn: str = "auto",
                  use_cache: bool = True, cache_write: bool = True, note=None, **kw) -> Session:
    """A Session on a checked pair: llama.cpp's settings for it here (repack / flash attention:
    "auto", "on" or "off") and the prompt cache unless `use_cache` is off (`cache_write` False:
    entries are read, none written). `kw`: the Session's own (ctx, verbose)."""
    note = note or output.note
    tuning = choose(pair, threads, repack, flash_attn, note)
    return Session(pair, threads=threads, tuning=tuning, cache=default_cache(output, use_cache, write=cache_write),
                   note=note, **kw)
