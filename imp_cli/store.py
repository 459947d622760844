"""The model store: short names -> an installed (text GGUF, mmproj GGUF) pair with a manifest.

Layout: $IMP_HOME/models/<name>/{<name>-<QUANT>.gguf, <name>-mmproj-F16.gguf, manifest.json}.
A model appears only once complete: it is built in a hidden staging folder beside its final
place and renamed in; an interrupted pull leaves at most a staging folder, which the next pull
removes. Names are checked so that nothing outside the store is read or deleted through one.

Concurrent pulls of one model (same source, revision and types) convert it once: `pull_lock`
is an OS file lock (flock) in models/.locks; the others wait for it and then use the result. The
kernel releases the lock when its holder dies, however it dies, so no stale lock is left.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .errors import ImpError

KNOWN_MODELS = {
    "imp-v1-3b": "MILVLG/imp-v1-3b",
    "imp-v1.5-3b": "MILVLG/Imp-v1.5-3B-Phi2",
    "imp-v1.5-3b-196": "MILVLG/Imp-v1.5-3B-196",
    "imp-v1.5-4b": "MILVLG/Imp-v1.5-4B-Phi3",
    "imp-v1.5-2b": "MILVLG/Imp-v1.5-2B-Qwen1.5",
}
DEFAULT_MODEL = "imp-v1-3b"
MANIFEST = "manifest.json"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,79}$")
STAGING_PREFIX = ".staging-"


def home() -> Path:
    if os.environ.get("IMP_HOME"):
        return Path(os.environ["IMP_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "imp"


def models_dir() -> Path:
    return home() / "models"


def check_name(name: str) -> str:
    """A store name is one plain path component: no separators, no '..', no leading dot."""
    if not _NAME.match(name) or ".." in name:
        raise ImpError(f"invalid model name {name!r} (use lowercase letters, digits, '.', '-', '_')")
    return name


def entry_dir(name: str) -> Path:
    """The folder of a store entry, refusing any name or symlink that leads out of the store."""
    root = models_dir()
    folder = root / check_name(name)
    if folder.is_symlink() or (folder.exists() and folder.resolve().parent != root.resolve()):
        raise ImpError(f"store entry {name!r} points outside the store; refusing to use it")
    return folder


def name_for_repo(repo_id: str) -> str:
    """The store name of a repo id: its known short name, else its lowercased repo name."""
    for short, repo in KNOWN_MODELS.items():
        if repo.lower() == repo_id.lower():
            return short
    return check_name(repo_id.split("/")[-1].lower())


@dataclass
class Entry:
    name: str
    folder: Path
    manifest: dict

    @property
    def text_path(self) -> Path:
        return self._file("text")

    @property
    def mmproj_path(self) -> Path:
        return self._file("mmproj")

    def _file(self, kind: str) -> Path:
        name = self.manifest[kind]["file"]
        if Path(name).name != name or name.startswith("."):  # a hand-edited manifest can't lead out
            raise ImpError(f"store entry {self.name!r} has a bad file name in its manifest")
        return self.folder / name

    @property
    def size(self) -> int:
        return self.manifest["text"]["bytes"] + self.manifest["mmproj"]["bytes"]

    def summary(self) -> dict:
        m = self.manifest
        return {"name": self.name, "source": m.get("source"), "revision": m.get("revision"),
                "quant": m["text"]["type"], "mmproj_type": m["mmproj"]["type"], "bytes": self.size,
                "path": str(self.folder), "created": m.get("created")}


def get(name: str) -> Entry | None:
    folder = entry_dir(name)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        entry = Entry(name, folder, data)
        if not (entry.text_path.is_file() and entry.mmproj_path.is_file()):
            raise ImpError(f"store entry {name!r} is incomplete: remove it with `imp models rm {name}` and pull again")
    except (ValueError, KeyError, TypeError):
        raise ImpError(f"store entry {name!r} has a corrupt manifest: remove it with `imp models rm {name}`") from None
    return entry


def entries() -> list[Entry]:
    root = models_dir()
    if not root.is_dir():
        return []
    found = []
    for folder in sorted(root.iterdir()):
        if folder.name.startswith(".") or not _NAME.match(folder.name):
            continue
        try:
            entry = get(folder.name)
        except ImpError:
            continue
        if entry:
            found.append(entry)
    return found


def remove(name: str) -> Path:
    folder = entry_dir(name)
    if not folder.is_dir():
        raise ImpError(f"no model named {name!r} in the store ({models_dir()})")
    shutil.rmtree(folder)
    return folder


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Install:
    """Build a store entry in a staging folder; `commit()` swaps it into place atomically.

    Use as a context manager: the staging folder is created in __enter__ and removed on exit
    unless committed, so no Ctrl-C window leaves it behind.
    """

    def __init__(self, name: str):
        self.name = check_name(name)
        self.final = entry_dir(name)
        self.staging = self.final.parent / f"{STAGING_PREFIX}{name}-{os.getpid()}"

    def __enter__(self) -> "Install":
        self.final.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(self.final.parent)
        try:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging.mkdir()
        except BaseException:
            self.abort()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.abort()

    def commit(self, text: Path, mmproj: Path, text_type: str, mmproj_type: str,
               source: str, revision: str | None, ref: str | None = None) -> Entry:
        from .version import __version__

        manifest = {
            "name": self.name, "source": source, "revision": revision, "ref": ref,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "imp_version": __version__,
            "text": {"file": text.name, "type": text_type, "bytes": text.stat().st_size, "sha256": sha256(text)},
            "mmproj": {"file": mmproj.name, "type": mmproj_type, "bytes": mmproj.stat().st_size, "sha256": sha256(mmproj)},
        }
        (self.staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        old = None
        if self.final.exists():
            old = self.final.parent / f"{STAGING_PREFIX}old-{self.name}-{os.getpid()}"
            os.replace(self.final, old)
        os.replace(self.staging, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return Entry(self.name, self.final, manifest)

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


@contextlib.contextmanager
def pull_lock(key: str, what: str, say: Callable[[str], None]) -> Iterator[bool]:
    """Hold the lock for `key` (a model's source, revision and types) while converting it.

    Yields whether another process held it first (then this one waited for it: the model may
    now be installed). The holder's pid is written in the lock file for the waiting message.
    The lock file stays (removing it would race with a process about to lock it); closing the
    descriptor, or the process ending, releases the lock. A Ctrl-C while waiting interrupts the
    wait only: the holder goes on."""
    folder = models_dir() / ".locks"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (hashlib.sha256(key.encode("utf-8")).hexdigest()[:32] + ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        waited = False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            for _ in range(50):  # the holder writes its pid just after it locks
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                if holder:
                    break
                time.sleep(0.01)
            say(f"waiting for another imp pull of {what} (pid {holder or '?'})")
            fcntl.flock(fd, fcntl.LOCK_EX)
            waited = True
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield waited
    finally:
        os.close(fd)


def _remove_stale_staging(root: Path) -> None:
    """Staging folders of processes that no longer run are leftovers of interrupted pulls."""
    for folder in root.glob(STAGING_PREFIX + "*"):
        pid = folder.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
