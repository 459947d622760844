"""`imp ask` as a program in a pipeline: what goes to stdout and stderr, exit codes, where images
and options come from, and one clean line for every kind of bad input.

Everything runs the installed `imp` command with stdout and stderr both pipes, in an environment
with no IMP_* variables, an empty model store (IMP_HOME) and HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import http.server
import json
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from factory import TINY
from ggufedit import STRING, decode_gguf, encode_gguf, with_key
from helpers import assert_one_line_error, assert_usage_error, clean_env, run_imp, quiet_http_server

QUESTION = "What is in the image?"
N_TOKENS = 24


# ---------------------------------------------------------------------------------------- helpers
@pytest.fixture
def env(tmp_path):
    return clean_env(tmp_path)


@pytest.fixture(scope="module")
def model(converted) -> tuple[Path, Path]:
    return converted("new", "float16", "square")


@pytest.fixture(scope="module")
def reference_answer(imp_bin, model, photo, tmp_path_factory) -> str:
    """The answer for the photo given by path, with --model: what the other sources must give."""
    env = clean_env(tmp_path_factory.mktemp("ref"))
    p = run_imp("ask", photo, QUESTION, "--model", model[0], "-n", N_TOKENS, env=env)
    assert p.returncode == 0, p.stderr
    return p.stdout


# ------------------------------------------------------------------------- stdout is the answer
def test_stdout_is_only_the_answer(imp_bin, model, photo, env, reference_answer):
    p = run_imp("ask", photo, QUESTION, "--model", model[0], "-n", N_TOKENS, env=env)
    assert p.returncode == 0
    assert p.stderr == ""  # no progress, logs (llama.cpp's included) or warnings on success
    assert p.stdout == reference_answer
    answer = p.stdout[:-1]
    assert p.stdout.endswith("\n") and "\n" not in answer  # this answer has no newline of its own
    assert answer == answer.strip() and len(answer.split()) >= 5
    assert answer.isprintable()


def test_several_images_one_answer_each(imp_bin, model, photo, env, reference_answer, tmp_path):
    """Each image's answer equals a run on that image alone (the shared prefix reuse must not
    leak one image into the next); plain output has `head`-style headers, --json one line each."""
    other = tmp_path / "other.png"
    Image.open(photo).rotate(90, expand=True).save(other)
    alone = run_imp("ask", other, QUESTION, "--model", model[0], "-n", N_TOKENS, env=env)
    assert alone.returncode == 0 and alone.stdout != reference_answer
    p = run_imp("ask", photo, other, QUESTION, "--model", model[0], "-n", N_TOKENS, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout == f"==> {photo} <==\n{reference_answer}\n==> {other} <==\n{alone.stdout}"
    p = run_imp("ask", photo, other, QUESTION, "--model", model[0], "-n", N_TOKENS, "--json", env=env)
    records = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r["image"]["source"] for r in records] == [str(photo), str(other)]
    assert [r["answer"] + "\n" for r in records] == [reference_answer, alone.stdout]
    assert records[1]["usage"]["reused_tokens"] > 0  # the system prompt was not evaluated twice


def test_image_from_stdin(imp_bin, model, photo, env, reference_answer):
    p = run_imp("ask", "-", QUESTION, "--model", model[0], "-n", N_TOKENS, env=env,
                stdin=photo.read_bytes())
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    assert p.stdout == reference_answer


class _Images(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def do_GET(self):  # noqa: N802
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture(scope="module")
def http_base(photo):
    handler = type("Handler", (_Images,), {"files": {"/photo.png": photo.read_bytes()}})
    server = quiet_http_server(handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_image_from_url(imp_bin, model, env, http_base, reference_answer):
    p = run_imp("ask", f"{http_base}/photo.png", QUESTION, "--model", model[0], "-n", N_TOKENS, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    assert p.stdout == reference_answer


def test_image_url_404(imp_bin, model, env, http_base):
    url = f"{http_base}/missing.png"
    p = run_imp("ask", url, QUESTION, "--model", model[0], env=env)
    assert_one_line_error(p, url, "404")


def test_verbose_logs_go_to_stderr(imp_bin, model, photo, env, reference_answer):
    """-v shows llama.cpp's logs, on stderr: stdout is still the answer alone."""
    p = run_imp("ask", photo, QUESTION, "--model", model[0], "-n", N_TOKENS, "-v", env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout == reference_answer
    assert len(p.stderr.splitlines()) > 10  # llama.cpp's model loading log


# ---------------------------------------------------------------------------- environment vars
def test_imp_model_env(imp_bin, model, photo, tmp_path, reference_answer):
    env = clean_env(tmp_path, IMP_MODEL=str(model[0]))
    p = run_imp("ask", photo, QUESTION, "-n", N_TOKENS, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout == reference_answer


def test_imp_max_tokens_env(imp_bin, model, photo, tmp_path, reference_answer):
    short = run_imp("ask", photo, QUESTION, "--model", model[0], "--json",
                    env=clean_env(tmp_path, IMP_MAX_TOKENS="5"))
    assert short.returncode == 0, short.stderr
    record = json.loads(short.stdout)
    assert record["usage"]["completion_tokens"] == 5 and record["finish_reason"] == "length"
    assert reference_answer.startswith(record["answer"]) and record["answer"] != reference_answer.strip()
    # an explicit option beats the environment
    p = run_imp("ask", photo, QUESTION, "--model", model[0], "-n", N_TOKENS,
                env=clean_env(tmp_path, IMP_MAX_TOKENS="5"))
    assert p.stdout == reference_answer


# ------------------------------------------------------------------------------------ help
def test_help_exits_0(imp_bin, env):
    for args in (["--help"], ["ask", "--help"], ["ask", "-h"]):
        p = run_imp(*args, env=env)
        assert p.returncode == 0, (args, p.stderr)
        assert "Usage" in p.stdout and "Traceback" not in p.stderr
    assert "--model" in run_imp("ask", "--help", env=env).stdout


def test_help_does_not_import_heavy_modules(env):
    """`imp --help` stays instant: llama.cpp, numpy, Pillow, gguf (and torch) are not imported.
    Checked in a fresh interpreter (this one has imported them all already)."""
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from imp_cli.app import app\n"
        "heavy = ('llama_cpp', 'numpy', 'PIL', 'gguf', 'torch')\n"
        "assert not [m for m in heavy if m in sys.modules]\n"
        "for args in (['--help'], ['ask', '--help']):\n"
        "    r = CliRunner().invoke(app, args)\n"
        "    assert r.exit_code == 0, (args, r.output)\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


@pytest.mark.parametrize("args", [["--help"], ["ask", "--help"]])
def test_installed_help_does_not_import_llama_cpp(imp_bin, env, args):
    """The same through the installed entry point, by `python -X importtime` (no timing asserted)."""
    p = subprocess.run([sys.executable, "-X", "importtime", imp_bin, *args], capture_output=True,
                       text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "Usage" in p.stdout
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0]
                for line in p.stderr.splitlines() if line.startswith("import time:")}
    assert "typer" in imported  # the trace is there
    assert not imported & {"llama_cpp", "numpy", "PIL", "gguf", "torch"}


# ------------------------------------------------------------------------------- bad inputs
@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, photo, model, checkpoint) -> dict[str, Path]:
    """One file per kind of bad input."""
    from convert.pipeline import convert

    d = tmp_path_factory.mktemp("bad")
    files = {}
    files["text"] = d / "notes.txt"
    files["text"].write_text("this is not an image\n")
    jpeg = d / "full.jpg"
    Image.open(photo).convert("RGB").save(jpeg, quality=90)
    data = jpeg.read_bytes()
    files["half_jpeg"] = d / "half.jpg"
    files["half_jpeg"].write_bytes(data[: len(data) // 2])

    # A checkpoint whose text model is 96 wide: its text GGUF cannot take the 64-wide projector.
    wide = checkpoint("new", "float16", "square", sizes=replace(TINY, hidden_size=96, num_heads=4))
    r = convert(str(wide), d / "wide", quant="F16", mmproj_type="F16")
    files["wide_text"], files["wide_mmproj"] = Path(r.text_path), Path(r.mmproj_path)

    import gguf
    import numpy as np

    files["llama_gguf"] = d / "llama" / "tiny-llama.gguf"
    files["llama_gguf"].parent.mkdir()
    w = gguf.GGUFWriter(str(files["llama_gguf"]), "llama")
    w.add_name("not imp")
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_head_count(4)
    w.add_tensor("token_embd.weight", np.zeros((32, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    text = model[0].read_bytes()
    files["half_gguf"] = d / "half-F16.gguf"
    files["half_gguf"].write_bytes(text[: len(text) // 2])

    files["alone"] = d / "alone" / "lonely-F16.gguf"  # a text GGUF with no mmproj beside it
    files["alone"].parent.mkdir()
    shutil.copyfile(model[0], files["alone"])

    # Two projectors for one model (issue 13, defect 4): which one is for the user to say.
    files["two_mmproj"] = d / "two" / "pair-F16.gguf"
    files["two_mmproj"].parent.mkdir()
    shutil.copyfile(model[0], files["two_mmproj"])
    for kind in ("F16", "Q8_0"):
        shutil.copyfile(model[1], files["two_mmproj"].parent / f"pair-mmproj-{kind}.gguf")

    # An aspect mode imp does not know (issue 13, defect 5): refused by the pair check, not met
    # by the image code mid-answer.
    kvs, tensors, data = decode_gguf(model[1])
    files["stretch_mmproj"] = d / "stretch-mmproj-F16.gguf"
    files["stretch_mmproj"].write_bytes(encode_gguf(with_key(kvs, "imp.image_aspect_ratio", STRING, "stretch"),
                                                    tensors, data))
    return files


def _cases(photo, model, f):
    """name -> (argv after `imp`, extra env, stdin, phrases the error line must contain)."""
    text, mmproj = model
    return {
        "missing image file": (["ask", "/nonexistent/cat.png", QUESTION, "-m", text], {}, b"",
                               ["/nonexistent/cat.png", "not found"]),
        "not an image": (["ask", f["text"], QUESTION, "-m", text], {}, b"", [str(f["text"]), "not an image"]),
        "truncated image": (["ask", f["half_jpeg"], QUESTION, "-m", text], {}, b"", [str(f["half_jpeg"]), "truncated"]),
        "empty stdin": (["ask", "-", QUESTION, "-m", text], {}, b"", ["standard input"]),
        "mismatched pair": (["ask", photo, QUESTION, "-m", f["wide_text"], "--mmproj", mmproj], {}, b"",
                            ["mismatched model pair", "64", "96"]),
        "mismatched pair, other way": (["ask", photo, QUESTION, "-m", text, "--mmproj", f["wide_mmproj"]], {},
                                       b"", ["mismatched model pair", "64", "96"]),
        "not an image, json mode": (["ask", f["text"], QUESTION, "-m", text, "--json"], {}, b"",
                                    [str(f["text"]), "not an image"]),
        "gguf that is not imp": (["ask", photo, QUESTION, "-m", f["llama_gguf"], "--mmproj", mmproj], {}, b"",
                                 ["llama", str(f["llama_gguf"])]),
        "truncated gguf": (["ask", photo, QUESTION, "-m", f["half_gguf"], "--mmproj", mmproj], {}, b"",
                           [str(f["half_gguf"]), "truncated"]),
        "model is not gguf": (["ask", photo, QUESTION, "-m", f["text"], "--mmproj", mmproj], {}, b"",
                              [str(f["text"]), "not a GGUF"]),
        "mmproj given as model": (["ask", photo, QUESTION, "-m", mmproj], {}, b"", ["vision projector"]),
        "missing model file": (["ask", photo, QUESTION, "-m", "/nonexistent/model.gguf"], {}, b"",
                               ["/nonexistent/model.gguf", "not found"]),
        "no mmproj beside model": (["ask", photo, QUESTION, "-m", f["alone"]], {}, b"", ["no mmproj", "--mmproj"]),
        "two mmproj beside model": (["ask", photo, QUESTION, "-m", f["two_mmproj"]], {}, b"",
                                    ["pair-mmproj-F16.gguf", "pair-mmproj-Q8_0.gguf", "--mmproj"]),
        "unknown aspect mode": (["ask", photo, QUESTION, "-m", text, "--mmproj", f["stretch_mmproj"]], {}, b"",
                                [str(f["stretch_mmproj"]), "imp.image_aspect_ratio", "'stretch'"]),
        "question longer than context": (["ask", photo, "tell me " * 300, "-m", text, "--ctx", "64"], {}, b"",
                                         ["context", "64"]),
        "empty question": (["ask", photo, "   ", "-m", text], {}, b"", ["question is empty"]),
        # No --model, no IMP_MODEL, an empty store, offline: the default model cannot be had.
        "no model anywhere": (["ask", photo, QUESTION], {}, b"", ["not installed", "imp pull"]),
    }


CASE_NAMES = ["missing image file", "not an image", "not an image, json mode", "truncated image", "empty stdin",
              "mismatched pair", "mismatched pair, other way",
              "gguf that is not imp", "truncated gguf", "model is not gguf", "mmproj given as model",
              "missing model file", "no mmproj beside model", "two mmproj beside model", "unknown aspect mode",
              "question longer than context",
              "empty question", "no model anywhere"]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_input_one_line_error(imp_bin, photo, model, bad_files, tmp_path, case):
    argv, extra, stdin, phrases = _cases(photo, model, bad_files)[case]
    p = run_imp(*argv, env=clean_env(tmp_path, **extra), stdin=stdin)
    assert_one_line_error(p, *phrases)


def test_error_line_stays_one_line_for_a_name_with_a_newline(imp_bin, model, tmp_path):
    p = run_imp("ask", tmp_path / "a\nb.png", QUESTION, "-m", model[0], env=clean_env(tmp_path))
    assert_one_line_error(p, "not found")


def test_question_longer_than_the_trained_context(imp_bin, model, photo, env):
    """Thousands of words with the default context: refused with the token count."""
    p = run_imp("ask", photo, "word " * 4000, "-m", model[0], env=env)
    line = assert_one_line_error(p, "context")
    assert "prompt is" in line


# ----------------------------------------------------------------------------- usage errors
@pytest.mark.parametrize("argv,phrase", [
    (["ask", "photo.png"], "no question (and there is no file 'photo.png')"),
    (["ask", "photo.png", "q", "--bogus"], "No such option"),
    (["ask", "photo.png", "q", "--max-tokens", "0"], "--max-tokens"),
    (["ask", "photo.png", "q", "--temperature", "hot"], "--temperature"),
    (["frobnicate"], "No such command"),
], ids=["missing question", "unknown option", "max-tokens 0", "temperature not a number", "unknown command"])
def test_usage_errors_exit_2(imp_bin, env, argv, phrase):
    assert_usage_error(run_imp(*argv, env=env), phrase)


def test_no_arguments_shows_help(imp_bin, env):
    """No command is a usage error (exit 2, as click's no_args_is_help has it since 8.2), with the
    help on stdout."""
    p = run_imp(env=env)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Usage" in p.stdout and "Traceback" not in p.stderr


# ----------------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_exits_130(imp_bin, model, photo, env):
    """SIGINT mid-answer: exit 130, no traceback. The tiny model needs ~3000 tokens (several
    seconds) to fill a 3072 context, so the answer is still streaming when the signal lands."""
    proc = subprocess.Popen([imp_bin, "ask", str(photo), QUESTION, "-m", str(model[0]), "-n", "100000",
                             "--ctx", "3072"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        first = proc.stdout.read(1)  # the answer has started
        assert first, proc.stderr.read().decode()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err_text = err.decode("utf-8", "replace")
    assert proc.returncode == 130, (proc.returncode, err_text)
    assert "Traceback" not in err_text and "error" not in err_text, err_text
    assert "\x1b" not in err_text
    assert len(first + out) < 3000 * 4  # interrupted well before the context was full


def test_reader_closing_the_pipe_early_is_not_an_error(imp_bin, model, photo, env):
    """`imp ask ... | head -c 20`: imp stops quietly when nobody reads its answer any more."""
    proc = subprocess.Popen([imp_bin, "ask", str(photo), QUESTION, "-m", str(model[0]), "-n", "100000",
                             "--ctx", "3072"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.read(1)
        proc.stdout.close()  # as `head` does once it has what it wants
        err = proc.stderr.read().decode("utf-8", "replace")
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert "internal error" not in err and "BrokenPipe" not in err, err
    assert proc.returncode == 141, (proc.returncode, err)  # 128 + SIGPIPE, as a shell pipeline reports it


def test_answer_cut_off_by_the_context(imp_bin, model, photo, env, reference_answer):
    """Generation that fills the context: exit 0, the answer so far, one warning line on stderr."""
    p = run_imp("ask", photo, QUESTION, "-m", model[0], "-n", "100000", "--ctx", "80", env=env)
    assert p.returncode == 0, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "--ctx" in lines[0], p.stderr
    # the prompt is 57 tokens here, so ~22 answer tokens fit: about the 24-token reference answer
    assert p.stdout.endswith("\n")
    assert reference_answer.startswith(p.stdout[:-1]) and len(p.stdout) > 20


def test_model_given_as_a_folder(imp_bin, model, photo, env, reference_answer):
    """--model may name the folder holding the pair."""
    p = run_imp("ask", photo, QUESTION, "--model", model[0].parent, "-n", N_TOKENS, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout == reference_answer


def test_shell_completion(imp_bin, env):
    """Typer's completion is on (it costs `imp --help` nothing measurable): the completion
    protocol answers with commands and options. (The script itself, `--show-completion`, names
    the user's shell, found from the parent process: not something a test runner has.)"""
    complete = dict(env, _IMP_COMPLETE="complete_bash", COMP_WORDS="imp ca", COMP_CWORD="1")
    assert run_imp(env=complete).stdout.split() == ["cache"]
    complete.update(COMP_WORDS="imp ask --no-c", COMP_CWORD="2")
    assert run_imp(env=complete).stdout.split() == ["--no-cache"]
    complete.update(COMP_WORDS="imp ch", COMP_CWORD="1")
    assert run_imp(env=complete).stdout.split() == ["chat"]
