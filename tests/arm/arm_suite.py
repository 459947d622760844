"""imp on aarch64, under emulation (make test-arm; tests/arm/setup.sh makes the machine).

Where what runs:
  - the host (x86): the checkpoint factory, the oracle (transformers/torch: its results do not
    depend on the architecture, and torch under emulation would cost minutes per model), the
    host's own conversions and llama.cpp numbers (the x86 reference for quantized files);
  - the emulated aarch64 (qemu-user, tests/arm/emu.py): imp itself with llama.cpp cross-compiled
    for the feature level: conversion, the engine's numbers (tests/arm/worker.py), and the `imp`
    command (ask, chat, serve, choices, grammar, tune, the prompt cache).

At each CPU feature level (ARM_LEVELS, default "neon,i8mm"; "dotprod" too with ARM_LEVELS=all):
  1. the machine is what it claims: qemu's CPU grants that level's features (hwcaps), llama.cpp
     was built for it (its system info), imp reads the ARM cpuinfo (implementer, part, features)
     and chooses ARM's defaults;
  2. conversion on ARM: the F16 GGUFs are byte-identical to the host's conversion of the same
     checkpoint (which the ordinary suite reads back against the checkpoint), quantized ones equal
     or within quantization rounding;
  3. oracle parity for every family and both checkpoint layouts (F16): projected image embeddings,
     first-step logits (same tolerances as on x86), teacher-forced top-1 and 24 greedy tokens;
  4. repacking on and off (Q8_0 and Q4_K_M, where llama.cpp's ARM repacks apply): the same greedy
     tokens, logits within REPACK_TOL of each other and within QUANT_TOL of x86's on the same file,
     and repacking really happens at dotprod/i8mm (llama.cpp's CPU_REPACK buffer) and not on NEON;
  5. the command: `imp ask` (the oracle's answer; the prompt cache hits in a second process),
     `imp chat` piped, `imp serve` over HTTP from the host, `--choices`, `--grammar` and
     `--json-schema` (x86's answers), `imp tune` (its key names the ARM CPU);
  6. the prompt cache across architectures: an entry written on ARM is refused on x86 and the other
     way round (the KV layout names the architecture), the answers stay the uncached ones.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: factory, oracle, helpers
sys.path.insert(0, str(HERE))

import emu  # noqa: E402
import factory as F  # noqa: E402
from test_choices import GRAMMAR, GRAMMAR_RE  # noqa: E402  (the x86 suite's grammar)

QUESTION = "What is in the image?"
N = 24
# As on x86 (tests/test_ask.py): fractions of the oracle's std over the predictable rows.
EMBD_TOL, LOGITS_TOL = 1e-2, 6e-3
# Built with +fp16 (the dotprod and i8mm levels, as a native build on a Pi 5, Graviton or Apple
# core is), ggml computes F16 dot products in fp16 lanes (FP16_VA): the F16 vision tower's
# embeddings move further, measured 6.8e-3 to 1.8e-2 x std (the widest: Qwen's 1152-wide SigLIP)
# against 2.5e-3 to 3.3e-3 on NEON. A conversion mistake costs 1e-1 or more; the logits and the
# tokens after them stay within the x86 bounds.
EMBD_TOL_FP16 = 3e-2
# Repacking changes how a quantized dot product is summed and scaled, not what it computes: as on
# x86 (README, imp tune: measured 7e-3 to 8e-3 x std there), the bound is 2e-2. A wrong interleave is O(1).
REPACK_TOL = 2e-2
# ARM's and x86's kernels on the same quantized file: both quantize the activations (Q8) too, and
# activations that differ in the last float bits round to different Q8 steps, layer after layer:
# measured 3.3e-2 (Q8_0) and 4.7e-2 (Q4_K_M) x std, Q8_0's own rounding (tests/test_families.py
# measures Q8_0 against F16 at 4e-2 to 6e-2). A wrong kernel is O(1); the greedy tokens must agree.
QUANT_TOL = 0.1
PROB_TOL = 5e-3  # --choices probabilities, as in tests/test_choices.py

SCHEMA = {"type": "object", "properties": {"kind": {"enum": ["animal", "vehicle", "thing"]},
                                           "count": {"type": "integer", "minimum": 0, "maximum": 20}},
          "required": ["kind", "count"], "additionalProperties": False}

# name: (family, layout, aspect, sizes)
WIDE = dataclasses.replace(F.TINY, hidden_size=256, intermediate_size=512)  # rows of 256: Q4_K applies
CHECKPOINTS = {
    "phi2-new-square": ("phi2", "new", "square", None),
    "phi2-old-pad": ("phi2", "old", "pad", None),
    "phi3-new-square": ("phi3", "new", "square", None),
    "qwen2-new-pad": ("qwen2", "new", "pad", None),
    "phi2-wide": ("phi2", "new", "square", WIDE),
}
# the files converted on both sides: (checkpoint, quant)
CONVERSIONS = [(name, "F16") for name in CHECKPOINTS if name != "phi2-wide"] + \
    [("phi2-new-square", "Q8_0"), ("phi2-wide", "Q4_K_M")]
QUANTIZED = [c for c in CONVERSIONS if c[1] != "F16"]
F16 = [c for c in CONVERSIONS if c[1] == "F16"]


def _levels() -> list[str]:
    raw = os.environ.get("ARM_LEVELS", "neon,i8mm")
    names = list(emu.LEVELS) if raw == "all" else [n.strip() for n in raw.split(",") if n.strip()]
    unknown = [n for n in names if n not in emu.LEVELS]
    assert not unknown, f"unknown ARM_LEVELS {unknown}: choose from {', '.join(emu.LEVELS)}"
    return names


LEVELS = _levels()


def tag(name: str, quant: str) -> str:
    return f"{name}-{quant}"


def live(family: str, logits: np.ndarray) -> np.ndarray:
    return logits[F.predictable_ids(family)]


def rel(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / ref.std())


def host_python(*args, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONPATH": str(emu.REPO), "IMP_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=e, timeout=timeout)


def host_imp(*args, home: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """The host's (x86) `imp`, this checkout."""
    return host_python("-c", "import sys; from imp_cli.app import main; sys.exit(main())", *args,
                       env={"IMP_HOME": str(home)}, timeout=timeout)


