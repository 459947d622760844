"""The benchmark's report: figures derived from the raw results, the targets, and latest.md.

    python bench/report.py bench/results/<raw>.json      # rewrite latest.md from a raw file
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import GB, med, ratio, summary  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
QUIET_SHARE = 0.10
AFTER_LOAD = ("vision_load_ms", "image_encode_ms", "cache_read_ms", "cache_save_ms", "prompt_ms")
# issue 23's targets: warm ÷ cold launch to first byte per image size (px), loaded -> first token
WARM_OVER_COLD = {384: 0.08, 196: 0.15}
WARM_TTFT_S = 0.5


def ttft_ms(timings: dict) -> float | None:
    """`ttft_ms` (request start to the first answer token, in-process); for raw files from before
    it existed, the sum of the phases after the load plus the old `first_token_ms`."""
    if not timings:
        return None
    if timings.get("ttft_ms") is not None:
        return timings["ttft_ms"]
    return sum(timings.get(k) or 0 for k in (*AFTER_LOAD, "first_token_ms"))


def _col(rows: list, *keys) -> dict | None:
    """summary() of rows[...][keys...] over the rows that have it."""
    vals = []
    for row in rows:
        for k in keys:
            row = row.get(k) if isinstance(row, dict) else None
        vals.append(row)
    return summary(vals)


def derive_size(d: dict) -> dict:
    """Per model size: cold vs warm (issue 8's requirements), the cache entry, and imp against
    llama-mtmd-cli."""
    runs = [r for r in d.get("cold_warm", []) if "error" not in r.get("json", {}).get("cold", {"error": 1})]
    js_cold = [r["json"]["cold"] for r in runs]
    js_warm = [r["json"]["warm"] for r in runs if "error" not in r["json"]["warm"]]
    pl = [r["plain"] for r in d.get("cold_warm", [])
          if "error" not in r["plain"]["cold"] and "error" not in r["plain"]["warm"]]
    out: dict = {
        "cold_first_byte_s": _col([p["cold"] for p in pl], "first_output_s"),
        "cold_wall_s": _col([p["cold"] for p in pl], "wall_s"),
        "cold_cpu_s": _col([p["cold"] for p in pl], "cpu_s"),
        "warm_cpu_s": _col([p["warm"] for p in pl], "cpu_s"),
        "warm_first_byte_s": _col([p["warm"] for p in pl], "first_output_s"),
        "warm_over_cold": summary([p["warm"]["first_output_s"] / p["cold"]["first_output_s"] for p in pl]),
        "cold_json_first_record_s": _col(js_cold, "first_output_s"),
        "warm_cache_status": sorted({w["cache"] for w in js_warm}),
        "cold_cache_status": sorted({c["cache"] for c in js_cold}),
    }
    for name, rows in (("cold", js_cold), ("warm", js_warm)):
        for k in ("load_ms", *AFTER_LOAD, "prompt_tokens", "reused_tokens", "generation_tokens_per_s",
                  "prompt_tokens_per_s"):
            out[f"{name}_{k}"] = _col(rows, "timings", k)
        out[f"{name}_ttft_ms"] = summary([ttft_ms(r["timings"]) for r in rows])
        out[f"{name}_peak_rss"] = _col(rows, "peak_rss")
    out["entry_bytes"] = summary([r["json"]["cache_after_cold"]["bytes"] for r in runs])
    io = d.get("cache_io") or {}
    out["entry_store_ms"], out["entry_load_ms"] = summary(io.get("store_ms", [])), summary(io.get("load_ms", []))
    # the disk write runs in the background; the cold process waits for it after its last record
    out["entry_write_tail_s"] = summary([r["json"]["cold"]["after_answer_s"] - r["json"]["warm"]["after_answer_s"]
                                         for r in runs if "error" not in r["json"]["warm"]])
    native = [r for r in d.get("mtmd_cli", {}).get("runs", []) if "error" not in r]
    out["native_first_byte_s"] = _col(native, "first_output_s")
    out["native_image_encode_ms"] = _col(native, "image_encode_ms")
    out["native_generation_tokens_per_s"] = _col(native, "generation_tokens_per_s")
    out["native_prompt_tokens"] = _col(native, "prompt_tokens")
    out["native_prompt_ms"] = _col(native, "prompt_ms")
    out["native_load_ms"] = _col(native, "load_ms")
    out["native_wall_s"] = _col(native, "wall_s")
    out["native_cpu_s"] = _col(native, "cpu_s")
    out["native_peak_rss"] = _col(native, "peak_rss")
    # runs during which other processes took under QUIET_SHARE of the CPUs: on a shared machine
    # the fairest comparison, when each side has some
    quiet = [p["cold"] for p in pl if p["cold"]["foreign_cpu"] < QUIET_SHARE]
    out["cold_first_byte_quiet_s"] = _col(quiet, "first_output_s")
    out["native_first_byte_quiet_s"] = _col([r for r in native if r["foreign_cpu"] < QUIET_SHARE], "first_output_s")
    out["vs_native_quiet_first_byte"] = ratio(out["cold_first_byte_quiet_s"], out["native_first_byte_quiet_s"])
    out["vs_native"] = {
        "cold_first_byte": ratio(out["cold_first_byte_s"], out["native_first_byte_s"]),
        "cold_wall": ratio(out["cold_wall_s"], out["native_wall_s"]),
        "image_encode": ratio(out["cold_image_encode_ms"], out["native_image_encode_ms"]),
        "generation_rate": ratio(out["cold_generation_tokens_per_s"], out["native_generation_tokens_per_s"]),
        "peak_rss": ratio(out["cold_peak_rss"], out["native_peak_rss"]),
    }
    size = d.get("image_size") or 384
    out["targets"] = [
        _target("warm ÷ cold, launch to first answer byte", med(out["warm_over_cold"]), "<=",
                WARM_OVER_COLD.get(size, 0.15)),
        _target("warm: model loaded to first token (`ttft_ms`), s", _s(out["warm_ttft_ms"]), "<=", WARM_TTFT_S),
    ]
    if native:
        out["targets"] += [
            _target("cold wall, imp ÷ llama-mtmd-cli", out["vs_native"]["cold_wall"], "<=", 0.85),
            _target("cold peak RSS, imp ÷ llama-mtmd-cli", out["vs_native"]["peak_rss"], "<=", 0.8),
            _target("cold launch to first byte, imp ÷ llama-mtmd-cli", out["vs_native"]["cold_first_byte"], "<=", 0.85),
        ]
    return out


def _s(ms) -> float | None:
    v = med(ms)
    return None if v is None else v / 1000


def _target(name: str, value, op: str, limit: float) -> dict:
    met = None if value is None else (value <= limit if op == "<=" else value < limit)
    return {"target": name, "value": value, "op": op, "limit": limit, "met": met}


# `imp serve`'s log line per request, as imp_cli.stats.log_fields writes it:
#   "POST /v1/chat/completions 200 prompt 16 tokens (760 reused), answer 7 tokens (9.1 tok/s), ..., cache hit 900 ms"
# and before it (older raw results): "POST /v1/chat/completions 200 775+32 tokens (0 reused) 21000 ms"
_SERVE_LINE = re.compile(r"^POST \S+ (\d{3}) prompt (\d+) tokens \((\d+) reused\), answer (\d+) tokens.* (\d+) ms")
_OLD_SERVE_LINE = re.compile(r"^POST \S+ (\d{3}) (\d+)\+(\d+) tokens \((\d+) reused\) (\d+) ms")


def serve_log_requests(lines: list[str]) -> list[dict]:
    """The completed requests in `imp serve`'s log, in the order it answered them (prompt_tokens:
    the whole prompt, reused ones included)."""
    out = []
    for line in lines:
        if m := _SERVE_LINE.match(line.strip()):
            status, evaluated, reused, completion, ms = (int(x) for x in m.groups())
            prompt = evaluated + reused
        elif m := _OLD_SERVE_LINE.match(line.strip()):
            status, prompt, completion, reused, ms = (int(x) for x in m.groups())
        else:
            continue
        out.append({"status": status, "prompt_tokens": prompt, "completion_tokens": completion,
                    "reused_tokens": reused, "ms": ms})
    return out


def derive_serve(s: dict) -> dict:
    """Issue 10: the second question's time to first content against the first's, and the
    concurrent clients' requests per minute."""
    first, second = s["first"].get("first_content_s"), s["second"].get("first_content_s")
    burst = [r for c in s.get("clients", []) for r in c if "error" not in r]
    reqs = serve_log_requests(s.get("server_log", []))
    return {"first_ttft_s": first, "second_ttft_s": second,
            "second_over_first": round(second / first, 3) if first and second else None,
            "requests_per_min": s["burst"]["requests_per_min"], "burst_wall_s": s["burst"]["wall_s"],
            "burst_completed": s["burst"]["completed"],
            "burst_requests": s["burst"]["clients"] * s["burst"]["per_client"],
            "burst_ttft_s": summary([r["first_content_s"] for r in burst]),
            "burst_total_s": summary([r["total_s"] for r in burst]),
            "completion_tokens": sum((r.get("usage") or {}).get("completion_tokens", 0) for r in burst),
            "log": reqs}


