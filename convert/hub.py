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

    First the small files at the resolved commit (config.json and the index name the rest), then
    the shards and the tower folder's config.json that needed_files picks from the repo's file list.
    Progress bars (on stderr) by default only when stderr is a terminal: no carriage-return noise in logs."""
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    if show_progress is None:
        show_progress = sys.stderr.isatty()
    if show_progress:
        enable_progress_bars()
    else:
        disable_progress_bars()
    label = repo_id + (f"@{revision}" if revision else "")
    first = Path(_snapshot(repo_id, revision, NEEDED_FILES, label))
    commit = first.name  # snapshot_download returns .../snapshots/<commit>
    config, index = _read_json(first / "config.json"), _read_json(first / "model.safetensors.index.json")
    try:
        files = needed_files(_listing(repo_id, commit, first), config if isinstance(config, dict) else None, index)
    except ConvertError as e:
        raise ConvertError(f"{label}: {e}") from None
    folder = Path(_snapshot(repo_id, commit, files, label))
    return Source(folder, repo_id, revision, commit)


def _snapshot(repo_id: str, revision: str | None, files: list[str], label: str) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=files)
    except RevisionNotFoundError:
        raise ConvertError(f"{repo_id}: revision {revision!r} not found on the Hub") from None
    except GatedRepoError:
        raise ConvertError(f"{repo_id}: gated repository; log in with `hf auth login` first") from None
    except RepositoryNotFoundError:
        raise ConvertError(f"{repo_id}: no such repository on the Hugging Face Hub") from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline() else "the Hub cannot be reached"
        raise ConvertError(f"{label}: not in the local Hugging Face cache and {why}") from None
    except (HfHubHTTPError, OSError) as e:
        raise ConvertError(f"{repo_id}: download failed ({str(e).splitlines()[0]})") from None


def _listing(repo_id: str, commit: str, snapshot: Path) -> list[str]:
    """The repo's files at `commit`: from the Hub, or (offline) what the cached snapshot holds."""
    if not offline():
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError

        try:
            return HfApi().list_repo_files(repo_id, revision=commit)
        except (HfHubHTTPError, OSError) as e:
            raise ConvertError(f"{repo_id}: cannot list the repository's files ({str(e).splitlines()[0]})") from None
    return [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]


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
