"""The prompt cache: the KV state of a prompt's [system text, image] prefix, kept on disk so that
a later process asking anything about the same image with the same model skips the vision tower
and the ~760-token prefill.

An entry is one file `<key>.kv`: a magic, a format version, a JSON header (the key, the KV layout
it was saved with, the prefix it covers, the payload's length and CRC-32) and the payload
(`llama_state_seq_get_data` of sequence 0). Entries are written under a temporary name and renamed,
so readers and concurrent writers only ever see whole files; anything unreadable, truncated,
corrupt, foreign or stale is ignored and removed, never used. Least recently used entries go
first when the folder outgrows its budget (a hit refreshes the entry's mtime).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import store
from .errors import ImpError

MAGIC = b"IMPKVC\x00\x00"
FORMAT = 1
SUFFIX = ".kv"
DEFAULT_BUDGET = 4 * 1000**3
_HEAD = struct.Struct("<8sII")  # magic, format version, header length
_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "M": 1000**2, "MB": 1000**2, "G": 1000**3, "GB": 1000**3,
          "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "T": 1000**4, "TB": 1000**4}


def cache_dir() -> Path:
    return store.home() / "cache"


def parse_size(text: str) -> int:
    """'4G', '500MB', '1.5GiB', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text or "")
    if not m or m.group(2).upper() not in _UNITS:
        raise ImpError(f"invalid cache size {text!r} (use e.g. 4G, 500M or a number of bytes)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def enabled_by_env() -> bool:
    return os.environ.get("IMP_CACHE", "on").strip().lower() not in ("off", "0", "no", "false")


def budget_from_env() -> int:
    value = os.environ.get("IMP_CACHE_SIZE")
    return parse_size(value) if value else DEFAULT_BUDGET


def entry_key(**parts) -> str:
    """A content-derived key: model and mmproj identities, preprocessed pixels, prefix tokens."""
    blob = json.dumps({"format": FORMAT, **parts}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class Loaded:
    """An entry that checked out. Its payload is a read-only view of the file mapped into memory
    (no copy: reading a 249 MB entry into fresh memory took ~1 s on a busy 2-core VM, mapping it
    nothing); close() unmaps it."""

    header: dict
    payload: memoryview
    _map: object = None

    def intact(self) -> bool:
        """The payload's CRC-32 is the one the header records."""
        return crc32(self.payload) == self.header.get("payload_crc32")

    def close(self) -> None:
        try:
            self.payload.release()
            if self._map is not None:
                self._map.close()
                self._map = None
        except BufferError:  # a view of it is still alive (an exception's frame): unmapped when collected
            pass


# -- CRC-32 on every core ----------------------------------------------------------------------
def crc32(data) -> int:
    """zlib.crc32 of a buffer, the parts of a large one on as many threads as there are CPUs
    (zlib releases the GIL; at ~1 GB/s a 249 MB entry costs 0.25 s on one core), joined with
    crc32_combine."""
    view = memoryview(data).cast("B")
    parts = min(os.cpu_count() or 1, 8) if view.nbytes >= 32 << 20 else 1
    if parts == 1:
        return zlib.crc32(view)
    from concurrent.futures import ThreadPoolExecutor

    size = -(-view.nbytes // parts)
    chunks = [view[i:i + size] for i in range(0, view.nbytes, size)]
    with ThreadPoolExecutor(len(chunks)) as pool:
        crcs = list(pool.map(zlib.crc32, chunks))
    crc = crcs[0]
    for part, chunk in zip(crcs[1:], chunks[1:]):
        crc = crc32_combine(crc, part, chunk.nbytes)
    return crc


def _gf2_times(matrix: list[int], vector: int) -> int:
    total, i = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[i]
        vector >>= 1
        i += 1
    return total


def _gf2_square(matrix: list[int]) -> list[int]:
    return [_gf2_times(matrix, row) for row in matrix]


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of A + B from crc32(A), crc32(B) and len(B): zlib's crc32_combine (Python's zlib
    does not offer it), i.e. crc1 advanced over len2 zero bytes by squaring the one-zero-bit
    operator in GF(2), then xor crc2. ~10 ms."""
    if len2 <= 0:
        return crc1
    odd = [0xEDB88320] + [1 << n for n in range(31)]  # the operator for one zero bit
    even = _gf2_square(odd)  # two zero bits
    odd = _gf2_square(even)  # four
    while True:
        even = _gf2_square(odd)  # the first pass: one zero byte
        if len2 & 1:
            crc1 = _gf2_times(even, crc1)
        len2 >>= 1
        if not len2:
            break
        odd = _gf2_square(even)
        if len2 & 1:
            crc1 = _gf2_times(odd, crc1)
        len2 >>= 1
        if not len2:
            break
    return crc1 ^ crc2


class PromptCache:
    def __init__(self, folder: Path | None = None, budget: int | None = None,
                 note: Callable[[str], None] = lambda message: None, writable: bool = True):
        self.folder = Path(folder) if folder is not None else cache_dir()
        self.writable = writable  # False: entries are read, none stored (a batch of many images)
        self.budget = budget_from_env() if budget is None else budget
        self.note = note  # shown with -v: why an entry was ignored, a write that failed
        self._writer: threading.Thread | None = None

    def path(self, key: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", key):
            raise ValueError(f"bad cache key {key!r}")
        return self.folder / (key + SUFFIX)

    # -- reading --------------------------------------------------------------------------------
    def load(self, key: str, layout: dict) -> Loaded | None:
        """The entry for `key` if it is whole, intact and saved with this KV `layout` (the checksum
        is checked here, before llama.cpp sees a byte: it aborts on some malformed states); a
        bad entry is removed (with a note) and counts as a miss. close() it after use."""
        path = self.path(key)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                magic, version, n_header = _HEAD.unpack(f.read(_HEAD.size))
                if magic != MAGIC:
                    return self._reject(path, "not an imp prompt-cache entry")
                if version != FORMAT:
                    return self._reject(path, f"format version {version}, this imp reads {FORMAT}")
                if n_header > min(size, 1 << 24):
                    return self._reject(path, "truncated header")
                header = json.loads(f.read(n_header))
                if not isinstance(header, dict) or header.get("key") != key:
                    return self._reject(path, "its header does not match its name")
                if header.get("layout") != layout:
                    return self._reject(path, "saved with another llama.cpp KV layout")
                n = int(header["payload_bytes"])
                start = _HEAD.size + n_header
                if start + n != size:
                    return self._reject(path, "truncated or extended payload")
                # Entries are replaced by rename, never rewritten in place: the mapping stays whole.
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
                loaded = Loaded(header, memoryview(mapped)[start:] if mapped else memoryview(b""), mapped)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
            return self._reject(path, f"unreadable ({type(e).__name__})")
        if not loaded.intact():
            loaded.close()
            return self._reject(path, "payload checksum mismatch")
        try:
            os.utime(path)  # least recently *used*: a hit counts as a use
        except OSError:
            pass
        return loaded

    def discard(self, key: str, why: str) -> None:
        """Remove an entry that passed its checks but that llama.cpp still refused."""
        self._reject(self.path(key), why)

    def _reject(self, path: Path, why: str) -> None:
        self.note(f"prompt cache: ignoring {path.name[:16]}…: {why}; removed")
        try:
            path.unlink()
        except OSError:
            pass
        return None

    # -- writing --------------------------------------------------------------------------------
    def store_async(self, key: str, header: dict, payload) -> None:
        """Write in the background (off the answer's critical path); at most one write is pending,
        so memory holds at most one payload beyond the one being written. wait() joins it."""
        self.wait()
        self._writer = threading.Thread(target=self.store, args=(key, header, payload),
                                        name="prompt-cache-write", daemon=False)
        self._writer.start()

    def wait(self) -> None:
        if self._writer is not None:
            self._writer.join()
            self._writer = None

    def store(self, key: str, header: dict, payload) -> bool:
        """Atomically write one entry; a failure (full disk, read-only folder) costs only the
        cache, never the answer. A read-only cache stores nothing."""
        if not self.writable:
            return False
        view = memoryview(payload).cast("B")
        if _HEAD.size + view.nbytes > self.budget:
            self.note(f"prompt cache: an entry of {view.nbytes / 1e6:.0f} MB exceeds the budget of "
                      f"{self.budget / 1e6:.0f} MB; not stored")
            return False
        header = {**header, "key": key, "payload_bytes": view.nbytes, "payload_crc32": crc32(view),
                  "created": time.time()}
        blob = json.dumps(header, separators=(",", ":")).encode()
        final = self.path(key)
        tmp = final.with_name(f".{key}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(_HEAD.pack(MAGIC, FORMAT, len(blob)))
                f.write(blob)
                f.write(view)
            os.replace(tmp, final)
        except OSError as e:
            self.note(f"prompt cache: could not write an entry ({e.strerror or e}); answer unaffected")
            try:
                tmp.unlink()
            except OSError:
                pass
            return False
        self.evict(keep=final)
        return True

    # -- housekeeping ---------------------------------------------------------------------------
    def entries(self) -> list[os.DirEntry]:
        try:
            return [e for e in os.scandir(self.folder) if e.name.endswith(SUFFIX) and e.is_file()]
        except FileNotFoundError:
            return []

    def evict(self, keep: Path | None = None) -> int:
        """Remove least recently used entries until the folder fits the budget; returns how many.
        Temporary files of writers that died long ago go too."""
        # One pass over the folder. Plain strings, not Path objects: pathlib interns every name it
        # parses, and a server storing entries all day would keep growing that table.
        items, now = [], time.time()
        try:
            with os.scandir(self.folder) as found:
                for e in found:
                    try:
                        if e.name.endswith(SUFFIX) and e.is_file():
                            st = e.stat()
                            items.append((st.st_mtime, st.st_size, e.path))
                        elif e.name.endswith(".tmp") and now - e.stat().st_mtime > 3600:
                            os.unlink(e.path)
                    except OSError:
                        continue
        except OSError:
            return 0
        removed = 0
        total = sum(size for _, size, _ in items)
        kept = os.fspath(keep) if keep is not None else None
        for _, size, path in sorted(items, key=lambda t: t[0]):
            if total <= self.budget:
                break
            if path == kept:
                continue
            try:
                os.unlink(path)
                removed += 1
                total -= size
            except OSError:
                pass
        return removed

    def info(self) -> dict:
        items = self.entries()
        return {"folder": str(self.folder), "entries": len(items),
                "bytes": sum(e.stat().st_size for e in items), "budget": self.budget}

    def clear(self) -> int:
        n = 0
        for e in self.entries():
            try:
                Path(e.path).unlink()
                n += 1
            except OSError:
                pass
        return n


# -- content-derived identity of a model file --------------------------------------------------
def file_identity(path: Path, memo_dir: Path | None = None) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime, inode) so that only the first
    use of a file pays for hashing it (~1 s for a 3B model). A copied file hashes the same; a
    re-converted one is a new identity, whatever its path."""
    path = Path(path)
    st = path.stat()
    real = str(path.resolve())
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
    memo_path = (memo_dir or cache_dir()) / "identities.json"
    try:
        memo = json.loads(memo_path.read_text(encoding="utf-8"))
        if not isinstance(memo, dict):
            memo = {}
    except (OSError, ValueError):
        memo = {}
    known = memo.get(real)
    if isinstance(known, dict) and known.get("stamp") == stamp and isinstance(known.get("sha256"), str):
        return known["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    memo[real] = {"stamp": stamp, "sha256": digest}
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_name(f".identities.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(memo), encoding="utf-8")
        os.replace(tmp, memo_path)
    except OSError:
        pass  # only costs hashing again next time
    return digest
