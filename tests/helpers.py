"""The one way tests run the `imp` command and judge what it did.

- `clean_env(tmp)`: a user who set nothing: no IMP_*/HF_* variables, no forced colours, an empty
  model store and hub cache under `tmp`, offline, one thread.
- `run_imp(*args, env=...)`: the installed command with stdin, stdout and stderr all pipes and a
  timeout; output decoded strictly as UTF-8, and no colour or cursor codes allowed on the pipes.
- `assert_ok`, `assert_one_line_error`, `assert_usage_error`: the exit code is pinned, never "1 or 2".
- Every answer record `run_imp` sees on stdout (`imp ask --json`, `imp chat --json`) is validated
  against imp_cli/schema/record.schema.json (tests/schema_check.py), whatever the test checks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from schema_check import check_stdout

IMP = str(Path(sys.executable).parent / "imp")  # the installed console script

_TERMINAL_VARS = ("FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS")


def clean_env(tmp_path: Path, hub: Path | None = None, **extra: str) -> dict:
    """The environment of a user who set nothing; every folder imp may write is under
    tmp_path/env (created by imp, not here). `hub`: a Hugging Face hub cache to use (default: an
    empty one)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("IMP_", "HF_", "HUGGINGFACE_")) and k not in _TERMINAL_VARS}
    base = tmp_path / "env"
    env.update(
        IMP_HOME=str(base / "imp-home"),
        XDG_CACHE_HOME=str(base / "xdg-cache"),
        HF_HOME=str(base / "hf-home"),
        HF_HUB_CACHE=str(hub or base / "empty-hub"),
        HF_HUB_OFFLINE="1",  # tests never go online
        HF_HUB_DISABLE_TELEMETRY="1",
        # One thread: on a busy 2-core machine llama.cpp's spinning threads make a 1 s run take 9 s.
        IMP_THREADS="1",
    )
    env.update(extra)
    return env


def _decoded(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    out, err = p.stdout.decode("utf-8"), p.stderr.decode("utf-8")  # strict: bad UTF-8 fails
    assert "\x1b" not in out and "\x1b" not in err, (out, err)  # nothing for a terminal on a pipe
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def run_imp(*args, env: dict, stdin: bytes = b"", cwd: Path | None = None, timeout: float = 120,
            **popen: object) -> subprocess.CompletedProcess:
    """`imp ARGS` with all three streams pipes; stdout/stderr as str. `popen`: more arguments
    for subprocess (e.g. preexec_fn to set a resource limit)."""
    p = subprocess.run([IMP, *map(str, args)], input=stdin, capture_output=True, env=env, cwd=cwd,
                       timeout=timeout, **popen)
    done = _decoded(p)
    check_stdout(args, done.stdout)  # every --json record the suite produces obeys the schema
    return done


def run_python(code: str, *args, env: dict, cwd: Path | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -c CODE ARGS` (e.g. the CLI with one function patched), judged like run_imp."""
    p = subprocess.run([sys.executable, "-c", code, *map(str, args)], stdin=subprocess.DEVNULL,
                       capture_output=True, env=env, cwd=cwd, timeout=timeout)
    return _decoded(p)


def start_imp(*args, env: dict, cwd: Path | None = None) -> subprocess.Popen:
    """`imp ARGS` in the background (text pipes), for tests that interrupt it."""
    return subprocess.Popen([IMP, *map(str, args)], env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"exit {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
    assert "Traceback" not in p.stderr, p.stderr
    return p


def assert_one_line_error(p: subprocess.CompletedProcess, *phrases: str, code: int = 1,
                          after_progress: bool = False) -> str:
    """Exit `code`, nothing on stdout, exactly one stderr line `error: ...` naming every phrase
    (returned). With after_progress, progress lines (`pulling ...`) may come before it, but the
    error is the last line and the only error line."""
    assert "Traceback" not in p.stderr, p.stderr
    assert p.returncode == code, f"exit {p.returncode}, expected {code}\nstderr: {p.stderr}"
    assert p.stdout == "", p.stdout
    assert p.stderr.endswith("\n"), repr(p.stderr)
    lines = p.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], p.stderr
    if not after_progress:
        assert len(lines) == 1, p.stderr
    line = errors[0]
    assert line.startswith("error: ") and "internal error" not in line, line
    for phrase in phrases:
        assert phrase in line, (phrase, line)
    return line


def assert_usage_error(p: subprocess.CompletedProcess, *phrases: str) -> None:
    """Exit 2 (usage), nothing on stdout, no traceback, the stderr text naming every phrase."""
    assert "Traceback" not in p.stderr, p.stderr
    assert p.returncode == 2, f"exit {p.returncode}, expected 2\nstderr: {p.stderr}"
    assert p.stdout == "", p.stdout
    for phrase in phrases:
        assert phrase in p.stderr, (phrase, p.stderr)


def quiet_http_server(handler):
    """A threading HTTP server on a free loopback port whose request errors (a client that gave
    up: the timeout tests) are not printed from a background thread into later tests' stderr."""
    import http.server

    class Quiet(http.server.ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request, client_address):
            pass

    return Quiet(("127.0.0.1", 0), handler)