def derive_tuned(t: dict) -> dict:
    """Issue 14: a cold `imp ask` with the tuned settings against llama-mtmd-cli's defaults."""
    plain = [r["plain"] for r in t["imp"] if "error" not in r["plain"]]
    js = [r["json"] for r in t["imp"] if "error" not in r["json"]]
    native = [r for r in t.get("native", []) if "error" not in r]
    out = {"imp_wall_s": _col(plain, "wall_s"), "imp_first_byte_s": _col(plain, "first_output_s"),
           "imp_peak_rss": _col(plain + js, "peak_rss"), "imp_load_ms": _col(js, "timings", "load_ms"),
           "imp_prompt_ms": _col(js, "timings", "prompt_ms"), "imp_prompt_tokens": _col(js, "timings", "prompt_tokens"),
           "imp_encode_ms": _col(js, "timings", "image_encode_ms"),
           "imp_generation_tokens_per_s": _col(js, "timings", "generation_tokens_per_s"),
           "native_wall_s": _col(native, "wall_s"), "native_first_byte_s": _col(native, "first_output_s"),
           "native_peak_rss": _col(native, "peak_rss"), "native_load_ms": _col(native, "load_ms"),
           "native_prompt_ms": _col(native, "prompt_ms"), "native_prompt_tokens": _col(native, "prompt_tokens"),
           "native_encode_ms": _col(native, "image_encode_ms"),
           "native_generation_tokens_per_s": _col(native, "generation_tokens_per_s")}
    out["ratios"] = {k: ratio(out[f"imp_{k}"], out[f"native_{k}"])
                     for k in ("wall_s", "first_byte_s", "peak_rss", "load_ms", "prompt_ms", "encode_ms",
                               "generation_tokens_per_s")}
    out["targets"] = [_target("cold wall, imp ÷ native", out["ratios"]["wall_s"], "<=", 0.85),
                      _target("peak RSS, imp ÷ native", out["ratios"]["peak_rss"], "<=", 0.8),
                      _target("model load, imp ÷ native", out["ratios"]["load_ms"], "<=", 0.3)]
    return out


