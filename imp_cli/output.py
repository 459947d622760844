"""One sink for everything that is not the answer. It alone decides TTY vs pipe vs JSON.

stdout carries the answer (or one JSON document with --json) and nothing else; errors,
warnings, progress and stats go to stderr, with colour and cursor movement only when stderr is
a terminal (and NO_COLOR is unset).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Callable, Iterator


class Output:
    def __init__(self, json_mode: bool = False, verbose: bool = False, quiet: bool = False):
        self.json_mode, self.verbose, self.quiet = json_mode, verbose, quiet
        self.interactive = sys.stderr.isatty()
        self._err = None

    @property
    def err(self):
        """The stderr console, made on first use: an answer that prints nothing on stderr does
        not import rich (~0.1 s of a warm `imp ask`)."""
        if self._err is None:
            from rich.console import Console

            no_color = bool(os.environ.get("NO_COLOR")) or not self.interactive
            self._err = Console(stderr=True, no_color=no_color, force_terminal=self.interactive,
                                force_interactive=self.interactive, highlight=False, soft_wrap=True)
        return self._err

    # -- the answer (stdout) ---------------------------------------------------------------------
    def answer(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def record(self, obj: dict) -> None:
        sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
        sys.stdout.flush()

    # -- everything else (stderr) ----------------------------------------------------------------
    def error(self, message: str) -> None:
        self.err.print(f"[bold red]error:[/] {_escape(_one_line(message))}")

    def failure(self, exc: BaseException) -> None:
        """The one line for an exception that ends a command (or, in imp chat, a turn): a problem
        the user can act on (ImpError, ConvertError) as its message; anything else is a bug, said
        as an internal error (after its traceback, with -v)."""
        from convert.errors import ConvertError

        from .errors import ImpError

        if isinstance(exc, (ImpError, ConvertError)):
            self.error(str(exc))
            return
        if self.verbose:
            import traceback

            traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        self.error(f"internal error: {type(exc).__name__}: {exc} (run with -v for details)")

    def warn(self, message: str) -> None:
        self.err.print(f"[yellow]warning:[/] {_escape(_one_line(message))}")

    def note(self, message: str) -> None:
        """Only with -v: what happened behind the scenes (a cache entry ignored, say)."""
        if self.verbose:
            self.err.print(f"[dim]{_escape(_one_line(message))}[/]")

    def info(self, message: str) -> None:
        if not self.quiet:
            self.err.print(_escape(message))

    def table(self, title: str, rows: dict) -> None:
        width = max(len(k) for k in rows)
        self.err.print(f"[bold]{_escape(title)}[/]")
        for k, v in rows.items():
            self.err.print(f"  {k.ljust(width)}  {_escape(str(v))}")

    @contextlib.contextmanager
    def phase(self, description: str, total: float) -> Iterator[Callable[[float], None]]:
        """A progress bar on a terminal; on a pipe, one line when the phase starts."""
        if self.quiet:
            yield lambda done: None
            return
        if not self.interactive:
            self.err.print(f"{description} …")
            yield lambda done: None
            return
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

        columns = [TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn()]
        with Progress(*columns, console=self.err, transient=False) as bar:
            task = bar.add_task(description, total=total)
            yield lambda done: bar.update(task, completed=done)
            bar.update(task, completed=total)


def _one_line(text: str) -> str:
    """Errors are one line: control characters (from a file name, say) are shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
