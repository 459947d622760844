"""How the benchmark measures: processes (wall clock, launch to first stdout byte, peak RSS),
other processes' share of the CPUs, statistics, and the machine it ran on.

The machine may be shared: before a measurement we wait a bounded time for the other processes to
go quiet, then record how much of the CPUs they took during it. Ratios between figures taken in
the same run are what count; absolute figures move with the neighbours.
"""

from __future__ import annotations

import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GB = 1e9


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- statistics ------------------------------------------------------------------------------------
def summary(values) -> dict | None:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    mid = statistics.median(vals)
    return {"median": mid, "min": min(vals), "max": max(vals), "n": len(vals),
            "values": [round(v, 4) for v in vals]}


def med(s) -> float | None:
    return s["median"] if isinstance(s, dict) else s


def ratio(a, b) -> float | None:
    a, b = med(a), med(b)
    return round(a / b, 3) if a is not None and b else None


# -- the other processes on the machine ------------------------------------------------------------
def cpu_busy_s() -> float:
    """CPU-seconds all CPUs have spent busy since boot (/proc/stat)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0.0
    user, nice, system, idle, iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class Quiet:
    """Before each measurement: wait up to `max_wait_s` for the machine's load (share of all CPUs
    busy, over one second) to fall under `threshold`; every wait and the load measured when it
    ended are recorded, so a report can say how busy the machine was."""

    def __init__(self, max_wait_s: float = 30.0, threshold: float = 0.15):
        self.max_wait_s, self.threshold = max_wait_s, threshold
        self.waits: list[dict] = []

    def wait(self, what: str) -> float | None:
        if self.max_wait_s <= 0:  # not waiting (the tests)
            return None
        n = os.cpu_count() or 1
        t0 = time.monotonic()
        while True:
            b0 = cpu_busy_s()
            time.sleep(1.0)
            load = (cpu_busy_s() - b0) / n
            waited = time.monotonic() - t0
            if load < self.threshold or waited >= self.max_wait_s:
                break
            time.sleep(2.0)
        self.waits.append({"before": what, "waited_s": round(waited, 1), "load_at_start": round(load, 2)})
        if load >= self.threshold:
            log(f"  machine still busy after {waited:.0f} s ({load:.0%} of the CPUs): measuring anyway")
        return load


QUIET = Quiet()


# -- processes -------------------------------------------------------------------------------------
def _rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def run_measured(cmd: list[str], env: dict | None = None, poll_s: float = 0.05) -> dict:
    """Run cmd to completion (after a bounded wait for a quiet machine). Returns rc, wall_s,
    first_output_s (launch to the first non-blank byte on stdout, read as it arrives), cpu_s (the
    child's user + system CPU time: on a busy machine, with one thread, closer to what the
    wall time would be on an idle one than the wall time is), peak_rss
    (the kernel's rusage of exactly this child), peak_anon (sampled), stdout, stderr, and
    foreign_cpu: the share of all CPUs that other processes used meanwhile."""
    load = QUIET.wait(" ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd[:3])))
    err_f = tempfile.TemporaryFile()
    busy0, self0 = cpu_busy_s(), sum(os.times()[:2])
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err_f, stdin=subprocess.DEVNULL, env=env,
                         cwd=str(ROOT))
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
    peak_anon = 0
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        peak_anon = max(peak_anon, _rss_anon(p.pid))
        time.sleep(poll_s)
    wall = time.perf_counter() - t0
    others = (cpu_busy_s() - busy0) - (ru.ru_utime + ru.ru_stime) - (sum(os.times()[:2]) - self0)
    th.join(10)
    p.stdout.close()
    err_f.seek(0)
    stderr = err_f.read().decode("utf-8", "replace")
    err_f.close()
    return {"rc": os.waitstatus_to_exitcode(status), "wall_s": wall, "first_output_s": first[0] if first else None,
            "cpu_s": ru.ru_utime + ru.ru_stime,
            "peak_rss": ru.ru_maxrss * 1024, "peak_anon": peak_anon,
            "stdout": b"".join(chunks).decode("utf-8", "replace"), "stderr": stderr,
            "load_before": load if load is None else round(load, 2),
            "foreign_cpu": round(max(0.0, others) / (wall * (os.cpu_count() or 1)), 3)}


# -- the machine -----------------------------------------------------------------------------------
def machine(threads: int) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    cpu, flags, mem = "?", set(), 0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "?":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass

    def ver(pkg: str) -> str | None:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    return {
        "host": socket.gethostname(), "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "cpu_model": cpu,
        "logical_cpus": os.cpu_count(), "threads_used": threads,
        "simd": [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "asimd") if f in flags],
        "ram_bytes": mem, "os": platform.platform(), "python": platform.python_version(),
        **{k: ver(k) for k in ("llama-cpp-python", "torch", "transformers", "imp")},
        "loadavg": os.getloadavg(),
    }


# -- imp, measured from outside as a user runs it ---------------------------------------------------
IMP = str(Path(sys.executable).parent / "imp")


def imp_env(home: Path | None = None) -> dict:
    """The environment for `imp` processes: this checkout's code first, none of the user's IMP_*
    settings (IMP_CACHE=off would void the warm figure), and its own IMP_HOME when given (the
    prompt cache lives there)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMP_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    if home is not None:
        env["IMP_HOME"] = str(home)
    return env


def imp_help(n: int = 10) -> dict:
    env = imp_env()
    QUIET.wait("imp --help")
    subprocess.run([IMP, "--help"], capture_output=True, env=env)  # the page cache warm
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([IMP, "--help"], capture_output=True, env=env, check=True)
        times.append(time.perf_counter() - t0)
    return summary(times)


def imp_convert(source: Path, quant: str, out_dir: Path, threads: int) -> dict:
    """One `imp convert --json`: wall time, peak RSS (the kernel's high-water mark, which counts
    resident pages of the memory-mapped input) and the anonymous memory it really held."""
    import shutil

    shutil.rmtree(out_dir, ignore_errors=True)
    r = run_measured([IMP, "convert", str(source), "--out", str(out_dir), "--quant", quant, "--force", "--json",
                      "--threads", str(threads), "--name", "bench"], env=imp_env())
    shutil.rmtree(out_dir, ignore_errors=True)
    if r["rc"] != 0:
        return {"error": _tail(r["stderr"])}
    info = json.loads(r["stdout"].strip().splitlines()[-1])
    return {"wall_s": r["wall_s"], "peak_rss": r["peak_rss"], "peak_anon": r["peak_anon"],
            "foreign_cpu": r["foreign_cpu"], "text_bytes": info.get("text_bytes")}


def imp_ask(text: Path, mmproj: Path, image: Path, question: str, tokens: int, threads: int, home: Path,
            as_json: bool, extra: tuple[str, ...] = ()) -> dict:
    """One `imp ask` process, exactly `tokens` generated (--ignore-eos). Plain: the answer streams,
    so the first stdout byte is the first answer byte. --json: one record after the answer, with
    the engine's timings; the process's time after that record is the prompt-cache write it waits
    for (plus the exit itself)."""
    cmd = [IMP, "ask", str(image), question, "--model", str(text), "--mmproj", str(mmproj), "-n", str(tokens),
           "--threads", str(threads), "--ignore-eos", *extra] + (["--json"] if as_json else [])
    r = run_measured(cmd, env=imp_env(home))
    if r["rc"] != 0:
        return {"error": _tail(r["stderr"])}
    row = {k: r[k] for k in ("wall_s", "first_output_s", "cpu_s", "peak_rss", "peak_anon", "foreign_cpu", "load_before")}
    if as_json:
        record = json.loads(r["stdout"].strip().splitlines()[-1])
        usage = record["usage"]  # the record's counts, under the names the report reads them by
        row.update(timings={**record["timings"], "prompt_tokens": usage["evaluated_tokens"],
                            "reused_tokens": usage["reused_tokens"]}, cache=record["cache"],
                   after_answer_s=r["wall_s"] - r["first_output_s"])
    return row


def imp_cache(home: Path, action: str) -> dict | None:
    """`imp cache info --json` (returns its record) or `imp cache clear`."""
    cmd = [IMP, "cache", action] + (["--json"] if action == "info" else ["--yes"])
    r = subprocess.run(cmd, capture_output=True, text=True, env=imp_env(home), check=True)
    return json.loads(r.stdout) if action == "info" else None


def cold_warm(text: Path, mmproj: Path, image: Path, questions: tuple[str, str], tokens: int, threads: int,
              home: Path, extra: tuple[str, ...] = ()) -> dict:
    """Issue 8's figure: the first question about an image in a fresh process with an empty prompt
    cache (cold), then a second question about the same image in a NEW process with the same
    IMP_HOME (warm: the [system, image] prefix comes from the cache). Done twice: --json for the
    engine's timings, plain for launch to the first answer byte as a user sees it."""
    out: dict = {}
    for mode in ("json", "plain"):
        imp_cache(home, "clear")
        log(f"  cold ({mode}) ...")
        cold = imp_ask(text, mmproj, image, questions[0], tokens, threads, home, mode == "json", extra)
        entry = imp_cache(home, "info")
        log(f"  warm ({mode}) ...")
        warm = imp_ask(text, mmproj, image, questions[1], tokens, threads, home, mode == "json", extra)
        out[mode] = {"cold": cold, "warm": warm, "cache_after_cold": entry}
        for k, v in (("cold", cold), ("warm", warm)):
            if "error" in v:
                log(f"  imp ask ({k}, {mode}) failed: {v['error']}")
            else:
                log(f"  {k} {mode}: first byte {v['first_output_s']:.2f} s, wall {v['wall_s']:.1f} s"
                    + (f", cache {v['cache']}" if mode == "json" else "")
                    + (f" (others used {v['foreign_cpu']:.0%} of the CPUs)" if v["foreign_cpu"] > 0.05 else ""))
    return out


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])[-600:]


