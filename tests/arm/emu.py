"""Running imp on the emulated aarch64 machine that tests/arm/setup.sh made (host side).

A command runs in .arm/root through `chroot` (qemu-user-static's binfmt_misc entry runs its aarch64
binaries), inside a private mount namespace (`unshare --mount`), so the mounts it needs (/proc,
/dev, the repository at /imp, a cpuinfo text over /proc/cpuinfo) vanish with it and nothing is left
mounted on the host. The CPU is qemu's `QEMU_CPU` and the llama.cpp build of that feature level.

Paths: the host's ROOT/work/... is the emulated machine's /work/...
"""

from __future__ import annotations

import os
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ARM = Path(os.environ.get("ARM_DIR", REPO / ".arm"))
ROOT = ARM / "root"
WORK = ROOT / "work"


@dataclass(frozen=True)
class Level:
    name: str  # the llama.cpp build: /opt/llama/NAME
    qemu_cpu: str  # the emulated CPU (QEMU_CPU)
    like: str  # what real machine it stands for
    cpuinfo: str  # a real cpuinfo text of such a machine (tests/cpuinfo/NAME.txt), over /proc/cpuinfo


LEVELS = {
    "neon": Level("neon", "cortex-a72", "a Raspberry Pi 4 (Cortex-A72): NEON only", "pi4"),
    "dotprod": Level("dotprod", "neoverse-n1", "a Pi 5 / Graviton 2 (dotprod, fp16)", "pi5"),
    "i8mm": Level("i8mm", "max", "a Graviton 3 / Apple M2+ / Snapdragon 8 Gen 3 (i8mm)", "graviton3"),
}


def arm_path(host: Path) -> str:
    """The emulated machine's path of a file under ROOT/work."""
    return "/" + str(Path(host).resolve().relative_to(ROOT.resolve()))


def ready() -> str:
    """'' when the emulated machine is set up, else why not."""
    if not (ROOT / "opt/venv/bin/python").exists():
        return f"no emulated root at {ROOT}: run `make test-arm` (tests/arm/setup.sh)"
    if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        return "qemu-aarch64 is not registered with binfmt_misc: run tests/arm/setup.sh"
    return ""


def env_for(level: Level, **extra: str) -> dict:
    lib = f"/opt/llama/{level.name}"
    env = {
        "PATH": "/opt/venv/bin:/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
        "QEMU_CPU": level.qemu_cpu,
        # llama-cpp-python's loader: libllama from LLAMA_CPP_LIB_PATH, libmtmd from MTMD_CPP_LIB (its
        # own variable); the cross-built libraries carry no RPATH, so libggml* come from LD_LIBRARY_PATH
        "LLAMA_CPP_LIB_PATH": lib, "MTMD_CPP_LIB": lib, "LD_LIBRARY_PATH": lib,
        "PYTHONPATH": "/imp", "PYTHONDONTWRITEBYTECODE": "1",
        "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "IMP_THREADS": "1",
    }
    env.update(extra)
    return env


def command(argv: list[str], level: Level, env: dict | None = None, cpuinfo: bool = True) -> list[str]:
    """The host command line that runs argv on the emulated machine."""
    fake = REPO / "tests" / "cpuinfo" / f"{level.cpuinfo}.txt"
    mounts = [
        f"mount -t proc proc {ROOT}/proc",
        f"mount --rbind /dev {ROOT}/dev",
        f"mkdir -p {ROOT}/imp && mount --bind -o ro {REPO} {ROOT}/imp",
    ]
    if cpuinfo:  # under qemu-user /proc/cpuinfo is the host's x86 text: show a real one of that machine
        mounts.append(f"mount --bind -o ro {fake} {ROOT}/proc/cpuinfo")
    env_args = [f"{k}={v}" for k, v in (env or env_for(level)).items()]
    inner = " && ".join(mounts) + " && exec chroot " + shlex.quote(str(ROOT)) + " /usr/bin/env -i " + \
        " ".join(map(shlex.quote, env_args + argv))
    return ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", inner]


def run(argv: list[str], level: Level, env: dict | None = None, input: bytes | None = None,
        timeout: float = 900, cpuinfo: bool = True) -> subprocess.CompletedProcess:
    """argv on the emulated machine; stdout/stderr as str."""
    p = subprocess.run(command(argv, level, env, cpuinfo), input=input, capture_output=True, timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, p.stdout.decode("utf-8", "replace"),
                                       p.stderr.decode("utf-8", "replace"))


def popen(argv: list[str], level: Level, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen(command(argv, level, env), **kw)
