"""The architecture-dependent half of the ARM suite: runs on the emulated aarch64 (and, for the x86
reference, on the host). Needs only imp's own dependencies (no torch, no pytest).

  python worker.py convert SRC OUT QUANT         -> converts; prints {"text": ..., "mmproj": ...}
  python worker.py numerics JOBS.json OUT.npz    -> for each job, llama.cpp's numbers on one model
  python worker.py info                          -> what this process runs on (JSON)

A numerics job: {"name", "text", "mmproj", "image", "question", "forced": [ids], "n": int,
"stop": [ids], "repack": bool, "live": [ids] (optional: the rows a margin is taken over)}. For each: the projected image embeddings, the first-step logits,
the teacher-forced top-1 over `forced`, the greedy ids (stopping before a stop id), and whether
which repacked layouts llama.cpp chose (its load log names each repacked weight's).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def info() -> dict:
    import llama_cpp

    from imp_cli import cpuinfo, tune

    cpu = cpuinfo.read()
    return {"machine": cpuinfo.machine(), "model": cpu.model, "level": cpu.arm_level(),
            "hwcaps": sorted(cpuinfo.hwcaps()) if cpu.is_arm else [], "tune_cpu": tune.cpu(),
            "default": tune.family_default(tune.cpu())[1],
            "system_info": llama_cpp.llama_print_system_info().decode()}


def convert(src: str, out: str, quant: str) -> dict:
    from convert.pipeline import convert as run

    r = run(src, Path(out), quant=quant, mmproj_type="F16", threads=1)
    return {"text": str(r.text_path), "mmproj": str(r.mmproj_path), "family": r.family}


def numerics(jobs_path: str, out_path: str) -> None:
    from convert.native import native_log
    from imp_cli.engine import Engine, Tuning
    from imp_cli.images import load_image
    from imp_cli.modelfiles import read_pair
    from imp_cli.session import make_prompt, stage_image

    seen: list[str] = []
    handle = native_log.handle

    def spy(level: int, line: str) -> None:  # every native log line, whether shown or not
        seen.append(line)
        handle(level, line)

    native_log.handle = spy
    results: dict[str, np.ndarray] = {}
    for job in json.loads(Path(jobs_path).read_text()):
        seen.clear()
        name = job["name"]
        pair = read_pair(Path(job["text"]), Path(job["mmproj"]))
        with Engine(pair, n_ctx=1024, threads=1, tuning=Tuning(repack=job["repack"])) as engine:
            staged = stage_image(engine.pair, load_image(job["image"]))
            prompt = make_prompt(engine, staged, job["question"])
            head, tail = prompt.head, prompt.tail
            embd = engine.encode_image(staged.pixels, staged.key)
            engine.evaluate([head, embd, tail])
            first = engine.last_logits().copy()
            forced = job["forced"]
            top1 = []
            for i in range(len(forced)):
                engine.evaluate([head, embd, tail + forced[:i]])
                top1.append(int(np.argmax(engine.last_logits())))
            ids: list[int] = []
            margins: list[float] = []  # top-1 minus top-2 over the live rows, x their std, per step
            live = np.array(job.get("live") or range(engine.n_vocab))
            while len(ids) < job["n"]:
                engine.evaluate([head, embd, tail + ids])
                logits = engine.last_logits()
                tok = int(np.argmax(logits))
                top2 = np.sort(logits[live])[-2:]
                margins.append(float((top2[1] - top2[0]) / logits[live].std()))
                if tok in job["stop"]:
                    break
                ids.append(tok)
            results[f"{name}/greedy_margin"] = np.array(margins, dtype=np.float32)
            results[f"{name}/embd"] = np.asarray(embd.data, dtype=np.float32)
            results[f"{name}/prompt"] = np.array(list(head) + [-1] + list(tail), dtype=np.int64)
        results[f"{name}/first"] = first
        results[f"{name}/top1"] = np.array(top1, dtype=np.int64)
        results[f"{name}/greedy"] = np.array(ids, dtype=np.int64)
        # llama.cpp logs "repack: repack tensor NAME with q4_K_8x8" per repacked weight
        formats = sorted({m for line in seen for m in re.findall(r"repack tensor \S+ with (\S+)", line)})
        results[f"{name}/repacks"] = np.array(formats, dtype=str)
    np.savez(out_path, **results)


def main(argv: list[str]) -> None:
    cmd = argv[0]
    if cmd == "info":
        print(json.dumps(info()))
    elif cmd == "convert":
        print(json.dumps(convert(*argv[1:4])))
    elif cmd == "numerics":
        numerics(argv[1], argv[2])
    else:
        raise SystemExit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
