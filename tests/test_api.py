"""The Python API (imp_cli.load -> Model): the same answers as the CLI for the same inputs, images
given every way, errors as ImpError with the CLI's lines, one call at a time across threads, a
light `import imp_cli`, and the README's "Python" section run as written against the tiny model.
"""

from __future__ import annotations

import http.server
import io
import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import assert_ok, clean_env, quiet_http_server, run_imp, run_python
from schema_check import check_record

N = 24  # tokens per answer: short, and long enough to tell answers apart
QUESTION = "What is in the image?"
SCHEMA = {"type": "object", "properties": {"object": {"type": "string", "maxLength": 12},
                                           "count": {"type": "integer", "minimum": 0, "maximum": 20}},
          "required": ["object", "count"], "additionalProperties": False}
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model(text, env):
    """The tiny model through the API, IMP_HOME (prompt cache) as the CLI runs in `env`."""
    import imp_cli

    with pytest.MonkeyPatch.context() as mp:
        for k in ("IMP_HOME", "XDG_CACHE_HOME", "HF_HOME", "HF_HUB_OFFLINE"):
            mp.setenv(k, env[k])
        with imp_cli.load(text, threads=1) as m:
            yield m


@pytest.fixture(scope="module")
def text(converted):
    return converted("new", "float16", "square")[0]


def cli_answer(text, env, *args) -> str:
    p = assert_ok(run_imp("ask", *args, "--model", text, "-n", N, env=env))
    return p.stdout[:-1]


# ------------------------------------------------------------------------------- same answers
def test_ask_equals_imp_ask_and_streams_the_same(model, text, env, photo):
    want = cli_answer(text, env, photo, QUESTION)
    assert len(want.split()) >= 5
    assert model.ask(photo, QUESTION, max_tokens=N) == want
    assert model.ask(str(photo), QUESTION, max_tokens=N) == want
    stream = model.ask(photo, QUESTION, stream=True, max_tokens=N)
    pieces = list(stream)
    assert len(pieces) > 1 and "".join(pieces) == want == stream.text
    assert stream.finish_reason in ("stop", "length") and stream.timings["cache"] == "hit"
    # no image: as `imp ask` cannot, but the Session can; and per-call sampling keywords
    assert model.ask(None, QUESTION, max_tokens=3)
    assert (model.ask(photo, QUESTION, max_tokens=N, temperature=0.8, seed=3)
            == model.ask(photo, QUESTION, max_tokens=N, temperature=0.8, seed=3))
    assert model.ask(photo, QUESTION, max_tokens=N, system="You are terse.") != want