def derive(res: dict) -> dict:
    out = {str(size): derive_size(d) for size, d in res.get("sizes", {}).items()}
    if res.get("serve") and "error" not in res["serve"]:
        out["serve"] = derive_serve(res["serve"])
    if res.get("tuned"):
        out["tuned"] = derive_tuned(res["tuned"])
    return out


def add_steps(base: dict, new: dict) -> dict:
    """`base` with the steps `new` measured that `base` lacks (serve, tuned), each section then
    says which run it comes from: ratios are only compared within one run."""
    merged = {k: v for k, v in base.items() if k != "derived"}
    for step in ("serve", "tuned", "batch"):
        if new.get(step):
            merged[step] = new[step]
            merged.setdefault("step_runs", {})[step] = {
                "command": new["command"], "date": new["machine"]["date"], "loadavg": new["machine"]["loadavg"],
                "runs": new["settings"]["runs"], "elapsed_s": new["elapsed_s"],
                "busy_starts": sum(w["load_at_start"] >= new["settings"]["quiet_threshold"]
                                   for w in new.get("quiet_waits", [])),
                "measurements": len(new.get("quiet_waits", []))}
    return merged


# -- markdown --------------------------------------------------------------------------------------
def _f(v, scale: float = 1.0, digits: int = 2, unit: str = "") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, dict):
        m, lo, hi = v["median"] * scale, v["min"] * scale, v["max"] * scale
        spread = f" ({lo:,.{digits}f}–{hi:,.{digits}f})" if v["n"] > 1 and hi != lo else ""
        return f"{m:,.{digits}f}{unit}{spread}"
    return f"{v * scale:,.{digits}f}{unit}"


def _x(v) -> str:
    return "n/a" if v is None else f"{v:.2f}×"


