"""`imp pull`: download a known model or repo id, convert it and install the pair in the store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from . import store
from .errors import ImpError
from .resolve import installed, resolve_spec


def pull(spec: str, output, quant: str = "Q4_K_M", mmproj_type: str = "F16", force: bool = False,
         threads: int | None = None, tune: bool = False) -> store.Entry:
    """Install `spec` (unless it already is); with `tune`, measure llama.cpp's settings for it
    after a conversion (`imp tune`)."""
    name, repo_id, revision = resolve_spec(spec)
    existing = installed(name, repo_id, revision)
    if existing and not force and existing.manifest["text"]["type"] == quant:
        output.info(f"{name} is already installed ({existing.folder})")
        return existing
    # One conversion per model at a time: another pull of the same one waits, then uses it.
    key = json.dumps([repo_id.lower(), revision or "", quant, mmproj_type])
    with store.pull_lock(key, name, output.info) as waited:
        if waited:
            existing = installed(name, repo_id, revision)
            if existing and existing.manifest["text"]["type"] == quant:
                output.info(f"{name} was installed by the other pull ({existing.folder})")
                return existing
        entry = _convert_and_install(name, repo_id, revision, output, quant, mmproj_type, threads)
    output.info(f"installed {name} ({entry.folder})")
    if tune:
        _tune(entry, output, threads or 0)
    return entry


def _convert_and_install(name: str, repo_id: str, revision: str | None, output, quant: str, mmproj_type: str,
                         threads: int | None) -> store.Entry:
    from convert.hub import download, remote_size
    from convert.pipeline import convert

    from .modelfiles import read_pair

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
        return install.commit(text, mmproj, quant, mmproj_type, repo_id, source.commit, revision)


def _tune(entry: store.Entry, output, threads: int) -> None:
    """A failed measurement leaves the model installed (the defaults apply) and says so."""
    from .modelfiles import read_pair
    from .tune import tune_pair

    try:
        result = tune_pair(read_pair(entry.text_path, entry.mmproj_path), output, threads=threads)
    except ImpError as e:
        output.warn(f"could not tune llama.cpp for {entry.name} ({e}): run `imp tune -m {entry.name}` later")
        return
    output.info(f"tuned: {result.choice.describe()} (saved in {result.path})")


def _check_disk(folder: Path, need: int) -> None:
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise ImpError(f"not enough disk space in {probe}: need {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free")