def test_every_kind_of_image_gives_the_same_answer(model, photo):
    want = model.ask(photo, QUESTION, max_tokens=N)
    data = photo.read_bytes()
    pil = Image.open(photo)
    handler = type("H", (http.server.SimpleHTTPRequestHandler,),
                   {"do_GET": lambda self: (self.send_response(200), self.send_header("Content-Length", str(len(data))),
                                            self.end_headers(), self.wfile.write(data)),
                    "log_message": lambda self, *a: None})
    server = quiet_http_server(handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/photo.png"
        for image in (data, bytearray(data), memoryview(data), pil, pil.convert("RGBA"), np.asarray(pil),
                      np.asarray(pil.convert("RGBA")), url):
            assert model.ask(image, QUESTION, max_tokens=N) == want, type(image)
    finally:
        server.shutdown()
    grey = np.asarray(pil.convert("L"))
    assert model.ask(grey, QUESTION, max_tokens=N) == model.ask(pil.convert("L"), QUESTION, max_tokens=N)


def test_choose_equals_imp_ask_choices(model, text, env, photo):
    p = assert_ok(run_imp("ask", photo, QUESTION, "--model", text, "--choices", "yes,no,a red car", "--json", env=env))
    record = json.loads(p.stdout)
    choice = model.choose(photo, QUESTION, ["yes", "no", " a red car "])  # blanks dropped, as the CLI does
    assert choice.answer == record["answer"] == str(choice)
    assert list(choice.probabilities) == ["yes", "no", "a red car"]
    for k, v in record["choices"].items():
        assert choice.probabilities[k] == pytest.approx(v, abs=1e-6)


def test_extract_returns_the_parsed_value_imp_ask_prints(model, text, env, photo):
    p = assert_ok(run_imp("ask", photo, "Describe it.", "--model", text, "--json-schema", json.dumps(SCHEMA),
                          "-n", "160", env=env))
    value = model.extract(photo, "Describe it.", SCHEMA, max_tokens=160)
    assert value == json.loads(p.stdout)
    assert set(value) <= {"object", "count"} and isinstance(value["count"], int) and 0 <= value["count"] <= 20
    assert model.extract(photo, "Describe it.", json.dumps(SCHEMA), max_tokens=160) == value  # a JSON string too
    with pytest.raises(__import__("imp_cli").ImpError, match="max_tokens=2 before it was complete"):
        model.extract(photo, "Describe it.", SCHEMA, max_tokens=2)


def test_chat_equals_imp_chat(model, text, env, photo):
    questions = [QUESTION, "And what else?", "What colour is it?"]
    p = assert_ok(run_imp("chat", photo, "--model", text, "-n", N, env=env,
                          stdin="".join(f"{q}\n" for q in questions).encode()))
    want = p.stdout.split("\n\n")[:3]
    chat = model.chat(photo)
    assert chat.ask(questions[0], max_tokens=N) == want[0]
    assert "".join(chat.ask(questions[1], stream=True, max_tokens=N)) == want[1]
    assert chat.ask(questions[2], max_tokens=N) == want[2]
    assert chat.turns == list(zip(questions, want))
    chat.reset()
    assert chat.turns == [] and chat.ask(questions[0], max_tokens=N) == want[0]


def test_ask_many_yields_the_records_of_imp_ask_json(model, text, env, photo, tmp_path):
    other = tmp_path / "flipped.png"
    Image.open(photo).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(other)
    questions = [QUESTION, "Describe it."]
    p = assert_ok(run_imp("ask", photo, other, "-q", questions[0], "-q", questions[1], "--model", text, "-n", N,
                          "--json", env=env))
    want = [json.loads(line) for line in p.stdout.splitlines()]
    records = model.ask_many([photo, other], questions, max_tokens=N)
    assert not isinstance(records, list)  # lazy
    got = list(records)
    volatile = ("timings", "cache", "usage")  # how much of the prompt was reused depends on what came before
    assert [{k: v for k, v in r.items() if k not in volatile} for r in got] == \
           [{k: v for k, v in r.items() if k not in volatile} for r in want]
    decisions = list(model.ask_many([photo], "Is it red?", choices=["yes", "no"]))
    assert decisions[0]["answer"] in ("yes", "no") and set(decisions[0]["choices"]) == {"yes", "no"}
    extracted = list(model.ask_many([photo], "Describe it.", schema=SCHEMA, max_tokens=160))
    assert extracted[0]["answer"] == model.extract(photo, "Describe it.", SCHEMA, max_tokens=160)
    for record in got + decisions + extracted:
        check_record(record)  # the record schema's shape, as every --json line


# ---------------------------------------------------------------------------------------- errors
def test_info_names_the_pair_as_records_do(model, photo):
    """Model.info promises the names of the --json records: the same model and settings objects
    (it said `type` where records say `quant`, and left out mmproj_type)."""
    record = next(model.ask_many([photo], QUESTION, max_tokens=2))
    info = model.info
    assert {k: info.get(k) for k in record["model"]} == record["model"]
    assert info["settings"] == record["settings"]


def test_errors_are_imp_errors_with_the_clis_lines(model, text, env, photo, tmp_path):
    import imp_cli
    from imp_cli.session import PromptTooLong

    missing = tmp_path / "missing.jpg"
    p = run_imp("ask", missing, QUESTION, "--model", text, env=env)
    cli_line = p.stderr.strip().removeprefix("error: ")
    with pytest.raises(imp_cli.ImpError) as e:
        model.ask(missing, QUESTION)
    assert str(e.value) == cli_line
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
    cli_line = run_imp("ask", corrupt, QUESTION, "--model", text, env=env).stderr.strip().removeprefix("error: ")
    with pytest.raises(imp_cli.ImpError, match=re.escape(cli_line)):
        model.ask(corrupt, QUESTION)
    with pytest.raises(imp_cli.ArgumentError, match="the question is empty"):
        model.ask(photo, "  ")
    with pytest.raises(imp_cli.ArgumentError, match="give at least two choices"):
        model.choose(photo, QUESTION, ["yes"])
    with pytest.raises(imp_cli.ArgumentError, match="'yes' is given twice"):
        model.choose(photo, QUESTION, ["yes", "no", "yes"])
    with pytest.raises(imp_cli.ArgumentError, match="format 'email'"):
        model.extract(photo, QUESTION, {"type": "string", "format": "email"})
    with pytest.raises(imp_cli.ImpError, match="not list"):
        model.ask([1, 2], QUESTION)
    with pytest.raises(PromptTooLong, match="more than the context"):
        model.ask(photo, "why " * 5000)
    with pytest.raises(TypeError, match="temprature"):
        model.ask(photo, QUESTION, temprature=1)
    assert issubclass(imp_cli.ArgumentError, imp_cli.ImpError) and issubclass(PromptTooLong, imp_cli.ImpError)
    # the model is still fine after all that
    assert model.ask(photo, QUESTION, max_tokens=N) == cli_answer(text, env, photo, QUESTION)


def test_load_errors(env, tmp_path):
    code = """
import imp_cli
for args, kw in [(("no-such-model",), {}), (("imp-v1-3b",), {"pull": False}), ((str(__import__("sys").argv[1]),), {}),
                 ((None,), {"repack": "fast"})]:
    try:
        imp_cli.load(*args, **kw)
    except imp_cli.ImpError as e:
        print(type(e).__name__, e)
"""
    p = assert_ok(run_python(code, tmp_path / "nothing.gguf", env=env))
    lines = p.stdout.splitlines()
    assert len(lines) == 4, p.stdout
    assert "unknown model 'no-such-model'" in lines[0]
    assert "model imp-v1-3b is not installed: run `imp pull imp-v1-3b`" in lines[1]
    assert "nothing.gguf" in lines[2]
    assert lines[3].startswith("ArgumentError repack must be 'auto', 'on' or 'off'")


# ------------------------------------------------------------------------------------- threads
def test_one_model_shared_by_threads_answers_one_call_at_a_time(model, photo):
    questions = [QUESTION, "Describe it.", "What colour is it?"]
    want = {q: model.ask(photo, q, max_tokens=N) for q in questions}
    got: dict = {}
    errors: list = []

    def work(i: int) -> None:
        try:
            for k in range(3):
                q = questions[(i + k) % 3]
                if (i + k) % 2:
                    got[(i, k)] = (q, "".join(model.ask(photo, q, stream=True, max_tokens=N)))
                else:
                    got[(i, k)] = (q, model.ask(photo, q, max_tokens=N))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert errors == [] and len(got) == 12
    assert all(answer == want[q] for q, answer in got.values())


def test_an_open_stream_holds_the_model(model, photo):
    import imp_cli

    stream = model.ask(photo, QUESTION, stream=True, max_tokens=N)
    next(stream)
    with pytest.raises(imp_cli.ImpError, match="still streaming"):
        model.ask(photo, QUESTION)  # the same thread would wait for itself
    done = threading.Event()
    threading.Thread(target=lambda: (model.ask(photo, QUESTION, max_tokens=2), done.set()), daemon=True).start()
    assert not done.wait(0.5)  # another thread waits its turn ...
    stream.close()
    assert stream.finish_reason == "interrupted" and stream.text
    assert done.wait(120)  # ... and goes on once the stream is closed


# ------------------------------------------------------------------------------ light, typed
def test_import_imp_cli_stays_light(env):
    code = ("import sys, imp_cli; imp_cli.load; imp_cli.Model; imp_cli.ImpError;"
            "heavy = [m for m in ('numpy', 'PIL', 'llama_cpp', 'rich', 'typer', 'gguf') if m in sys.modules];"
            "print(heavy)")
    assert assert_ok(run_python(code, env=env)).stdout.strip() == "[]"
    assert (ROOT / "imp_cli" / "py.typed").is_file()


def test_readme_python_section_runs(text, converted, photo, tmp_path):
    """Every ```python block of the README's "Python" section, in order, in one interpreter, in
    a folder with the pictures they name and the tiny model installed as imp-v1-3b."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Python\n(.*?)(?=^## )", readme, flags=re.M | re.S)
    assert section, "README has no '## Python' section"
    blocks = re.findall(r"```python\n(.*?)```", section[1], flags=re.S)
    assert len(blocks) >= 3
    env = clean_env(tmp_path)
    text_path, mmproj = converted("new", "float16", "square")
    assert_ok(run_imp("models", "import", text_path, mmproj, "--name", "imp-v1-3b", "--force", env=env))
    work = tmp_path / "work"
    work.mkdir()
    image = Image.open(photo)
    for name in ("photo.jpg", "shelf.jpg", "a.jpg", "b.jpg"):
        image.save(work / name, quality=95)
    program = "\n\n".join(f"# --- README block {i + 1}\n{block}" for i, block in enumerate(blocks))
    (work / "readme_blocks.py").write_text(program)
    p = subprocess.run([sys.executable, "readme_blocks.py"], cwd=work, env=env, capture_output=True, timeout=600)
    assert p.returncode == 0, p.stderr.decode()[-3000:]
