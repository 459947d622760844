"""One step from what the user named (--model / IMP_MODEL / the default) to what it is.

`resolve` only looks: a GGUF path or folder on disk, an installed store entry, or a known name
or repo id that needs a pull. It never downloads; the caller decides whether to pull (`imp ask`
does, with a note; a server would not).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import store
from .errors import ImpError


@dataclass(frozen=True)
class Found:
    kind: str  # "local" (GGUF files on disk), "store" (an installed entry) or "pull" (not installed)
    spec: str  # what the user said
    text: Path | None = None  # for "local" and "store": the pair
    mmproj: Path | None = None
    name: str | None = None  # for "store" and "pull": the store name
    repo_id: str | None = None  # for "pull"
    revision: str | None = None


def resolve(spec: str | None, mmproj: str | None = None) -> Found:
    """An existing path (GGUF file or folder) wins; then an installed store name; then a known
    name or repo id, installed under its store name or marked as needing a pull."""
    from .modelfiles import resolve_paths

    spec = spec or store.DEFAULT_MODEL
    explicit_mmproj = Path(mmproj).expanduser() if mmproj else None
    if Path(spec).expanduser().exists() or spec.endswith(".gguf"):
        text, proj = resolve_paths(spec, mmproj)
        return Found("local", spec, text, proj)
    entry = store.get(spec) if _plain_name(spec) else None
    if entry is None:
        name, repo_id, revision = resolve_spec(spec)
        entry = installed(name, repo_id, revision)
        if entry is None:
            return Found("pull", spec, name=name, repo_id=repo_id, revision=revision)
    return Found("store", spec, entry.text_path, explicit_mmproj or entry.mmproj_path, name=entry.name)


def resolve_spec(spec: str) -> tuple[str, str, str | None]:
    """A known short name or `owner/name[@rev]` -> (store name, repo id, revision)."""
    from convert.hub import parse_repo_id

    if spec in store.KNOWN_MODELS:
        return spec, store.KNOWN_MODELS[spec], None
    parsed = parse_repo_id(spec)
    if parsed is None:
        raise ImpError(unknown_model(spec))
    repo_id, revision = parsed
    return store.name_for_repo(repo_id), repo_id, revision


def unknown_model(spec: str) -> str:
    """The message for a --model that is nothing we know: every name that would work."""
    try:
        mine = [e.name for e in store.entries() if e.name not in store.KNOWN_MODELS]
    except ImpError:
        mine = []
    names = ", ".join(list(store.KNOWN_MODELS) + mine)
    return (f"unknown model {spec!r}: not a file, an installed model or a known name. Use one of {names}; "
            "a GGUF path (its mmproj beside it) or a folder holding a pair; or a Hugging Face repo id (owner/name)")


def installed(name: str, repo_id: str, revision: str | None) -> store.Entry | None:
    """The store entry for this repo (and revision, if one was asked for), if installed.

    A store name taken by another repo is an error rather than a silent substitute."""
    entry = store.get(name)
    if entry is None:
        return None
    source = str(entry.manifest.get("source") or "")
    if source.lower() != repo_id.lower():
        raise ImpError(f"the store name {name} is taken by {source}: remove it first (`imp models rm {name}`)")
    if revision and revision not in (entry.manifest.get("revision"), entry.manifest.get("ref")):
        return None
    return entry


def pullable_offline(found: Found) -> bool:
    """Whether a pull could still succeed from the local Hugging Face cache (HF_HUB_OFFLINE)."""
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(found.repo_id, revision=found.revision, local_files_only=True,
                          allow_patterns=["config.json"])
        return True
    except Exception:
        return False


def _plain_name(spec: str) -> bool:
    try:
        store.check_name(spec)
        return True
    except ImpError:
        return False
