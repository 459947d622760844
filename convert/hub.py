"""Resolve a conversion SOURCE: a local checkpoint folder, or a Hugging Face repo id[@revision]."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import NEEDED_FILES
from .errors import ConvertError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Source:
    folder: Path
    repo_id: str | None  # None for a local folder
    revision: str | None

    @property
    def label(self) -> str:
        if self.repo_id is None:
            return str(self.folder)
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def offline() -> bool:
    """Whether the user asked huggingface_hub never to touch the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off")


def parse_repo_id(text: str) -> tuple[str, str | None] | None:
    """`owner/name[@rev]` -> (repo_id, revision); None if it is not shaped like a repo id."""
    repo, _, rev = text.partition("@")
    if not _REPO_ID.match(repo) or ".." in repo:
        return None
    return repo, (rev or None)


def resolve(source: str, show_progress: bool | None = None) -> Source:
    """A local folder wins over a repo id of the same spelling."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConvertError(f"{source}: not a folder (expected a checkpoint folder or a repo id)")
        return Source(path, None, None)
    parsed = parse_repo_id(source)
    if parsed is None:
        raise ConvertError(f"{source}: no such folder, and not a Hugging Face repo id (owner/name)")
    repo_id, revision = parsed
    return Source(download(repo_id, revision, show_progress), repo_id, revision)


def download(repo_id: str, revision: str | None, show_progress: bool | None = None) -> Path:
    """Fetch only what conversion needs into the standard hub cache (resumable, reused).
    Progress bars (on stderr) by default only when stderr is a terminal: no carriage-return noise in logs."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    if show_progress is None:
        show_progress = sys.stderr.isatty()
    if show_progress:
        enable_progress_bars()
    else:
        disable_progress_bars()
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=NEEDED_FILES)
    except RevisionNotFoundError:
        raise ConvertError(f"{repo_id}: revision {revision!r} not found on the Hub") from None
    except GatedRepoError:
        raise ConvertError(f"{repo_id}: gated repository; log in with `hf auth login` first") from None
    except RepositoryNotFoundError:
        raise ConvertError(f"{repo_id}: no such repository on the Hugging Face Hub") from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline() else "the Hub cannot be reached"
        label = repo_id + (f"@{revision}" if revision else "")
        raise ConvertError(f"{label}: not in the local Hugging Face cache and {why}") from None
    except (HfHubHTTPError, OSError) as e:
        raise ConvertError(f"{repo_id}: download failed ({str(e).splitlines()[0]})") from None
    return Path(folder)


def remote_size(repo_id: str, revision: str | None) -> int | None:
    """Bytes a download of the needed files would take, or None when the Hub can't say
    (offline, unreachable): a best-effort figure for checking disk space first."""
    import fnmatch

    if offline():
        return None
    try:
        from huggingface_hub import HfApi

        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True, timeout=10)
    except Exception:  # any failure only means we cannot check early
        return None
    return sum(
        f.size or 0 for f in info.siblings or []
        if any(fnmatch.fnmatch(f.rfilename, pattern) for pattern in NEEDED_FILES)
    )
