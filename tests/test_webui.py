"""imp serve's web page (GET /), tested in a real browser: Debian's chromium driven by playwright
(its own browser downloads are never used), against `imp serve` on the tiny models, on loopback.

Without chromium or playwright these tests are skipped with the reason; with IMP_REQUIRE_BROWSER=1
(set by .ci/run) a missing browser is a failure instead. IMP_SCREENSHOT=PATH saves the screenshot
the answer test takes there (docs/webui.png in the README was taken so).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from test_ask import _torch_one_thread  # noqa: F401 - fixture: the oracle on one thread
from test_serve import KEY, N_TOKENS, QUESTION, Server, as_imp_sees_it, ask_cli, data_url, raw

CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
SECOND = "And what else?"
TIMEOUT_MS = 60_000
ROOT = Path(__file__).resolve().parent.parent


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _missing(reason: str):
    if os.environ.get("IMP_REQUIRE_BROWSER") == "1":
        pytest.fail(f"IMP_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    if executable is None:
        _missing("no chromium on this machine (apt-get install chromium chromium-driver)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed (pip install playwright; the test extra has it)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh tab (its own sessionStorage) that records console errors and page errors."""
    context = browser.new_context(viewport={"width": 1000, "height": 760})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.errors = []
    page.on("console", lambda m: page.errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: page.errors.append(f"page error: {e}"))
    yield page
    context.close()


@pytest.fixture(scope="module")
def server(imp_bin, converted, env):
    """The tiny model behind an API key; answers of at most N_TOKENS, as the oracle's."""
    text, _ = converted("new", "float16", "square")
    s = Server(imp_bin, text, env, "--api-key", KEY, "--max-tokens", str(N_TOKENS))
    yield s
    assert s.stop() == 0, s.log()


def url(server: Server) -> str:
    return f"http://127.0.0.1:{server.port}/"


def open_page(page, server: Server, key: str = KEY) -> None:
    """Load the page and give the API key it asks for; then it shows the model."""
    page.goto(url(server))
    page.get_by_label("Key", exact=True).fill(key)
    page.get_by_role("button", name="Use this key").click()
    page.wait_for_selector("body[data-ready=yes]")


def ask(page, question: str) -> dict:
    """Type the question, press Enter, wait for the answer to end: its text and stats line."""
    n = page.locator("#turns .turn").count()
    box = page.get_by_label("Question")
    box.fill(question)
    box.press("Enter")
    page.wait_for_function("n => document.querySelectorAll('#turns .turn').length > n", arg=n)
    page.wait_for_selector("body[data-busy=no]")
    turn = page.locator("#turns .turn").nth(n)
    return {"answer": turn.locator(".answer").text_content(), "stats": turn.locator(".stats").text_content()}


def oracle_answer(oracle_for, photo: Path, question: str, history: tuple = ()) -> str:
    oracle = oracle_for("new", "float16", "square")
    ids = oracle.greedy(as_imp_sees_it(photo), question, N_TOKENS, history=history)
    return oracle.tokenizer.decode(ids, skip_special_tokens=True).strip()


# -------------------------------------------------------------------------------------- the tests
def test_page_is_self_contained_and_locked_down(server, imp_bin, converted, env):
    status, headers, body = raw(server.port, "GET", "/")  # no key needed for the page itself
    assert status == 200 and headers["content-type"].startswith("text/html")
    csp = headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "http" not in csp
    html = body.decode()
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "inline script"
    assert not re.search(r"\son[a-z]+\s*=", html) and "style=" not in html and "javascript:" not in html
    for path in re.findall(r'(?:src|href)="([^"]+)"', html):
        assert path.startswith("/ui/"), path  # nothing from another origin
        assert raw(server.port, "GET", path)[0] == 200
    assert raw(server.port, "GET", "/v1/models")[0] == 401  # the API still wants the key
    # --no-ui: no page; /health and the API as before
    text, _ = converted("new", "float16", "square")
    bare = Server(imp_bin, text, env, "--no-ui")
    try:
        status, _, body = raw(bare.port, "GET", "/")
        assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
        assert raw(bare.port, "GET", "/ui/app.js")[0] == 404
        assert raw(bare.port, "GET", "/health")[0] == 200 and raw(bare.port, "GET", "/v1/models")[0] == 200
    finally:
        assert bare.stop() == 0, bare.log()


