"""llama.cpp's own llama-mtmd-cli runs an imp GGUF pair with no --chat-template: the template the
converter writes (tests/test_chat_templates.py checks its text) is one llama.cpp accepts, and with
--jinja it renders Imp's exact prompt. Not part of `make test` (its name does not start with test_):
`make bench` builds the binary into bench/cache and runs this file by path.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from imp_cli.prompts import build_prompt
from test_chat_templates import MTMD_CLI_MARKER


def _mtmd_cli() -> Path | None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    try:
        from mtmd_cli import binary_path
    finally:
        sys.path.pop(0)
    path = binary_path()
    return path if path.is_file() else None


def test_llama_mtmd_cli_runs_an_imp_pair_without_chat_template(converted, photo):
    binary = _mtmd_cli()
    assert binary is not None, "llama-mtmd-cli is not built: make bench builds it into bench/cache"
    text, mmproj = converted("new", "float16", "square")
    question = "What is in the picture?"
    for extra in ([], ["--jinja"]):
        p = subprocess.run([str(binary), "-m", str(text), "--mmproj", str(mmproj), "--image", str(photo), "-p", question,
                            "-n", "4", "-t", "1", "-v", *extra], capture_output=True, timeout=300)
        err = p.stderr.decode("utf-8", "replace")
        assert p.returncode == 0, err[-2000:]
        assert "does not have chat template" not in err
    # with --jinja it renders the GGUF's template: Imp's exact prompt, the marker where the image goes
    before, after = build_prompt("phi2", question)
    assert before + MTMD_CLI_MARKER + after in err, err[-3000:]
