"""Weight repacking and flash attention, chosen per machine by measurement (`imp tune`).

llama.cpp's defaults are not the fastest everywhere: on 2-core AVX2 and AVX-512 EPYCs, repacking
the weights at load (`use_extra_bufts`) costs load time, 1 GB of RSS and a fifth to a third of the
prompt-eval speed, and flash attention slows generation at depth (DESIGN.md sections 6 and 8), so
without a measurement x86 runs with both off (family_default has the figures); other CPUs may
gain from both. `imp tune` measures the four combinations on the installed model and stores the
fastest in $IMP_HOME/tuning.json, keyed by what the result depends on: CPU model and SIMD flags,
thread count, llama-cpp-python version and the model's tensor type. `choose()` is the one place
that turns that file, the CPU family's defaults and the --repack/--flash-attn overrides into the
engine's settings; the Session calls it.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from . import cpuinfo, store
from .cpuinfo import physical_cores
from .engine import Tuning
from .errors import ImpError
from .modelfiles import ModelPair

KIND = "imp-tuning"
FORMAT = 1
FILE = "tuning.json"
SWITCHES = ("auto", "on", "off")
# All four settings, llama-cpp-python's defaults (repack on, flash attention off) first.
SETTINGS = [Tuning(repack=r, flash_attn=f) for r in (True, False) for f in (False, True)]
# The workload a setting is judged by: a cold `imp ask` (load, the image and question prefill,
# an answer of this many tokens). Prefill dominates it (DESIGN.md section 6).
QUESTION_TOKENS, ANSWER_TOKENS = 48, 64
# Below this share of its threads' time, other processes disturbed a measurement: say so.
BUSY_SHARE = 0.7


def tuning_path() -> Path:
    return store.home() / FILE


# -- what a tuning result depends on ---------------------------------------------------------
def cpu() -> dict:
    """The CPU's model name, the SIMD flags ggml's kernels depend on, and the architecture
    (imp_cli/cpuinfo.py reads x86's and ARM's /proc/cpuinfo)."""
    info = cpuinfo.read()
    return {"cpu": info.model, "flags": " ".join(sorted(info.simd)), "arch": info.arch}


def llama_cpp_version() -> str:
    """llama-cpp-python's version (from the module: importlib.metadata would cost a warm answer
    ~30 ms of imports)."""
    from .engine import llama_bindings

    return llama_bindings().__version__


def tuning_key(pair: ModelPair, threads: int = 0) -> dict:
    return {**cpu(), "threads": threads or physical_cores(), "llama_cpp": llama_cpp_version(),
            "tensor_type": pair.text_type}


_X86 = {"x86_64", "amd64", "x86", "i386", "i686"}
# the K-quants and float types (measured), and Q8_0: no x86 repacked kernels for it (see below)
_MEASURED_TYPES = re.compile(r"^(Q[2-6]_K(_[SML])?|F16|BF16|F32|Q8_0)$")


def family_default(key: dict) -> tuple[Tuning, str]:
    """The settings to use without a measurement by `imp tune`, and why. The rule comes from
    these measurements (full-size synthetic Imp-3B, Q4_K_M text + F16 mmproj, 384 px; whole
    processes; re-measure with `make bench` and `imp tune`, and change the table with the rule):

    | date | CPU, 2 cores | prompt eval, repack on -> off | cold `imp ask`, repack on -> off |
    |---|---|---|---|
    | 2026-12-01 | AMD EPYC, AVX2 | llama-bench pp775 19.8 -> 25.0 tok/s | 51-56 -> 46 s; load 4.5 -> 1.1 s; peak RSS 4.16 -> 3.08 GB |
    | 2026-12-01 | AMD EPYC (Zen 5), AVX-512 | `imp tune` 44.0 -> 76.6 tok/s | `imp tune`'s estimate 24.4 -> 16.6 s |
    | 2026-12-05 | AMD EPYC (Zen 4 class), AVX-512 VNNI | llama-bench pp512 48.5 -> 72.5 tok/s | 28.8 s (1.01x llama-mtmd-cli) -> 23.1 s (0.81x); 4.30 -> 3.25 GB |
    | 2026-12-05 | AMD EPYC, AVX2, idle, 2 threads | llama-mtmd-cli (on) vs imp (off, 256-token batches): 39.9 -> 31.7 ms per prompt token | 41.6 -> 34.4 s (0.83x); load 4.0 -> 0.5 s; peak RSS 4.82 -> 3.33 GB (docs/performance.md) |

    Flash attention on those boxes: generation at a depth of 700-775 tokens 4.5 vs 7.3 tok/s
    (AVX2, llama-bench tg32) and 8.2 vs 10.4 tok/s (AVX-512, `imp tune`) with it on vs off; its
    faster prompt eval does not make up for that in a cold answer. `imp tune` chose repack off
    and flash attention off on every x86 box it ran on. So on x86-64 with AVX2 (with or without
    AVX-512): both off for the K-quants and float types we ship (Q4_K_M, F16), and for Q8_0, which
    the llama.cpp in llama-cpp-python 0.3.36 does not repack on x86 at all (ggml-cpu/repack.cpp
    has ARM and RISC-V kernels for it), so that only flash attention matters there. Not measured,
    hence llama-cpp-python's defaults (repack on, flash attention off): Q4_0 and IQ4_NL (repacked
    on x86 by other kernels), x86 without AVX2, and other architectures; ARM has its own rule
    (arm_default). The architecture
    comes from the key's `arch` (platform.machine()): an emulated CPU can show the host's
    /proc/cpuinfo flags."""
    if cpuinfo.machine(key.get("arch")) == "aarch64":
        return arm_default(key)
    flags = set(key.get("flags", "").split())
    arch = key.get("arch", "").lower()
    x86 = arch in _X86 if arch else "avx2" in flags
    ttype = key.get("tensor_type")
    if x86 and "avx2" in flags and (ttype is None or _MEASURED_TYPES.match(ttype)):
        simd = "AVX-512" if "avx512f" in flags else "AVX2"
        return (Tuning(repack=False, flash_attn=False),
                f"the measured defaults for x86 with {simd} (repack off, flash attention off)")
    return Tuning(), "llama-cpp-python's defaults (not measured for this CPU family and model type)"


def arm_default(key: dict) -> tuple[Tuning, str]:
    """ARM's defaults: repacking on, flash attention off, at every feature level.

    Repacking is where ARM differs from x86. llama.cpp's repacked kernels were written for ARM
    (they replaced the Q4_0_4_4 / 4_8 / 8_8 file types Arm contributed, with Arm's reported
    prompt-processing gains on Graviton and Snapdragon): with dotprod (a Pi 5, Graviton 2) it
    interleaves Q4_0 / Q8_0 rows 4x4 and Q4_K / Q5_K / Q6_K 8x4, with i8mm (Graviton 3 / 4, Apple
    M2+, Snapdragon 8 Gen 3) 4x8 and 8x8 for the SMMLA instruction; on NEON alone (a Pi 4) it
    repacks nothing, so "on" costs nothing there. On x86 repacking lost on every box measured
    (DESIGN.md section 8) because its x86 kernels are not faster than the plain AVX ones; no such
    measurement exists on ARM here (only emulation, whose speed means nothing), so the kernels'
    authors' choice, llama.cpp's default, stands. Flash attention: llama-cpp-python's default
    (off), as on x86. `imp tune` measures both on the real machine.
    """
    level = cpuinfo.arm_level(set(key.get("flags", "").split()))
    why = {"i8mm": "Q4_K and Q4_0 repacked for i8mm (SMMLA)",
           "dotprod": "Q4_K and Q4_0 repacked for dotprod (SDOT)",
           "neon": "nothing to repack without dotprod"}[level]
    return Tuning(repack=True, flash_attn=False), f"ARM's defaults ({level}: {why})"


# -- the tuning file -------------------------------------------------------------------------
def read_entries(path: Path, note: Callable[[str], None]) -> list[dict]:
    """The well-formed entries of the tuning file; a missing file is empty, a corrupt or foreign
    one is ignored with a note (shown with -v)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        note(f"ignoring the tuning file {path}: unreadable ({type(e).__name__})")
        return []
    if not isinstance(data, dict) or data.get("kind") != KIND:
        note(f"ignoring the tuning file {path}: not an imp tuning file")
        return []
    if data.get("format") != FORMAT:
        note(f"ignoring the tuning file {path}: format {data.get('format')!r}, this imp reads {FORMAT}")
        return []
    entries = data.get("entries")
    if not isinstance(entries, list):
        note(f"ignoring the tuning file {path}: no list of entries")
        return []
    good = [e for e in entries if _well_formed(e)]
    if len(good) < len(entries):
        note(f"ignoring {len(entries) - len(good)} malformed entr{'y' if len(entries) - len(good) == 1 else 'ies'} in {path}")
    return good