def test_page_loads_without_console_errors_and_fits_a_phone(page, server):
    page.set_viewport_size({"width": 375, "height": 740})
    open_page(page, server)
    assert page.locator("#model").text_content() == f"model {server.model}"
    # labelled controls, reachable by their names
    for label in ("Question", "Longest answer (tokens)", "Temperature", "Choose a picture, drop it here, or paste it"):
        assert page.get_by_label(label, exact=True).count() == 1, label
    for name in ("Ask", "Stop", "New conversation"):
        assert page.get_by_role("button", name=name).count() == 1, name
    assert page.evaluate("document.documentElement.scrollWidth") <= 375  # no sideways scrolling
    assert page.errors == []


def test_a_picture_can_be_dropped_or_pasted(page, server, photo):
    open_page(page, server)
    data = list(photo.read_bytes())
    for event in ("drop", "paste"):
        page.evaluate("""([bytes, kind]) => {
            const file = new File([new Uint8Array(bytes)], kind + ".png", {type: "image/png"});
            const dt = new DataTransfer();
            dt.items.add(file);
            const e = kind === "drop" ? new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true})
                                      : new ClipboardEvent("paste", {clipboardData: dt, bubbles: true, cancelable: true});
            (kind === "drop" ? document.getElementById("drop") : document.body).dispatchEvent(e);
        }""", [data, event])
        page.wait_for_function("name => document.getElementById('preview').alt.endsWith(name)", arg=f"{event}.png")
        assert page.locator("#preview").is_visible()
    assert page.errors == []


def test_streamed_answer_equals_imp_ask_and_follow_up_equals_oracle(page, server, photo, imp_bin, env, oracle_for,
                                                                   tmp_path, converted):
    open_page(page, server)
    page.set_input_files("#image", str(photo))
    page.wait_for_selector("#preview:not([hidden])")
    assert page.locator("#preview").get_attribute("src").startswith("blob:")
    first = ask(page, QUESTION)
    text, _ = converted("new", "float16", "square")
    want = ask_cli(photo, QUESTION, text, env)
    assert len(want.split()) >= 5
    assert first["answer"] == want
    assert re.fullmatch(r"\d+ tokens? · [\d.]+ tokens/s", first["stats"]), first["stats"]
    # a follow-up continues the conversation: the oracle's two-turn answer
    second = ask(page, SECOND)
    assert second["answer"] == oracle_answer(oracle_for, photo, SECOND, ((QUESTION, want),))
    shot = tmp_path / "webui.png"
    page.screenshot(path=str(shot))
    assert shot.read_bytes().startswith(b"\x89PNG")
    assert page.errors == []
    # "New conversation" forgets the turns; the picture stays, sent again with the next question
    page.get_by_role("button", name="New conversation").click()
    assert page.locator("#turns .turn").count() == 0
    with page.expect_request("**/v1/chat/completions") as sent:
        ask(page, QUESTION)
    messages = sent.value.post_data_json["messages"]
    assert len(messages) == 1 and messages[0]["content"][0]["image_url"]["url"] == data_url(photo)
    if os.environ.get("IMP_SCREENSHOT"):  # the README's picture: the demo drawing, two questions
        page.set_input_files("#image", str(ROOT / "samples" / "demo.jpg"))
        page.wait_for_selector("#turns:empty", state="attached")
        ask(page, "What is in the picture?")
        ask(page, "What colour is the roof?")
        page.screenshot(path=os.environ["IMP_SCREENSHOT"])


