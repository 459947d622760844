"""A warm `imp ask` (a prompt-cache hit in a new process) with two checkouts' code, interleaved:
what a change did to the warm answer, measured in one run on the same machine.

    .venv/bin/python bench/warm_ab.py --base ../other-checkout [--size 384] [--runs 5]

One cold answer (this checkout's code) makes the prompt-cache entry (the same bytes either way);
each side then answers once untimed (page cache), then RUNS times in turn, 1 token, 1 thread:
launch to first answer byte, the process's CPU time, peak RSS; medians on stdout and the raw
rows as JSON in bench/results/warm-ab-<size>-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import measure  # noqa: E402
import synthetic  # noqa: E402

QUESTIONS = ("What is in the image? Describe it in detail.", "Which colours dominate this picture?")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, required=True, help="the other checkout (its imp_cli is imported)")
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cache", type=Path, default=BENCH / "cache", help="where bench/run.py made the models")
    ap.add_argument("--home", type=Path, default=Path("/tmp/imp-warm-ab"), help="the IMP_HOME both sides share")
    a = ap.parse_args()
    p = synthetic.paths(a.size, a.cache.resolve())
    text, mmproj = p["Q4_K_M"], p["mmproj"]
    image = a.cache.resolve() / "bench-image.png"
    sides = {"base": str(a.base.resolve()), "this": str(measure.ROOT)}
    measure.QUIET.max_wait_s = 3

    def ask(code: str, question: str) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMP_")}
        env.update(PYTHONPATH=code, IMP_HOME=str(a.home))
        return measure.run_measured([measure.IMP, "ask", str(image), question, "-m", str(text), "--mmproj", str(mmproj),
                                     "-n", "1", "-t", "1", "--ignore-eos"], env=env)

    shutil.rmtree(a.home, ignore_errors=True)
    cold = ask(sides["this"], QUESTIONS[0])
    print(f"cold (this): first byte {cold['first_output_s']:.2f} s, CPU {cold['cpu_s']:.2f} s", flush=True)
    for code in sides.values():
        ask(code, QUESTIONS[1])
    rows: dict = {side: [] for side in sides}
    for i in range(a.runs):
        for side, code in sides.items():
            r = ask(code, QUESTIONS[1])
            rows[side].append({k: r[k] for k in ("first_output_s", "cpu_s", "wall_s", "peak_rss", "foreign_cpu")})
            print(side, rows[side][-1], flush=True)
    for side in sides:
        print(side, {k: round(statistics.median(x[k] for x in rows[side]), 3)
                     for k in ("first_output_s", "cpu_s", "peak_rss", "foreign_cpu")})
    out = BENCH / "results" / f"warm-ab-{a.size}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"machine": measure.machine(1), "sides": sides, "size": a.size, "cold": cold.get("first_output_s"),
                               "rows": rows}, indent=1))
    shutil.rmtree(a.home, ignore_errors=True)


if __name__ == "__main__":
    main()