def _well_formed(entry) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("key"), dict)
            and isinstance(entry.get("choice"), dict)
            and all(isinstance(entry["choice"].get(k), bool) for k in ("repack", "flash_attn")))


def lookup(key: dict, path: Path, note: Callable[[str], None]) -> Tuning | None:
    for entry in read_entries(path, note):
        if entry["key"] == key:
            return Tuning(**{k: entry["choice"][k] for k in ("repack", "flash_attn")})
    return None


def save(key: dict, choice: Tuning, measurements: list[dict], path: Path,
         note: Callable[[str], None] = lambda message: None) -> None:
    """Replace this key's entry (others are kept), written under a temporary name and renamed."""
    entries = [e for e in read_entries(path, note) if e["key"] != key]
    entries.append({"key": key, "choice": asdict(choice), "measured": measurements,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    data = {"kind": KIND, "format": FORMAT, "entries": entries}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise ImpError(f"cannot write the tuning file {path}: {e.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)


# -- the choice --------------------------------------------------------------------------------
def choose(pair: ModelPair, threads: int = 0, repack: str = "auto", flash_attn: str = "auto",
           note: Callable[[str], None] = lambda message: None) -> Tuning:
    """The engine settings for this model here: an explicit on/off wins, then `imp tune`'s
    measurement for this machine and model, then the CPU family's defaults."""
    for name, value in (("repack", repack), ("flash-attn", flash_attn)):
        if value not in SWITCHES:
            raise ImpError(f"--{name} must be one of {', '.join(SWITCHES)}, not {value!r}")
    key = tuning_key(pair, threads)
    path = tuning_path()
    found = lookup(key, path, note) if "auto" in (repack, flash_attn) else None
    if found is not None:
        base, source = found, f"measured by `imp tune` ({path})"
    else:
        base, source = family_default(key)
        if "auto" in (repack, flash_attn):
            hint = "imp tune" + (f" -t {threads}" if threads else "")  # tunings are per thread count
            note(f"no tuning for this machine and model: using {source}; run `{hint}` to measure")
    chosen = Tuning(repack=base.repack if repack == "auto" else repack == "on",
                    flash_attn=base.flash_attn if flash_attn == "auto" else flash_attn == "on")
    forced = ", ".join(f"--{n} {v}" for n, v in (("repack", repack), ("flash-attn", flash_attn)) if v != "auto")
    said = ([source] if "auto" in (repack, flash_attn) else []) + ([forced] if forced else [])
    note(f"llama.cpp settings: {chosen.describe()} ({'; '.join(said)})")
    return chosen


# -- measuring ---------------------------------------------------------------------------------
@dataclass
class Measurement:
    tuning: Tuning
    load_s: float
    prompt_tokens_per_s: float
    generation_tokens_per_s: float
    cpu_share: float  # CPU time this process got / (wall time x threads): ~1 on an idle machine
    estimate_s: float = 0.0  # a cold `imp ask` with this setting, from the three figures

    def best_with(self, other: "Measurement") -> "Measurement":
        """Each figure's best of two rounds: other processes only ever make a figure worse."""
        return Measurement(self.tuning, min(self.load_s, other.load_s),
                           max(self.prompt_tokens_per_s, other.prompt_tokens_per_s),
                           max(self.generation_tokens_per_s, other.generation_tokens_per_s),
                           max(self.cpu_share, other.cpu_share))

    def as_dict(self) -> dict:
        # durations in ms, as in every --json record (the table `imp tune` prints says seconds)
        return {**asdict(self.tuning), "load_ms": round(self.load_s * 1000, 1),
                "prompt_tokens_per_s": round(self.prompt_tokens_per_s, 2),
                "generation_tokens_per_s": round(self.generation_tokens_per_s, 2),
                "cpu_share": round(self.cpu_share, 2), "estimate_ms": round(self.estimate_s * 1000, 1)}


@dataclass
class Workload:
    prompt_tokens: int = 512  # one batch of prompt evaluation
    depth: int = 700  # generation is measured after this many tokens (an image prompt's length)
    gen_tokens: int = 16


def measure(pair: ModelPair, tuning: Tuning, threads: int, work: Workload, verbose: bool = False) -> Measurement:
    """Load the model with `tuning`, evaluate a prompt batch, fill to the depth, generate."""
    from .engine import Engine, Sampling

    n_ctx = work.depth + work.gen_tokens + 2
    wall, cpu = time.perf_counter(), time.process_time()
    with Engine(pair, n_ctx=n_ctx, threads=threads, verbose=verbose, tuning=tuning) as engine:
        tokens = _filler(engine, work.depth)
        engine.evaluate([tokens[:work.prompt_tokens]])
        prompt_rate = engine.timings.prompt_tokens / engine.timings.prompt_ms * 1000
        engine.evaluate([tokens])
        engine.start_request()
        for _ in engine.generate(Sampling(ignore_eos=True), work.gen_tokens + 1):  # + the first, untimed
            pass
        gen_rate = engine.timings.as_dict()["generation_tokens_per_s"]
        share = (time.process_time() - cpu) / ((time.perf_counter() - wall) * threads)
        return Measurement(tuning, engine.timings.load_ms / 1000, prompt_rate, gen_rate, share)


def _filler(engine, n: int) -> list[int]:
    """n tokens of ordinary text: the speed of a batch does not depend on which tokens."""
    text = "The quick brown fox jumps over the lazy dog near the river bank. "
    tokens: list[int] = []
    while len(tokens) < n:
        tokens += engine.tokenize(text * 8)
    return tokens[:n]


def _warm_page_cache(path: Path) -> None:
    """Read the file once so the first setting measured does not pay for a cold disk."""
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


@dataclass
class TuneResult:
    key: dict
    choice: Tuning
    measurements: list[Measurement]
    path: Path
    work: Workload
    estimate: dict  # the cold answer each setting's estimate_s is for
    rounds: int

    def as_dict(self) -> dict:
        return {"key": self.key, "choice": asdict(self.choice), "file": str(self.path),
                "workload": asdict(self.work), "rounds": self.rounds, "estimate": self.estimate,
                "measurements": [m.as_dict() for m in self.measurements]}


def tune_pair(pair: ModelPair, output, threads: int = 0, verbose: bool = False,
              work: Workload | None = None, rounds: int = 1) -> TuneResult:
    """Measure the four settings (`rounds` times, interleaved, keeping each figure's best), keep
    the one with the shortest cold answer, store it."""
    work = work or Workload()
    n_ctx = min(pair.n_ctx_train, 4096)
    if work.depth + work.gen_tokens + 2 > n_ctx:  # a model with a short trained context
        depth = n_ctx - work.gen_tokens - 2
        work = Workload(min(work.prompt_tokens, depth), depth, work.gen_tokens)
    threads = threads or physical_cores()
    key = tuning_key(pair, threads)
    _warm_page_cache(pair.text_path)
    prefill = pair.image_tokens + QUESTION_TOKENS
    best: dict[Tuning, Measurement] = {}
    title = (f"measuring {len(SETTINGS)} settings of llama.cpp on {pair.name} "
             f"({threads} thread{'s' if threads > 1 else ''}" + (f", {rounds} rounds)" if rounds > 1 else ")"))
    with output.phase(title, rounds * len(SETTINGS)) as progress:
        for r in range(rounds):
            for i, tuning in enumerate(SETTINGS):
                m = measure(pair, tuning, threads, work, verbose)
                output.info(f"  {tuning.describe()}: load {m.load_s:.2f} s, prompt {m.prompt_tokens_per_s:.1f} tok/s, "
                            f"generation {m.generation_tokens_per_s:.1f} tok/s, CPU share {m.cpu_share:.0%}")
                best[tuning] = best[tuning].best_with(m) if tuning in best else m
                progress(r * len(SETTINGS) + i + 1)
    results = [best[t] for t in SETTINGS]
    for m in results:
        m.estimate_s = m.load_s + prefill / m.prompt_tokens_per_s + ANSWER_TOKENS / m.generation_tokens_per_s
    share = min(m.cpu_share for m in results)
    if share < BUSY_SHARE:
        output.warn(f"other processes took the CPUs while measuring (imp got as little as {share:.0%} of its "
                    f"{threads} threads' time): the figures may mislead; run `imp tune` again on an idle machine"
                    + ("" if rounds > 1 else " or with --rounds 3"))
    chosen = min(results, key=lambda m: m.estimate_s).tuning
    path = tuning_path()
    save(key, chosen, [m.as_dict() for m in results], path, output.note)
    estimate = {"prompt_tokens": prefill, "answer_tokens": ANSWER_TOKENS}
    return TuneResult(key, chosen, results, path, work, estimate, rounds)


def run_tune(pair: ModelPair, output, threads: int = 0, verbose: bool = False, rounds: int = 1) -> None:
    """`imp tune` on an opened pair (opening.open_pair): measure, store, print the table (or one
    JSON object)."""
    result = tune_pair(pair, output, threads=threads, verbose=verbose, rounds=rounds)
    if output.json_mode:
        output.record(result.as_dict())
        return
    output.answer("repack\tflash_attn\tload_s\tprompt_tok_s\tgen_tok_s\test_ask_s\tchosen\n")
    for m in result.measurements:
        d = m.as_dict()
        output.answer("\t".join([_onoff(m.tuning.repack), _onoff(m.tuning.flash_attn), f"{m.load_s:.2f}",
                                 f"{d['prompt_tokens_per_s']:.1f}", f"{d['generation_tokens_per_s']:.1f}",
                                 f"{m.estimate_s:.1f}", "*" if m.tuning == result.choice else ""]) + "\n")
    output.info(f"chose {result.choice.describe()} for {pair.text_type} with {result.key['threads']} threads; "
                f"saved in {result.path}")


def _onoff(flag: bool) -> str:
    return "on" if flag else "off"
