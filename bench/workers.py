"""Measurements that run inside one Python process, each in a fresh process of its own so that
its peak RSS is its own and no two measurements share the cores:

    session       imp's Session API: a cold answer, then a second question about the same image
                  in the same process (the prefix stays in the KV cache)
    cache_io      the prompt cache's write and read of an entry, timed alone
    llava         llama-cpp-python's stock path: Llama + Llava15ChatHandler, streamed
    transformers  tests/oracle.py (transformers on CPU) on the same checkpoint
    bandwidth     memory read bandwidth, the ceiling of generation speed

`run_worker(kind, args)` starts `python bench/workers.py KIND ARGS_JSON`; the worker prints its
result as one tagged JSON line on stdout.
"""

from __future__ import annotations

import base64
import json
import re
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import GB, ROOT, log, run_measured  # noqa: E402

RESULT_TAG = "@@BENCH_RESULT "


def run_worker(kind: str, args: dict) -> dict:
    r = run_measured([sys.executable, str(Path(__file__).resolve()), kind, json.dumps(args)])
    result = next((json.loads(line[len(RESULT_TAG):]) for line in reversed(r["stdout"].splitlines())
                   if line.startswith(RESULT_TAG)), None)
    if r["rc"] != 0 or result is None:
        tail = "\n".join(r["stderr"].strip().splitlines()[-10:])
        log(f"worker {kind} failed (exit {r['rc']}):\n{tail}")
        return {"error": f"worker exited with {r['rc']}", "stderr_tail": tail}
    result["process"] = {k: r[k] for k in ("wall_s", "peak_rss", "peak_anon", "foreign_cpu", "load_before")}
    return result


# -- imp ---------------------------------------------------------------------------------------------
def worker_session(a: dict) -> dict:
    """Two questions about one image through one Session (prompt cache off): the second reuses
    the [system, image] prefix from the KV cache and evaluates only its own tokens."""
    sys.path.insert(0, str(ROOT))
    from imp_cli.images import load_image
    from imp_cli.modelfiles import read_pair
    from imp_cli.session import Sampling, Session
    from imp_cli.tune import choose

    pair = read_pair(Path(a["text"]), Path(a["mmproj"]))
    t0 = time.perf_counter()
    out: dict = {"answers": []}
    tuning = choose(pair, a["threads"])  # as `imp ask` would run it here
    with Session(pair, threads=a["threads"], ctx=a.get("ctx", 4096), cache=None, tuning=tuning) as session:
        out["session_open_ms"] = (time.perf_counter() - t0) * 1000
        staged = session.stage(load_image(a["image"]))
        for q in a["questions"]:
            stream = session.answer(staged, q, sampling=Sampling(ignore_eos=True), max_tokens=a["tokens"])
            t1 = time.perf_counter()
            first = None
            for _ in stream:
                if first is None:
                    first = time.perf_counter() - t1
            result = stream.result
            out["answers"].append({"question": q, "timings": result.timings, "cache": result.cache,
                                   "reused_tokens": result.reused_tokens,
                                   "first_piece_after_prefill_ms": None if first is None else first * 1000})
    return out


def worker_cache_io(a: dict) -> dict:
    """The prompt cache's own write and read (PromptCache.store / .load: header, checksum, write
    to a temporary name and rename; read back and verify) for an entry of `bytes`, in `folder`,
    outside any answer: the background write `imp ask` does after the prefix, timed alone."""
    import os

    import numpy as np

    sys.path.insert(0, str(ROOT))
    from imp_cli.prompt_cache import PromptCache, entry_key

    payload = np.random.default_rng(0).integers(0, 256, a["bytes"], dtype=np.uint8)
    cache = PromptCache(Path(a["folder"]), budget=4 * a["bytes"])
    layout = {"bench": True}
    out: dict = {"bytes": a["bytes"], "store_ms": [], "load_ms": []}
    for i in range(a["runs"]):
        key = entry_key(bench=i)
        t0 = time.perf_counter()
        assert cache.store(key, {"layout": layout}, payload)
        t1 = time.perf_counter()
        assert cache.load(key, layout) is not None
        t2 = time.perf_counter()
        out["store_ms"].append((t1 - t0) * 1000)
        out["load_ms"].append((t2 - t1) * 1000)
        os.unlink(cache.path(key))
    return out