def markdown(res: dict, raw_name: str) -> str:
    m, s, der = res["machine"], res["settings"], res["derived"]
    L = [f"# imp benchmark — {m['date']}", ""]
    L.append(f"Machine: {m['cpu_model']} ({', '.join(m['simd'])}), {m['logical_cpus']} logical CPUs, "
             f"{m['threads_used']} threads used, {m['ram_bytes'] / 2**30:.0f} GiB RAM; llama-cpp-python "
             f"{m['llama-cpp-python']}. Load average at the start: {', '.join(f'{x:.1f}' for x in m['loadavg'])}.  ")
    models = sorted({r.get("model", "Imp-3B (Phi-2 2.7B)") for r in res.get("sizes", {}).values()})
    L.append(f"Model{'s' if len(models) > 1 else ''}: synthetic full-size {', '.join(models)} + SigLIP-so400m "
             f"(real shapes, random weights), {s['quant']} text + F16 mmproj. {s['runs']} run(s) per figure (median, min–max), {s['tokens']} "
             f"generated tokens per answer (`--ignore-eos`), total time {res['elapsed_s'] / 60:.1f} min. "
             f"Raw numbers: `{raw_name}`.")
    if s["runs"] == 1:
        L.append("")
        L.append("> **One run per figure** (`--runs 1`): single runs on a shared machine move by 10–30%.")
    busy = [w for w in res.get("quiet_waits", []) if w["load_at_start"] >= s["quiet_threshold"]]
    L.append("")
    L.append(f"The machine was shared with other developers' test runs. Before each measurement the benchmark "
             f"waited up to {s['quiet_wait_s']:.0f} s for the other processes to use under "
             f"{s['quiet_threshold']:.0%} of the CPUs; {len(busy)} of {len(res.get('quiet_waits', []))} measurements "
             f"started on a busier machine. The share of the CPUs that other processes took during each imp/native "
             f"run is in the JSON (`foreign_cpu`); ratios within this run are what count, absolute figures move "
             f"with the neighbours.")
    L.append("")
    for size in res.get("sizes", {}):
        d = der[size]
        raw = res["sizes"][size]
        L.append(f"## {_heading(size, raw)} ({raw.get('image_tokens', '?')} image tokens)")
        L.append("")
        L.append("| target | measured | required | met |")
        L.append("|---|---|---|---|")
        for t in d["targets"]:
            L.append(f"| {t['target']} | {_f(t['value'], digits=3)} | {t['op']} {t['limit']} | "
                     f"{'yes' if t['met'] else ('no' if t['met'] is False else 'n/a')} |")
        L.append("")
        L.append("A second question about the same image in a new `imp ask` process, same `IMP_HOME`, against "
                 "the first one with an empty prompt cache:")
        L.append("")
        L.append("| | cold (first question) | warm (second question, new process) |")
        L.append("|---|---|---|")
        L.append(f"| launch to first answer byte, s | {_f(d['cold_first_byte_s'])} | {_f(d['warm_first_byte_s'])} |")
        L.append(f"| the process's CPU time (user + system), s | {_f(d['cold_cpu_s'])} | {_f(d['warm_cpu_s'])} |")
        L.append(f"| prompt cache | {', '.join(d['cold_cache_status'])} | {', '.join(d['warm_cache_status'])} |")
        L.append(f"| model load (`load_ms`), s | {_f(d['cold_load_ms'], 1e-3)} | {_f(d['warm_load_ms'], 1e-3)} |")
        L.append(f"| vision tower load, s | {_f(d['cold_vision_load_ms'], 1e-3)} | {_f(d['warm_vision_load_ms'], 1e-3)} |")
        L.append(f"| image encode, s | {_f(d['cold_image_encode_ms'], 1e-3)} | {_f(d['warm_image_encode_ms'], 1e-3)} |")
        L.append(f"| cache read (`cache_read_ms`), s | | {_f(d['warm_cache_read_ms'], 1e-3)} |")
        L.append(f"| prompt evaluated, tokens | {_f(d['cold_prompt_tokens'], digits=0)} | "
                 f"{_f(d['warm_prompt_tokens'], digits=0)} (+{_f(d['warm_reused_tokens'], digits=0)} reused) |")
        L.append(f"| prompt eval, s | {_f(d['cold_prompt_ms'], 1e-3)} | {_f(d['warm_prompt_ms'], 1e-3)} |")
        L.append(f"| **request start to first token** (`ttft_ms`; the model is loaded before), s "
                 f"| {_f(d['cold_ttft_ms'], 1e-3)} | **{_f(d['warm_ttft_ms'], 1e-3)}** |")
        L.append(f"| generation, tokens/s | {_f(d['cold_generation_tokens_per_s'])} | "
                 f"{_f(d['warm_generation_tokens_per_s'])} |")
        L.append(f"| peak RSS, GB | {_f(d['cold_peak_rss'], 1 / GB)} | {_f(d['warm_peak_rss'], 1 / GB)} |")
        L.append("")
        L.append(f"Cache entry: {_f(d['entry_bytes'], 1e-6, 0)} MB. Write: after the answer (off the first byte's "
                 f"path) the cold process copies the prefix's KV state out and writes it (`PromptCache.store` "
                 f"alone, timed on an entry of that size: {_f(d['entry_store_ms'], digits=0)} ms, into the page "
                 f"cache, no fsync); the cold process took {_f(d['entry_write_tail_s'])} s longer than the warm "
                 f"one after its answer (copy + write). Read in the "
                 f"warm process (file, checksum, `llama_state_seq_set_data`): {_f(d['warm_cache_read_ms'], digits=0)} "
                 f"ms (`PromptCache.load` alone: {_f(d['entry_load_ms'], digits=0)} ms).")
        L.append("")
        mt = raw.get("mtmd_cli", {})
        L.append("Against llama.cpp's own `llama-mtmd-cli` (built from the llama.cpp vendored in the same "
                 "llama-cpp-python, run with its defaults on the same GGUF pair and image):")
        L.append("")
        if mt.get("error"):
            L.append(f"> llama-mtmd-cli not available: {mt['error']}")
        else:
            v = d["vs_native"]
            L.append("| | imp (cold) | llama-mtmd-cli | imp ÷ native |")
            L.append("|---|---|---|---|")
            L.append(f"| wall clock, s | {_f(d['cold_wall_s'])} | {_f(d['native_wall_s'])} | {_x(v['cold_wall'])} |")
            L.append(f"| CPU time (user + system), s | {_f(d['cold_cpu_s'])} | {_f(d['native_cpu_s'])} "
                     f"| {_x(ratio(d['cold_cpu_s'], d['native_cpu_s']))} |")
            L.append(f"| launch to first answer byte, s | {_f(d['cold_first_byte_s'])} | {_f(d['native_first_byte_s'])} "
                     f"| {_x(v['cold_first_byte'])} |")
            if d["vs_native_quiet_first_byte"] is not None:
                L.append(f"| … only runs during which other processes took < {QUIET_SHARE:.0%} of the CPUs "
                         f"| {_f(d['cold_first_byte_quiet_s'])} | {_f(d['native_first_byte_quiet_s'])} "
                         f"| {_x(d['vs_native_quiet_first_byte'])} |")
            L.append(f"| image encode, s | {_f(d['cold_image_encode_ms'], 1e-3)} | "
                     f"{_f(d['native_image_encode_ms'], 1e-3)} | {_x(v['image_encode'])} |")
            L.append(f"| generation, tokens/s | {_f(d['cold_generation_tokens_per_s'])} | "
                     f"{_f(d['native_generation_tokens_per_s'])} | {_x(v['generation_rate'])} |")
            L.append(f"| model load, s | {_f(d['cold_load_ms'], 1e-3)} | {_f(d['native_load_ms'], 1e-3)} | |")
            L.append(f"| prompt eval, s (tokens) | {_f(d['cold_prompt_ms'], 1e-3)} ({_f(d['cold_prompt_tokens'], digits=0)}) "
                     f"| {_f(d['native_prompt_ms'], 1e-3)} ({_f(d['native_prompt_tokens'], digits=0)}) | |")
            L.append(f"| peak RSS, GB | {_f(d['cold_peak_rss'], 1 / GB)} | {_f(d['native_peak_rss'], 1 / GB)} "
                     f"| {_x(v['peak_rss'])} |")
        L.append("")
        sess = raw.get("session") or {}
        if sess.get("answers"):
            a1, a2 = sess["answers"][0]["timings"], sess["answers"][-1]["timings"]
            L.append(f"In one process (the Session API, prompt cache off), the second question about the same image "
                     f"evaluates {a2['prompt_tokens']} tokens in {a2['prompt_ms'] / 1000:.2f} s "
                     f"({a2['reused_tokens']} reused) against {a1['prompt_tokens']} tokens in "
                     f"{a1['prompt_ms'] / 1000:.2f} s + {a1['image_encode_ms'] / 1000:.2f} s encode for the first.")
            L.append("")
    L += _serve_md(res) + _tuned_md(res) + _batch_md(res)
    L += _families(res)
    L += _other(res)
    L.append("## How it was run")
    L.append("")
    L.append(f"    {res['command']}")
    L.append("")
    L.append("- imp: `imp ask IMAGE QUESTION --model TEXT --mmproj MMPROJ -n N --threads T --ignore-eos` as a new "
             "process per answer, `IMP_HOME` a fresh folder; cold after `imp cache clear`, warm right after it with "
             "another question. Launch to first answer byte: wall clock from spawn to the first non-blank byte read "
             "from its stdout (plain mode, the answer streams). Phases: the same pair again with `--json` "
             "(its `timings`: load_ms, vision_load_ms, image_encode_ms, cache_read_ms, cache_save_ms, prompt_ms, "
             "ttft_ms, generation_tokens_per_s). Entry size: `imp cache info --json`.")
    L.append("- llama-mtmd-cli: `llama-mtmd-cli -m TEXT --mmproj MMPROJ --image IMAGE -p QUESTION -n N -t T "
             "--chat-template vicuna --ignore-eos -v`: imp's GGUFs carry no chat template and without one it refuses "
             "to run (vicuna is Imp-Phi-2's `USER: … ASSISTANT:` format, which its error message suggests; `phi3` "
             "and `chatml` for the 4B and 2B, their own formats); "
             "--ignore-eos so both sides generate N tokens; -v only makes it log its timings. Everything else is its "
             "default: its sampling, flash attention auto (on), weight repacking, and an mmproj warm-up encode at "
             "start-up, so its image encode figure is a second encode where imp's is the process's first. First "
             "byte as for imp; phases from its log (`load time`, `mtmd batch encoding done in`, `prompt eval time`, "
             "`eval time`).")
    L.append(f"- Threads: {m['threads_used']} for every side. On this shared 2-core machine llama.cpp's OpenMP "
             "threads spin against the other developers' processes: a 196-px `imp ask` took 183 s with 2 threads "
             "and 72 s with 1 in a probe before this run.")
    L.append("")
    return "\n".join(L)


