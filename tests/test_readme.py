"""The README stands alone for users: it points at nothing outside the repository, and every
command it documents exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_no_pointer_outside_the_repository():
    assert "../" not in README
    for target in re.findall(r"\]\(([^)]+)\)", README):  # markdown links: the web, or a file here
        assert target.startswith(("http://", "https://", "#")) or (ROOT / target).exists(), target


def test_documented_commands_exist(imp_bin):
    commands = set(re.findall(r"^### `imp ([a-z]+)", README, flags=re.M))
    assert {"ask", "convert"} <= commands
    for command in sorted(commands):
        p = subprocess.run([imp_bin, command, "--help"], capture_output=True, timeout=30)
        assert p.returncode == 0, (command, p.stderr)


def test_test_command_is_make_test():
    assert "make test" in README
