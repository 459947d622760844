"""Resolve a conversion SOURCE: a local checkpoint folder, or a Hugging Face repo id[@revision]."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import NEEDED_FILES, needed_files
from .errors import ConvertError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Source:
    folder: Path
    repo_id: str | None  # None for a local folder
    revision: str | None  # as asked for (a branch, tag or commit), None for the default branch
    commit: str | None = None  # the commit it resolved to

    @property
    def label(self) -> str:
        """What the GGUF records as imp.source: the folder, or the repo id and resolved commit."""
        if self.repo_id is None:
            return str(self.folder)
        rev = self.commit or self.revision
        return self.repo_id + (f"@{rev}" if rev else "")


def offline() -> bool:
    """Whether the user asked huggingface_hub never to touch the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off")


def parse_repo_id(text: str) -> tuple[str, str | None] | None:
    """`owner/name[@rev]` -> (repo_id, revision); None if it is not shaped like a repo id."""
    repo, _, rev = text.partition("@")
    if not _REPO_ID.match(repo) or ".." in repo:
        return None
    return repo, (rev or None)


def resolve(source: "str | Source", show_progress: bool | None = None) -> Source:
    """A local folder wins over a repo id of the same spelling."""
    if isinstance(source, Source):
        return source
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConvertError(f"{source}: not a folder (expected a checkpoint folder or a repo id)")
        return Source(path, None, None)
    parsed = parse_repo_id(source)
    if parsed is None:
        raise ConvertError(f"{source}: no such folder, and not a Hugging Face repo id (owner/name)")
    repo_id, revision = parsed
    return download(repo_id, revision, show_progress)


def download(repo_id: str, revision: str | None, show_progress: bool | None = None) -> Source:
    """Fetch exactly what conversion needs into the standard hub cache (resumable, reused).

    One call resolves the revision and lists the repo's files; then the small files (config.json
    and the index name the rest), then the shards and the tower folder's config.json that
    needed_files picks. Offline or with the Hub unreachable, the same choice from the cache.
    Progress bars (on stderr) by default only when stderr is a terminal: no carriage-return noise in logs."""
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    if show_progress is None:
        show_progress = sys.stderr.isatty()
    if show_progress:
        enable_progress_bars()
    else:
        disable_progress_bars()
    label = repo_id + (f"@{revision}" if revision else "")
    remote = None if offline() else _remote_listing(repo_id, revision)
    local = remote is None
    first = Path(_snapshot(repo_id, remote[0] if remote else revision, NEEDED_FILES, label, local))
    commit = first.name  # snapshot_download returns .../snapshots/<commit>
    listing = remote[1] if remote else [p.relative_to(first).as_posix() for p in first.rglob("*") if p.is_file()]
    config, index = _read_json(first / "config.json"), _read_json(first / "model.safetensors.index.json")
    try:
        files = needed_files(listing, config if isinstance(config, dict) else None, index)
    except ConvertError as e:
        raise ConvertError(f"{label}: {e}") from None
    folder = Path(_snapshot(repo_id, commit, files, label, local))
    return Source(folder, repo_id, revision, commit)


def _remote_listing(repo_id: str, revision: str | None) -> tuple[str, list[str]] | None:
    """(commit, the repo's files) from the Hub, or None when it cannot be reached or fails (the
    cache is then used, as huggingface_hub itself does)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi().model_info(repo_id, revision=revision)
    except (RevisionNotFoundError, GatedRepoError, RepositoryNotFoundError) as e:
        raise _hub_error(e, repo_id, revision, repo_id) from None
    except Exception:  # unreachable, or the Hub failing: what the cache holds
        return None
    return info.sha, [s.rfilename for s in info.siblings or []]


def _snapshot(repo_id: str, revision: str | None, files: list[str], label: str, local: bool) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=files, local_files_only=local)
    except Exception as e:
        raise _hub_error(e, repo_id, revision, label) from None


def _hub_error(e: Exception, repo_id: str, revision: str | None, label: str) -> Exception:
    """A huggingface_hub failure as one line (anything else is re-raised as it is)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, RevisionNotFoundError):
        return ConvertError(f"{repo_id}: revision {revision!r} not found on the Hub")
    if isinstance(e, GatedRepoError):
        return ConvertError(f"{repo_id}: gated repository; log in with `hf auth login` first")
    if isinstance(e, RepositoryNotFoundError):
        return ConvertError(f"{repo_id}: no such repository on the Hugging Face Hub")
    if isinstance(e, LocalEntryNotFoundError):
        why = "HF_HUB_OFFLINE is set" if offline() else "the Hub cannot be reached"
        return ConvertError(f"{label}: not in the local Hugging Face cache and {why}")
    if isinstance(e, (HfHubHTTPError, OSError)):
        return ConvertError(f"{repo_id}: download failed ({str(e).splitlines()[0]})")
    return e


def _read_json(path: Path):
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (ValueError, UnicodeDecodeError):
        raise ConvertError(f"{path.name} of the repository is not valid JSON") from None


def remote_size(repo_id: str, revision: str | None) -> int | None:
    """Bytes a download of the needed files would take (every top-level shard: the index is not
    read yet), or None when the Hub can't say (offline, unreachable): a best-effort figure for
    checking disk space first."""
    if offline():
        return None
    try:
        from huggingface_hub import HfApi

        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True, timeout=10)
    except Exception:  # any failure only means we cannot check early
        return None
    sizes = {f.rfilename: f.size or 0 for f in info.siblings or []}
    try:
        return sum(sizes[name] for name in needed_files(sizes, None, None))
    except ConvertError:
        return None
