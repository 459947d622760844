"""`make bench`: imp's speed and memory on a full-size synthetic Imp-3B, against baselines.

    .venv/bin/python bench/run.py [--runs 3] [--tokens 64] [--threads N] [--size 384|196] [--skip ...]
    .venv/bin/python bench/run.py --report-only bench/results/<raw>.json   # redo latest.md/.png

First makes (or finds in bench/cache/) the model with bench/synthetic.py, then measures, each
figure --runs times (median, min, max), in one invocation on one machine:
  - `imp --help` wall time (median of 10);
  - `imp convert` to F16 and to Q4_K_M: wall time and peak RSS (requirement: < 2.5 GB);
  - `imp ask` with Q4_K_M and Q8_0 (a fresh process each run): model load, image encode, prompt
    tokens/s, time to first token (wall clock from launch, and engine-internal), peak RSS;
  - generation tokens/s over exactly --tokens tokens, through the Engine API with a greedy loop
    that never picks an end-of-generation token (random weights may emit one early, and `imp ask`
    has no option to ignore it); the headline figure alternates imp and the stock path in one
    process (--ab-rounds), since the host's memory bandwidth drifts more than the 5% to resolve;
  - baseline (a): llama-cpp-python's stock Llava15ChatHandler on the same GGUF files;
  - baseline (b): transformers float32 on CPU on the same weights (tests/oracle.py);
  - the physical limit: memory read bandwidth and the generation ceiling it implies.
Each heavy measurement runs in its own process (`run.py --worker KIND`), one at a time, so that
peak RSS figures are clean and no two measurements compete for the cores; each waits for other
processes on the machine to go quiet and is measured again if they took CPU meanwhile.

Writes bench/results/<date>-<host>.json (every raw number), bench/results/latest.md and
bench/results/latest.png (drawn with Pillow). About 30 min on 2 cores with the model cached,
~5 min more the first time.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
PY = sys.executable
IMP = str(Path(PY).parent / "imp")
RESULT_TAG = "@@BENCH_RESULT "
QUESTION = "What is in the image? Describe it in detail."
SYSTEM = (  # Imp's (and imp's) Phi-2 system prompt; given to the stock handler too
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
GB = 1e9

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# =============================================================================================
# statistics
# =============================================================================================
def summary(values: list) -> dict | None:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    med = statistics.median(vals)
    return {"median": med, "min": min(vals), "max": max(vals), "n": len(vals),
            "spread_pct": round(100 * (max(vals) - min(vals)) / med, 1) if med else None,
            "values": [round(v, 4) for v in vals]}


def med(s: dict | None) -> float | None:
    return s["median"] if s else None


def ratio(a: dict | float | None, b: dict | float | None) -> float | None:
    a = med(a) if isinstance(a, dict) else a
    b = med(b) if isinstance(b, dict) else b
    return round(a / b, 3) if a is not None and b else None


# =============================================================================================
# processes: wall time, peak RSS (wait4's ru_maxrss) and a /proc poll for anon/file RSS
# =============================================================================================
def _proc_status(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                    out[k] = int(v.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def _cpu_busy_s() -> float:
    """CPU-seconds all CPUs have spent busy since boot (/proc/stat)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0.0
    user, nice, system, idle, iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


QUIET = {"max_wait_s": 30.0, "threshold": 0.15, "foreign_max": 0.10, "retries": 1, "log": []}


def wait_quiet(what: str) -> None:
    """The machine may be shared: before a measurement, wait (up to QUIET['max_wait_s']) until the
    other processes use less than QUIET['threshold'] of the CPUs, measured over one second."""
    n = os.cpu_count() or 1
    t0 = time.monotonic()
    while True:
        b0 = _cpu_busy_s()
        time.sleep(1.0)
        load = (_cpu_busy_s() - b0) / n
        waited = time.monotonic() - t0
        if load < QUIET["threshold"] or waited >= QUIET["max_wait_s"]:
            break
        time.sleep(3.0)
    if waited > 1.5:
        QUIET["log"].append({"before": what, "waited_s": round(waited, 1), "load_at_start": round(load, 2)})
        log(f"  (waited {waited:.0f} s for other processes to calm down; CPU load now {load:.0%})")


def guarded(what: str, fn, retries: int | None = None):
    """In-process: wait for a quiet machine, run fn(), and measure the share of the CPUs that
    other processes took meanwhile; run it again (up to `retries` times) if that share is over
    QUIET['foreign_max']. Returns (fn's result, foreign share, attempts)."""
    retries = QUIET["retries"] if retries is None else retries
    n = os.cpu_count() or 1
    for attempt in range(retries + 1):
        wait_quiet(what)
        b0, s0, t0 = _cpu_busy_s(), sum(os.times()[:2]), time.perf_counter()
        result = fn()
        wall = time.perf_counter() - t0
        foreign = max(0.0, (_cpu_busy_s() - b0) - (sum(os.times()[:2]) - s0)) / (wall * n)
        if foreign <= QUIET["foreign_max"] or attempt == retries or wall < 1.0:  # < 1 s: jiffies too coarse
            return result, round(foreign, 3), attempt + 1
        log(f"  {what}: other processes took {foreign:.0%} of the CPUs; measuring again")


def run_measured(cmd: list[str], stderr_path: Path | None = None, env: dict | None = None,
                 poll_s: float = 0.05) -> dict:
    """Run cmd to completion. Returns rc, wall_s, peak_rss (bytes, from the kernel's rusage of
    exactly this child), peak_anon/peak_file (sampled from /proc), stdout, the stderr text, and
    first_output_s: seconds from launch to the first non-blank byte on stdout."""
    err_f = open(stderr_path, "w+b") if stderr_path else tempfile.TemporaryFile()
    wait_quiet(" ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd[:4])))
    busy0, self0 = _cpu_busy_s(), sum(os.times()[:2])
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err_f, stdin=subprocess.DEVNULL,
                         env=env, cwd=str(ROOT))
    chunks: list[bytes] = []
    first: list[float] = []

    def reader() -> None:
        fd = p.stdout.fileno()
        while True:
            b = os.read(fd, 65536)
            if not b:
                break
            if not first and b.strip():
                first.append(time.perf_counter() - t0)
            chunks.append(b)

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    peak_anon = peak_file = 0
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        st = _proc_status(p.pid)
        peak_anon = max(peak_anon, st.get("RssAnon", 0))
        peak_file = max(peak_file, st.get("RssFile", 0))
        time.sleep(poll_s)
    wall = time.perf_counter() - t0
    # CPU time that neither the child nor this process used: other processes on a shared machine
    others = (_cpu_busy_s() - busy0) - (ru.ru_utime + ru.ru_stime) - (sum(os.times()[:2]) - self0)
    foreign = max(0.0, others) / (wall * (os.cpu_count() or 1))
    p.returncode = os.waitstatus_to_exitcode(status)
    th.join(10)
    p.stdout.close()
    err_f.seek(0)
    stderr = err_f.read().decode("utf-8", "replace")
    err_f.close()
    return {"rc": p.returncode, "wall_s": wall, "peak_rss": ru.ru_maxrss * 1024, "peak_anon": peak_anon,
            "peak_file": peak_file, "stdout": b"".join(chunks).decode("utf-8", "replace"), "stderr": stderr,
            "first_output_s": first[0] if first else None, "foreign_cpu": round(foreign, 3)}


CONTENTION: list[tuple[str, float]] = []  # (measurement, share of the CPUs other processes used)


def run_worker(kind: str, args: dict, label: str) -> dict:
    """Run `run.py --worker kind` in a fresh process; its result is the tagged JSON line."""
    stderr_path = RESULTS / f".{kind}-{label}.stderr.tmp"
    args = {**args, "quiet": {k: v for k, v in QUIET.items() if k != "log"}}
    r = run_measured([PY, str(Path(__file__).resolve()), "--worker", kind, "--worker-args", json.dumps(args)],
                     stderr_path=stderr_path)
    result = None
    for line in r["stdout"].splitlines():
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
    if r["rc"] != 0 or result is None:
        tail = "\n".join(r["stderr"].strip().splitlines()[-15:])
        log(f"worker {kind} ({label}) failed (rc {r['rc']}):\n{tail}")
        return {"error": f"worker exited with {r['rc']}", "stderr_tail": tail}
    stderr_path.unlink(missing_ok=True)
    result["process"] = {"wall_s": r["wall_s"], "peak_rss": r["peak_rss"], "peak_anon": r["peak_anon"],
                         "peak_file": r["peak_file"], "foreign_cpu": r["foreign_cpu"]}
    CONTENTION.append((f"{kind} {label}", r["foreign_cpu"]))
    return result


# =============================================================================================
# the machine
# =============================================================================================
def machine(threads: int) -> dict:
    cpu = "?"
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "?":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg: str) -> str | None:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    from imp_cli.engine import _physical_cores

    return {
        "host": socket.gethostname(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "cpu_model": cpu,
        "logical_cpus": os.cpu_count(),
        "physical_cores": _physical_cores(),
        "threads_used": threads,
        "simd": [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "neon", "asimd") if f in flags],
        "ram_bytes": mem,
        "os": platform.platform(),
        "python": platform.python_version(),
        "llama_cpp_python": ver("llama-cpp-python"),
        "torch": ver("torch"),
        "transformers": ver("transformers"),
        "numpy": ver("numpy"),
        "imp": ver("imp"),
    }