# -- imp serve, measured from a client -------------------------------------------------------------
_READY = re.compile(r"on http://[^\s]*:(\d+)/v1")


class Server:
    """`imp serve` as a subprocess on 127.0.0.1 and a free port (--port 0, read back from its
    ready line), with its own IMP_HOME; stopped with SIGTERM at the end (its peak RSS from the
    kernel's rusage of exactly this child)."""

    def __init__(self, text: Path, mmproj: Path, tokens: int, threads: int, home: Path, extra=()):
        self.cmd = [IMP, "serve", "--model", str(text), "--mmproj", str(mmproj), "--host", "127.0.0.1",
                    "--port", "0", "-n", str(tokens), "--threads", str(threads), *extra]
        self.env, self.port, self.peak_rss = imp_env(home), None, None

    def __enter__(self) -> "Server":
        QUIET.wait("imp serve")
        self.err = tempfile.TemporaryFile()
        t0 = time.perf_counter()
        self.p = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=self.err, stdin=subprocess.DEVNULL,
                                  env=self.env, cwd=str(ROOT))
        while self.port is None:
            if self.p.poll() is not None or time.perf_counter() - t0 > 600:
                self.stop()
                raise RuntimeError(f"imp serve did not start: {_tail(self.stderr())}")
            found = _READY.search(self.stderr())
            self.port = int(found[1]) if found else None
            time.sleep(0.1)
        self.startup_s = time.perf_counter() - t0
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("GET", "/v1/models")
        self.model_id = json.loads(conn.getresponse().read())["data"][0]["id"]  # requests must name it
        conn.close()
        return self

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read().decode("utf-8", "replace")

    def wait_logged(self, requests: int, timeout_s: float = 10.0) -> None:
        """Until the log has a line for each of `requests` POSTs: it writes one after the response
        has ended, which can be after the client has read it all."""
        t0 = time.perf_counter()
        while self.stderr().count("\nPOST ") < requests and time.perf_counter() - t0 < timeout_s:
            time.sleep(0.1)

    def stop(self) -> None:
        import signal

        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        try:
            _, _, ru = os.wait4(self.p.pid, 0)
            self.peak_rss = ru.ru_maxrss * 1024
        except ChildProcessError:  # already reaped by poll()
            pass
        self.p.returncode = self.p.returncode if self.p.returncode is not None else 0

    def __exit__(self, *exc) -> None:
        self.stop()
        self.log = self.stderr()
        self.err.close()


