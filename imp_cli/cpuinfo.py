"""What CPU this is, as llama.cpp's kernels see it: the architecture, a model name, the SIMD features.

x86 and ARM Linux describe a CPU differently in /proc/cpuinfo. x86 has `model name` and `flags`
per processor. ARM (aarch64) has no model name and no flags: each processor block has `Features`
(asimd = NEON, asimddp = dotprod, i8mm, sve, ...) and the MIDR fields `CPU implementer` (0x41 Arm,
0x61 Apple, 0x51 Qualcomm, ...) and `CPU part` (0xd08 Cortex-A72, ...); a big.LITTLE chip lists
several parts. The architecture comes from platform.machine(), never from the text: under user-mode
emulation (qemu-user) /proc/cpuinfo is the host's x86 text while the process runs aarch64 code.

`read()` is what imp uses (the tuning file's key, the CPU-family defaults); `parse()` takes the
text, so tests feed it real cpuinfo texts of other machines.
"""

from __future__ import annotations

import functools
import platform
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

# platform.machine() spellings -> one name per architecture
_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "x64": "x86_64", "i386": "x86", "i486": "x86", "i586": "x86",
         "i686": "x86", "x86": "x86", "aarch64": "aarch64", "arm64": "aarch64", "aarch64_be": "aarch64_be",
         "armv7l": "arm", "armv6l": "arm", "armv8l": "arm", "arm": "arm"}

# The features that decide which ggml kernels run, as /proc/cpuinfo spells them.
# x86: SSE4, AVX*, AMX, FMA, F16C. ARM: asimd (NEON) and its extensions (asimddp = dotprod,
# asimdhp = fp16 arithmetic), fphp, i8mm (int8 matrix multiply), bf16, sve/sve2 (and their i8mm,
# bf16), sme.
_SIMD = {"x86": re.compile(r"^(sse4|avx|amx|fma|f16c)"), "arm": re.compile(r"^(asimd|sve|sme|i8mm|bf16|fphp)")}

# MIDR implementer codes and the parts imp has reason to name (Linux prints them in hex).
IMPLEMENTERS = {0x41: "Arm", 0x42: "Broadcom", 0x43: "Cavium", 0x46: "Fujitsu", 0x48: "HiSilicon",
                0x4E: "NVIDIA", 0x50: "APM", 0x51: "Qualcomm", 0x61: "Apple", 0x6D: "Microsoft",
                0xC0: "Ampere"}
PARTS = {
    0x41: {0xD03: "Cortex-A53", 0xD04: "Cortex-A35", 0xD05: "Cortex-A55", 0xD07: "Cortex-A57",
           0xD08: "Cortex-A72", 0xD09: "Cortex-A73", 0xD0A: "Cortex-A75", 0xD0B: "Cortex-A76",
           0xD0C: "Neoverse-N1", 0xD0D: "Cortex-A77", 0xD0E: "Cortex-A76AE", 0xD40: "Neoverse-V1",
           0xD41: "Cortex-A78", 0xD44: "Cortex-X1", 0xD46: "Cortex-A510", 0xD47: "Cortex-A710",
           0xD48: "Cortex-X2", 0xD49: "Neoverse-N2", 0xD4B: "Cortex-A78C", 0xD4D: "Cortex-A715",
           0xD4E: "Cortex-X3", 0xD4F: "Neoverse-V2", 0xD80: "Cortex-A520", 0xD81: "Cortex-A720",
           0xD82: "Cortex-X4", 0xD84: "Neoverse-V3", 0xD85: "Cortex-X925", 0xD87: "Cortex-A725",
           0xD8E: "Neoverse-N3"},
    0x51: {0x001: "Oryon", 0x802: "Kryo-4xx-Gold", 0x803: "Kryo-4xx-Silver", 0x804: "Kryo-4xx-Gold",
           0x805: "Kryo-4xx-Silver"},
    0x61: {0x022: "M1-Icestorm", 0x023: "M1-Firestorm", 0x024: "M1-Pro-Icestorm", 0x025: "M1-Pro-Firestorm",
           0x028: "M1-Max-Icestorm", 0x029: "M1-Max-Firestorm", 0x032: "M2-Blizzard", 0x033: "M2-Avalanche"},
    0xC0: {0xAC3: "Ampere-1", 0xAC4: "Ampere-1a"},
}


@dataclass(frozen=True)
class CpuInfo:
    arch: str  # "x86_64", "aarch64", ... (from platform.machine())
    model: str  # x86: the model name; ARM: implementer and part names, e.g. "Arm Cortex-A72"
    features: frozenset[str] = field(default_factory=frozenset)  # every flag / Feature the kernel lists
    implementer: int | None = None  # ARM only: MIDR implementer (of the first processor)
    parts: tuple[int, ...] = ()  # ARM only: the distinct CPU parts, in order of appearance
    board: str = ""  # a board name when the text has one (a Raspberry Pi's `Model` line)

    @property
    def is_arm(self) -> bool:
        return self.arch == "aarch64"

    @property
    def simd(self) -> frozenset[str]:
        """The features ggml's kernels depend on (the tuning key's `flags`)."""
        simd = _SIMD["arm" if self.arch in ("aarch64", "aarch64_be", "arm") else "x86"]
        return frozenset(f for f in self.features if simd.match(f))

    # ARM feature levels, as ggml picks its kernels (llama.cpp's repack.cpp and its CPU variants)
    @property
    def neon(self) -> bool:
        return self.is_arm and ("asimd" in self.features or not self.features)  # ASIMD is mandatory in ARMv8-A

    @property
    def dotprod(self) -> bool:
        return self.is_arm and "asimddp" in self.features

    @property
    def i8mm(self) -> bool:
        return self.is_arm and "i8mm" in self.features

    @property
    def sve(self) -> bool:
        return self.is_arm and "sve" in self.features

    def arm_level(self) -> str:
        """"i8mm", "dotprod" or "neon" (ARM only, else "")."""
        return arm_level(self.features) if self.is_arm else ""