# =============================================================================================
# workers (each runs in its own process)
# =============================================================================================
def _ignore_eos_sampling():
    """Sampling(ignore_eos=True) when the engine has it (the product's own loop then generates
    exactly max_tokens), else None."""
    from imp_cli.engine import Sampling

    return Sampling(ignore_eos=True) if "ignore_eos" in getattr(Sampling, "__dataclass_fields__", {}) else None


def _eog_ids(model) -> list[int]:
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(model)
    return [t for t in range(llama_cpp.llama_vocab_n_tokens(vocab)) if llama_cpp.llama_vocab_is_eog(vocab, t)]


def worker_engine(a: dict) -> dict:
    """imp's Engine in-process: warm image encodes, prompt eval, and exactly N generated tokens
    (Engine.generate with ignore_eos, or on an engine without it a greedy evaluate() loop over
    all tokens but end-of-generation ones), re-using the prompt's KV cache."""
    import numpy as np

    from imp_cli.engine import Engine
    from imp_cli.images import load_image, preprocess
    from imp_cli.modelfiles import read_pair, resolve_paths
    from imp_cli.prompts import build_prompt

    n, runs = a["tokens"], a["runs"]
    pair = read_pair(*resolve_paths(a["text"], a["mmproj"]))
    image = load_image(a["image"])
    pixels = preprocess(image.image, size=pair.image_size, aspect=pair.image_aspect)
    before, after = build_prompt(pair.prompt_family, a["question"])
    out: dict = {"encode_ms": [], "prompt_ms": [], "prompt_tokens": [], "gen_tok_s": [], "first_token_ms": []}
    with Engine(pair, n_ctx=4096, threads=a["threads"]) as eng:
        out["load_ms"] = eng.timings.load_ms
        eog = _eog_ids(eng.llm.model)
        out["eog_ids"] = eog
        head, tail = eng.tokenize(before, first=True), eng.tokenize(after)
        keys = iter(range(10**6))

        def pick(logits: np.ndarray) -> int:
            logits[eog] = -np.inf
            return int(np.argmax(logits))

        def encode():
            b = eng.timings.image_encode_ms
            emb = eng.encode_image(pixels, f"bench-{next(keys)}")  # a new key: really encoded
            return emb, eng.timings.image_encode_ms - b

        # the process's first encode (graph allocation, cold caches), as in a one-shot `imp ask`
        (_, out["encode_cold_ms"]), out["encode_cold_foreign_cpu"], _ = guarded("cold encode", encode, 0)

        def prompt():
            emb, enc_ms = encode()
            t0 = time.perf_counter()
            eng.evaluate([head, emb, tail])  # after the system text (cached), all is evaluated
            first = pick(eng.last_logits())
            return emb, enc_ms, eng.timings.prompt_ms, eng.timings.prompt_tokens, first, \
                enc_ms + (time.perf_counter() - t0) * 1000

        sampling = _ignore_eos_sampling()
        out["generation_loop"] = "Engine.generate(ignore_eos=True)" if sampling else "evaluate+argmax loop"

        def generate(emb, first):
            def go():
                eng.evaluate([head, emb, tail])  # back to the prompt (re-runs its last token)
                if sampling:  # the product's own loop
                    for _ in eng.generate(sampling, n):
                        pass
                    t = eng.timings
                    assert t.generated_tokens == n, (t.generated_tokens, t.finish_reason)
                    return (n - 1) / (t.generation_ms - t.first_token_ms) * 1000
                gen = [first]
                t_first = time.perf_counter()
                while len(gen) < n:
                    eng.evaluate([head, emb, tail + gen])  # prefix reuse: decodes the new token only
                    gen.append(pick(eng.last_logits()))
                return (n - 1) / (time.perf_counter() - t_first)
            return go

        out["foreign_cpu"] = []
        for i in range(runs):
            (emb, enc_ms, p_ms, p_tok, first, ttft), f1, _ = guarded(f"engine prompt {i + 1}", prompt)
            rate, f2, _ = guarded(f"engine generation {i + 1}", generate(emb, first))
            out["encode_ms"].append(enc_ms)
            out["prompt_ms"].append(p_ms)
            out["prompt_tokens"].append(p_tok)
            out["first_token_ms"].append(ttft)
            out["gen_tok_s"].append(rate)
            out["foreign_cpu"].append(max(f1, f2))
    return out


