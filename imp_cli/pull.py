"""`imp pull`: download a known model or repo id, convert it and install the pair in the store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from . import store
from .errors import ImpError
from .resolve import installed, resolve_spec


def pull(spec: str, output, quant: str = "Q4_K_M", mmproj_type: str = "F16", force: bool = False,
         threads: int | None = None, tune: bool = False, name: str | None = None) -> store.Entry:
    """Install `spec` (unless it already is); with `tune`, measure llama.cpp's settings for it
    after a conversion (`imp tune`). A local checkpoint folder is converted and installed."""
    from .cpuinfo import physical_cores

    threads = threads or physical_cores()  # 0 means one per physical core, as everywhere
    if Path(spec).expanduser().is_dir() and spec not in store.KNOWN_MODELS:  # a folder wins, as in imp convert
        return pull_local(Path(spec).expanduser(), output, quant, mmproj_type, force, threads, tune, name)
    if name is not None:
        raise ImpError("--name is for a local checkpoint folder; a known model or repo id has its own store name")
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
        entry = _download_and_install(name, repo_id, revision, output, quant, mmproj_type, threads)
    return _installed(entry, output, tune, threads)


def _download_and_install(name: str, repo_id: str, revision: str | None, output, quant: str, mmproj_type: str,
                          threads: int | None) -> store.Entry:
    from convert.hub import download, remote_size

    output.info(f"pulling {name} from {repo_id}" + (f"@{revision}" if revision else ""))
    # The download needs the checkpoint's size (in the Hugging Face cache); conversion about 1.3x
    # more in the store (the F16 intermediate, then the final pair). Checked before and after.
    expected = remote_size(repo_id, revision)
    if expected:
        _check_disk(store.models_dir(), int(expected * 2.3))
    source = download(repo_id, revision)
    checkpoint_bytes = sum(p.stat().st_size for p in source.folder.glob("*.safetensors"))
    _check_disk(store.models_dir(), int(checkpoint_bytes * 1.3))
    # The downloaded Source (not its cache folder): the GGUF records repo id and commit.
    return _install(source, name, output, quant, mmproj_type, threads, repo_id, source.commit, revision)


def _install(source, name: str, output, quant: str, mmproj_type: str, threads: int | None, origin: str,
             revision: str | None, ref: str | None = None) -> store.Entry:
    """Convert `source` (a checkpoint folder, or a downloaded hub.Source) into the store as
    `name`: built in a staging folder, the pair checked as the runtime will read it, committed
    with where it came from (`origin`, `revision`, `ref`: the manifest's source, revision, ref)."""
    from convert.pipeline import convert

    from .modelfiles import read_pair

    with store.Install(name) as install:
        result = convert(source, install.staging, quant=quant, mmproj_type=mmproj_type,
                         progress=output, threads=threads, name=name)
        text, mmproj = Path(result.text_path), Path(result.mmproj_path)
        read_pair(text, mmproj)  # verify the pair loads as the runtime will see it
        return install.commit(text, mmproj, quant, mmproj_type, origin, revision, ref)


def _installed(entry: store.Entry, output, tune: bool, threads: int) -> store.Entry:
    output.info(f"installed {entry.name} ({entry.folder})")
    if tune:
        _tune(entry, output, threads)
    return entry


def pull_local(folder: Path, output, quant: str, mmproj_type: str, force: bool, threads: int, tune: bool,
               name: str | None) -> store.Entry:
    """`imp pull ./checkpoint`: convert a checkpoint on disk and install the pair in the store
    (what `imp convert` then `imp models import` would do, in one step)."""
    from .imports import check_free_name

    if name is None:
        name = folder.resolve().name.lower()
        try:
            store.check_name(name)
        except ImpError:
            raise ImpError(f"the folder name {folder.resolve().name!r} cannot be a store name: give one with "
                           "--name (lowercase letters, digits, '.', '-', '_')") from None
    else:
        store.check_name(name)
    check_free_name(name, force)
    output.info(f"converting {folder} into the store as {name}")
    _check_disk(store.models_dir(), int(sum(p.stat().st_size for p in folder.glob("*.safetensors")) * 1.3))
    entry = _install(str(folder), name, output, quant, mmproj_type, threads, f"local:{folder.resolve()}", None)
    return _installed(entry, output, tune, threads)


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
