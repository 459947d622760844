"""A soak of `imp serve`: many clients for many minutes, then whether the server grew.

    .venv/bin/python bench/soak.py [--model TEXT.gguf] [--minutes 10] [--requests 1000] [--clients 4]
                                   [--json OUT.json]

Without --model the tiny test model is built (tests/factory.py, converted to F16) in a temporary
folder. Several client threads send, in a seeded random mix: questions about new images (random
pixels, never seen before), follow-ups that send the conversation back, streamed and whole answers,
streams the client drops after the first token (a disconnect mid-answer), and malformed requests
(bad JSON, no messages, a broken image, bad numbers) that must get a 4xx. The run lasts at least
--minutes and at least --requests requests.

The server process is sampled every second: resident memory (RSS), open file descriptors and
threads. The first WARMUP of the run warms it up (every kind of request, all clients at once:
thread pools and caches reach their size); then the clients pause, the server is sampled idle
(A); the rest of the run follows; then it is sampled idle again (B). Held to (BOUNDS):
  - no errors besides the intended 4xx (a 5xx, a dropped connection, a wrong status: any is one);
  - B's open file descriptors and threads no more than A's;
  - RSS, like with like, grown by at most rss_growth (2%): idle at the end (B) against idle after
    the warm-up (A), and busy in the run's last fifth against busy in the fifth after the warm-up
    (medians of the samples: a busy sample also holds the requests in flight);
The server's prompt cache gets a small budget (--cache-size) so that it is full, and evicting,
by the end of the warm-up: otherwise the folder's growing index of entries is growth too.
and reports requests served, p50/p95 time to first token (streamed answers, request sent to
first content received) and the samples.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WARMUP = 0.2
BOUNDS = {"rss_growth": 0.02}
QUESTIONS = ["What is in the picture?", "Describe the image.", "What colour dominates?", "Is it outdoors?"]
FOLLOW_UPS = ["And what else?", "Why?", "Say more.", "Is that all?"]


@dataclass
class Sample:
    t: float  # seconds since the start
    rss_kb: int
    fds: int
    threads: int
    idle: str = ""  # "A" / "B" for the idle samples
    rss_anon_kb: int = 0  # of rss_kb: the heap (anonymous memory) ...
    rss_file_kb: int = 0  # ... and mapped files (the model, mapped cache entries)


@dataclass
class Report:
    model: str
    clients: int
    seconds: float = 0.0
    requests: int = 0
    served: int = 0  # 2xx
    intended_4xx: int = 0
    disconnects: int = 0  # streams the client dropped on purpose
    errors: list = field(default_factory=list)  # anything else: (kind, detail)
    ttft_ms: list = field(default_factory=list)  # streamed answers
    kinds: dict = field(default_factory=dict)
    samples: list = field(default_factory=list)
    requests_at_warmup: int = 0

    def summary(self) -> dict:
        idle = {s.idle: s for s in self.samples if s.idle}
        a, b = idle.get("A"), idle.get("B")
        # Like with like: idle at the end against idle after the warm-up, and the busy samples of
        # the run's last fifth against those of the fifth right after the warm-up (medians: a busy
        # sample holds whatever the requests in flight hold, its maximum is one request's spike).
        early = late = None
        if a and b:
            span = b.t - a.t
            busy = [s for s in self.samples if not s.idle and a.t < s.t]
            early = _median([s.rss_kb for s in busy if s.t < a.t + span / 5])
            late = _median([s.rss_kb for s in busy if s.t >= b.t - span / 5])
        q = sorted(self.ttft_ms)
        return {
            "model": self.model, "clients": self.clients, "seconds": round(self.seconds, 1),
            "requests": self.requests, "served": self.served, "intended_4xx": self.intended_4xx,
            "disconnects": self.disconnects, "errors": len(self.errors), "kinds": self.kinds,
            "ttft_p50_ms": round(_median(q), 1) if q else None,
            "ttft_p95_ms": round(q[min(len(q) - 1, int(len(q) * 0.95))], 1) if q else None,
            "idle_A": asdict(a) if a else None, "idle_B": asdict(b) if b else None,
            "rss_idle_growth": round(b.rss_kb / a.rss_kb - 1, 4) if a and b else None,
            "rss_busy_kb": [early, late] if early and late else None,
            "rss_busy_growth": round(late / early - 1, 4) if early and late else None,
            "rss_kb_per_request": (round((b.rss_kb - a.rss_kb) / max(1, self.requests - self.requests_at_warmup), 3)
                                   if a and b else None),
            "fds_max": max((s.fds for s in self.samples), default=None),
            "threads_max": max((s.threads for s in self.samples), default=None),
        }


def _median(values: list) -> float | None:
    """The upper median (a sample that was measured, not a mean of two), or None."""
    return sorted(values)[len(values) // 2] if values else None


def check(report: Report, bounds: dict = BOUNDS) -> list[str]:
    """What the run did wrong (empty: it held)."""
    s = report.summary()
    wrong = [f"{len(report.errors)} unexpected errors, e.g. {report.errors[:3]}"] if report.errors else []
    a, b = s["idle_A"], s["idle_B"]
    if not a or not b:
        return wrong + ["the server was not sampled idle after the warm-up and at the end"]
    if b["fds"] > a["fds"]:
        wrong.append(f"open file descriptors grew: {a['fds']} after the warm-up, {b['fds']} at the end")
    if b["threads"] > a["threads"]:
        wrong.append(f"threads grew: {a['threads']} after the warm-up, {b['threads']} at the end")
    bound = bounds.get("rss_growth")
    if bound is not None and s["rss_idle_growth"] > bound:
        wrong.append(f"idle RSS grew by {s['rss_idle_growth']:.1%} from the warm-up to the end "
                     f"(bound {bound:.0%}): {a['rss_kb']} kB -> {b['rss_kb']} kB")
    if bound is not None and s["rss_busy_growth"] is not None and s["rss_busy_growth"] > bound:
        early, late = s["rss_busy_kb"]
        wrong.append(f"busy RSS grew by {s['rss_busy_growth']:.1%} from the first fifth after the warm-up to the "
                     f"last (bound {bound:.0%}): median {early} kB -> {late} kB")
    per_request = bounds.get("rss_kb_per_request")
    if per_request is not None and s["rss_kb_per_request"] > per_request:
        wrong.append(f"idle RSS grew by {s['rss_kb_per_request']} kB per request after the warm-up "
                     f"(bound {per_request} kB)")
    return wrong


# -- the server ------------------------------------------------------------------------------------
class Server:
    def __init__(self, model: Path, env: dict, *args: str):
        imp = Path(sys.executable).with_name("imp")
        self.proc = subprocess.Popen([str(imp), "serve", "--model", str(model), "--port", "0", *args],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env=env, text=True)
        self.log: list[str] = []
        ready = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.log.append(line)
                if "http://" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(300) or not (m := re.search(r"http://127\.0\.0\.1:(\d+)/v1", "".join(self.log))):
            self.proc.kill()
            raise RuntimeError("imp serve did not start:\n" + "".join(self.log))
        self.port = int(m[1])

    def sample(self, t: float, idle: str = "") -> Sample:
        proc = Path(f"/proc/{self.proc.pid}")
        status = (proc / "status").read_text()
        kb = {k: int(re.search(rf"^{k}:\s+(\d+)", status, re.M)[1]) for k in ("VmRSS", "RssAnon", "RssFile", "Threads")}
        return Sample(round(t, 2), kb["VmRSS"], len(os.listdir(proc / "fd")), kb["Threads"], idle, kb["RssAnon"],
                      kb["RssFile"])

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


# -- the clients -----------------------------------------------------------------------------------
def new_image(rng: random.Random) -> str:
    """A data URL of a small PNG of random pixels: an image the server has never seen."""
    from PIL import Image

    w, h = rng.randint(24, 96), rng.randint(24, 96)
    img = Image.frombytes("RGB", (w, h), bytes(rng.getrandbits(8) for _ in range(w * h * 3)))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user_turn(question: str, image: str | None = None) -> dict:
    if image is None:
        return {"role": "user", "content": question}
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                        {"type": "text", "text": question}]}


class Client:
    KINDS = {"new": 3, "follow_up": 3, "stream": 3, "disconnect": 1, "malformed": 1}

    def __init__(self, n: int, port: int, model: str, report: Report, lock: threading.Lock, seed: int):
        self.n, self.port, self.model, self.report, self.lock = n, port, model, report, lock
        self.rng = random.Random(seed * 1000 + n)
        self.conversation: list[dict] = []
        self.idle = threading.Event()
        self.sent = 0

    def _post(self, body: bytes, stream: bool = False):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        return conn, conn.getresponse()

    def one(self) -> None:
        kinds, weights = zip(*self.KINDS.items())
        # each kind once first (the warm-up sees them all), then the weighted mix
        kind = kinds[(self.sent + self.n) % len(kinds)] if self.sent < len(kinds) else self.rng.choices(kinds, weights)[0]
        self.sent += 1
        if kind == "follow_up" and not self.conversation:
            kind = "new"
        try:
            getattr(self, kind)()
        except Exception as e:  # a dropped connection, a timeout, a bad reply: all errors
            self._error(kind, f"{type(e).__name__}: {e}")
        with self.lock:
            self.report.requests += 1
            self.report.kinds[kind] = self.report.kinds.get(kind, 0) + 1

    def _error(self, kind: str, detail: str) -> None:
        with self.lock:
            self.report.errors.append((kind, detail[:300]))

    def _body(self, messages: list[dict], **extra) -> bytes:
        return json.dumps({"model": self.model, "messages": messages, "max_tokens": self.rng.randint(4, 24),
                           "temperature": 0, **extra}).encode()

    def _answer(self, kind: str, messages: list[dict]) -> str | None:
        conn, r = self._post(self._body(messages))
        try:
            data = r.read()
            if r.status != 200:
                self._error(kind, f"status {r.status}: {data[:200]!r}")
                return None
            with self.lock:
                self.report.served += 1
            return json.loads(data)["choices"][0]["message"]["content"]
        finally:
            conn.close()

    def new(self) -> None:
        messages = [user_turn(self.rng.choice(QUESTIONS), new_image(self.rng))]
        answer = self._answer("new", messages)
        self.conversation = messages + [{"role": "assistant", "content": answer}] if answer is not None else []

    def follow_up(self) -> None:
        messages = self.conversation + [user_turn(self.rng.choice(FOLLOW_UPS))]
        answer = self._answer("follow_up", messages)
        # at most 3 turns, then a new picture
        turns = len(messages) // 2 + 1
        self.conversation = messages + [{"role": "assistant", "content": answer}] if answer is not None and turns < 3 else []

    def stream(self, drop: bool = False) -> None:
        kind = "disconnect" if drop else "stream"
        image = new_image(self.rng) if self.rng.random() < 0.5 else None
        messages = [user_turn(self.rng.choice(QUESTIONS), image)]
        t0 = time.perf_counter()
        body = self._body(messages, stream=True, **({"max_tokens": 400} if drop else {}))
        conn, r = self._post(body)
        try:
            if r.status != 200:
                self._error(kind, f"status {r.status}: {r.read()[:200]!r}")
                return
            first = None
            done = False
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content") and first is None:
                    first = (time.perf_counter() - t0) * 1000
                    if drop:  # gone mid-answer: the socket closes with the answer still streaming
                        conn.sock.shutdown(socket.SHUT_RDWR)
                        with self.lock:
                            self.report.disconnects += 1
                        return
            if not done:
                self._error(kind, "the stream ended without [DONE]")
                return
            with self.lock:
                self.report.served += 1
                if first is not None:
                    self.report.ttft_ms.append(first)
        finally:
            conn.close()

    def disconnect(self) -> None:
        self.stream(drop=True)

    def malformed(self) -> None:
        bad = self.rng.choice([
            b"{not json",
            json.dumps({"model": self.model}).encode(),  # no messages
            json.dumps({"messages": [user_turn("What?", "data:image/png;base64,AAAA")]}).encode(),
            json.dumps({"messages": [user_turn("What?")], "max_tokens": -3}).encode(),
            json.dumps({"messages": [user_turn("What?")], "temperature": "hot"}).encode(),
            json.dumps({"messages": "hello"}).encode(),
        ])
        conn, r = self._post(bad)
        try:
            r.read()
            if 400 <= r.status < 500:
                with self.lock:
                    self.report.intended_4xx += 1
            else:
                self._error("malformed", f"status {r.status} for {bad[:60]!r}")
        finally:
            conn.close()


def soak(model: Path, minutes: float, min_requests: int, clients: int, env: dict, seed: int = 0,
         progress=lambda message: None, serve_args: tuple[str, ...] = ()) -> Report:
    report = Report(str(model), clients)
    lock = threading.Lock()
    server = Server(model, env, *serve_args)
    t0 = time.monotonic()
    duration = minutes * 60
    pause, stop = threading.Event(), threading.Event()
    workers = [Client(n, server.port, model.stem, report, lock, seed) for n in range(clients)]

    def loop(client: Client) -> None:
        while not stop.is_set():
            if pause.is_set():
                client.idle.set()
                time.sleep(0.05)
                continue
            client.idle.clear()
            client.one()
        client.idle.set()

    def wait_idle() -> None:
        for c in workers:
            c.idle.wait(600)
        time.sleep(1.0)  # the server finishes what it was doing (a dropped stream's generation)

    threads = [threading.Thread(target=loop, args=(c,), daemon=True) for c in workers]
    try:
        for t in threads:
            t.start()
        warmed = False
        while True:
            time.sleep(1.0)
            elapsed = time.monotonic() - t0
            report.samples.append(server.sample(elapsed))
            if not warmed and elapsed >= WARMUP * duration:
                pause.set()
                wait_idle()
                report.samples.append(server.sample(time.monotonic() - t0, "A"))
                report.requests_at_warmup = report.requests
                pause.clear()
                warmed = True
                progress(f"warmed up after {report.requests} requests")
            if elapsed >= duration and report.requests >= min_requests:
                break
            if int(elapsed) % 60 == 0:
                progress(f"{elapsed / 60:.0f} min: {report.requests} requests, {len(report.errors)} errors")
        stop.set()
        for t in threads:
            t.join(600)
        time.sleep(1.0)
        report.seconds = time.monotonic() - t0
        report.samples.append(server.sample(report.seconds, "B"))
    finally:
        stop.set()
        rc = server.stop()
    if rc not in (0, -15):
        report.errors.append(("server", f"exit {rc}: {''.join(server.log)[-500:]}"))
    return report


def tiny_model(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    from factory import make_checkpoint

    from convert.pipeline import convert

    ckpt = make_checkpoint(folder / "ckpt")
    return Path(convert(str(ckpt), folder / "gguf", quant="F16").text_path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a text GGUF with its mmproj beside it (default: the tiny test model)")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rss-growth", type=float, default=BOUNDS["rss_growth"])
    ap.add_argument("--threads", type=int, default=0,
                    help="imp serve --threads (0: its default; the tiny model runs with 1)")
    ap.add_argument("--cache-size", help="the server's prompt-cache budget (IMP_CACHE_SIZE; default: 2M for the "
                    "tiny model, ~80 entries, 400M with --model, 5 entries at 196 px): small enough that the "
                    "cache is full, evicting, by the end of the warm-up, as a day-long server's is")
    ap.add_argument("--json", help="write the report (with every sample) here")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from imp_cli.errors import ImpError
    from imp_cli.prompt_cache import parse_size

    try:
        parse_size(a.cache_size or "0")  # the server would refuse it only after the model is built
    except ImpError as e:
        ap.error(f"--cache-size: {e}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a terminated soak stops its server too
    with tempfile.TemporaryDirectory(prefix="imp-soak-") as tmp:
        tmp = Path(tmp)
        model = Path(a.model) if a.model else tiny_model(tmp)
        env = {**os.environ, "IMP_HOME": str(tmp / "home"), "PYTHONUNBUFFERED": "1",
               "IMP_CACHE_SIZE": a.cache_size or ("400M" if a.model else "2M")}
        threads = a.threads or (0 if a.model else 1)
        report = soak(model, a.minutes, a.requests, a.clients, env, a.seed,
                      progress=lambda m: print(m, file=sys.stderr, flush=True),
                      serve_args=("--threads", str(threads)) if threads else ())
    summary = report.summary()
    wrong = check(report, {"rss_growth": a.rss_growth})
    print(json.dumps({**summary, "bound_rss_growth": a.rss_growth, "failures": wrong}, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps({"summary": summary, "errors": report.errors,
                                            "samples": [asdict(s) for s in report.samples]}, indent=1))
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
