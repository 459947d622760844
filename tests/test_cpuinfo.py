"""CPU detection on x86 and ARM (imp_cli/cpuinfo.py), what `imp tune` keys on and the CPU-family
defaults, on real /proc/cpuinfo texts of other machines (tests/cpuinfo/: a Raspberry Pi 4 and 5,
a Graviton 3, a Linux VM on an Apple M2, a Snapdragon 8 Gen 3 phone, a Zen 4 EPYC); and the prompt
cache's KV layout, which names the architecture so that an entry written on ARM is never restored
on x86 or the other way round. The same code under an emulated aarch64: tests/arm/ (make test-arm).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from helpers import clean_env, run_imp
from imp_cli import cpuinfo, tune
from imp_cli.engine import Tuning
from imp_cli.prompt_cache import _HEAD

TEXTS = Path(__file__).parent / "cpuinfo"


def arm(name: str) -> cpuinfo.CpuInfo:
    return cpuinfo.parse((TEXTS / f"{name}.txt").read_text(), arch="aarch64")


# name: (model, implementer, parts, level, board)
ARM_MACHINES = {
    "pi4": ("Arm Cortex-A72", 0x41, (0xD08,), "neon", "Raspberry Pi 4 Model B Rev 1.5"),
    "pi5": ("Arm Cortex-A76", 0x41, (0xD0B,), "dotprod", "Raspberry Pi 5 Model B Rev 1.0"),
    "graviton3": ("Arm Neoverse-V1", 0x41, (0xD40,), "i8mm", ""),
    "apple-m2-vm": ("Apple (part 0x000)", 0x61, (0x000,), "i8mm", ""),
    "snapdragon-8gen3": ("Arm Cortex-A520 + Cortex-A720 + Cortex-X4", 0x41, (0xD80, 0xD81, 0xD82), "i8mm", ""),
}


@pytest.mark.parametrize("name", list(ARM_MACHINES))
def test_arm_cpuinfo(name):
    model, implementer, parts, level, board = ARM_MACHINES[name]
    info = arm(name)
    assert (info.arch, info.is_arm, info.model, info.implementer, info.parts, info.board) == \
        ("aarch64", True, model, implementer, parts, board)
    assert info.arm_level() == level
    assert info.neon and info.dotprod == (level != "neon") and info.i8mm == (level == "i8mm")
    # the tuning key's flags: the SIMD features only (no evtstrm, crc32, aes, ...)
    assert "asimd" in info.simd and not info.simd & {"evtstrm", "crc32", "cpuid", "aes", "sha2"}
    assert ("asimddp" in info.simd) == info.dotprod and ("i8mm" in info.simd) == info.i8mm


def test_graviton3_has_sve_and_bf16():
    info = arm("graviton3")
    assert info.sve and {"sve", "svei8mm", "svebf16", "bf16", "i8mm", "asimddp", "fphp", "asimdhp"} <= info.simd
    assert not arm("pi5").sve and "fphp" in arm("pi5").simd and "fphp" not in arm("pi4").simd


def test_x86_cpuinfo_and_its_tuning_flags_are_unchanged():
    text = (TEXTS / "epyc-zen4.txt").read_text()
    info = cpuinfo.parse(text, arch="x86_64")
    assert (info.arch, info.is_arm, info.model, info.arm_level()) == \
        ("x86_64", False, "AMD EPYC 9R14 96-Core Processor", "")
    # what tune.cpu() keyed on before ARM was known: tuning files written then still match
    old = re.compile(r"^(sse4|avx|amx|fma|f16c|asimd|sve|i8mm|dotprod|bf16|neon|fphp)")
    flags = next(line for line in text.splitlines() if line.startswith("flags")).split(":", 1)[1].split()
    assert info.simd == {f for f in flags if old.match(f)}
    assert {"avx512f", "avx512_vnni", "avx2", "fma", "sse4_2"} <= info.simd


def test_architecture_comes_from_the_machine_not_the_text():
    """Under qemu-user /proc/cpuinfo is the host's x86 text while the code runs on aarch64."""
    info = cpuinfo.parse((TEXTS / "epyc-zen4.txt").read_text(), arch="aarch64")
    assert info.is_arm and info.implementer is None and not info.simd and "emulated" in info.model
    assert cpuinfo.parse((TEXTS / "pi4.txt").read_text(), arch="x86_64").arch == "x86_64"


@pytest.mark.parametrize("raw,arch", [("x86_64", "x86_64"), ("AMD64", "x86_64"), ("aarch64", "aarch64"),
                                      ("arm64", "aarch64"), ("armv7l", "arm"), ("riscv64", "riscv64")])
def test_machine_names(raw, arch):
    assert cpuinfo.machine(raw) == arch


