"""Write outputs under temporary names in their final folder; rename into place only when all
are complete. A failed or interrupted run leaves no partial file and never clobbers a good one."""

from __future__ import annotations

import os
from pathlib import Path


class Staging:
    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []  # (temporary, final)

    def path_for(self, final: Path) -> Path:
        tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
        self._pending.append((tmp, final))
        return tmp

    def scratch(self, final: Path, tag: str) -> Path:
        """An intermediate file beside `final`, removed by cleanup()."""
        tmp = final.with_name(f".{final.name}.{tag}-{os.getpid()}")
        self._pending.append((tmp, tmp))
        return tmp

    def commit(self) -> None:
        for tmp, final in self._pending:
            if tmp != final:
                os.replace(tmp, final)
        self._pending = [(t, f) for t, f in self._pending if t == f]

    def cleanup(self) -> None:
        for tmp, _ in self._pending:
            tmp.unlink(missing_ok=True)
        self._pending = []

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()


def write_text(path: Path, text: str) -> None:
    """`text` (UTF-8) into `path` through a temporary name beside it: never half a file, and no
    temporary file left behind when it fails (the OSError is raised)."""
    with Staging() as staging:
        staging.path_for(Path(path)).write_text(text, encoding="utf-8")
        staging.commit()