def arm_level(features) -> str:
    """The ARM feature level ggml picks its kernels by: "i8mm", "dotprod" (asimddp) or "neon",
    from a set of /proc/cpuinfo feature names (a CpuInfo's, or a tuning key's flags)."""
    return "i8mm" if "i8mm" in features else "dotprod" if "asimddp" in features else "neon"


def machine(raw: str | None = None) -> str:
    """The architecture's one name: 'x86_64', 'aarch64', ... (platform.machine() by default)."""
    raw = (platform.machine() if raw is None else raw) or "unknown"
    return _ARCH.get(raw.lower(), raw.lower())


def _blocks(text: str) -> list[dict[str, str]]:
    """/proc/cpuinfo as one dict per blank-line-separated block, keys lower-cased."""
    blocks, block = [], {}
    for line in text.splitlines() + [""]:
        if not line.strip():
            if block:
                blocks.append(block)
            block = {}
            continue
        k, sep, v = line.partition(":")
        if sep:
            block.setdefault(k.strip().lower(), v.strip())
    return blocks


def _int(text: str | None) -> int | None:
    try:
        return int(text, 0) if text else None
    except ValueError:
        return None


def arm_name(implementer: int | None, parts: tuple[int, ...]) -> str:
    """'Arm Cortex-A72', 'Arm Cortex-X4 + Cortex-A720', 'Apple (part 0x000)', ..."""
    vendor = IMPLEMENTERS.get(implementer, f"implementer 0x{implementer:02x}" if implementer is not None else "ARM")
    known = PARTS.get(implementer, {})
    names = [known.get(p, f"part 0x{p:03x}") for p in parts]
    if not names:
        return vendor
    if all(n.startswith("part ") for n in names):
        return f"{vendor} ({', '.join(names)})"
    return f"{vendor} {' + '.join(names)}"


def parse(text: str, arch: str | None = None) -> CpuInfo:
    """A /proc/cpuinfo text on the architecture `arch` (platform.machine()'s, by default)."""
    arch = machine(arch)
    blocks = _blocks(text)
    merged: dict[str, str] = {}
    for b in blocks:
        for k, v in b.items():
            merged.setdefault(k, v)
    if arch == "aarch64":
        cores = [b for b in blocks if "cpu part" in b or "features" in b]
        implementer = _int(cores[0].get("cpu implementer")) if cores else None
        parts = tuple(dict.fromkeys(p for p in (_int(b.get("cpu part")) for b in cores) if p is not None))
        # a feature counts when every core has it (big.LITTLE cores may differ; threads move)
        sets = [set(b["features"].split()) for b in cores if "features" in b]
        features = frozenset(set.intersection(*sets)) if sets else frozenset()
        if not cores:
            # another architecture's text (qemu-user shows the host's) or none at all
            model = ("ARM (the CPU description is another machine's: emulated?)"
                     if "flags" in merged or "vendor_id" in merged else "ARM (unknown)")
            return CpuInfo(arch, model)
        model = arm_name(implementer, parts) if implementer is not None else "ARM (unknown)"
        return CpuInfo(arch, model, features, implementer, parts, merged.get("model", ""))
    model = merged.get("model name") or merged.get("cpu model") or merged.get("hardware") or ""
    features = frozenset(merged.get("flags", merged.get("features", "")).split())
    return CpuInfo(arch, model or platform.processor() or "unknown", features)


# Linux's aarch64 hwcap bits (arch/arm64/include/uapi/asm/hwcap.h) for the features above: what
# ggml itself reads (getauxval) to pick kernels at run time.
_HWCAP = {0: "fp", 1: "asimd", 9: "fphp", 10: "asimdhp", 20: "asimddp", 22: "sve", 23: "asimdfhm"}
_HWCAP2 = {1: "sve2", 9: "svei8mm", 12: "svebf16", 13: "i8mm", 14: "bf16", 23: "sme"}
AT_HWCAP, AT_HWCAP2 = 16, 26


def hwcaps() -> frozenset[str]:
    """The aarch64 features the kernel (or qemu-user, which emulates them) grants this process,
    from the auxiliary vector; empty where that cannot be read."""
    try:
        import ctypes

        getauxval = ctypes.CDLL(None).getauxval
        getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
        words = getauxval(AT_HWCAP), getauxval(AT_HWCAP2)
    except (OSError, AttributeError):
        return frozenset()
    return frozenset(name for word, table in zip(words, (_HWCAP, _HWCAP2))
                     for bit, name in table.items() if word >> bit & 1)


@functools.lru_cache(maxsize=1)
def physical_cores(path: str = "/proc/cpuinfo") -> int:
    """Physical cores (llama.cpp is slower with SMT siblings): the distinct (physical id, core id)
    pairs of the processor blocks; the logical CPUs where the text has none (ARM, not Linux).
    Cached like read(): the engine, the tuning key and --jobs each ask."""
    import os

    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        text = ""
    cores = {(b["physical id"], b["core id"]) for b in _blocks(text) if "physical id" in b and "core id" in b}
    return len(cores) or os.cpu_count() or 1


@functools.lru_cache(maxsize=1)
def read(path: str = "/proc/cpuinfo") -> CpuInfo:
    """This machine's CPU (cached: it does not change while imp runs). On aarch64 with a cpuinfo
    that names no ARM core (qemu-user shows the host's), the features come from the hwcaps."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:  # not Linux: the platform's own description
        text = ""
    info = parse(text)
    if info.is_arm and info.implementer is None:
        info = replace(info, features=hwcaps())
    return info