def arm_imp(level: emu.Level, *args, home: str, stdin: str | None = None, timeout: float = 900,
            cpuinfo: bool = True) -> subprocess.CompletedProcess:
    return emu.run(["imp", *map(str, args)], level, emu.env_for(level, IMP_HOME=home),
                   input=stdin.encode() if stdin is not None else None, timeout=timeout, cpuinfo=cpuinfo)


MEASURED: dict = {}  # what the tolerances were compared with, written to .arm/last-run.json


@pytest.fixture(scope="session", autouse=True)
def _report():
    yield
    if MEASURED:
        (emu.ARM / "last-run.json").write_text(json.dumps(MEASURED, indent=1, sort_keys=True) + "\n")


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"exit {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-5000:]}"
    return p


# =============================================================================================
# the host's half: checkpoints, oracle, x86 conversions and numbers (once per run)
# =============================================================================================
@pytest.fixture(scope="session")
def data():
    why = emu.ready()
    assert not why, why  # make test-arm sets the machine up first; never skip
    work = emu.WORK / "run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    rng = np.random.default_rng(7)  # the photo of tests/conftest.py
    y, x = np.mgrid[0:72, 0:104]
    base = np.stack([x * 2, y * 3, (x + y) * 1.5], axis=-1)
    photo = work / "photo.png"
    Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)).save(photo)

    ckpts = {}
    for name, (family, layout, aspect, sizes) in CHECKPOINTS.items():
        ckpts[name] = F.make_checkpoint(work / "ckpt" / name, layout=layout, aspect=aspect, family=family,
                                        **({"sizes": sizes} if sizes else {}))
    # x86 conversions, in a subprocess of this checkout (imp's own code, as a user runs it)
    host = {}
    for name, quant in CONVERSIONS:
        p = ok(host_python(HERE / "worker.py", "convert", ckpts[name], work / "x86" / tag(name, quant), quant))
        host[name, quant] = json.loads(p.stdout.splitlines()[-1])

    # the oracle on the host (torch)
    import torch
    from oracle import Oracle
    from PIL import ImageOps

    torch.set_num_threads(1)
    image = ImageOps.exif_transpose(Image.open(photo)).convert("RGB")
    forced_text = ("The image shows a small red car parked on a quiet street near a tall building, "
                   "next to a green tree and a white house with a black door.")
    expect = {}
    for name, _ in F16:
        o = Oracle(ckpts[name])
        forced = o.tokenizer.encode(forced_text, add_special_tokens=False).ids[:12]
        expect[name] = {
            "family": o.family, "stop": sorted(o.stop_ids), "forced": forced,
            "prompt": o.prompt_ids(QUESTION),
            "embd": o.image_embeddings(image), "first": o.first_logits(image, QUESTION),
            "answer": o.answer_text(image, QUESTION, N),
        }
        greedy = o.greedy(image, QUESTION, N)
        live_ids = F.predictable_ids(o.family)
        for key, ids in (("top1", forced), ("greedy", greedy)):
            rows = o.teacher_forced_logits(image, QUESTION, ids)[:, live_ids]
            expect[name][key] = [int(live_ids[i]) for i in rows.argmax(-1)] if key == "top1" else greedy
            expect[name][key + "_top2"] = [live_ids[np.argsort(r)[-2:][::-1]].tolist() for r in rows]
            expect[name][key + "_margin"] = [float(np.diff(np.sort(r)[-2:])[0] / r.std()) for r in rows]
        if name == "phi2-new-square":
            chat_q = ["Describe the image in detail.", "Is there a tree in the picture?"]
            expect[name]["chat"] = [o.tokenizer.decode(ids, skip_special_tokens=True).strip()
                                    for ids in o.chat_greedy(image, chat_q, N)]
            expect[name]["chat_q"] = chat_q
    stops = {name: expect["phi2-new-square"]["stop"] for name, _ in QUANTIZED}  # phi2 checkpoints
    forced = {name: expect["phi2-new-square"]["forced"] for name, _ in QUANTIZED}

    # x86 numbers on the quantized files, repacking on and off
    jobs = [{"name": f"{tag(name, quant)}/{'on' if repack else 'off'}", "text": host[name, quant]["text"],
             "mmproj": host[name, quant]["mmproj"], "image": str(photo), "question": QUESTION,
             "forced": forced[name], "n": N, "stop": stops[name], "repack": repack,
             "live": F.predictable_ids("phi2").tolist()}
            for name, quant in QUANTIZED for repack in (False, True)]
    (work / "x86-jobs.json").write_text(json.dumps(jobs))
    ok(host_python(HERE / "worker.py", "numerics", work / "x86-jobs.json", work / "x86.npz"))
    x86 = dict(np.load(work / "x86.npz"))
    print(f"\n[arm suite] host side (checkpoints, oracle, x86 conversions and numbers): "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return {"work": work, "photo": photo, "ckpts": ckpts, "host": host, "expect": expect, "x86": x86,
            "stops": stops, "forced": forced}


@pytest.fixture(scope="session")
def arm_converted(data):
    """The same conversions on the emulated machine (once: conversion runs no level-specific
    kernel; quantizing is ggml's reference code), at the first level asked for."""
    level = emu.LEVELS[LEVELS[0]]
    out = {}
    jobs = data["work"] / "arm-convert.sh"
    lines = [f"python /imp/tests/arm/worker.py convert {emu.arm_path(data['ckpts'][name])} "
             f"{emu.arm_path(data['work'] / 'arm' / tag(name, quant))} {quant}" for name, quant in CONVERSIONS]
    jobs.write_text("set -e\n" + "\n".join(lines) + "\n")
    p = ok(emu.run(["/bin/sh", emu.arm_path(jobs)], level))
    for (name, quant), line in zip(CONVERSIONS, [l for l in p.stdout.splitlines() if l.startswith("{")]):
        r = json.loads(line)
        out[name, quant] = {k: (emu.ROOT / r[k].lstrip("/") if k in ("text", "mmproj") else r[k]) for k in r}
    return out


@pytest.fixture(scope="session", params=LEVELS)
def level(request):
    return emu.LEVELS[request.param]


@pytest.fixture(scope="session")
def arm_numbers(data, arm_converted):
    """Per level: the engine's numbers for every F16 file and for the quantized ones with
    repacking on and off, from one emulated process."""
    made = {}

    def get(level: emu.Level) -> dict:
        if level.name not in made:
            work = data["work"]
            jobs = []
            for name, quant in CONVERSIONS:
                files = arm_converted[name, quant]
                common = {"text": emu.arm_path(files["text"]), "mmproj": emu.arm_path(files["mmproj"]),
                          "image": emu.arm_path(data["photo"]), "question": QUESTION, "n": N}
                if quant == "F16":
                    e = data["expect"][name]
                    jobs.append({"name": tag(name, quant), "forced": e["forced"], "stop": e["stop"], "repack": True, **common})
                else:
                    for repack in (False, True):
                        jobs.append({"name": f"{tag(name, quant)}/{'on' if repack else 'off'}", "forced": data["forced"][name],
                                     "stop": data["stops"][name], "repack": repack,
                                     "live": F.predictable_ids("phi2").tolist(), **common})
            path = work / f"jobs-{level.name}.json"
            path.write_text(json.dumps(jobs))
            t = time.perf_counter()
            ok(emu.run(["python", "/imp/tests/arm/worker.py", "numerics", emu.arm_path(path),
                        emu.arm_path(work / f"arm-{level.name}.npz")], level))
            print(f"\n[arm suite] {level.name}: engine numbers for {len(jobs)} jobs in {time.perf_counter() - t:.0f} s "
                  "(emulated: the time means nothing about ARM)", file=sys.stderr)
            made[level.name] = dict(np.load(work / f"arm-{level.name}.npz"))
        return made[level.name]

    return get


# =============================================================================================
# 1. the machine
# =============================================================================================
FEATURES = {  # llama.cpp's system info at each level (it lists a feature only when built and present)
    "neon": {"NEON"}, "dotprod": {"NEON", "DOTPROD"}, "i8mm": {"NEON", "DOTPROD", "MATMUL_INT8"},
}


def test_machine_is_the_level_it_claims(data, level):
    # without a cpuinfo text: qemu-user shows the host's x86 one; imp reads the features from the
    # hwcaps qemu grants (what ggml reads too)
    p = ok(emu.run(["python", "/imp/tests/arm/worker.py", "info"], level, cpuinfo=False))
    bare = json.loads(p.stdout)
    assert bare["machine"] == "aarch64" and bare["tune_cpu"]["arch"] == "aarch64"
    assert "emulated" in bare["model"] and bare["level"] == level.name, bare
    assert {"asimd"} <= set(bare["hwcaps"]) and ("asimddp" in bare["hwcaps"]) == (level.name != "neon")
    assert ("i8mm" in bare["hwcaps"]) == (level.name == "i8mm")
    system = bare["system_info"]
    listed = {f for f in ("NEON", "DOTPROD", "MATMUL_INT8") if f"{f} = 1" in system}
    assert listed == FEATURES[level.name], system
    assert bare["default"].startswith(f"ARM's defaults ({level.name}")
    # with the cpuinfo text of a real machine of that level over /proc/cpuinfo
    seen = json.loads(ok(emu.run(["python", "/imp/tests/arm/worker.py", "info"], level)).stdout)
    want = {"pi4": "Arm Cortex-A72", "pi5": "Arm Cortex-A76", "graviton3": "Arm Neoverse-V1"}[level.cpuinfo]
    assert seen["model"] == seen["tune_cpu"]["cpu"] == want and seen["level"] == level.name, seen


# =============================================================================================
# 2. conversion on ARM
# =============================================================================================
@pytest.mark.parametrize("name,quant", CONVERSIONS, ids=[tag(*c) for c in CONVERSIONS])
def test_conversion_on_arm_equals_x86(data, arm_converted, name, quant):
    ours, ref = arm_converted[name, quant], data["host"][name, quant]
    assert ours["family"] == ref["family"] == CHECKPOINTS[name][0]
    for kind in ("text", "mmproj"):
        same_gguf(Path(ours[kind]), Path(ref[kind]), data["ckpts"][name])


def same_gguf(ours: Path, ref: Path, source: Path) -> None:
    """The same metadata but for the source folder it names (/work/... on ARM, ROOT/work/... on
    x86), and the same tensors byte for byte, but for a rare rounding in a quantized block."""
    from gguf import GGUFReader

    ra, rb = GGUFReader(ours), GGUFReader(ref)
    fa, fb = ({k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")} for r in (ra, rb))
    assert (fa.pop("imp.source", None), fb.pop("imp.source", None)) in ((None, None), (emu.arm_path(source), str(source)))
    assert fa == fb
    assert len(ra.tensors) == len(rb.tensors)
    from gguf.quants import dequantize

    for ta, tb in zip(ra.tensors, rb.tensors):
        assert (ta.name, ta.tensor_type, list(ta.shape)) == (tb.name, tb.tensor_type, list(tb.shape))
        if bytes(ta.data) == bytes(tb.data):
            continue
        # llama.cpp's K-quant search in floats: GCC contracts a*b+c into FMA on aarch64 (not on
        # x86-64 without -mfma), so some blocks round the other way (measured: 23 bytes of the Q6_K
        # output.weight, 697 of the Q4_K token_embd.weight, 0.45%). Within a quantization step;
        # a wrong block layout would change nearly every byte. The float types must match exactly.
        assert ta.tensor_type.name not in ("F32", "F16", "BF16"), f"{ours.name}: {ta.name} differs from x86's"
        a, b = np.frombuffer(bytes(ta.data), np.uint8), np.frombuffer(bytes(tb.data), np.uint8)
        MEASURED.setdefault("quantized_bytes_differing", {})[f"{ours.name}/{ta.name}"] = int((a != b).sum())
        assert (a != b).mean() < 2e-2, f"{ours.name}: {ta.name}: {(a != b).sum()} bytes differ"
        da, db = dequantize(ta.data, ta.tensor_type), dequantize(tb.data, tb.tensor_type)
        assert np.abs(da - db).max() <= 0.1 * np.abs(db).max(), ta.name


# =============================================================================================
# 3. oracle parity (F16), 4. repacking
# =============================================================================================
@pytest.mark.parametrize("name", [c[0] for c in F16])
def test_oracle_parity(data, arm_numbers, level, name):
    got, e = arm_numbers(level), data["expect"][name]
    t = tag(name, "F16")
    head, tail = e["prompt"]
    assert got[f"{t}/prompt"].tolist() == list(head) + [-1] + list(tail)
    assert got[f"{t}/embd"].shape == e["embd"].shape
    assert rel(got[f"{t}/embd"], e["embd"]) < (EMBD_TOL if level.name == "neon" else EMBD_TOL_FP16)
    ours, ref = live(e["family"], got[f"{t}/first"]), live(e["family"], e["first"])
    MEASURED[f"{level.name}/{t}/embd_vs_oracle"] = rel(got[f"{t}/embd"], e["embd"])
    MEASURED[f"{level.name}/{t}/logits_vs_oracle"] = rel(ours, ref)
    assert rel(ours, ref) < LOGITS_TOL
    assert int(ours.argmax()) == int(ref.argmax())
    agree_but_for_ties(got[f"{t}/top1"].tolist(), e, "top1")
    assert len(e["greedy"]) == N and len(got[f"{t}/greedy"]) == N
    agree_but_for_ties(got[f"{t}/greedy"].tolist(), e, "greedy")


# Where the reference's best two tokens are closer than this (x std), rounding may pick either:
# measured 3.8e-4 x std at one teacher-forced step of the tiny Phi-3, where x86 and ARM differ.
TIE = 2 * LOGITS_TOL


def agree_but_for_ties(ours: list[int], e: dict, key: str) -> None:
    """Our tokens are the reference's, except that at a near-tie either of its best two may come
    out (for a greedy answer, it then continues differently: compared up to there)."""
    ref, top2, margin = e[key], e[key + "_top2"], e[key + "_margin"]
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            assert margin[i] < TIE and a in top2[i], f"{key}[{i}]: {a} != {b} (margin {margin[i]:.2e} x std)"
            MEASURED.setdefault("ties", []).append([key, i, margin[i]])
            if key == "greedy":
                return


@pytest.mark.parametrize("name,quant", QUANTIZED, ids=[tag(*c) for c in QUANTIZED])
def test_repacking_on_and_off(data, arm_numbers, level, name, quant):
    got, x86 = arm_numbers(level), data["x86"]
    t = tag(name, quant)
    ids = F.predictable_ids("phi2")
    on, off = got[f"{t}/on/first"][ids], got[f"{t}/off/first"][ids]
    assert got[f"{t}/off/repacks"].tolist() == []
    # llama.cpp repacks Q8_0 / Q4_K / Q6_K only with dotprod (4x4, 8x4: SDOT) or i8mm (4x8, 8x8: SMMLA)
    formats = got[f"{t}/on/repacks"].tolist()
    MEASURED[f"{level.name}/{t}/repacked_as"] = formats
    if level.name == "neon":
        assert formats == []
    else:
        shapes = ("_4x4", "_8x4") if level.name == "dotprod" else ("_4x8", "_8x8")
        assert formats and all(f.endswith(shapes) for f in formats), formats
    MEASURED[f"{level.name}/{t}/repack_on_vs_off"] = rel(on, off)
    MEASURED[f"{level.name}/{t}/arm_vs_x86"] = rel(off, x86[f"{t}/off/first"][ids])
    assert rel(on, off) < REPACK_TOL
    assert got[f"{t}/on/greedy"].tolist() == got[f"{t}/off/greedy"].tolist()
    assert got[f"{t}/on/top1"].tolist() == got[f"{t}/off/top1"].tolist()
    # and ARM's kernels against x86's on the same file
    assert rel(off, x86[f"{t}/off/first"][ids]) < QUANT_TOL
    assert int(off.argmax()) == int(x86[f"{t}/off/first"][ids].argmax())
    # the same greedy tokens, unless both machines saw a near-tie (within QUANT_TOL) where they part
    ours, ref = got[f"{t}/off/greedy"].tolist(), x86[f"{t}/off/greedy"].tolist()
    k = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
    if k is not None:
        m_arm, m_x86 = float(got[f"{t}/off/greedy_margin"][k]), float(x86[f"{t}/off/greedy_margin"][k])
        MEASURED.setdefault("ties", []).append([level.name, t, k, m_arm, m_x86])
        assert m_arm < QUANT_TOL and m_x86 < QUANT_TOL, f"greedy parts at {k}: margins {m_arm:.3f}, {m_x86:.3f} x std"
    else:
        assert len(ours) == len(ref) > 8


# =============================================================================================
# 5. the command
# =============================================================================================
@pytest.fixture(scope="session")
def model(data, arm_converted):
    return arm_converted["phi2-new-square", "F16"]


def test_ask_and_prompt_cache(data, model, level):
    e = data["expect"]["phi2-new-square"]
    home = f"/work/run/home-ask-{level.name}"
    text, photo = emu.arm_path(model["text"]), emu.arm_path(data["photo"])
    cold = json.loads(ok(arm_imp(level, "ask", photo, QUESTION, "--model", text, "-n", N, "--json", home=home)).stdout)
    assert cold["answer"] == e["answer"] and cold["cache"] == "miss"
    warm = json.loads(ok(arm_imp(level, "ask", photo, "How many dogs are there?", "--model", text, "-n", 8,
                                 "--json", home=home)).stdout)
    fresh = json.loads(ok(arm_imp(level, "ask", photo, "How many dogs are there?", "--model", text, "-n", 8,
                                  "--json", "--no-cache", home=home)).stdout)
    assert warm["cache"] == "hit" and warm["answer"] == fresh["answer"]
    # plain text, as a user sees it
    p = ok(arm_imp(level, "ask", photo, QUESTION, "--model", text, "-n", N, home=home))
    assert p.stdout == e["answer"] + "\n" and p.stderr == ""


def test_chat_piped(data, model, level):
    e = data["expect"]["phi2-new-square"]
    p = ok(arm_imp(level, "chat", emu.arm_path(data["photo"]), "--model", emu.arm_path(model["text"]), "-n", N,
                   "--json", home=f"/work/run/home-chat-{level.name}", stdin="".join(q + "\n" for q in e["chat_q"])))
    assert [json.loads(line)["answer"] for line in p.stdout.splitlines()] == e["chat"]


def test_serve(data, model, level):
    """`imp serve` on the emulated machine, asked over HTTP by the host."""
    import base64

    e = data["expect"]["phi2-new-square"]
    proc = emu.popen(["imp", "serve", "--model", emu.arm_path(model["text"]), "--port", "0"], level,
                     emu.env_for(level, IMP_HOME=f"/work/run/home-serve-{level.name}"),
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = []
    try:
        port = None
        deadline = time.monotonic() + 300
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline().decode("utf-8", "replace")
            if not line:
                break
            log.append(line)
            m = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
            port = int(m[1]) if m else None
        assert port, "".join(log)
        url = "data:image/png;base64," + base64.b64encode(data["photo"].read_bytes()).decode()
        body = {"model": model["text"].stem, "max_tokens": N, "temperature": 0,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": QUESTION}]}]}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            reply = json.loads(r.read())
        assert reply["choices"][0]["message"]["content"] == e["answer"]
    finally:
        proc.terminate()
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()


@pytest.fixture(scope="session")
def x86_constrained(data, tmp_path_factory):
    """--choices, --grammar and --json-schema answers of the x86 `imp` on the same file."""
    text = data["host"]["phi2-new-square", "F16"]["text"]
    gbnf = data["work"] / "verdict.gbnf"
    gbnf.write_text(GRAMMAR)
    home = tmp_path_factory.mktemp("x86-home")
    out = {}
    for kind, args in constrained_args(str(data["photo"]), str(text), str(gbnf)).items():
        out[kind] = json.loads(ok(host_imp(*args, home=home)).stdout)
    return out


def constrained_args(photo: str, text: str, gbnf: str) -> dict:
    base = ["ask", photo, "--model", text, "--json", "--temperature", "0", "--seed", "1"]
    return {"choices": base + ["-q", QUESTION, "--choices", "no,blue,red,a car,The car is red."],
            "grammar": base + ["-q", "Is it red?", "--grammar", f"@{gbnf}"],
            "schema": base + ["-q", "Describe it as JSON.", "--json-schema", json.dumps(SCHEMA)]}


def test_choices_grammar_schema(data, model, level, x86_constrained):
    home = f"/work/run/home-constrained-{level.name}"
    args = constrained_args(emu.arm_path(data["photo"]), emu.arm_path(model["text"]),
                            emu.arm_path(data["work"] / "verdict.gbnf"))
    for kind, argv in args.items():
        got, ref = json.loads(ok(arm_imp(level, *argv, home=home)).stdout), x86_constrained[kind]
        assert got["answer"] == ref["answer"], kind
        if kind == "choices":
            assert list(got["choices"]) == list(ref["choices"])
            assert max(abs(got["choices"][c] - ref["choices"][c]) for c in ref["choices"]) <= PROB_TOL
        elif kind == "grammar":
            assert GRAMMAR_RE.fullmatch(got["answer"]), got["answer"]
        else:  # --json gives the parsed object
            answer = got["answer"] if isinstance(got["answer"], dict) else json.loads(got["answer"])
            assert set(answer) == {"kind", "count"}


def test_tune(data, arm_converted, level):
    """`imp tune` measures and keys its file on the ARM CPU; `imp ask` then uses the measurement.
    (The figures it prints are emulated: meaningless, and not asserted.)"""
    home = f"/work/run/home-tune-{level.name}"
    text = emu.arm_path(arm_converted["phi2-wide", "Q4_K_M"]["text"])
    photo = emu.arm_path(data["photo"])
    before = ok(arm_imp(level, "ask", photo, QUESTION, "--model", text, "-n", 4, "-v", home=home))
    assert f"ARM's defaults ({level.name}" in before.stderr and "repack on" in before.stderr, before.stderr
    result = json.loads(ok(arm_imp(level, "tune", "--model", text, "--json", home=home)).stdout)
    key = result["key"]
    want = {"pi4": "Arm Cortex-A72", "pi5": "Arm Cortex-A76", "graviton3": "Arm Neoverse-V1"}[level.cpuinfo]
    assert (key["arch"], key["cpu"], key["tensor_type"]) == ("aarch64", want, "Q4_K_M"), key
    assert "asimd" in key["flags"].split() and ("i8mm" in key["flags"].split()) == (level.name == "i8mm")
    assert len(result["measurements"]) == 4
    saved = json.loads((emu.ROOT / home.lstrip("/") / "tuning.json").read_text())
    assert [e["key"] for e in saved["entries"]] == [key]
    after = ok(arm_imp(level, "ask", photo, QUESTION, "--model", text, "-n", 4, "-v", home=home))
    assert "measured by `imp tune`" in after.stderr, after.stderr


# =============================================================================================
# 6. the prompt cache across architectures
# =============================================================================================
def entry_arch(path: Path) -> str:
    from imp_cli.prompt_cache import _HEAD

    raw = path.read_bytes()
    _, _, n = _HEAD.unpack_from(raw)
    return json.loads(raw[_HEAD.size:_HEAD.size + n])["layout"]["arch"]


def test_cache_entry_never_crosses_architectures(data, model):
    """One IMP_HOME seen by both machines (as on a shared disk): ARM writes an entry, x86 refuses
    it (the KV layout names the architecture) and writes its own, which ARM refuses in turn.
    Once, at the first level."""
    level = emu.LEVELS[LEVELS[0]]
    home_host = data["work"] / "home-shared"
    home_arm = emu.arm_path(home_host)
    text_host, photo_host = model["text"], data["photo"]
    text, photo = emu.arm_path(text_host), emu.arm_path(photo_host)
    a = json.loads(ok(arm_imp(level, "ask", photo, QUESTION, "--model", text, "-n", 8, "--json", home=home_arm)).stdout)
    assert a["cache"] == "miss"
    (entry,) = (home_host / "cache").glob("*.kv")
    assert entry_arch(entry) == "aarch64"
    x = ok(host_imp("ask", photo_host, QUESTION, "--model", text_host, "-n", 8, "--json", "-v", home=home_host))
    assert "saved with another llama.cpp KV layout" in x.stderr, x.stderr
    xr = json.loads(x.stdout)
    assert xr["cache"] == "miss" and xr["answer"] == a["answer"]
    (entry2,) = (home_host / "cache").glob("*.kv")  # the same key: x86's entry replaced ARM's
    assert entry2.name == entry.name and entry_arch(entry2) == "x86_64"
    b = ok(arm_imp(level, "ask", photo, QUESTION, "--model", text, "-n", 8, "--json", "-v", home=home_arm))
    assert "saved with another llama.cpp KV layout" in b.stderr, b.stderr
    br = json.loads(b.stdout)
    assert br["cache"] == "miss" and br["answer"] == a["answer"]