def test_unknown_parts_and_implementers_are_named_by_number():
    text = (TEXTS / "pi4.txt").read_text().replace("0xd08", "0xfff").replace("0x41", "0x99")
    assert cpuinfo.parse(text, arch="aarch64").model == "implementer 0x99 (part 0xfff)"
    assert cpuinfo.parse("", arch="aarch64").model == "ARM (unknown)"


def test_this_machine():
    info = cpuinfo.read()
    assert info.arch == cpuinfo.machine() and info.model
    assert tune.cpu() == {"cpu": info.model, "flags": " ".join(sorted(info.simd)), "arch": info.arch}


# ---------------------------------------------------------------------------- tune's key and defaults
@pytest.fixture
def on_machine(monkeypatch):
    """on_machine(name): tune sees that machine's cpuinfo."""
    def use(name: str) -> None:
        info = arm(name) if name in ARM_MACHINES else cpuinfo.parse((TEXTS / f"{name}.txt").read_text(), "x86_64")
        monkeypatch.setattr(cpuinfo, "read", lambda path="/proc/cpuinfo": info)
    return use


def test_tuning_keys_tell_arm_machines_apart(on_machine):
    keys = {}
    for name in ARM_MACHINES:
        on_machine(name)
        keys[name] = tune.cpu()
        assert keys[name]["arch"] == "aarch64" and keys[name]["cpu"] == ARM_MACHINES[name][0]
    assert len({json.dumps(k, sort_keys=True) for k in keys.values()}) == len(keys)
    assert keys["pi4"]["flags"] == "asimd"
    assert "i8mm" in keys["graviton3"]["flags"].split() and "asimddp" in keys["pi5"]["flags"].split()


@pytest.mark.parametrize("name", list(ARM_MACHINES))
def test_arm_defaults(on_machine, name):
    on_machine(name)
    level = ARM_MACHINES[name][3]
    choice, why = tune.family_default(tune.cpu())
    assert choice == Tuning(repack=True, flash_attn=False)  # llama.cpp's repacked kernels were made for ARM
    assert why.startswith("ARM's defaults") and level in why


def test_x86_defaults_are_not_arm_ones(on_machine):
    on_machine("epyc-zen4")
    assert not tune.family_default(tune.cpu())[1].startswith("ARM")
    # a key carries its architecture: an ARM key is judged as ARM on any machine
    assert tune.family_default({"arch": "aarch64", "flags": "asimd asimddp"})[1].startswith("ARM's defaults (dotprod")
    assert tune.family_default({"arch": "x86_64", "flags": "asimd i8mm"})[0] == Tuning()


# ---------------------------------------------------------------------------- the prompt cache
def test_kv_layout_names_the_architecture(converted):
    from imp_cli.engine import Engine
    from imp_cli.modelfiles import read_pair

    text, mmproj = converted("new", "float16", "square")
    with Engine(read_pair(text, mmproj), n_ctx=256, threads=1) as engine:
        assert engine.kv_layout()["arch"] == cpuinfo.machine() == "x86_64"


def test_entry_from_another_architecture_is_never_restored(imp_bin, converted, photo, tmp_path):
    """An entry that says it was written on aarch64 (the same file from an ARM machine on a shared
    disk) is refused on x86 and replaced; the answer is the uncached one."""
    text, _ = converted("new", "float16", "square")
    env = clean_env(tmp_path)
    first = run_imp("ask", photo, "What is in the image?", "--model", text, "-n", 8, "--json", env=env)
    assert first.returncode == 0, first.stderr
    (entry,) = (Path(env["IMP_HOME"]) / "cache").glob("*.kv")
    raw = entry.read_bytes()
    magic, version, n = _HEAD.unpack_from(raw)
    header = json.loads(raw[_HEAD.size:_HEAD.size + n])
    assert header["layout"]["arch"] == "x86_64"
    header["layout"]["arch"] = "aarch64"
    new = json.dumps(header).encode()
    entry.write_bytes(_HEAD.pack(magic, version, len(new)) + new + raw[_HEAD.size + n:])
    p = run_imp("ask", photo, "What is in the image?", "--model", text, "-n", 8, "--json", "-v", env=env)
    assert p.returncode == 0, p.stderr
    assert "saved with another llama.cpp KV layout" in p.stderr
    again = json.loads(p.stdout)
    assert again["cache"] == "miss" and again["answer"] == json.loads(first.stdout)["answer"]


# ---------------------------------------------------------------------------- make test-arm's wiring
def test_arm_suite_is_wired_into_ci():
    """The emulated suite itself runs in `make test-arm` (tests/arm/); here only that CI runs it
    and that its setup script parses."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    assert subprocess.run(["bash", "-n", str(repo / "tests/arm/setup.sh")]).returncode == 0
    assert re.search(r"^make test-arm$", (repo / ".ci/run").read_text(), re.M)
    assert re.search(r"^test-arm:", (repo / "Makefile").read_text(), re.M)
    # not collected by `make test` (its files are not test_*.py), collected when named
    assert not list((repo / "tests/arm").glob("test_*.py"))