# -- baselines ---------------------------------------------------------------------------------------
def worker_llava(a: dict) -> dict:
    """llama-cpp-python's Llama + Llava15ChatHandler as its documentation shows it, streaming;
    every call encodes the image again. Encode times are mtmd's own log lines (verbose=True sends
    them to this process's stderr, which the worker captures)."""
    import io
    import os

    import llama_cpp
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    # mtmd writes to fd 2: capture it in a pipe read by a thread, passing it through
    read_fd, write_fd = os.pipe()
    saved = os.dup(2)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    captured = io.BytesIO()

    def pump() -> None:
        while chunk := os.read(read_fd, 65536):
            captured.write(chunk)
            os.write(saved, chunk)

    th = threading.Thread(target=pump, daemon=True)
    th.start()
    t0 = time.perf_counter()
    handler = Llava15ChatHandler(clip_model_path=a["mmproj"], verbose=True)
    llm = llama_cpp.Llama(model_path=a["text"], chat_handler=handler, n_ctx=4096, n_threads=a["threads"],
                          n_threads_batch=a["threads"], n_gpu_layers=0, verbose=True)
    out: dict = {"load_ms": (time.perf_counter() - t0) * 1000, "calls": []}
    url = "data:image/png;base64," + base64.b64encode(Path(a["image"]).read_bytes()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": a["question"]}]}]
    for i in range(a["runs"]):
        mark = captured.tell()
        stamps = []
        t1 = time.perf_counter()
        for chunk in llm.create_chat_completion(messages=messages, max_tokens=a["tokens"], temperature=0.0,
                                                stream=True):
            if chunk["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
        sys.stderr.flush()
        time.sleep(0.2)  # let the pump drain this call's log lines
        text = captured.getvalue()[mark:].decode("utf-8", "replace")
        enc = [int(x) for x in re.findall(r"image slice encoded in (\d+) ms", text)]
        out["calls"].append({
            "includes_mtmd_init": i == 0,  # the handler loads the projector on its first call
            "image_encode_ms": sum(enc) if enc else None,
            "ttft_ms": (stamps[0] - t1) * 1000 if stamps else None,
            "generated_chunks": len(stamps),
            "generation_tokens_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 2 else None,
        })
    llm.close()
    return out


def worker_transformers(a: dict) -> dict:
    """tests/oracle.py's Oracle in the given dtype: encode, first token, and N greedy tokens
    (its public API; the prompt's phases are told apart by running it to 1 and to N tokens)."""
    import torch
    from PIL import Image

    torch.set_num_threads(a["threads"])
    sys.path.insert(0, str(ROOT / "tests"))
    from oracle import Oracle

    t0 = time.perf_counter()
    oracle = Oracle(a["checkpoint"], dtype=getattr(torch, a.get("dtype", "float32")))
    out: dict = {"load_ms": (time.perf_counter() - t0) * 1000, "dtype": a.get("dtype", "float32"), "runs": []}
    image = Image.open(a["image"]).convert("RGB")
    n = a["tokens"]
    for _ in range(a["runs"]):
        t1 = time.perf_counter()
        oracle.image_embeddings(image)
        t2 = time.perf_counter()
        oracle.greedy(image, a["question"], 1, stop_at_eos=False)
        t3 = time.perf_counter()
        oracle.greedy(image, a["question"], n, stop_at_eos=False)
        t4 = time.perf_counter()
        out["runs"].append({"image_encode_ms": (t2 - t1) * 1000, "ttft_ms": (t3 - t2) * 1000,
                            "generation_tokens_per_s": (n - 1) / ((t4 - t3) - (t3 - t2))})
    return out


def worker_bandwidth(a: dict) -> dict:
    """Memory read bandwidth: the best of a few sums over a 1.5 GB array (past every cache), on
    `threads` threads (numpy releases the GIL in reductions)."""
    import numpy as np

    arr = np.ones(int(1.5 * GB) // 4, dtype=np.float32)
    parts = np.array_split(arr, a["threads"])
    best = 0.0
    for _ in range(5):
        ths = [threading.Thread(target=np.sum, args=(p,)) for p in parts]
        t0 = time.perf_counter()
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        best = max(best, arr.nbytes / (time.perf_counter() - t0) / GB)
    return {"bandwidth_gbs": round(best, 2), "array_bytes": arr.nbytes}


WORKERS = {"session": worker_session, "cache_io": worker_cache_io, "llava": worker_llava, "transformers": worker_transformers,
           "bandwidth": worker_bandwidth}

if __name__ == "__main__":
    kind, args = sys.argv[1], json.loads(sys.argv[2])
    result = WORKERS[kind](args)
    sys.stdout.write(RESULT_TAG + json.dumps(result) + "\n")
    sys.stdout.flush()
