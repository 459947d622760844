"""`imp pull` and model resolution for `imp ask`: names, repo ids and paths -> an installed pair."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from . import store
from .errors import ImpError


def resolve_spec(spec: str) -> tuple[str, str, str | None]:
    """A known short name or `owner/name[@rev]` -> (store name, repo id, revision)."""
    from convert.hub import parse_repo_id

    if spec in store.KNOWN_MODELS:
        return spec, store.KNOWN_MODELS[spec], None
    parsed = parse_repo_id(spec)
    if parsed is None:
        known = ", ".join(store.KNOWN_MODELS)
        raise ImpError(f"unknown model {spec!r}: use one of {known}, or a Hugging Face repo id (owner/name)")
    repo_id, revision = parsed
    return store.name_for_repo(repo_id), repo_id, revision


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


def pull(spec: str, output, quant: str = "Q4_K_M", mmproj_type: str = "F16", force: bool = False,
         threads: int | None = None) -> store.Entry:
    from convert.hub import download, remote_size
    from convert.pipeline import convert

    from .modelfiles import read_pair

    name, repo_id, revision = resolve_spec(spec)
    existing = installed(name, repo_id, revision)
    if existing and not force and existing.manifest["text"]["type"] == quant:
        output.info(f"{name} is already installed ({existing.folder})")
        return existing
    output.info(f"pulling {name} from {repo_id}" + (f"@{revision}" if revision else ""))
    # The download needs the checkpoint's size (in the Hugging Face cache); conversion about 1.3x
    # more in the store (the F16 intermediate, then the final pair). Checked before and after.
    expected = remote_size(repo_id, revision)
    if expected:
        _check_disk(store.models_dir(), int(expected * 2.3))
    source = download(repo_id, revision)
    checkpoint_bytes = sum(p.stat().st_size for p in source.folder.glob("*.safetensors"))
    _check_disk(store.models_dir(), int(checkpoint_bytes * 1.3))
    with store.Install(name) as install:
        # The downloaded Source (not its cache folder): the GGUF records repo id and commit.
        result = convert(source, install.staging, quant=quant, mmproj_type=mmproj_type,
                         progress=output, threads=threads, name=name)
        text, mmproj = Path(result.text_path), Path(result.mmproj_path)
        read_pair(text, mmproj)  # verify the pair loads as the runtime will see it
        entry = install.commit(text, mmproj, quant, mmproj_type, repo_id, source.commit, revision)
    output.info(f"installed {name} ({entry.folder})")
    return entry


def _check_disk(folder: Path, need: int) -> None:
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise ImpError(f"not enough disk space in {probe}: need {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free")


def resolve_model(model: str | None, mmproj: str | None, output):
    """--model / IMP_MODEL / the default -> a checked ModelPair.

    An existing path (GGUF file or folder) wins; then an installed store name; then a known
    name or repo id, installed under its store name or pulled first.
    """
    from .modelfiles import read_pair, resolve_paths

    spec = model or os.environ.get("IMP_MODEL") or store.DEFAULT_MODEL
    if Path(spec).expanduser().exists() or spec.endswith(".gguf"):
        return read_pair(*resolve_paths(spec, mmproj))
    entry = store.get(spec) if _plain_name(spec) else None
    if entry is None:
        entry = installed(*resolve_spec(spec))
    if entry is None:
        from convert.hub import offline

        if offline() and not _in_hub_cache(spec):
            raise ImpError(f"model {spec} is not installed and HF_HUB_OFFLINE is set: run `imp pull {spec}` when online")
        output.info(f"model {spec} is not installed yet: pulling it first")
        entry = pull(spec, output)
    return read_pair(entry.text_path, Path(mmproj).expanduser() if mmproj else entry.mmproj_path)


def _plain_name(spec: str) -> bool:
    try:
        store.check_name(spec)
        return True
    except ImpError:
        return False


def _in_hub_cache(spec: str) -> bool:
    """Whether an offline pull could still succeed from the local Hugging Face cache."""
    try:
        _, repo_id, revision = resolve_spec(spec)
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id, revision=revision, local_files_only=True, allow_patterns=["config.json"])
        return True
    except Exception:
        return False