def test_stop_ends_the_answer_and_the_next_question_works(page, imp_bin, long_context_model, env, photo):
    """A 32k-context copy of the tiny model asked for up to 30000 tokens: still running when Stop
    is pressed, however fast the machine. The server cancels the generation (its log says the
    client went away, well before 30000 tokens), and the next question is answered."""
    server = Server(imp_bin, long_context_model, env, "--ctx", "32768", "--max-tokens", "30000")
    try:
        page.goto(url(server))
        page.wait_for_selector("body[data-ready=yes]")
        page.set_input_files("#image", str(photo))
        page.get_by_label("Question").fill("Tell me everything.")
        page.get_by_role("button", name="Ask").click()
        page.wait_for_function("() => document.querySelector('#turns .turn .answer').textContent.length > 20")
        page.get_by_role("button", name="Stop").click()
        page.wait_for_selector("body[data-busy=no]")
        assert page.locator("#turns .turn .stats").text_content() == "stopped"
        stopped = page.locator("#turns .turn .answer").text_content()
        assert stopped
        line = server.wait_for_line(r"\(client gone\)")
        assert int(re.search(r"answer (\d+) tokens", line)[1]) < 29000, line
        page.get_by_text("Settings").click()  # open the settings, as a person would
        page.get_by_label("Longest answer (tokens)").fill(str(N_TOKENS))
        nxt = ask(page, QUESTION)
        assert re.fullmatch(r"\d+ tokens?( · [\d.]+ tokens/s)?", nxt["stats"]), nxt["stats"]  # ended, not stopped
        # ... with the conversation as it stands: the stopped answer, then this question
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(photo)}},
                                                 {"type": "text", "text": "Tell me everything."}]},
                    {"role": "assistant", "content": stopped}, {"role": "user", "content": QUESTION}]
        status, _, data = raw(server.port, "POST", "/v1/chat/completions",
                              json.dumps({"model": server.model, "messages": messages, "max_tokens": N_TOKENS}).encode())
        assert status == 200 and nxt["answer"] == json.loads(data)["choices"][0]["message"]["content"]
        assert page.locator("#turns .turn .answer").first.text_content() == stopped  # the stopped turn stays
        assert page.locator("#error").is_hidden()
    finally:
        assert server.stop() == 0, server.log()


def test_wrong_api_key_shows_the_error_and_the_right_one_works(page, server):
    page.goto(url(server))
    page.get_by_label("Key", exact=True).fill("sk-wrong")
    page.get_by_role("button", name="Use this key").click()
    error = page.locator("#key-error")
    error.wait_for(state="visible")
    assert "missing or wrong API key" in error.text_content()
    assert page.evaluate("sessionStorage.getItem('imp-api-key')") is None  # a wrong key is not kept
    page.get_by_label("Key", exact=True).fill(KEY)
    page.get_by_role("button", name="Use this key").click()
    page.wait_for_selector("body[data-ready=yes]")
    assert page.locator("#model").text_content() == f"model {server.model}"
    assert page.evaluate("sessionStorage.getItem('imp-api-key')") == KEY


def test_corrupt_image_shows_the_servers_message(page, server):
    broken = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40 + b"not really a picture"
    open_page(page, server)
    page.set_input_files("#image", files=[{"name": "broken.png", "mimeType": "image/png", "buffer": broken}])
    page.wait_for_selector("#preview:not([hidden])")
    box = page.get_by_label("Question")
    box.fill(QUESTION)
    box.press("Enter")
    error = page.locator("#error")
    error.wait_for(state="visible")
    body = {"model": server.model, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(broken).decode()}},
        {"type": "text", "text": QUESTION}]}], "stream": True}
    status, _, data = raw(server.port, "POST", "/v1/chat/completions", json.dumps(body).encode(),
                          {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert status == 400
    assert error.text_content() == json.loads(data)["error"]["message"]
    assert page.locator("#turns .turn").count() == 0  # nothing was said: no turn


def test_markup_in_an_answer_is_shown_as_text(page, server):
    """The page's only way into the DOM for model output is textContent: an answer made of markup
    (served here by intercepting the request in the browser) is displayed literally, and nothing
    in it runs or loads."""
    pieces = ["<img src=x onerror=\"window.pwned=1\">", " <script>window.pwned=2</script>", " <b>bold</b> &amp;"]

    def sse(route):
        chunks = [{"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in pieces]
        chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        chunks.append({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}})
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)

    open_page(page, server)
    page.route("**/v1/chat/completions", sse)
    turn = ask(page, "Say something in HTML.")
    assert turn["answer"] == "".join(pieces)
    answer = page.locator("#turns .turn .answer")
    assert answer.locator("*").count() == 0  # no element was made from the text
    assert page.evaluate("window.pwned") is None
    assert page.errors == []