def worker_llava(a: dict) -> dict:
    """llama-cpp-python's stock path: Llama + Llava15ChatHandler, streaming chat completions."""
    import llama_cpp
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    n, runs = a["tokens"], a["runs"]
    t0 = time.perf_counter()
    handler = Llava15ChatHandler(clip_model_path=a["mmproj"], verbose=True)
    llm = llama_cpp.Llama(model_path=a["text"], chat_handler=handler, n_ctx=4096, n_threads=a["threads"],
                          n_threads_batch=a["threads"], n_gpu_layers=0, verbose=True)
    t_llama = time.perf_counter()
    handler._init_mtmd_context(llm)  # what its first call does; includes mtmd's warm-up encode
    t_loaded = time.perf_counter()
    eog = _eog_ids(llm.model)

    marks: dict = {}
    original = llm.create_completion

    def create_completion(*args, **kw):  # the handler calls this once the prompt is evaluated
        marks["prompt_done"] = time.perf_counter()
        marks["n_prompt"] = len(kw["prompt"] if "prompt" in kw else args[0])
        return original(*args, **kw)

    llm.create_completion = create_completion
    png = Path(a["image"]).read_bytes()
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": a["question"]}]}]
    out: dict = {"load_ms": (t_loaded - t0) * 1000, "llama_init_ms": (t_llama - t0) * 1000,
                 "mtmd_init_ms": (t_loaded - t_llama) * 1000, "runs": [], "eog_ids": eog}
    attempt_ids = iter(range(10**6))

    def one_call():
        run_id = next(attempt_ids)
        sys.stderr.write(f"\n@@RUN {run_id}\n")
        sys.stderr.flush()
        marks.clear()
        stamps = []
        t0 = time.perf_counter()
        stream = llm.create_chat_completion(
            messages=messages, max_tokens=n, temperature=0.0, top_k=1, top_p=1.0, min_p=0.0,
            repeat_penalty=1.0, logit_bias={str(t): float("-inf") for t in eog}, stream=True)
        finish = None
        for chunk in stream:
            choice = chunk["choices"][0]
            if choice["delta"].get("content"):
                stamps.append(time.perf_counter())
            finish = choice.get("finish_reason") or finish
        t_end = time.perf_counter()
        perf = llama_cpp.llama_perf_context(llm._ctx.ctx)
        return {
            "run_id": run_id,
            "call_to_prompt_done_ms": (marks["prompt_done"] - t0) * 1000,
            "prompt_tokens": marks["n_prompt"],
            "first_token_ms": (stamps[0] - t0) * 1000 if stamps else None,
            "content_chunks": len(stamps),
            "generated_tokens": llm.n_tokens - marks["n_prompt"] + 1,  # the last one is never decoded
            "finish_reason": finish,
            "gen_tok_s_wall": (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 2 else None,
            "gen_tok_s_native": perf.n_eval / perf.t_eval_ms * 1000 if perf.t_eval_ms else None,
            "native_n_eval": perf.n_eval,
            "total_ms": (t_end - t0) * 1000,
        }

    for i in range(runs):
        run, foreign, attempts = guarded(f"stock handler run {i + 1}", one_call)
        out["runs"].append({**run, "foreign_cpu": foreign, "attempts": attempts})
    sys.stderr.write("\n@@END\n")
    sys.stderr.flush()
    # its encode/decode times, from mtmd's own log lines (verbose=True sends them to stderr)
    text = Path(a["stderr_path"]).read_text(errors="replace") if a.get("stderr_path") else ""
    pieces = re.split(r"^@@RUN (\d+)$", text, flags=re.M)[1:]
    by_id = {int(k): v for k, v in zip(pieces[0::2], pieces[1::2])}
    for run in out["runs"]:
        part = by_id.get(run["run_id"], "")
        enc = [int(x) for x in re.findall(r"image slice encoded in (\d+) ms", part)]
        dec = [int(x) for x in re.findall(r"image decoded \(batch \d+/\d+\) in (\d+) ms", part)]
        run["encode_ms_log"] = sum(enc) if enc else None
        run["image_decode_ms_log"] = sum(dec) if dec else None
        if enc:
            # prompt phase = its tokenize + encode + evaluation of text and image embeddings
            run["prompt_ms"] = run["call_to_prompt_done_ms"] - run["encode_ms_log"]
    llm.close()
    return out


def worker_ab(a: dict) -> dict:
    """Generation speed, imp against the stock path, interleaved in one process on one GGUF: the
    host's memory bandwidth drifts (other tenants), so runs taken minutes apart differ by more
    than the 5% we want to resolve. Each round runs, back to back, N tokens of:
      imp-gen    Engine.generate, the product's own loop (with ignore_eos when the engine has it;
                 without, it stops at end-of-generation)
      imp-loop   Engine.evaluate + greedy over non-end-of-generation tokens (always N tokens)
      stock      the stock handler's generation path: Llama.create_completion on the prompt it
                 evaluated (as Llava15ChatHandler does after the image), logit_bias -inf on
                 end-of-generation tokens, streamed
    after one full prompt (image included) on each side."""
    import llama_cpp
    import numpy as np
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    from imp_cli.engine import Engine, Sampling
    from imp_cli.images import load_image, preprocess
    from imp_cli.modelfiles import read_pair, resolve_paths
    from imp_cli.prompts import build_prompt

    n, rounds = a["tokens"], a["rounds"]
    pair = read_pair(*resolve_paths(a["text"], a["mmproj"]))
    image = load_image(a["image"])
    pixels = preprocess(image.image, size=pair.image_size, aspect=pair.image_aspect)
    before, after = build_prompt(pair.prompt_family, a["question"])
    eng = Engine(pair, n_ctx=4096, threads=a["threads"])
    eog = _eog_ids(eng.llm.model)
    head, tail = eng.tokenize(before, first=True), eng.tokenize(after)
    emb = eng.encode_image(pixels, "ab")
    eng.evaluate([head, emb, tail])
    logits = eng.last_logits()
    logits[eog] = -np.inf
    first = int(np.argmax(logits))

    handler = Llava15ChatHandler(clip_model_path=a["mmproj"], verbose=False)
    llm = llama_cpp.Llama(model_path=a["text"], chat_handler=handler, n_ctx=4096, n_threads=a["threads"],
                          n_threads_batch=a["threads"], n_gpu_layers=0, verbose=False)
    captured: dict = {}
    original = llm.create_completion

    def capture(*args, **kw):  # the handler's prompt, evaluated (image included): keep it
        captured["prompt"] = list(kw["prompt"] if "prompt" in kw else args[0])
        return original(*args, **kw)

    llm.create_completion = capture
    url = "data:image/png;base64," + base64.b64encode(Path(a["image"]).read_bytes()).decode()
    llm.create_chat_completion(
        messages=[{"role": "system", "content": SYSTEM},
                  {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": a["question"]}]}],
        max_tokens=1, temperature=0.0)
    llm.create_completion = original
    bias = {t: float("-inf") for t in eog}

    def imp_loop():
        eng.evaluate([head, emb, tail])
        gen = [first]
        t0 = time.perf_counter()
        while len(gen) < n:
            eng.evaluate([head, emb, tail + gen])
            lg = eng.last_logits()
            lg[eog] = -np.inf
            gen.append(int(np.argmax(lg)))
        return (n - 1) / (time.perf_counter() - t0), n

    sampling = _ignore_eos_sampling() or Sampling()

    def imp_generate():
        eng.evaluate([head, emb, tail])
        for _ in eng.generate(sampling, n):
            pass
        t = eng.timings.as_dict()
        return t["generation_tokens_per_s"], t["generated_tokens"]

    def stock():
        stamps = []
        for chunk in llm.create_completion(prompt=captured["prompt"], max_tokens=n, temperature=0.0, top_k=1,
                                           top_p=1.0, min_p=0.0, repeat_penalty=1.0, logit_bias=bias, stream=True):
            if chunk["choices"][0]["text"]:
                stamps.append(time.perf_counter())
        return (len(stamps) - 1) / (stamps[-1] - stamps[0]), len(stamps)

    sides = {"imp_loop": imp_loop, "imp_generate": imp_generate, "stock": stock}
    out: dict = {k: [] for k in sides}
    out["tokens"] = {k: [] for k in sides}
    out["foreign_cpu"] = []
    for r in range(rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))  # no side always goes first

        def one_round():
            return {k: sides[k]() for k in order}

        got, foreign, _ = guarded(f"A/B round {r + 1}", one_round)
        for k, (rate, count) in got.items():
            out[k].append(rate)
            out["tokens"][k].append(count)
        out["foreign_cpu"].append(foreign)
    out["pair_ratio_loop"] = [i / s for i, s in zip(out["imp_loop"], out["stock"])]
    out["pair_ratio_generate"] = [i / s for i, s in zip(out["imp_generate"], out["stock"]) if i]
    # the headline: the product's own loop if it generated exactly N tokens every round
    out["headline"] = "imp_generate" if all(c == n for c in out["tokens"]["imp_generate"]) else "imp_loop"
    out["ignore_eos"] = sampling.__dict__.get("ignore_eos", False)
    out["pair_ratio"] = out["pair_ratio_generate"] if out["headline"] == "imp_generate" else out["pair_ratio_loop"]
    eng.close()
    llm.close()
    return out


def worker_transformers(a: dict) -> dict:
    """tests/oracle.py (transformers, float32, CPU): encode, prompt, N greedy tokens with a KV cache."""
    import torch

    torch.set_num_threads(a["threads"])
    sys.path.insert(0, str(ROOT / "tests"))
    import oracle
    from oracle import Oracle
    from PIL import Image
    from transformers import DynamicCache

    # tests/oracle.py reads every tensor as float32 (12.7 GB) before building the float32 models
    # (another 12.7 GB): over 24 GB, and the kernel kills it. Read them in their stored float16
    # instead: load_state_dict casts them into the float32 parameters, so the model is identical
    # (float16 -> float32 is exact) and the peak is ~19 GB. (tests/oracle.py itself is unchanged.)
    from safetensors import safe_open

    def read_weights_stored_dtype(ckpt: Path) -> dict:
        index = ckpt / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
            else ["model.safetensors"]
        weights = {}
        for name in files:
            with safe_open(str(ckpt / name), framework="pt") as f:
                for key in f.keys():
                    weights[key] = f.get_tensor(key)
        return weights

    if hasattr(oracle, "_read_weights"):
        oracle._read_weights = read_weights_stored_dtype

    n, runs = a["tokens"], a["runs"]
    t0 = time.perf_counter()
    o = Oracle(a["checkpoint"])
    out: dict = {"load_ms": (time.perf_counter() - t0) * 1000, "encode_ms": [], "prompt_ms": [],
                 "prompt_tokens": [], "first_token_ms": [], "gen_tok_s": []}
    image = Image.open(a["image"]).convert("RGB")
    before, after = o.prompt_ids(a["question"])
    stop = sorted(i for i in o.stop_ids if i is not None)
    kw = o._cache_kwarg

    def pick(logits) -> int:
        logits = logits.clone()
        logits[stop] = -float("inf")
        return int(logits.argmax())

    def one_run():
        with torch.inference_mode():
            t0 = time.perf_counter()
            img = o._image_embeds(image)
            t1 = time.perf_counter()
            embeds = torch.cat([o._embed(before), img, o._embed(after)])
            cache = DynamicCache()
            logits = o.lm(inputs_embeds=embeds.unsqueeze(0), use_cache=True, **{kw: cache}).logits[0, -1]
            tok = pick(logits)
            t2 = time.perf_counter()
            for _ in range(n - 1):
                logits = o.lm(inputs_embeds=o._embed([tok]).unsqueeze(0), use_cache=True, **{kw: cache}).logits[0, -1]
                tok = pick(logits)
            t3 = time.perf_counter()
        return t0, t1, t2, t3, int(embeds.shape[0])

    out["foreign_cpu"] = []
    for i in range(runs):
        (t0, t1, t2, t3, n_prompt), foreign, _ = guarded(f"transformers run {i + 1}", one_run)
        out["encode_ms"].append((t1 - t0) * 1000)
        out["prompt_ms"].append((t2 - t1) * 1000)
        out["prompt_tokens"].append(n_prompt)
        out["first_token_ms"].append((t2 - t0) * 1000)
        out["gen_tok_s"].append((n - 1) / (t3 - t2))
        out["foreign_cpu"].append(foreign)
    return out


def worker_bandwidth(a: dict) -> dict:
    """Memory read bandwidth: reductions over a 1.5 GB array (far past every cache), best of a
    few, on 1 thread and on `threads` threads (numpy releases the GIL in reductions)."""
    import numpy as np

    nbytes = int(a.get("bytes", 1.5 * GB))
    arr = np.ones(nbytes // 4, dtype=np.float32)  # written once: every page is resident
    views = {"float32 sum": (arr, np.sum), "int64 sum": (arr.view(np.int64), np.sum),
             "float32 dot": (arr, lambda x: np.dot(x, x))}
    out: dict = {"array_bytes": arr.nbytes, "best_gbs": {}}

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    for name, (v, fn) in views.items():
        for nt in sorted({1, a["threads"]}):
            parts = np.array_split(v, nt)
            best = None
            for _ in range(5):
                if nt == 1:
                    dt = timed(lambda: fn(v))
                else:
                    def go():
                        ths = [threading.Thread(target=fn, args=(p,)) for p in parts]
                        for t in ths:
                            t.start()
                        for t in ths:
                            t.join()
                    dt = timed(go)
                gbs = arr.nbytes / dt / GB
                best = gbs if best is None else max(best, gbs)
            out["best_gbs"][f"{name}, {nt} thread{'s' if nt > 1 else ''}"] = round(best, 2)
    out["bandwidth_gbs"] = max(out["best_gbs"].values())
    out["method"] = max(out["best_gbs"], key=out["best_gbs"].get)
    return out


WORKERS = {"engine": worker_engine, "llava": worker_llava, "ab": worker_ab, "transformers": worker_transformers,
           "bandwidth": worker_bandwidth}


# =============================================================================================
# measurements driven from the main process
# =============================================================================================
def bench_help(n: int = 10) -> dict:
    wait_quiet("imp --help")
    subprocess.run([IMP, "--help"], capture_output=True)  # warm the page cache
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = subprocess.run([IMP, "--help"], capture_output=True)
        times.append(time.perf_counter() - t0)
        assert r.returncode == 0, r.stderr
    return summary(times)


def bench_convert(source: Path, quant: str, runs: int, threads: int) -> dict:
    out_dir = ROOT / "bench" / "cache" / "convert-bench"
    walls, rss, anon, reported = [], [], [], []
    for i in range(runs):
        shutil.rmtree(out_dir, ignore_errors=True)
        r = run_measured([IMP, "convert", str(source), "--out", str(out_dir), "-q", quant, "--force",
                          "--json", "--threads", str(threads), "--name", "bench"])
        if r["rc"] != 0:
            log(f"imp convert -q {quant} failed: {r['stderr'].strip()[-500:]}")
            return {"error": r["stderr"].strip()[-500:]}
        info = json.loads(r["stdout"].strip().splitlines()[-1])
        CONTENTION.append((f"convert {quant} run {i + 1}", r["foreign_cpu"]))
        walls.append(r["wall_s"])
        rss.append(r["peak_rss"])
        anon.append(r["peak_anon"])
        reported.append(info.get("seconds"))
        sizes = {"text_bytes": info.get("text_bytes"), "mmproj_bytes": info.get("mmproj_bytes")}
        log(f"  convert {quant} run {i + 1}/{runs}: {r['wall_s']:.1f} s, peak RSS {r['peak_rss'] / GB:.2f} GB "
            f"(anon {r['peak_anon'] / GB:.2f} GB)")
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"wall_s": summary(walls), "peak_rss": summary(rss), "peak_anon": summary(anon),
            "reported_seconds": summary(reported), **sizes}


_STAT_LINE = re.compile(r"^\s+([a-z_]+)\s+(\S+)\s*$")


def bench_ask(text: Path, image: Path, runs: int, tokens: int, threads: int) -> dict:
    """`imp ask --stats` as a user runs it: answer streamed on stdout, timings on stderr (with
    --ignore-eos when the CLI has it, so that it generates exactly `tokens`)."""
    rows = []
    helptext = subprocess.run([IMP, "ask", "--help"], capture_output=True, text=True).stdout
    extra = ["--ignore-eos"] if "--ignore-eos" in helptext else []
    for i in range(runs):
        for attempt in range(QUIET["retries"] + 1):
            r = run_measured([IMP, "ask", str(image), QUESTION, "--model", str(text), "-n", str(tokens),
                              "--threads", str(threads), "--stats", *extra])
            if r["rc"] != 0 or r["foreign_cpu"] <= QUIET["foreign_max"] or attempt == QUIET["retries"]:
                break
            log(f"  imp ask run {i + 1}: other processes took {r['foreign_cpu']:.0%} of the CPUs; measuring again")
        if r["rc"] != 0:
            log(f"imp ask failed: {r['stderr'].strip()[-500:]}")
            return {"error": r["stderr"].strip()[-500:]}
        t = {}
        for line in r["stderr"].splitlines():
            m = _STAT_LINE.match(line)
            if m:
                k, v = m.groups()
                try:
                    t[k] = float(v)
                except ValueError:
                    t[k] = v
        internal_ttft = sum(t.get(k, 0.0) for k in ("load_ms", "image_encode_ms", "prompt_ms", "first_token_ms"))
        CONTENTION.append((f"ask {text.name} run {i + 1}", r["foreign_cpu"]))
        rows.append({**t, "wall_s": r["wall_s"], "peak_rss": r["peak_rss"], "peak_anon": r["peak_anon"],
                     "foreign_cpu": r["foreign_cpu"],
                     "ttft_wall_s": r["first_output_s"], "ttft_internal_ms": internal_ttft})
        log(f"  imp ask {text.name} run {i + 1}/{runs}: wall {r['wall_s']:.1f} s, first output "
            f"{r['first_output_s'] or float('nan'):.2f} s, generated {t.get('generated_tokens')} "
            f"({t.get('finish_reason')}), peak RSS {r['peak_rss'] / GB:.2f} GB")

    def col(k):
        return summary([row.get(k) for row in rows])

    return {"runs": rows, "flags": extra, "load_ms": col("load_ms"), "image_encode_ms": col("image_encode_ms"),
            "prompt_tokens": col("prompt_tokens"), "prompt_ms": col("prompt_ms"),
            "prompt_tok_s": col("prompt_tokens_per_s"), "generation_tok_s": col("generation_tokens_per_s"),
            "generated_tokens": col("generated_tokens"), "ttft_wall_s": col("ttft_wall_s"),
            "ttft_internal_ms": col("ttft_internal_ms"), "wall_s": col("wall_s"), "peak_rss": col("peak_rss"),
            "peak_anon": col("peak_anon")}


def gguf_bytes(path: Path) -> dict:
    from gguf import GGUFReader

    r = GGUFReader(path)
    total = sum(int(t.n_bytes) for t in r.tensors)
    embd = sum(int(t.n_bytes) for t in r.tensors if t.name == "token_embd.weight")
    return {"file_bytes": path.stat().st_size, "tensor_bytes": total, "token_embd_bytes": embd}


def test_image(path: Path) -> Path:
    """A 640x480 photo-like picture (smooth gradients + noise), written once."""
    if not path.exists():
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(7)
        y, x = np.mgrid[0:480, 0:640]
        rgb = np.stack([x / 640 * 255, y / 480 * 255, (x + y) % 256], axis=-1)
        rgb = np.clip(rgb + rng.normal(0, 20, rgb.shape), 0, 255).astype("uint8")
        Image.fromarray(rgb).save(path)
    return path


# =============================================================================================
# main
# =============================================================================================
def main() -> None:
    ap = argparse.ArgumentParser(description="imp benchmark (see bench/run.py's docstring)")
    ap.add_argument("--runs", type=int, default=3, help="repetitions of each figure (default 3)")
    ap.add_argument("--convert-runs", type=int, default=None,
                    help="repetitions of each conversion (default: --runs; one Q4_K_M conversion takes ~2 min on 2 cores)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated per run (default 64)")
    ap.add_argument("--ab-rounds", type=int, default=5,
                    help="rounds of the interleaved imp/stock generation comparison (default 5)")
    ap.add_argument("--tf-tokens", type=int, default=24, help="tokens generated per transformers run (default 24)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads everywhere (0: physical cores)")
    ap.add_argument("--size", type=int, choices=(384, 196), default=384)
    ap.add_argument("--quants", default="Q4_K_M,Q8_0")
    ap.add_argument("--skip", default="", help="comma-separated: help,convert,ask,engine,llava,ab,transformers,bandwidth")
    ap.add_argument("--cache", type=Path, default=BENCH / "cache")
    ap.add_argument("--retries", type=int, default=1,
                    help="measure a run again (up to this many times) when other processes took over 10%% of the CPUs")
    ap.add_argument("--quiet-wait", type=float, default=60.0,
                    help="before each measurement, wait up to this many seconds for other processes to go idle")
    ap.add_argument("--report-only", type=Path, metavar="RAW_JSON",
                    help="only rewrite latest.md and latest.png from an earlier run's raw JSON")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-args", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.worker:
        wargs = json.loads(a.worker_args)
        QUIET.update(wargs.get("quiet", {}))
        result = WORKERS[a.worker](wargs)
        sys.stdout.write(RESULT_TAG + json.dumps(result) + "\n")
        sys.stdout.flush()
        return

    if a.report_only:
        res = json.loads(a.report_only.read_text())
        quants = res["settings"]["quants"]
        res["derived"] = derive(res, quants)
        a.report_only.write_text(json.dumps(res, indent=1))
        md = report_markdown(res, quants, a.report_only.name)
        (RESULTS / "latest.md").write_text(md)
        draw_chart(res, quants, RESULTS / "latest.png")
        print(md)
        return

    import synthetic
    from imp_cli.engine import _physical_cores

    started = time.perf_counter()
    threads = a.threads or _physical_cores()
    QUIET["max_wait_s"], QUIET["retries"] = a.quiet_wait, a.retries
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    quants = [q.strip().upper() for q in a.quants.split(",") if q.strip()]
    convert_runs = a.convert_runs if a.convert_runs is not None else a.runs
    RESULTS.mkdir(parents=True, exist_ok=True)
    res: dict = {"machine": machine(threads),
                 "settings": {"runs": a.runs, "convert_runs": convert_runs, "tokens": a.tokens,
                              "tf_tokens": a.tf_tokens, "threads": threads, "size": a.size,
                              "quants": quants, "question": QUESTION}}
    log(f"machine: {res['machine']['cpu_model']}, {res['machine']['logical_cpus']} CPUs, {threads} threads, "
        f"llama-cpp-python {res['machine']['llama_cpp_python']}")

    # -- the model (cached) -------------------------------------------------------------------
    t0 = time.perf_counter()
    r = subprocess.run([PY, str(BENCH / "synthetic.py"), "--size", str(a.size), "--cache", str(a.cache),
                        "--quants", ",".join(dict.fromkeys([*quants, "Q4_K_M", "Q8_0", "F16"]))])
    if r.returncode != 0:
        sys.exit("bench: could not build the synthetic model (see above)")
    paths = synthetic.paths(a.size, a.cache)
    source, workaround = synthetic.conversion_source(a.size, a.cache)
    res["model"] = {"checkpoint": str(paths["checkpoint"]), "converted_from": str(source),
                    "workaround": workaround or None, "prepare_s": time.perf_counter() - t0,
                    "mmproj_bytes": paths["mmproj"].stat().st_size,
                    "text": {q: gguf_bytes(paths[q]) for q in ("Q4_K_M", "Q8_0", "F16")}}
    if workaround:
        log(f"NOTE: {workaround}")
    image = test_image(a.cache / "bench-image.png")

    # -- imp --help -----------------------------------------------------------------------------
    if "help" not in skip:
        log("imp --help x10 ...")
        res["help_s"] = bench_help()
        log(f"  imp --help: median {res['help_s']['median'] * 1000:.0f} ms")

    # -- memory bandwidth -----------------------------------------------------------------------
    if "bandwidth" not in skip:
        log("memory bandwidth ...")
        res["bandwidth"] = run_worker("bandwidth", {"threads": threads}, "bw")
        log(f"  {res['bandwidth'].get('bandwidth_gbs')} GB/s ({res['bandwidth'].get('method')})")

    # -- conversion -----------------------------------------------------------------------------
    if "convert" not in skip:
        res["convert"] = {}
        for q in ("F16", "Q4_K_M"):
            log(f"imp convert -q {q} x{convert_runs} ...")
            res["convert"][q] = bench_convert(source, q, convert_runs, threads)

    # -- imp ask, engine, stock handler ---------------------------------------------------------
    res["ask"], res["engine"], res["llava"] = {}, {}, {}
    common = {"image": str(image), "question": QUESTION, "tokens": a.tokens, "runs": a.runs, "threads": threads,
              "mmproj": str(paths["mmproj"])}
    for q in quants:
        text = paths[q]
        if "ask" not in skip:
            log(f"imp ask {q} x{a.runs} ...")
            res["ask"][q] = bench_ask(text, image, a.runs, a.tokens, threads)
        if "engine" not in skip:
            log(f"engine generation {q} ({a.tokens} tokens) x{a.runs} ...")
            res["engine"][q] = run_worker("engine", {**common, "text": str(text)}, q)
            e = res["engine"][q]
            if "error" not in e:
                for k in ("encode_ms", "prompt_ms", "gen_tok_s", "first_token_ms"):
                    e[k] = summary(e[k])
                e["prompt_tok_s"] = summary([t / ms * 1000 for t, ms in zip(e["prompt_tokens"], e["prompt_ms"]["values"])])
                log(f"  engine {q}: {e['gen_tok_s']['median']:.2f} tok/s, warm encode {e['encode_ms']['median']:.0f} ms")
        if "llava" not in skip:
            log(f"stock Llava15ChatHandler {q} x{a.runs} ...")
            stderr_path = RESULTS / f".llava-{q}.stderr.tmp"
            l = run_worker("llava", {**common, "text": str(text), "stderr_path": str(stderr_path)}, q)
            if "error" not in l:
                for k in ("encode_ms_log", "prompt_ms", "first_token_ms", "gen_tok_s_wall", "gen_tok_s_native",
                          "generated_tokens", "prompt_tokens", "total_ms"):
                    l[k] = summary([run.get(k) for run in l["runs"]])
                l["prompt_tok_s"] = summary([run["prompt_tokens"] / run["prompt_ms"] * 1000
                                             for run in l["runs"] if run.get("prompt_ms")])
                log(f"  stock {q}: {med(l['gen_tok_s_wall']) or float('nan'):.2f} tok/s, "
                    f"encode {med(l['encode_ms_log']) or float('nan'):.0f} ms")
            res["llava"][q] = l
        if "ab" not in skip:
            log(f"interleaved generation, imp vs stock, {q}: {a.ab_rounds} rounds of {a.tokens} tokens ...")
            ab = run_worker("ab", {**common, "text": str(text), "rounds": a.ab_rounds}, q)
            if "error" not in ab:
                for k in ("imp_loop", "imp_generate", "stock", "pair_ratio", "pair_ratio_generate", "pair_ratio_loop"):
                    ab[k] = summary(ab[k])
                log(f"  {q}: imp {med(ab[ab['headline']]):.2f} tok/s, stock {med(ab['stock']):.2f} tok/s, "
                    f"paired ratio {med(ab['pair_ratio']):.3f}")
            res.setdefault("ab", {})[q] = ab

    # -- transformers ---------------------------------------------------------------------------
    if "transformers" not in skip:
        log(f"transformers float32 x{a.runs} ({a.tf_tokens} tokens) ...")
        t = run_worker("transformers", {"checkpoint": str(paths["checkpoint"]), "image": str(image),
                                        "question": QUESTION, "tokens": a.tf_tokens, "runs": a.runs,
                                        "threads": threads}, "tf")
        if "error" not in t:
            for k in ("encode_ms", "prompt_ms", "first_token_ms", "gen_tok_s"):
                t[k] = summary(t[k])
            t["prompt_tok_s"] = summary([n / ms * 1000 for n, ms in zip(t["prompt_tokens"], t["prompt_ms"]["values"])])
            log(f"  transformers: {t['gen_tok_s']['median']:.2f} tok/s, encode {t['encode_ms']['median']:.0f} ms")
        res["transformers"] = t

    res["elapsed_s"] = time.perf_counter() - started
    res["contention"] = {"foreign_cpu_share": dict(CONTENTION), "quiet_waits": QUIET["log"],
                         "max_foreign_cpu_share": max((v for _, v in CONTENTION), default=None)}
    res["derived"] = derive(res, quants)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())
    raw = RESULTS / f"{stamp}-{host}.json"
    raw.write_text(json.dumps(res, indent=1))
    md = report_markdown(res, quants, raw.name)
    (RESULTS / "latest.md").write_text(md)
    try:
        draw_chart(res, quants, RESULTS / "latest.png")
    except Exception as e:  # the chart is a convenience; the numbers are written already
        log(f"chart failed: {type(e).__name__}: {e}")
    log(f"done in {res['elapsed_s'] / 60:.1f} min: {raw}, {RESULTS / 'latest.md'}, {RESULTS / 'latest.png'}")
    print(md)


# =============================================================================================
# derived figures, report, chart
# =============================================================================================
def _get(d: dict, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def derive(res: dict, quants: list[str]) -> dict:
    d: dict = {"per_quant": {}, "targets": []}
    bw = _get(res, "bandwidth", "bandwidth_gbs")
    for q in quants:
        ask, eng, llv = res["ask"].get(q, {}), res["engine"].get(q, {}), res["llava"].get(q, {})
        ab = (res.get("ab") or {}).get(q) or {}
        tb = res["model"]["text"][q]["tensor_bytes"]
        ceiling = bw * GB / tb if bw else None
        if _get(ab, "pair_ratio"):  # interleaved in one process: the headline
            imp_gen, stock_gen = med(ab[ab.get("headline", "imp_loop")]), med(ab["stock"])
            gen_ratio = round(med(ab["pair_ratio"]), 3)
        else:
            imp_gen, stock_gen = med(_get(eng, "gen_tok_s")), med(_get(llv, "gen_tok_s_wall"))
            gen_ratio = ratio(imp_gen, stock_gen)
        row = {
            "imp_gen_tok_s": imp_gen,
            "stock_gen_tok_s": stock_gen,
            "gen_ratio_vs_stock": gen_ratio,
            "gen_ratio_vs_stock_separate_processes": ratio(_get(eng, "gen_tok_s"), _get(llv, "gen_tok_s_wall")),
            "gen_ratio_product_generate_vs_stock": round(med(ab["pair_ratio_generate"]), 3)
            if _get(ab, "pair_ratio_generate") else None,
            "imp_encode_ms": med(_get(ask, "image_encode_ms")),  # imp ask: the process's only encode
            "imp_encode_warm_ms": med(_get(eng, "encode_ms")),
            "stock_encode_ms": med(_get(llv, "encode_ms_log")),
            "encode_ratio_vs_stock": ratio(_get(ask, "image_encode_ms"), _get(llv, "encode_ms_log")),
            "encode_warm_ratio_vs_stock": ratio(_get(eng, "encode_ms"), _get(llv, "encode_ms_log")),
            "imp_prompt_tok_s": med(_get(ask, "prompt_tok_s")),
            "stock_prompt_tok_s": med(_get(llv, "prompt_tok_s")),
            "prompt_ratio_vs_stock": ratio(_get(ask, "prompt_tok_s"), _get(llv, "prompt_tok_s")),
            # answer latency without model load: encode + prompt + first token
            "imp_ttft_noload_ms": (med(_get(ask, "ttft_internal_ms")) - med(_get(ask, "load_ms")))
            if _get(ask, "ttft_internal_ms") and _get(ask, "load_ms") else None,
            "stock_ttft_noload_ms": med(_get(llv, "first_token_ms")),
            "imp_ttft_wall_s": med(_get(ask, "ttft_wall_s")),
            "imp_load_ms": med(_get(ask, "load_ms")),
            "stock_load_ms": _get(llv, "load_ms"),
            "imp_peak_rss": med(_get(ask, "peak_rss")),
            "stock_peak_rss": _get(llv, "process", "peak_rss"),
            "text_tensor_bytes": tb,
            "ceiling_tok_s": ceiling,
            "fraction_of_ceiling": round(imp_gen / ceiling, 3) if imp_gen and ceiling else None,
            "stock_fraction_of_ceiling": round(stock_gen / ceiling, 3) if ceiling and stock_gen else None,
        }
        row["ttft_noload_ratio_vs_stock"] = ratio(row["imp_ttft_noload_ms"], row["stock_ttft_noload_ms"])
        tf = res.get("transformers") or {}
        row["gen_speedup_vs_transformers"] = ratio(imp_gen, _get(tf, "gen_tok_s"))
        row["encode_speedup_vs_transformers"] = ratio(_get(tf, "encode_ms"), _get(ask, "image_encode_ms"))
        row["ttft_speedup_vs_transformers"] = ratio(_get(tf, "first_token_ms"), row["imp_ttft_noload_ms"])
        row["rss_vs_transformers"] = ratio(row["imp_peak_rss"], _get(tf, "process", "peak_rss"))
        d["per_quant"][q] = row

        def target(name, value, op, limit):
            ok = None if value is None else (value >= limit if op == ">=" else value <= limit)
            d["targets"].append({"target": name, "value": value, "op": op, "limit": limit, "met": ok})

        target(f"{q}: generation tok/s vs stock handler", row["gen_ratio_vs_stock"], ">=", 0.95)
        target(f"{q}: image encode time vs stock handler (imp ask, one-shot)", row["encode_ratio_vs_stock"], "<=", 1.05)
        target(f"{q}: image encode time vs stock handler (warm, in-process)", row["encode_warm_ratio_vs_stock"], "<=", 1.05)
    help_s = med(res.get("help_s"))
    d["targets"].append({"target": "imp --help wall time (s)", "value": help_s, "op": "<", "limit": 0.3,
                         "met": None if help_s is None else help_s < 0.3})
    for q, c in (res.get("convert") or {}).items():
        v = med(c.get("peak_rss"))
        d["targets"].append({"target": f"imp convert -q {q}: peak RSS (GB)", "value": v / GB if v else None,
                             "op": "<", "limit": 2.5, "met": None if v is None else v / GB < 2.5})
    return d


def _fmt(s, scale: float = 1.0, digits: int = 1, unit: str = "") -> str:
    if s is None:
        return "n/a"
    if isinstance(s, dict):
        m, lo, hi = s["median"] * scale, s["min"] * scale, s["max"] * scale
        if s["n"] > 1 and hi != lo:
            return f"{m:,.{digits}f}{unit} ({lo:,.{digits}f}–{hi:,.{digits}f})"
        return f"{m:,.{digits}f}{unit}"
    return f"{s * scale:,.{digits}f}{unit}"


def _r(x) -> str:
    return "n/a" if x is None else f"{x:.2f}×"


def report_markdown(res: dict, quants: list[str], raw_name: str) -> str:
    m, s, d = res["machine"], res["settings"], res["derived"]
    L = []
    L.append(f"# imp benchmark — {m['date']}")
    L.append("")
    L.append(f"Machine: {m['cpu_model']} ({', '.join(m['simd'])}), {m['logical_cpus']} logical CPUs / "
             f"{m['physical_cores']} cores, {m['threads_used']} threads used, {m['ram_bytes'] / 2**30:.0f} GiB RAM, "
             f"{m['os']}; Python {m['python']}, llama-cpp-python {m['llama_cpp_python']}, torch {m['torch']}, "
             f"transformers {m['transformers']}.  ")
    L.append(f"Model: synthetic full-size Imp-3B ({s['size']} px, real shapes, random weights), "
             f"Q4_K_M {res['model']['text']['Q4_K_M']['file_bytes'] / GB:.2f} GB, "
             f"Q8_0 {res['model']['text']['Q8_0']['file_bytes'] / GB:.2f} GB, "
             f"F16 {res['model']['text']['F16']['file_bytes'] / GB:.2f} GB text + "
             f"{res['model']['mmproj_bytes'] / GB:.2f} GB F16 mmproj.  ")
    L.append(f"Each figure: median (min–max) of {s['runs']} runs ({s.get('convert_runs', s['runs'])} per conversion); "
             f"{s['tokens']} generated tokens per run "
             f"({s['tf_tokens']} for transformers); total time {res['elapsed_s'] / 60:.1f} min. Raw numbers: `{raw_name}`.")
    c = res.get("contention") or {}
    if c.get("max_foreign_cpu_share") is not None:
        worst = sorted(c["foreign_cpu_share"].items(), key=lambda kv: -kv[1])[:3]
        L.append(f"Other processes on the machine used at most {c['max_foreign_cpu_share']:.0%} of the CPUs during a "
                 f"measurement (worst: {', '.join(f'{k} {v:.0%}' for k, v in worst)}); each measurement first waited "
                 f"for the machine to go idle (it had to wait {len(c.get('quiet_waits') or [])} times).")
    if res["model"].get("workaround"):
        L.append("")
        L.append(f"> **Workaround in effect:** {res['model']['workaround']}.")
    L.append("")

    L.append("## Targets")
    L.append("")
    L.append("| target | measured | required | met |")
    L.append("|---|---|---|---|")
    for t in d["targets"]:
        v = t["value"]
        val = "n/a" if v is None else (f"{v:.3f}" if "vs" in t["target"] else f"{v:.2f}")
        L.append(f"| {t['target']} | {val} | {t['op']} {t['limit']} | "
                 f"{'yes' if t['met'] else ('no' if t['met'] is False else 'n/a')} |")
    L.append("")

    tf = res.get("transformers") or {}

    def faster(x, what="faster"):
        return "n/a" if x is None else f"{x:.1f}× {what}"

    for q in quants:
        ask, eng, llv, row = res["ask"].get(q, {}), res["engine"].get(q, {}), res["llava"].get(q, {}), d["per_quant"][q]
        L.append(f"## {q} text + F16 mmproj: imp against the baselines")
        L.append("")
        L.append("imp ÷ stock: for times lower is better, for rates higher is better.")
        L.append("")
        L.append("| figure | imp | stock Llava15ChatHandler | imp ÷ stock | transformers f32 | imp vs transformers |")
        L.append("|---|---|---|---|---|---|")
        L.append(f"| image encode (729 tokens), s: `imp ask`'s one encode vs the stock per-call encode "
                 f"| {_fmt(_get(ask, 'image_encode_ms'), 0.001, 2)} | {_fmt(_get(llv, 'encode_ms_log'), 0.001, 2)} "
                 f"| {_r(row['encode_ratio_vs_stock'])} | {_fmt(_get(tf, 'encode_ms'), 0.001, 2)} "
                 f"| {faster(row['encode_speedup_vs_transformers'])} |")
        L.append(f"| image encode, warm (a later encode in the same process), s | {_fmt(_get(eng, 'encode_ms'), 0.001, 2)} "
                 f"| {_fmt(_get(llv, 'encode_ms_log'), 0.001, 2)} | {_r(row['encode_warm_ratio_vs_stock'])} "
                 f"| {_fmt(_get(tf, 'encode_ms'), 0.001, 2)} | {faster(ratio(_get(tf, 'encode_ms'), _get(eng, 'encode_ms')))} |")
        L.append(f"| prompt eval ({int(med(_get(ask, 'prompt_tokens')) or 0)} tokens: text + image), tokens/s "
                 f"| {_fmt(_get(ask, 'prompt_tok_s'))} | {_fmt(_get(llv, 'prompt_tok_s'))} | {_r(row['prompt_ratio_vs_stock'])} "
                 f"| {_fmt(_get(tf, 'prompt_tok_s'))} | {faster(ratio(_get(ask, 'prompt_tok_s'), _get(tf, 'prompt_tok_s')))} |")
        ab = (res.get("ab") or {}).get(q) or {}
        if _get(ab, "pair_ratio"):
            L.append(f"| **generation ({s['tokens']} tokens), tokens/s: interleaved in one process, "
                     f"{ab['pair_ratio']['n']} rounds; ratio = median of per-round ratios** "
                     f"| **{_fmt(ab[ab.get('headline', 'imp_loop')], digits=2)}** | {_fmt(ab['stock'], digits=2)} "
                     f"| **{_r(row['gen_ratio_vs_stock'])}** (rounds {ab['pair_ratio']['min']:.2f}–{ab['pair_ratio']['max']:.2f}) "
                     f"| {_fmt(_get(tf, 'gen_tok_s'), digits=2)} | {faster(row['gen_speedup_vs_transformers'])} |")
        L.append(f"| generation, tokens/s: separate processes, minutes apart "
                 f"| {_fmt(_get(eng, 'gen_tok_s'), digits=2)} | {_fmt(_get(llv, 'gen_tok_s_wall'), digits=2)} "
                 f"| {_r(row['gen_ratio_vs_stock_separate_processes'])} | | |")
        L.append(f"| first token after load (encode + prompt + 1st token), s "
                 f"| {_fmt(row['imp_ttft_noload_ms'], 0.001, 2)} | {_fmt(_get(llv, 'first_token_ms'), 0.001, 2)} "
                 f"| {_r(row['ttft_noload_ratio_vs_stock'])} | {_fmt(_get(tf, 'first_token_ms'), 0.001, 2)} "
                 f"| {faster(row['ttft_speedup_vs_transformers'])} |")
        L.append(f"| model load, s (page cache warm) | {_fmt(_get(ask, 'load_ms'), 0.001, 2)} "
                 f"| {_fmt(_get(llv, 'load_ms'), 0.001, 2)} (incl. mtmd's warm-up) "
                 f"| {_r(ratio(_get(ask, 'load_ms'), _get(llv, 'load_ms')))} | {_fmt(_get(tf, 'load_ms'), 0.001, 1)} | |")
        L.append(f"| `imp ask` from launch to the first answer byte, s | {_fmt(_get(ask, 'ttft_wall_s'), digits=2)} | | | | |")
        L.append(f"| peak RSS, GB | {_fmt(_get(ask, 'peak_rss'), 1 / GB, 2)} | {_fmt(_get(llv, 'process', 'peak_rss'), 1 / GB, 2)} "
                 f"| {_r(ratio(row['imp_peak_rss'], row['stock_peak_rss']))} | {_fmt(_get(tf, 'process', 'peak_rss'), 1 / GB, 2)} "
                 f"| {faster(ratio(_get(tf, 'process', 'peak_rss'), row['imp_peak_rss']), 'less memory')} |")
        L.append(f"| generation ceiling: bandwidth ÷ {row['text_tensor_bytes'] / GB:.2f} GB of weights, tokens/s "
                 f"| {_fmt(row['ceiling_tok_s'], digits=1)} | {_fmt(row['ceiling_tok_s'], digits=1)} | | | |")
        L.append(f"| share of that ceiling reached | {_fmt(row['fraction_of_ceiling'], 100, 0, '%')} "
                 f"| {_fmt(row['stock_fraction_of_ceiling'], 100, 0, '%')} | | | |")
        if row["imp_gen_tok_s"]:
            L.append(f"| weights streamed during generation (tokens/s × weight bytes), GB/s "
                     f"| {row['imp_gen_tok_s'] * row['text_tensor_bytes'] / GB:.1f} "
                     f"| {(row['stock_gen_tok_s'] or 0) * row['text_tensor_bytes'] / GB:.1f} | | | |")
        L.append("")

    conv = res.get("convert") or {}
    if conv:
        L.append("## `imp convert` (full-size 3B checkpoint, float16 safetensors)")
        L.append("")
        L.append("| output | wall time, s | peak RSS, GB | of which anonymous, GB | text GGUF, GB |")
        L.append("|---|---|---|---|---|")
        for q, c in conv.items():
            if "error" in c:
                L.append(f"| {q} | failed: {c['error'][:80]} | | | |")
                continue
            L.append(f"| {q} + F16 mmproj | {_fmt(c['wall_s'], digits=1)} | {_fmt(c['peak_rss'], 1 / GB, 2)} "
                     f"| {_fmt(c['peak_anon'], 1 / GB, 2)} | {(c.get('text_bytes') or 0) / GB:.2f} |")
        L.append("")
        L.append("Peak RSS is the kernel's high-water mark for the process (`wait4` ru_maxrss); it counts pages "
                 "of memory-mapped input files that are resident, which the kernel can drop at will. "
                 "The anonymous part (sampled from /proc every 50 ms) is the memory the converter really holds.")
        L.append("")

    L.append("## Other figures")
    L.append("")
    if res.get("help_s"):
        L.append(f"- `imp --help`: {_fmt(res['help_s'], 1000, 0, ' ms')} (median of 10, after one warm-up call).")
    bw = res.get("bandwidth") or {}
    if bw.get("bandwidth_gbs"):
        L.append(f"- Memory read bandwidth: {bw['bandwidth_gbs']:.1f} GB/s (best of 5, {bw['method']}; all: "
                 + ", ".join(f"{k} {v} GB/s" for k, v in bw["best_gbs"].items()) + ").")
    for q in quants:
        ab = (res.get("ab") or {}).get(q) or {}
        if _get(ab, "imp_loop") and ab.get("headline") == "imp_generate":
            L.append(f"- {q}, interleaved rounds, an API-level loop (`Engine.evaluate` + argmax over non-end tokens) "
                     f"instead of `Engine.generate`: {_fmt(ab['imp_loop'], digits=2)} tok/s; per-round ratio to stock "
                     f"{_fmt(ab.get('pair_ratio_loop'), digits=3)}.")
        elif _get(ab, "imp_generate"):
            L.append(f"- {q}, interleaved rounds, the product's own `Engine.generate` loop: "
                     f"{_fmt(ab['imp_generate'], digits=2)} tok/s over "
                     f"{', '.join(str(c) for c in sorted(set(ab['tokens']['imp_generate'])))} tokens per round "
                     + ("(it stops at end-of-generation, which these random weights never emitted); "
                        if set(ab['tokens']['imp_generate']) == {s['tokens']} else
                        "(it stops at end-of-generation, so some rounds were shorter); ")
                     + f"per-round ratio to stock "
                     f"{_fmt(ab.get('pair_ratio_generate'), digits=3)}.")
        eng = res["engine"].get(q, {})
        pg = eng.get("product_generate") or []
        if pg:
            L.append(f"- {q}, the product's own `Engine.generate` loop (stops at end-of-generation): "
                     + "; ".join(f"{p['generated_tokens']} tokens ({p['finish_reason']}), "
                                 f"{p['generation_tokens_per_s']} tok/s" for p in pg) + ".")
        ask = res["ask"].get(q, {})
        if ask.get("generation_tok_s"):
            L.append(f"- {q}, `imp ask --stats` generation figure: {_fmt(ask['generation_tok_s'], digits=2)} tok/s "
                     f"over {_fmt(ask.get('generated_tokens'), digits=0)} tokens.")
        llv = res["llava"].get(q, {})
        if llv.get("gen_tok_s_native"):
            L.append(f"- {q}, stock handler, llama.cpp's own eval timer: {_fmt(llv['gen_tok_s_native'], digits=2)} tok/s.")
    L.append("")
    L.append("## How each figure is measured")
    L.append("")
    flags = "".join(" " + f for f in (next(iter(res["ask"].values()), {}) or {}).get("flags") or [])
    ab0 = next(iter((res.get("ab") or {}).values()), {}) or {}
    if ab0.get("headline") == "imp_generate" and ab0.get("ignore_eos"):
        gen_how = ("Generation tokens/s is the product's own loop, `Engine.generate` with `Sampling(ignore_eos=True)` "
                   "(what `imp ask --ignore-eos` runs), so every run generates exactly N tokens; ")
    elif ab0.get("headline") == "imp_generate":
        gen_how = ("Generation tokens/s is the product's own loop, `Engine.generate` (this engine cannot ignore "
                   "end-of-sequence, but these random weights never emitted it, so every run generated N tokens); ")
    else:
        gen_how = ("Generation tokens/s is measured through the Engine API (`evaluate` + `last_logits`) with a greedy "
                   "loop that never picks an end-of-generation token, so every run generates exactly N tokens (this "
                   "engine's `generate` cannot ignore end-of-sequence, and random weights may emit it early); ")
    L.append(f"- **imp**: `imp ask IMAGE QUESTION --model TEXT.gguf -n N --threads T --stats{flags}` run as a fresh process "
             "per run; load, image encode and prompt figures are its `--stats` timings; \"launch to first answer byte\" "
             "is wall clock from spawn to the first non-blank byte on stdout; peak RSS is the child's ru_maxrss. "
             + gen_how +
             "the rate is (N − 1) / time from the first to the last token. The warm encode is the same Engine "
             "encoding the image again. The headline generation figures come from one process holding both imp's "
             "Engine and the stock Llama on the same GGUF, alternating N-token generations (order reversed every "
             "round), because the host's memory bandwidth drifts by more than 5% over minutes; the stock side there "
             "is `Llama.create_completion` on the prompt its handler evaluated, which is what `Llava15ChatHandler` "
             "calls after the image.")
    L.append("- **stock handler**: `llama_cpp.Llama(model_path=TEXT, chat_handler=Llava15ChatHandler(clip_model_path="
             "MMPROJ), n_ctx=4096, n_threads=T)` in one process; `create_chat_completion(..., stream=True, temperature=0, "
             "max_tokens=N)` with `logit_bias` −inf on every end-of-generation token so it also generates exactly N. "
             "Image encode is mtmd's own log line (`image slice encoded in … ms`); prompt time is the call's time until "
             "the handler hands the evaluated prompt to `create_completion`, minus that encode; generation tokens/s is "
             "over the streamed chunks' timestamps, as for imp. It sets `use_gpu=True`, but this build has no GPU "
             "backend, so it runs on the CPU like imp. Its load time includes mtmd's warm-up (a compute-graph reservation, which imp skips: imp pays it inside its first encode).")
    L.append("- **transformers**: tests/oracle.py (PhiForCausalLM + SiglipVisionModel + projector, float32, eager "
             "attention, `torch.set_num_threads(T)`) on the same checkpoint, in its own process; greedy with a KV cache, "
             "end-of-generation tokens excluded. The oracle reads every tensor as float32 before building the float32 "
             "model, which needs over 24 GB: the benchmark makes it read them as stored (float16) and lets "
             "`load_state_dict` cast them, the same model at ~19 GB peak.")
    L.append("- **ceiling**: generation reads every weight once per token, so tokens/s ≤ bandwidth / bytes of the text "
             "GGUF's tensors (this counts the whole token-embedding table, of which one row is read: the true ceiling is a few % higher). "
             "Bandwidth is the best of 5 reductions over a 1.5 GB numpy array; on a shared VM it varies with the other "
             "tenants. A share well under 100% means decoding is compute-bound on these cores, not memory-bound.")
    L.append("- **contention**: before each measurement the benchmark waits (up to --quiet-wait s) until other processes "
             "use < 15% of the CPUs, and measures a run again (--retries) if they took > 10% during it; llama.cpp's "
             "OpenMP threads spin, so a busy neighbour can slow it many times over. Shares are in the JSON.")
    L.append("")
    return "\n".join(L)


def draw_chart(res: dict, quants: list[str], path: Path) -> None:
    from PIL import Image, ImageDraw, ImageFont

    def font(size: int, bold: bool = False):
        name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
        for p in (f"/usr/share/fonts/truetype/dejavu/{name}", name):
            try:
                return ImageFont.truetype(p, size)
            except OSError:
                continue
        return ImageFont.load_default()

    tf = res.get("transformers") or {}
    COL = {"imp": (37, 99, 235), "stock": (234, 88, 12), "tf": (100, 116, 139), "limit": (22, 163, 74)}
    panels = []
    bars = []
    for q in quants:
        ab = (res.get("ab") or {}).get(q) or {}
        bars += [(f"imp {q}", ab.get(ab.get("headline", "imp_loop")) or _get(res, "engine", q, "gen_tok_s"), "imp"),
                 (f"stock {q}", ab.get("stock") or _get(res, "llava", q, "gen_tok_s_wall"), "stock")]
    bars.append(("transformers f32", _get(tf, "gen_tok_s"), "tf"))
    for q in quants:
        bars.append((f"ceiling {q}", res["derived"]["per_quant"][q]["ceiling_tok_s"], "limit"))
    panels.append(("Generation, tokens/s (higher is better)", bars, 1.0, "{:.2f}"))
    bars = []
    for q in quants:
        bars += [(f"imp {q}", _get(res, "ask", q, "image_encode_ms"), "imp")]
    bars += [(f"imp warm {quants[0]}", _get(res, "engine", quants[0], "encode_ms"), "imp"),
             (f"stock {quants[0]}", _get(res, "llava", quants[0], "encode_ms_log"), "stock"),
             ("transformers f32", _get(tf, "encode_ms"), "tf")]
    panels.append(("Image encode, s (lower is better)", bars, 0.001, "{:.2f}"))
    bars = []
    for q in quants:
        row = res["derived"]["per_quant"][q]
        bars += [(f"imp {q}", row["imp_ttft_noload_ms"], "imp"), (f"stock {q}", _get(res, "llava", q, "first_token_ms"), "stock")]
    bars.append(("transformers f32", _get(tf, "first_token_ms"), "tf"))
    panels.append(("First token after load, s (lower is better)", bars, 0.001, "{:.1f}"))
    bars = []
    for q in quants:
        bars += [(f"imp ask {q}", _get(res, "ask", q, "peak_rss"), "imp"),
                 (f"stock {q}", _get(res, "llava", q, "process", "peak_rss"), "stock")]
    bars.append(("transformers f32", _get(tf, "process", "peak_rss"), "tf"))
    for q, c in (res.get("convert") or {}).items():
        bars.append((f"imp convert {q}", c.get("peak_rss"), "imp"))
    panels.append(("Peak RSS, GB (lower is better)", bars, 1 / GB, "{:.1f}"))

    W, PH, PAD = 1400, 0, 30
    row_h, head_h = 34, 50
    heights = [head_h + row_h * len(b) + 20 for _, b, _, _ in panels]
    top = 112
    H = top + sum(heights[i] for i in range(0, len(panels), 2) if True) + PAD
    H = top + max(heights[0], heights[1]) + max(heights[2], heights[3]) + PAD
    img = Image.new("RGB", (W, H), "white")
    dr = ImageDraw.Draw(img)
    m = res["machine"]
    dr.text((PAD, 18), "imp benchmark: synthetic full-size Imp-3B", font=font(26, True), fill="black")
    dr.text((PAD, 54), f"{m['cpu_model']}, {m['threads_used']} threads, llama-cpp-python {m['llama_cpp_python']}, "
                       f"{m['date']}; median of {res['settings']['runs']} runs, whiskers min–max",
            font=font(15), fill=(80, 80, 80))
    fl, fv = font(15), font(14)
    lx = PAD
    for name, kind in (("imp", "imp"), ("llama-cpp-python Llava15ChatHandler", "stock"),
                       ("transformers", "tf"), ("bandwidth ceiling", "limit")):
        dr.rectangle([lx, 84, lx + 14, 98], fill=COL[kind])
        dr.text((lx + 20, 82), name, font=fv, fill="black")
        lx += 28 + int(dr.textlength(name, font=fv))
    pw = (W - 3 * PAD) // 2
    for i, (title, bars, scale, fmt) in enumerate(panels):
        x0 = PAD + (i % 2) * (pw + PAD)
        y0 = top + (0 if i < 2 else max(heights[0], heights[1]))
        dr.text((x0, y0 + 10), title, font=font(18, True), fill="black")
        label_w = 170
        bx0, bx1 = x0 + label_w, x0 + pw - 70
        vals = []
        for _, s, _ in bars:
            if isinstance(s, dict):
                vals.append(s["max"] * scale)
            elif s is not None:
                vals.append(s * scale)
        vmax = max(vals) if vals else 1
        if "RSS" in title:
            vmax = max(vmax, 2.5)
        for j, (label, s, kind) in enumerate(bars):
            y = y0 + head_h + j * row_h
            dr.text((x0, y + 6), label, font=fl, fill="black")
            if s is None:
                dr.text((bx0 + 4, y + 6), "n/a", font=fv, fill=(120, 120, 120))
                continue
            v = (s["median"] if isinstance(s, dict) else s) * scale
            x = bx0 + (bx1 - bx0) * v / vmax
            dr.rectangle([bx0, y + 4, x, y + row_h - 6], fill=COL[kind])
            if isinstance(s, dict) and s["n"] > 1:
                lo, hi = (bx0 + (bx1 - bx0) * s[k] * scale / vmax for k in ("min", "max"))
                yc = y + row_h // 2 - 1
                dr.line([lo, yc, hi, yc], fill="black", width=2)
                dr.line([lo, yc - 6, lo, yc + 6], fill="black", width=2)
                dr.line([hi, yc - 6, hi, yc + 6], fill="black", width=2)
            dr.text((min(x, bx1) + 8 if not isinstance(s, dict) else bx0 + (bx1 - bx0) * s["max"] * scale / vmax + 8, y + 6),
                    fmt.format(v), font=fv, fill="black")
        if "RSS" in title:  # the converter's 2.5 GB requirement
            xl = bx0 + (bx1 - bx0) * 2.5 / vmax
            dr.line([xl, y0 + head_h - 6, xl, y0 + head_h + len(bars) * row_h], fill=(220, 38, 38), width=2)
            dr.text((xl + 4, y0 + head_h - 22), "convert limit 2.5 GB", font=fv, fill=(220, 38, 38))
        dr.line([bx0, y0 + head_h - 4, bx0, y0 + head_h + len(bars) * row_h - 4], fill="black", width=1)
    img.save(path)


if __name__ == "__main__":
    main()