def sse_contents(lines) -> tuple[list[str], dict | None]:
    """The content pieces and the usage record of an OpenAI chat-completions event stream
    (`data: {...}` lines, `data: [DONE]` last); role-only and empty deltas are not pieces."""
    pieces, usage = [], None
    for line in lines:
        line = line.strip()
        if not line.startswith("data:") or line == "data: [DONE]":
            continue
        obj = json.loads(line[5:])
        usage = obj.get("usage") or usage
        for choice in obj.get("choices", []):
            if choice.get("delta", {}).get("content"):
                pieces.append(choice["delta"]["content"])
    return pieces, usage


def chat_stream(port: int, model: str, image_url: str, question: str, tokens: int) -> dict:
    """One streamed POST /v1/chat/completions with plain http.client: the time from sending the
    request to the first content chunk, the total, and the server's usage record."""
    import http.client

    body = json.dumps({"model": model, "max_tokens": tokens, "stream": True, "temperature": 0,
                       "stream_options": {"include_usage": True},
                       "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                                 {"type": "text", "text": question}]}]})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    first, lines = None, []
    for raw in resp:
        line = raw.decode("utf-8", "replace")
        lines.append(line)
        if first is None and sse_contents([line])[0]:
            first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    conn.close()
    if resp.status != 200:
        return {"error": f"HTTP {resp.status}: {''.join(lines)[:300]}"}
    pieces, usage = sse_contents(lines)
    return {"first_content_s": first, "total_s": total, "pieces": len(pieces), "usage": usage}


def data_url(image: Path) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()


def serve_figures(text: Path, mmproj: Path, images: list[Path], questions: tuple[str, ...], tokens: int,
                  threads: int, home: Path, per_client: int) -> dict:
    """Issue 10's figures from one server: time to first content chunk of a first and then a
    second question about images[0]; then len(images)-1 clients at once, each asking about its
    own image `per_client` questions in turn: requests per minute over the whole burst."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    shutil.rmtree(home, ignore_errors=True)
    out: dict = {}
    with Server(text, mmproj, tokens, threads, home) as srv:
        out["startup_s"] = srv.startup_s
        url = data_url(images[0])
        out["first"] = chat_stream(srv.port, srv.model_id, url, questions[0], tokens)
        log(f"  serve: first question, first content after {out['first'].get('first_content_s')} s")
        out["second"] = chat_stream(srv.port, srv.model_id, url, questions[1], tokens)
        log(f"  serve: second question, first content after {out['second'].get('first_content_s')} s")

        def client(img: Path) -> list[dict]:
            u = data_url(img)
            return [chat_stream(srv.port, srv.model_id, u, questions[i % len(questions)], tokens) for i in range(per_client)]

        clients = images[1:]
        busy0 = cpu_busy_s()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(clients)) as pool:
            out["clients"] = list(pool.map(client, clients))
        wall = time.perf_counter() - t0
        done = sum(1 for c in out["clients"] for r in c if "error" not in r)
        out["burst"] = {"clients": len(clients), "per_client": per_client, "wall_s": wall, "completed": done,
                        "requests_per_min": done / wall * 60,
                        "machine_busy": round((cpu_busy_s() - busy0) / (wall * (os.cpu_count() or 1)), 3)}
        log(f"  serve: {done} requests from {len(clients)} clients in {wall:.0f} s")
        srv.wait_logged(2 + len(clients) * per_client)
    out["server_peak_rss"] = srv.peak_rss
    out["server_log"] = srv.log.strip().splitlines()[-40:]
    return out


def imp_tune(text: Path, mmproj: Path, threads: int, home: Path, rounds: int) -> dict:
    """`imp tune --json` in `home` (it stores its choice there, where `imp ask` then finds it)."""
    r = run_measured([IMP, "tune", "--model", str(text), "--mmproj", str(mmproj), "--threads", str(threads),
                      "--rounds", str(rounds), "--json"], env=imp_env(home))
    if r["rc"] != 0:
        return {"error": _tail(r["stderr"])}
    return {"wall_s": r["wall_s"], "foreign_cpu": r["foreign_cpu"], **json.loads(r["stdout"].strip().splitlines()[-1])}
