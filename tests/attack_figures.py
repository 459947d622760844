"""The figures of docs/performance.md's "imp serve under attack" (issue 21): the attacks of
tests/test_harden.py at full size, each timed, against whichever imp_cli the server imports.
Not part of `make test` (its name does not start with test_): run it by path. To compare two trees (a checkout of the old code in OLD):

    cd OLD && PYTHONPATH=OLD python -m pytest -s NEW/tests/attack_figures.py --rootdir NEW
    cd NEW && PYTHONPATH=NEW python -m pytest -s tests/attack_figures.py

(the server is started with the current folder first on its path, hence the cd). Some cases take
minutes against the old code.
"""
import json
import os
import socket
import threading
import time

import pytest

from helpers import clean_env
from test_harden import Server, data_url, error_code, png_16bit_bomb, raw, tiff_float_bomb, user

def note(line: str) -> None:
    print(f"\nattack figures ({os.getcwd()}): {line}")


@pytest.fixture(scope="module")
def server(converted, tmp_path_factory):
    text, _ = converted("new", "float16", "square")
    s = Server(text, clean_env(tmp_path_factory.mktemp("m")), "--max-body", "45000000")
    yield s
    s.proc.terminate()
    s.proc.wait(60)


def test_health_during_big_body(server):
    for n in (50_000, 100_000, 400_000):
        body = json.dumps({"model": server.model, "messages": [{"role": "user", "content": "x" * 40}] * n}).encode()
        res = {}
        t0 = time.monotonic()
        th = threading.Thread(target=lambda: res.setdefault("r", server.post(body, timeout=900)))
        th.start()
        waits = []
        while th.is_alive():
            t = time.monotonic()
            raw(server.port, "GET", "/health", timeout=600)
            waits.append(time.monotonic() - t)
        th.join()
        note(f"{n} messages ({len(body)/1e6:.1f} MB): request {time.monotonic()-t0:.2f} s -> {res['r'][0]} "
             f"{error_code(res['r'])}; /health max wait {max(waits or [0]):.3f} s over {len(waits)} calls")


def test_bombs_rss(server, photo):
    for name, data, media in [("png16 8000^2", png_16bit_bomb(8000), "image/png"),
                              ("tiff float32 8000^2", tiff_float_bomb(8000), "image/tiff")]:
        before = server.peak_rss()
        t0 = time.monotonic()
        r = server.chat([user("q", data_url(data, media))], timeout=300)
        note(f"{name} ({len(data)/1e3:.0f} KB): {r[0]} {error_code(r)} in {time.monotonic()-t0:.2f} s, "
             f"peak RSS +{(server.peak_rss()-before)/2**20:.0f} MB")


def test_big_stop(server, photo):
    url = data_url(photo.read_bytes())
    for size in (100_000, 300_000):
        payload = json.dumps({"model": server.model, "messages": [user("Tell me.", url)], "max_tokens": 50,
                              "stream": True, "stop": ["z" * size]}).encode()
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
            first = sock.recv(200)
        r = server.chat([user("q", url)], timeout=600)
        note(f"stop string of {size:,} chars, client gone after the first bytes ({first[:12]!r}): next request "
             f"{r[0]} after {time.monotonic()-t0:.2f} s")


def test_big_prompt(server):
    before = server.peak_rss()
    t0 = time.monotonic()
    r = server.chat([user("word " * 8_000_000)], timeout=600)
    note(f"40 MB prompt: {r[0]} {error_code(r)} in {time.monotonic()-t0:.2f} s, peak RSS +{(server.peak_rss()-before)/2**20:.0f} MB")
