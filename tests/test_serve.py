"""`imp serve` end to end: the installed command started on a free loopback port, spoken to with
the official `openai` client (and raw HTTP for what a client library would not send).

Answers are judged against the oracle (transformers on the same weights) and against `imp ask`;
usage counts against the oracle's own tokenization. All traffic stays on 127.0.0.1; every loop is
bounded.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from helpers import assert_ok, run_imp
from test_ask import _torch_one_thread, eager_to_stop  # noqa: F401 - fixtures: the oracle on one thread; a model that stops at once

QUESTION = "What is in the image?"
QUESTIONS = [QUESTION, "Describe the picture.", "What colour is it?", "Is there a cat?"]
N_TOKENS = 24
KEY = "sk-test-0123456789"
MAX_BODY = 2_000_000


# ---------------------------------------------------------------------------------------- helpers
class Server:
    """`imp serve` as a subprocess on a free port (--port 0: it prints the one it got).
    `command`: what runs instead of `imp_bin serve` (test_harden's patched server)."""

    def __init__(self, imp_bin: str | None, text: Path, env: dict, *args: str, command: list[str] | None = None):
        self.proc = subprocess.Popen([*(command or [imp_bin, "serve"]), "--model", str(text), "--port", "0", *args],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.model = text.stem
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        assert self._ready.wait(180), self.log()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/v1", self.log())
        assert m, self.log()
        self.port = int(m[1])

    def _read(self) -> None:
        for raw in self.proc.stderr:
            with self._changed:
                self.lines.append(raw.decode("utf-8", "replace"))
                self._changed.notify_all()
            if "http://" in self.lines[-1]:
                self._ready.set()
        self._ready.set()

    def log(self) -> str:
        return "".join(self.lines)

    def lines_matching(self, pattern: str) -> list[str]:
        with self._changed:
            return [l for l in self.lines if re.search(pattern, l)]

    def wait_for_line(self, pattern: str, nth: int = 1, timeout: float = 60) -> str:
        """The nth log line matching `pattern` (a request's line comes once it has ended)."""
        with self._changed:
            ok = self._changed.wait_for(lambda: len([l for l in self.lines if re.search(pattern, l)]) >= nth, timeout)
            assert ok, self.log()
            return [l for l in self.lines if re.search(pattern, l)][nth - 1]

    def client(self, key: str = KEY):
        import openai

        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0, timeout=120)

    def stop(self, sig=signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(60)


def raw(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """One plain HTTP request -> (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def as_imp_sees_it(path: Path) -> Image.Image:
    image = Image.open(path)
    image.load()
    return ImageOps.exif_transpose(image).convert("RGB")


def data_url(path: Path, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(path.read_bytes()).decode()}"


def user(question: str, image_url: str | None = None) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": image_url}}] if image_url else []
    return {"role": "user", "content": parts + [{"type": "text", "text": question}]}


def ask_cli(image: Path, question: str, text: Path, env: dict) -> str:
    """`imp ask`'s answer (helpers.run_imp: the suite's one way to run the command)."""
    return assert_ok(run_imp("ask", image, question, "--model", text, "-n", N_TOKENS, env=env)).stdout[:-1]


@pytest.fixture(scope="module")
def servers(imp_bin, converted, env):
    """One server per layout, started on first use; each must stop with exit 0 on SIGTERM."""
    made: dict = {}

    def get(layout: str) -> Server:
        if layout not in made:
            text, _ = converted(layout, "float16", "square")
            args = ("--api-key", KEY, "--allow-remote-images", "--max-body", str(MAX_BODY)) if layout == "new" else ()
            made[layout] = Server(imp_bin, text, env, *args)
        return made[layout]

    yield get
    for server in made.values():
        assert server.stop() == 0, server.log()
        assert server.log().rstrip().endswith("imp serve: stopped"), server.log()


@pytest.fixture(scope="module")
def expected(oracle_for, photo):
    """expected(layout, question, history=()) -> (answer text, answer ids) of the oracle."""
    made: dict = {}
    image = as_imp_sees_it(photo)

    def get(layout: str, question: str, history: tuple = ()):
        key = (layout, question, history)
        if key not in made:
            oracle = oracle_for(layout, "float16", "square")
            ids = oracle.greedy(image, question, N_TOKENS, history=history)
            made[key] = (oracle.tokenizer.decode(ids, skip_special_tokens=True).strip(), ids)
        return made[key]

    return get


# ------------------------------------------------------------------------------ correct answers
@pytest.mark.parametrize("layout", ["new", "old"])
def test_answers_equal_imp_ask_and_oracle(servers, converted, oracle_for, expected, photo, imp_bin, env, layout):
    server = servers(layout)
    text, _ = converted(layout, "float16", "square")
    client = server.client()
    messages = [user(QUESTION, data_url(photo))]
    want, ids = expected(layout, QUESTION)
    assert len(want.split()) >= 5  # a real answer: the comparison means something

    reply = client.chat.completions.create(model=server.model, messages=messages, max_tokens=N_TOKENS, temperature=0)
    chunks = list(client.chat.completions.create(model=server.model, messages=messages, max_tokens=N_TOKENS,
                                                 stream=True, stream_options={"include_usage": True}))

    assert reply.choices[0].message.content == want
    assert reply.choices[0].message.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert ask_cli(photo, QUESTION, text, env) == want
    finish = "length" if len(ids) == N_TOKENS else "stop"
    assert reply.choices[0].finish_reason == finish
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
    # usage: the prompt as the oracle tokenizes it (+ the image's tokens), the answer's tokens
    oracle = oracle_for(layout, "float16", "square")
    before, after = oracle.prompt_ids(QUESTION)
    n_image = oracle.image_embeddings(as_imp_sees_it(photo)).shape[0]
    for usage in (reply.usage, chunks[-1].usage):
        assert (usage.prompt_tokens, usage.completion_tokens) == (len(before) + n_image + len(after), len(ids))
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert chunks[-1].choices == []  # include_usage: the last chunk carries only the usage


def test_two_turn_conversation_equals_oracle(servers, expected, photo):
    server = servers("new")
    first, _ = expected("new", QUESTION)
    second = "And what else?"
    want, _ = expected("new", second, ((QUESTION, first),))
    assert len(want.split()) >= 5
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(photo)}},
                                             {"type": "text", "text": QUESTION}]},
                {"role": "assistant", "content": first},
                {"role": "user", "content": second}]
    reply = server.client().chat.completions.create(model=server.model, messages=messages, max_tokens=N_TOKENS)
    assert reply.choices[0].message.content == want


def test_second_question_reuses_the_image_prefix(servers, oracle_for, photo):
    """The prompt cache: a second question about the same image evaluates only its own tokens."""
    server = servers("new")
    client = server.client()
    done = len(server.lines_matching(r"^POST /v1/chat/completions 200 "))
    for question in ("First question about it?", "Second question about it?"):
        client.chat.completions.create(model=server.model, messages=[user(question, data_url(photo))], max_tokens=2)
    line = server.wait_for_line(r"^POST /v1/chat/completions 200 ", nth=done + 2)
    reused = int(re.search(r"\((\d+) reused\)", line)[1])
    oracle = oracle_for("new", "float16", "square")
    before, _ = oracle.prompt_ids("Second question about it?")
    n_image = oracle.image_embeddings(as_imp_sees_it(photo)).shape[0]
    assert reused >= len(before) + n_image, line


def test_stop_sequences_cut_the_answer(servers, expected, photo):
    server = servers("new")
    want, _ = expected("new", QUESTION)
    stop = want.split()[3]
    cut = want[:want.index(stop)]
    client = server.client()
    messages = [user(QUESTION, data_url(photo))]
    reply = client.chat.completions.create(model=server.model, messages=messages, max_tokens=N_TOKENS, stop=[stop])
    streamed = list(client.chat.completions.create(model=server.model, messages=messages, max_tokens=N_TOKENS,
                                                   stop=stop, stream=True))
    assert reply.choices[0].message.content == cut
    assert reply.choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cut
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_end_of_turn_finishes_with_stop_and_is_not_counted(imp_bin, eager_to_stop, env, photo):
    """A model whose first token is always `</s>`: an empty answer, finish_reason stop, and the
    end-of-turn token is not in completion_tokens (1 was generated)."""
    server = Server(imp_bin, eager_to_stop, env)
    try:
        client = server.client()
        messages = [user(QUESTION, data_url(photo))]
        reply = client.chat.completions.create(model=server.model, messages=messages, max_tokens=12)
        chunks = list(client.chat.completions.create(model=server.model, messages=messages, max_tokens=12,
                                                     stream=True, stream_options={"include_usage": True}))
        assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == ("", "stop")
        assert reply.usage.completion_tokens == 0 and chunks[-1].usage.completion_tokens == 0
        assert [c.choices[0].finish_reason for c in chunks if c.choices] == [None, "stop"]
    finally:
        assert server.stop() == 0, server.log()


def test_models_endpoints(servers):
    import openai

    server = servers("new")
    client = server.client()
    assert [m.id for m in client.models.list().data] == [server.model]
    assert client.models.retrieve(server.model).id == server.model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    status, _, body = raw(server.port, "GET", "/health")  # open without the key, by design
    assert (status, json.loads(body)) == (200, {"status": "ok"})


# ---------------------------------------------------------------------------------- load, faults
def test_eight_concurrent_clients_get_their_answers(servers, expected, photo):
    server = servers("new")
    url = data_url(photo)
    results: dict = {}

    def one(i: int) -> None:
        question = QUESTIONS[i % len(QUESTIONS)]
        client = server.client()
        if i % 2:
            stream = client.chat.completions.create(model=server.model, messages=[user(question, url)],
                                                    max_tokens=N_TOKENS, stream=True)
            results[i] = "".join(c.choices[0].delta.content or "" for c in stream)
        else:
            reply = client.chat.completions.create(model=server.model, messages=[user(question, url)],
                                                   max_tokens=N_TOKENS)
            results[i] = reply.choices[0].message.content

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert {i: results.get(i) for i in range(8)} == {i: expected("new", QUESTIONS[i % len(QUESTIONS)])[0]
                                                       for i in range(8)}


def _open_stream(port: int, body: dict, key: str | None = KEY) -> socket.socket:
    """Start a streaming request by hand and read up to its first content event."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"{auth}Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    seen = b""
    for _ in range(1000):
        seen += sock.recv(65536)
        if b'"content": "' in seen.split(b"\r\n\r\n", 1)[-1].replace(b'"content": ""', b""):
            break
    assert seen.startswith(b"HTTP/1.1 200"), seen[:200]
    return sock


def test_client_killed_mid_stream_does_not_stall_others(servers, expected, photo):
    """A client that disconnects stops its generation (which would run ~3000 tokens) at once."""
    server = servers("new")
    url = data_url(photo)
    body = {"model": server.model, "messages": [user("Tell me everything.", url)], "max_tokens": 2900, "stream": True}
    sock = _open_stream(server.port, body)
    results: dict = {}

    def one(i: int) -> None:
        reply = server.client().chat.completions.create(model=server.model, messages=[user(QUESTIONS[i], url)],
                                                        max_tokens=N_TOKENS)
        results[i] = reply.choices[0].message.content

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    for t in threads:
        t.join(300)
    assert results == {i: expected("new", QUESTIONS[i])[0] for i in range(3)}
    line = server.wait_for_line(r"\(client gone\)")
    generated = int(re.search(r"answer (\d+) tokens", line)[1])
    assert line.startswith("POST /v1/chat/completions 200 ") and generated < 2900, line


def test_full_queue_gets_503_and_ctrl_c_finishes_the_running_answer(imp_bin, long_context_model, env, photo,
                                                                     expected):
    """--max-queue 0: while one answer runs, the next request is refused, not queued. The running
    answer may take 30000 tokens (a 32k-context copy of the tiny model, same weights): it is
    still running when the second request comes, however slow the machine."""
    server = Server(imp_bin, long_context_model, env, "--max-queue", "0", "--ctx", "32768")
    try:
        url = data_url(photo)
        sock = _open_stream(server.port, {"model": server.model, "messages": [user("Tell me everything.", url)],
                                          "max_tokens": 30000, "stream": True}, key=None)
        body = json.dumps({"model": server.model, "messages": [user(QUESTION, url)], "max_tokens": N_TOKENS})
        status, headers, data = raw(server.port, "POST", "/v1/chat/completions", body.encode())
        assert status == 503 and json.loads(data)["error"]["code"] == "queue_full"
        assert int(headers["retry-after"]) >= 1
        sock.close()
        server.wait_for_line(r"\(client gone\)")
        reply = server.client().chat.completions.create(model=server.model, messages=[user(QUESTION, url)],
                                                        max_tokens=N_TOKENS)
        assert reply.choices[0].message.content == expected("new", QUESTION)[0]

        # Ctrl-C while an answer streams: it is finished, then the server exits 0.
        sock = _open_stream(server.port, {"model": server.model, "messages": [user(QUESTION, url)],
                                          "max_tokens": 300, "stream": True}, key=None)
        server.proc.send_signal(signal.SIGINT)
        rest = b""
        for _ in range(100000):
            data = sock.recv(65536)
            rest += data
            if not data or b"data: [DONE]" in rest:
                break
        sock.close()
        assert b"data: [DONE]" in rest and b'"finish_reason": "length"' in rest
        assert server.proc.wait(60) == 0, server.log()
    finally:
        if server.proc.poll() is None:
            server.stop()


def _hostile_cases(photo: Path, model: str, port: int) -> list[tuple[str, dict | bytes, int, str]]:
    """(name, body or raw bytes, status, error code): each pinned."""
    good_image = data_url(photo)

    def chat(**kw) -> dict:
        return {"model": model, "messages": [user(QUESTION, good_image)], "max_tokens": 4, **kw}

    def with_image(url: str) -> dict:
        return chat(messages=[user(QUESTION, url)])

    text_b64 = base64.b64encode(b"hello, this is not a picture").decode()
    png = photo.read_bytes()
    cases = [
        ("broken JSON", b'{"model": ', 400, "invalid_json"),
        ("empty body", b"", 400, "invalid_json"),
        ("JSON array", b"[1, 2]", 400, "invalid_json"),
        ("JSON nested 100000 deep", b"[" * 100000 + b"]" * 100000, 400, "invalid_json"),
        ("JSON string", b'"hi"', 400, "invalid_json"),
        ("not UTF-8", b"\xff\xfe\x00{", 400, "invalid_json"),
        ("NaN temperature", json.dumps(chat()).replace('"max_tokens": 4', '"temperature": NaN').encode(), 400, "invalid_value"),
        ("no model", {"messages": [user(QUESTION)]}, 400, "missing_required_parameter"),
        ("model a number", chat(model=5), 400, "invalid_type"),
        ("unknown model", chat(model="gpt-4o"), 404, "model_not_found"),
        ("no messages", {"model": model}, 400, "missing_required_parameter"),
        ("messages a string", chat(messages="hi"), 400, "invalid_type"),
        ("messages empty", chat(messages=[]), 400, "invalid_type"),
        ("message a number", chat(messages=[1]), 400, "invalid_type"),
        ("unknown role", chat(messages=[{"role": "robot", "content": "hi"}]), 400, "invalid_value"),
        ("no content", chat(messages=[{"role": "user"}]), 400, "missing_required_parameter"),
        ("content a number", chat(messages=[{"role": "user", "content": 5}]), 400, "invalid_type"),
        ("part a number", chat(messages=[{"role": "user", "content": [5]}]), 400, "invalid_type"),
        ("unknown part type", chat(messages=[{"role": "user", "content": [{"type": "input_audio"}]}]), 400, "invalid_value"),
        ("text part not text", chat(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]), 400, "invalid_type"),
        ("image part without url", chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400, "invalid_type"),
        ("image url a number", with_image(5), 400, "invalid_type"),
        ("image_url a number", chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": 5}]}]), 400, "invalid_type"),
        ("image from the assistant", chat(messages=[user("hi"), {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": good_image}}]}, user("so?")]), 400, "invalid_value"),
        ("image in the system message", chat(messages=[{"role": "system", "content": [{"type": "image_url", "image_url": {"url": good_image}}]}, user("hi")]), 400, "invalid_value"),
        ("assistant first", chat(messages=[{"role": "assistant", "content": "hello"}, user("hi")]), 400, "invalid_value"),
        ("assistant last", chat(messages=[user("hi"), {"role": "assistant", "content": "hello"}]), 400, "invalid_value"),
        ("two images in one message", chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": good_image}}] * 2}]), 400, "too_many_images"),
        ("two images in two turns", chat(messages=[user("a", good_image), {"role": "assistant", "content": "b"}, user("c", good_image)]), 400, "too_many_images"),
        ("bad base64", with_image("data:image/png;base64,iVBOR!!!not-base64"), 400, "invalid_image"),
        ("data URL not base64", with_image("data:image/png,abc"), 400, "invalid_image"),
        ("data URL of text", with_image(f"data:text/plain;base64,{text_b64}"), 400, "invalid_image"),
        ("not an image", with_image(f"data:image/png;base64,{text_b64}"), 400, "invalid_image"),
        ("truncated PNG", with_image("data:image/png;base64," + base64.b64encode(png[:len(png) // 2]).decode()), 400, "invalid_image"),
        ("empty data URL", with_image("data:image/png;base64,"), 400, "invalid_image"),
        ("file URL", with_image("file:///etc/passwd"), 400, "invalid_image"),
        ("loopback URL (SSRF)", with_image(f"http://127.0.0.1:{port}/health"), 400, "invalid_image"),
        ("localhost URL (SSRF)", with_image(f"http://localhost:{port}/health"), 400, "invalid_image"),
        ("private URL (SSRF)", with_image("http://10.0.0.1/cat.png"), 400, "invalid_image"),
        ("metadata URL (SSRF)", with_image("http://169.254.169.254/latest/meta-data/"), 400, "invalid_image"),
        ("IPv6 loopback URL (SSRF)", with_image("http://[::1]/cat.png"), 400, "invalid_image"),
        ("IPv4-mapped loopback URL (SSRF)", with_image("http://[::ffff:127.0.0.1]/cat.png"), 400, "invalid_image"),
        ("unspecified address URL (SSRF)", with_image("http://0.0.0.0/cat.png"), 400, "invalid_image"),
        ("ftp URL", with_image("ftp://127.0.0.1/cat.png"), 400, "invalid_image"),
        ("temperature a string", chat(temperature="hot"), 400, "invalid_type"),
        ("temperature negative", chat(temperature=-1), 400, "invalid_value"),
        ("temperature too high", chat(temperature=3), 400, "invalid_value"),
        ("top_p above 1", chat(top_p=1.5), 400, "invalid_value"),
        ("max_tokens zero", chat(max_tokens=0), 400, "invalid_value"),
        ("max_tokens a string", chat(max_tokens="10"), 400, "invalid_type"),
        ("max_tokens a float", chat(max_tokens=1.5), 400, "invalid_type"),
        ("max_tokens a bool", chat(max_tokens=True), 400, "invalid_type"),
        ("max_completion_tokens negative", chat(max_completion_tokens=-5), 400, "invalid_value"),
        ("seed a string", chat(seed="x"), 400, "invalid_type"),
        ("stream a string", chat(stream="yes"), 400, "invalid_type"),
        ("stream_options a string", chat(stream_options="x"), 400, "invalid_type"),
        ("stop a number", chat(stop=5), 400, "invalid_type"),
        ("five stops", chat(stop=["a", "b", "c", "d", "e"]), 400, "invalid_value"),
        ("n of 2", chat(n=2), 400, "invalid_value"),
        ("prompt over the context", chat(messages=[user("word " * 4000, good_image)]), 400, "context_length_exceeded"),
    ]
    return cases


def test_hostile_requests_get_pinned_errors_and_the_server_lives_on(servers, photo, expected):
    server = servers("new")
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    cases = [(name, body if isinstance(body, bytes) else json.dumps(body).encode(), auth, "POST",
              "/v1/chat/completions", status, code)
             for name, body, status, code in _hostile_cases(photo, server.model, server.port)]
    good = json.dumps({"model": server.model, "messages": [user(QUESTION)], "max_tokens": 2}).encode()
    cases += [
        ("no key", good, {}, "POST", "/v1/chat/completions", 401, "invalid_api_key"),
        ("wrong key", good, {"Authorization": "Bearer sk-wrong"}, "POST", "/v1/chat/completions", 401, "invalid_api_key"),
        ("key prefix only", good, {"Authorization": f"Bearer {KEY[:-1]}"}, "POST", "/v1/chat/completions", 401, "invalid_api_key"),
        ("basic auth", good, {"Authorization": "Basic " + base64.b64encode(f"u:{KEY}".encode()).decode()}, "POST",
         "/v1/chat/completions", 401, "invalid_api_key"),
        ("models without key", None, {}, "GET", "/v1/models", 401, "invalid_api_key"),
        ("body over --max-body", b'{"model": "' + b"x" * (MAX_BODY + 10) + b'"}', auth, "POST", "/v1/chat/completions", 413, "request_too_large"),
        ("GET on chat", None, auth, "GET", "/v1/chat/completions", 405, "method_not_allowed"),
        ("unknown path", b"{}", auth, "POST", "/v1/completions/nothing", 404, "not_found"),
    ]
    assert len(cases) >= 60
    for name, body, headers, method, path, status, code in cases:
        got, got_headers, data = raw(server.port, method, path, body, headers)
        error = json.loads(data)["error"]
        assert (name, got, error["code"]) == (name, status, code), error
        assert got_headers["content-type"] == "application/json" and error["message"] and error["type"]

    # A declared 60 MB body is refused from its header, before any of it is read.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Authorization", f"Bearer {KEY}")
    conn.putheader("Content-Length", str(60 * 2**20))
    conn.endheaders()
    response = conn.getresponse()
    assert (response.status, json.loads(response.read())["error"]["code"]) == (413, "request_too_large")
    conn.close()

    reply = server.client().chat.completions.create(model=server.model, messages=[user(QUESTION, data_url(photo))],
                                                    max_tokens=N_TOKENS)
    assert reply.choices[0].message.content == expected("new", QUESTION)[0]


def test_remote_images_refused_without_the_flag(servers, photo):
    server = servers("old")  # started without --allow-remote-images
    body = json.dumps({"model": server.model, "messages": [user(QUESTION, "https://127.0.0.1/cat.png")]}).encode()
    status, _, data = raw(server.port, "POST", "/v1/chat/completions", body)
    error = json.loads(data)["error"]
    assert (status, error["code"]) == (400, "invalid_image") and "--allow-remote-images" in error["message"]


def test_start_up_errors_are_one_line_and_exit_1(imp_bin, converted, env, tmp_path):
    text, _ = converted("new", "float16", "square")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        port = str(taken.getsockname()[1])
        for args, message in [
            (["--model", str(tmp_path / "nothing.gguf"), "--port", "0"], "not found"),
            (["--model", str(text), "--port", port], f"error: cannot listen on 127.0.0.1:{port}: Address already in use"),
        ]:
            p = subprocess.run([imp_bin, "serve", *args], capture_output=True, env=env, timeout=120)
            err = p.stderr.decode()
            assert (p.returncode, p.stdout) == (1, b""), err
            assert len(err.splitlines()) == 1 and message in err, err
    finally:
        taken.close()
    # The warning comes as soon as the address is bound (it never listens here: the model is missing).
    p = subprocess.run([imp_bin, "serve", "--model", str(tmp_path / "nothing.gguf"), "--host", "0.0.0.0", "--port", "0"],
                       capture_output=True, env=env, timeout=120)
    lines = p.stderr.decode().splitlines()
    assert p.returncode == 1 and len(lines) == 2, lines
    assert lines[0] == ("warning: listening on 0.0.0.0, not a loopback address, without --api-key: "
                        "anyone who can reach it can use the model")


# ------------------------------------------------------------------------------- in-process parts
def test_ask_help_does_not_import_the_server_stack():
    code = ("import sys\nsys.argv = ['imp', 'ask', '--help']\nfrom imp_cli.app import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('uvicorn', 'starlette', 'anyio')))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "[]"


def test_scheduler_admits_in_order_up_to_max_queue():
    from imp_cli.serve import QueueFull, Scheduler

    s = Scheduler(max_queue=1)
    s.submit("a")  # the engine is idle: this one does not wait
    assert s.take() == "a"
    s.submit("b")  # waits while a runs
    with pytest.raises(QueueFull):
        s.submit("c")
    s.done()
    assert s.take() == "b"
    s.submit("c")
    assert s.close() == ["c"] and s.take() is None


def test_a_stopping_server_answers_the_waiting_jobs_503_and_takes_no_more():
    from imp_cli.api_errors import ApiError
    from imp_cli.serve import Scheduler

    class Waiting:
        posted = None

        def post(self, kind, value=None):
            self.posted = (kind, value)

    s = Scheduler(max_queue=2)
    running, waiting = Waiting(), [Waiting(), Waiting()]
    s.submit(running)
    assert s.take() is running
    for job in waiting:
        s.submit(job)
    s.refuse_waiting()
    assert running.posted is None  # the running answer finishes
    for job in waiting:
        kind, error = job.posted
        assert kind == "error" and (error.status, error.code) == (503, "shutting_down")
    with pytest.raises(ApiError) as refused:
        s.submit(Waiting())
    assert refused.value.status == 503 and s.take() is None


def test_image_in_a_later_turn_sits_where_the_client_put_it():
    from imp_cli.prompts import PHI2_SYSTEM, Turn, build_prompt

    before, after = build_prompt("phi2", "q2", [Turn("q1", "a1")], None, image_turn=1)
    assert (before, after) == (f"{PHI2_SYSTEM} USER: q1 ASSISTANT: a1</s>USER: ", "\nq2 ASSISTANT:")
    before, after = build_prompt("phi2", "q2", [Turn("q1", "a1")], None)
    assert (before, after) == (f"{PHI2_SYSTEM} USER: ", "\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT:")


def test_data_url_decodes_like_the_file(photo):
    from imp_cli.images import load_data_url, load_image

    a, b = load_image(str(photo)), load_data_url(data_url(photo))
    assert (a.sha256, a.size, a.image.tobytes()) == (b.sha256, b.size, b.image.tobytes())


def test_public_address_policy():
    import ipaddress

    from imp_cli.remote import is_public

    refused = ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
               "224.0.0.1", "240.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "fc00::1", "ff02::1",
               "::ffff:127.0.0.1", "::ffff:10.0.0.1", "2002:7f00:1::1", "2002:a00:1::1"]
    public = ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"]
    assert [a for a in refused if is_public(ipaddress.ip_address(a))] == []
    assert [a for a in public if not is_public(ipaddress.ip_address(a))] == []


@pytest.fixture
def image_host(photo):
    """A loopback HTTP server: /img.png, /to?url=... (a 302 there), /host (echoes the Host header)."""
    import urllib.parse

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            path = urllib.parse.urlsplit(self.path)
            if path.path == "/to":
                self.send_response(302)
                self.send_header("Location", urllib.parse.parse_qs(path.query)["url"][0])
                self.end_headers()
                return
            body = photo.read_bytes() if path.path == "/img.png" else self.headers["Host"].encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def test_remote_fetch_checks_every_hop_and_pins_the_address(image_host, photo):
    """fetch_public with a policy that trusts 127.0.0.1 only (the real one refuses it too)."""
    import ipaddress

    from imp_cli.images import ImageError
    from imp_cli.remote import fetch_public, resolve

    port = image_host
    only_one = lambda ip: ip == ipaddress.ip_address("127.0.0.1")  # noqa: E731
    base = f"http://127.0.0.1:{port}"
    assert fetch_public(f"{base}/img.png", max_bytes=MAX_BODY, allow=only_one) == photo.read_bytes()
    assert fetch_public(f"{base}/to?url={base}/img.png", max_bytes=MAX_BODY, allow=only_one) == photo.read_bytes()
    with pytest.raises(ImageError, match="not a public address"):  # a redirect to another address
        fetch_public(f"{base}/to?url=http://127.0.0.2:{port}/img.png", max_bytes=MAX_BODY, allow=only_one)
    with pytest.raises(ImageError, match="not a public address"):  # the default policy
        fetch_public(f"{base}/img.png", max_bytes=MAX_BODY)
    with pytest.raises(ImageError, match="larger than"):
        fetch_public(f"{base}/img.png", max_bytes=100, allow=only_one)
    # A name is resolved once and the connection made to the checked address; Host keeps the name.
    pinned = lambda host, p: [ipaddress.ip_address("127.0.0.1")] if host == "images.test" else resolve(host, p)  # noqa: E731
    assert fetch_public(f"http://images.test:{port}/host", max_bytes=MAX_BODY, allow=only_one,
                        resolver=pinned) == f"images.test:{port}".encode()
    # One bad address among the answers is enough to refuse.
    mixed = lambda host, p: [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("127.0.0.2")]  # noqa: E731
    with pytest.raises(ImageError, match="not a public address"):
        fetch_public(f"http://images.test:{port}/img.png", max_bytes=MAX_BODY, allow=only_one, resolver=mixed)


def test_stop_text_finds_a_stop_split_across_pieces():
    from imp_cli.serve import StopText

    stopper = StopText(["o w", "XYZ"])
    out = [stopper.feed(p) for p in ["Hel", "lo", " ", "world"]]
    assert out == [("Hel", False), ("l", False), ("", False), ("", True)]  # "lo" held: "o" may start "o w"
    stopper = StopText(["o w"])
    assert [stopper.feed(p) for p in ["go", "!"]] + [stopper.flush()] == [("g", False), ("o!", False), ""]
    stopper = StopText(["o w"])
    assert stopper.feed("go") == ("g", False) and stopper.flush() == "o"  # the end releases what was held


def test_engine_setting_overrides(imp_bin, converted, env):
    """--repack/--flash-attn are the shared options of ask, chat and serve: the server's engine
    is loaded with them (its -v note says which, before it listens)."""
    text, _ = converted("new", "float16", "square")
    server = Server(imp_bin, text, env, "-v", "--repack", "off", "--flash-attn", "on")
    try:
        assert "llama.cpp settings: repack off, flash attention on (--repack off, --flash-attn on)" in server.log()
    finally:
        server.stop()