def _heading(key: str, raw: dict) -> str:
    """"384 px" for the 3B (as before the families), "Imp-v1.5-4B (Phi-3-mini 3.8B), 384 px" else."""
    if raw.get("family", "phi2") == "phi2":
        return f"{key} px"
    return f"{raw['model']}, {raw['image_size']} px"


def _families(res: dict) -> list[str]:
    """One row per model at 384 px (issue 12): the same figures side by side, from this one run."""
    der = res.get("derived", {})  # also holds the serve/tuned steps' figures: go by the models
    rows = [(k, raw, der[k]) for k, raw in res.get("sizes", {}).items()
            if k in der and raw.get("image_size", int(k) if k.isdigit() else 0) == 384]
    if len({raw.get("family", "phi2") for _, raw, _ in rows}) < 2:
        return []
    L = ["## The Imp family at 384 px", "",
         "The same measurements on each model, from this run (`imp ask` cold, i.e. with an empty prompt cache):", "",
         "| model | text GGUF, GB | conversion, s | conversion peak RSS, GB | image encode, s | prompt eval, "
         "tokens/s | generation, tokens/s | launch to first answer byte, s | peak RSS, GB | first byte, imp ÷ native |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for _, raw, d in rows:
        conv = _conversion(res, raw)
        rss = conv.get("peak_rss")
        L.append(f"| {raw.get('model', 'Imp-3B (Phi-2 2.7B)')} | {raw['text_bytes'] / GB:.2f} | "
                 f"{_f(conv.get('seconds'), digits=0)} | {_f(rss and rss / GB)} | "
                 f"{_f(d['cold_image_encode_ms'], 1e-3)} | {_f(d['cold_prompt_tokens_per_s'], digits=1)} | "
                 f"{_f(d['cold_generation_tokens_per_s'])} | {_f(d['cold_first_byte_s'])} | "
                 f"{_f(d['cold_peak_rss'], 1 / GB)} | {_x(d['vs_native']['cold_first_byte'])} |")
    L += ["", "Conversion of the float16 checkpoint to the text type + F16 mmproj: `imp convert` in this run (the "
          "`convert` step), else as `bench/synthetic.py` recorded it when it made the model (its marker keeps the "
          "wall time, the converting process's peak RSS and the quantization threads; n/a for a marker written "
          "before they were kept or with another thread count than this run's).", ""]
    return L


def _conversion(res: dict, raw: dict) -> dict:
    """This model's conversion to the run's text type: {"seconds", "peak_rss"} or {}."""
    family, quant = raw.get("family", "phi2"), res["settings"]["quant"]
    for c in (res.get("convert") or {}).values():
        if c.get("family", "phi2") == family and c.get("quant", quant) == quant and "error" not in c:
            return {"seconds": c["wall_s"], "peak_rss": c["peak_rss"]}
    conv = raw.get("conversion") or {}
    return conv if conv.get("threads") == res["settings"].get("threads") else {}


def _run_note(res: dict, step: str) -> str:
    r = (res.get("step_runs") or {}).get(step)
    if not r:
        return ""
    runs = "once" if step == "serve" else f"{r['runs']} run(s)"
    return (f" Measured in a separate run ({r['date']}, {runs}; load average at its start "
            f"{', '.join(f'{x:.1f}' for x in r['loadavg'])}; {r.get('busy_starts', '?')} of "
            f"{r.get('measurements', '?')} measurements started with other processes using over 15% of the "
            f"CPUs): `{r['command']}`.")


def _serve_md(res: dict) -> list[str]:
    s, d = res.get("serve"), res["derived"].get("serve")
    if not s:
        return []
    L = ["## imp serve (384 px)", ""]
    if d is None:
        return L + [f"> failed: {s['error']}", ""]
    L.append("`imp serve` on the same model (one engine, requests answered one at a time in arrival order), "
             "started with a fresh `IMP_HOME` (no `tuning.json` there: the CPU family's default engine settings); "
             "streamed requests with http.client, timed by the client from "
             "sending the request to the first content chunk." + _run_note(res, "serve"))
    L.append("")
    log = d["log"]
    reused = [r["reused_tokens"] for r in log[:2]] if len(log) >= 2 else [None, None]
    L.append("| | first question | second question, same image | second ÷ first |")
    L.append("|---|---|---|---|")
    L.append(f"| time to first token, s | {_f(d['first_ttft_s'])} | {_f(d['second_ttft_s'])} "
             f"| {_x(d['second_over_first'])} |")
    if log[:2]:
        L.append(f"| prompt tokens (of which reused) | {log[0]['prompt_tokens']} ({reused[0]}) | "
                 f"{log[1]['prompt_tokens']} ({reused[1]}) | |")
    L.append("")
    rss = s.get("server_peak_rss")
    L.append(f"{s['burst']['per_client']} questions each from {s['burst']['clients']} clients at once, each about "
             f"its own image (none seen before): {d['burst_completed']} of {d['burst_requests']} requests answered "
             f"in {d['burst_wall_s']:.0f} s, **{d['requests_per_min']:.1f} requests per minute** "
             f"({d['completion_tokens']} tokens generated); time to first token per request "
             f"{_f(d['burst_ttft_s'])} s (it includes waiting in the queue). Server start-up (load to ready) "
             f"{s['startup_s']:.1f} s, server peak RSS {'n/a' if not rss else f'{rss / GB:.2f} GB'}.")
    L.append("")
    return L


def _tuned_md(res: dict) -> list[str]:
    t, d = res.get("tuned"), res["derived"].get("tuned")
    if not t:
        return []
    L = ["## Tuned settings against llama.cpp's defaults (384 px)", ""]
    tune = t.get("tune")
    if tune and "error" not in tune:
        c = tune["choice"]
        L.append(f"`imp tune --rounds {tune['rounds']}` ({tune['wall_s']:.0f} s) in a fresh `IMP_HOME` chose "
                 f"**repack {'on' if c['repack'] else 'off'}, flash attention {'on' if c['flash_attn'] else 'off'}** "
                 f"for {tune['key'].get('tensor_type', '?')} with {tune['key']['threads']} "
                 f"thread(s); its figures (workload: {tune['workload']['prompt_tokens']}-token prompt, "
                 f"{tune['workload']['gen_tokens']} tokens generated at depth {tune['workload']['depth']}):")
        L.append("")
        L.append("| repack | flash attention | load, s | prompt, tok/s | generation, tok/s | estimated ask, s "
                 "| CPU share it got | chosen |")
        L.append("|---|---|---|---|---|---|---|---|")
        for m in tune["measurements"]:
            on = lambda v: "on" if v else "off"  # noqa: E731
            chosen = m["repack"] == c["repack"] and m["flash_attn"] == c["flash_attn"]
            load_s = m["load_ms"] / 1000 if "load_ms" in m else m["load_s"]  # imp tune --json: ms since issue 24
            estimate_s = m["estimate_ms"] / 1000 if "estimate_ms" in m else m["estimate_s"]
            L.append(f"| {on(m['repack'])} | {on(m['flash_attn'])} | {load_s:.2f} | {m['prompt_tokens_per_s']:.1f} "
                     f"| {m['generation_tokens_per_s']:.1f} | {estimate_s:.1f} | {m['cpu_share']:.2f} "
                     f"| {'*' if chosen else ''} |")
        L.append("")
        L.append("`imp ask` then ran with its default `--repack auto --flash-attn auto`, which read that choice.")
    elif tune:
        L.append(f"> imp tune failed: {tune['error']}")
    else:
        L.append(f"No tune in this run: `imp ask` ran with `{t['imp_args']}` (the settings `imp tune` chose on "
                 f"this machine earlier).")
    L.append(_run_note(res, "tuned").strip())
    L.append("")
    L.append("| target | measured | required | met |")
    L.append("|---|---|---|---|")
    for x in d["targets"]:
        L.append(f"| {x['target']} | {_f(x['value'], digits=3)} | {x['op']} {x['limit']} | "
                 f"{'yes' if x['met'] else ('no' if x['met'] is False else 'n/a')} |")
    L.append("")
    r = d["ratios"]
    L.append("| cold, one process each | imp (tuned) | llama-mtmd-cli (defaults) | imp ÷ native |")
    L.append("|---|---|---|---|")
    L.append(f"| wall clock, s | {_f(d['imp_wall_s'])} | {_f(d['native_wall_s'])} | {_x(r['wall_s'])} |")
    L.append(f"| launch to first answer byte, s | {_f(d['imp_first_byte_s'])} | {_f(d['native_first_byte_s'])} "
             f"| {_x(r['first_byte_s'])} |")
    L.append(f"| model load, s | {_f(d['imp_load_ms'], 1e-3)} | {_f(d['native_load_ms'], 1e-3)} | {_x(r['load_ms'])} |")
    L.append(f"| image encode, s | {_f(d['imp_encode_ms'], 1e-3)} | {_f(d['native_encode_ms'], 1e-3)} "
             f"| {_x(r['encode_ms'])} |")
    L.append(f"| prompt eval, s (tokens) | {_f(d['imp_prompt_ms'], 1e-3)} ({_f(d['imp_prompt_tokens'], digits=0)}) "
             f"| {_f(d['native_prompt_ms'], 1e-3)} ({_f(d['native_prompt_tokens'], digits=0)}) | {_x(r['prompt_ms'])} |")
    L.append(f"| generation, tokens/s | {_f(d['imp_generation_tokens_per_s'])} | "
             f"{_f(d['native_generation_tokens_per_s'])} | {_x(r['generation_tokens_per_s'])} |")
    L.append(f"| peak RSS, GB | {_f(d['imp_peak_rss'], 1 / GB)} | {_f(d['native_peak_rss'], 1 / GB)} | {_x(r['peak_rss'])} |")
    L.append("")
    return L


def _batch_md(res: dict) -> list[str]:
    """Issue 18: throughput of a batch through one model, four ways, in one run."""
    b = res.get("batch")
    if not b:
        return []
    runs = b["runs"]
    L = ["## Batches (issue 18)", "",
         f"{b['images']} distinct 640x480 pictures, one question, {b['tokens']} tokens each (--ignore-eos), "
         f"the 196-px 3B, {' '.join(b['engine_args'])}, {b['threads']} threads in all; one run each, in this order "
         "(the machine is shared: 'CPUs busy' is the share of both cores busy during the run, ours included).", "",
         "| how | answers | wall | answers/hour | × naive | peak RSS per process | peak PSS, all processes | CPUs busy |",
         "|---|---|---|---|---|---|---|---|"]
    names = {"one_2": "`imp ask --output`, 1 process × 2 threads", "two_1": "`--jobs 2`, 2 processes × 1 thread",
             "ray_2x1": "Ray Data, 2 actors × 1 thread", "naive": "one `imp ask` per image (shell loop)",
             "cache_write": "`--cache write`, 1 × 2 (4 images)"}
    naive = runs.get("naive", {}).get("answers_per_hour")
    for key, label in names.items():
        r = runs.get(key)
        if not r:
            continue
        if r.get("error"):
            L.append(f"| {label} | failed: {r['error'][:80]} | | | | | | |")
            continue
        per = max((p["peak_rss"] for p in r.get("peak_rss_per_process", [])), default=None)
        ratio = r["answers_per_hour"] / naive if naive and r.get("answers_per_hour") else None
        L.append(f"| {label} | {r.get('answers')} | {r['wall_s']:.0f} s | {r.get('answers_per_hour', 0):.0f} | "
                 f"{_x(ratio)} | {_f(per, 1e-9, 2, ' GB')} | {_f(r.get('peak_pss_total'), 1e-9, 2, ' GB')} | "
                 f"{r.get('cpus_busy', 0):.0%} |")
    ray_run = runs.get("ray_2x1", {})
    if ray_run.get("ray_init_s") is not None:
        L += ["", f"Ray: `ray.init` took {ray_run['ray_init_s']:.1f} s of its wall time; after it, "
              f"{ray_run['answers_per_hour_after_init']:.0f} answers/hour."]
    one = runs.get("one_2", {}).get("timings", {})
    if one:
        L += ["", f"Per image (1 × 2, medians of the records' timings): encode {_f(one.get('image_encode_ms'), 1e-3)} s, "
              f"prompt {_f(one.get('prompt_ms'), 1e-3)} s, generation {_f(one.get('generation_tokens_per_s'), 1, 1)} tok/s."]
    cw = runs.get("cache_write", {}).get("timings", {})
    if b.get("cache_entry_bytes"):
        L += ["", f"Cache policy: with `--cache write` each image writes a {b['cache_entry_bytes'] / 1e6:.0f} MB entry "
              f"and copies the KV state before its answer starts ({_f(cw.get('cache_save_ms'), 1e-3)} s median); "
              "a batch's default (read, never write) saves both per image."]
    rs = b.get("resume_scan") or {}
    if rs.get("seconds") is not None:
        L += ["", f"`--resume` start-up: reading a {rs['lines']:,}-line output ({rs['file_bytes'] / 1e6:.0f} MB) "
              f"took {rs['seconds']:.2f} s (peak RSS of that process {rs['peak_rss'] / 1e6:.0f} MB)."]
    L.append("")
    return L


def _other(res: dict) -> list[str]:
    L = []
    if res.get("help_s"):
        L.append(f"- `imp --help`: {_f(res['help_s'], 1000, 0, ' ms')} (median of 10).")
    for q, c in (res.get("convert") or {}).items():
        if "error" in c:
            L.append(f"- `imp convert -q {q}` failed: {c['error']}")
        else:
            what = "Imp-3B 384-px" if c.get("family", "phi2") == "phi2" else f"{c['family']}"
            L.append(f"- `imp convert -q {c.get('quant', q)}` of the {what} checkpoint: {c['wall_s']:.0f} s, peak RSS "
                     f"{c['peak_rss'] / GB:.2f} GB ({c['peak_anon'] / GB:.2f} GB anonymous).")
    bw = res.get("bandwidth") or {}
    if bw.get("bandwidth_gbs"):
        L.append(f"- Memory read bandwidth: {bw['bandwidth_gbs']:.1f} GB/s (best of 5 numpy sums over 1.5 GB).")
    llv = res.get("llava") or {}
    if llv.get("calls"):
        c = [x for x in llv["calls"] if not x["includes_mtmd_init"]] or llv["calls"]
        L.append(f"- llama-cpp-python's Llava15ChatHandler (384 px): image encode "
                 f"{_f(_col(c, 'image_encode_ms'), 1e-3)} s per call, generation "
                 f"{_f(_col(c, 'generation_tokens_per_s'))} tokens/s, first token {_f(_col(c, 'ttft_ms'), 1e-3)} s "
                 f"after the call.")
    tf = res.get("transformers") or {}
    if tf.get("runs"):
        L.append(f"- transformers ({tf['dtype']}, tests/oracle.py): image encode "
                 f"{_f(_col(tf['runs'], 'image_encode_ms'), 1e-3)} s, generation "
                 f"{_f(_col(tf['runs'], 'generation_tokens_per_s'))} tokens/s, peak RSS "
                 f"{tf['process']['peak_rss'] / GB:.1f} GB.")
    for name in ("llava", "transformers", "bandwidth"):
        if (res.get(name) or {}).get("error"):
            L.append(f"- {name}: failed ({res[name]['error']}).")
    if L:
        L = ["## Other figures", ""] + L + [""]
    return L


def write(res: dict, raw: Path) -> str:
    """The raw JSON (with the derived figures) and latest.md beside it."""
    res["derived"] = derive(res)
    raw.write_text(json.dumps(res, indent=1))
    md = markdown(res, raw.name)
    tmp = raw.parent / "latest.md.tmp"
    tmp.write_text(md)
    tmp.replace(raw.parent / "latest.md")
    return md


if __name__ == "__main__":
    # report.py RAW.json                 rewrite latest.md from a raw file
    # report.py BASE.json NEW.json       BASE plus the serve/tuned steps NEW measured -> NEW-combined.json
    path = Path(sys.argv[1])
    res = json.loads(path.read_text())
    if len(sys.argv) > 2:
        new = Path(sys.argv[2])
        res, path = add_steps(res, json.loads(new.read_text())), new.with_name(new.stem + "-combined.json")
    print(write(res, path))
