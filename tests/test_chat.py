"""`imp chat` against the oracle, through a pipe, and in a real terminal.

- Multi-turn parity: a three-turn greedy conversation equals the transformers reference run turn by
  turn (each answer fed back where Imp's template puts it), token for token, for both layouts.
- A follow-up's prompt is Imp's own, token for token: earlier answers go back as their stripped
  text, re-rendered in the template and tokenized with the rest. The earlier turns stay in the
  KV cache: the ids the model generated are kept up to the first that differs from that
  re-rendering, and only the rest is evaluated (test_follow_ups.py: answers that start without a
  blank).
- Piped input: one line one turn, a blank line after each answer, --json, the commands, context
  overflow, bad input that does not end the conversation.
- A pseudo-terminal (pexpect): prompt, streaming, /image, /reset, Ctrl-C, Ctrl-D, no traceback.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from test_ask import _torch_one_thread, as_imp_sees_it, ask_ok, env  # noqa: F401  (fixtures)
from helpers import run_imp

# On these weights an answer's text re-tokenizes differently from the ids the model generated
# (checked below), so the conversation tells Imp's re-rendered text from feeding back the ids.
QUESTIONS = ["Describe the image in detail.", "Is there a tree in the picture?", "What is this?"]
N_TOKENS = 24


@pytest.fixture(scope="module")
def flipped(photo, tmp_path_factory) -> Path:
    """Another image: the photo mirrored."""
    from PIL import Image

    path = tmp_path_factory.mktemp("flipped") / "flipped.png"
    Image.open(photo).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(path)
    return path


def first_turns(imp_bin, model, question, env, *images) -> list[str]:
    """`imp ask`'s answer for each image: what the first turn of a conversation must say."""
    return [ask_ok(imp_bin, image, model, env=env, question=question, n=N_TOKENS) for image in images]


def open_session(text: Path, mmproj: Path, ctx: int = 1024):
    from imp_cli.modelfiles import read_pair
    from imp_cli.session import Session

    return Session(read_pair(text, mmproj), threads=1, ctx=ctx)


def chat_piped(imp_bin, image, model, lines: list[str], *extra, env) -> subprocess.CompletedProcess:
    args = ["chat", *([image] if image is not None else []), "--model", model, "-n", N_TOKENS, *extra]
    return run_imp(*args, env=env, stdin="".join(f"{line}\n" for line in lines).encode())


# ------------------------------------------------------------------------- parity, KV reuse
def kv_after(prompt_ids: list[int], answer_ids: list, n_tokens: int = N_TOKENS) -> list:
    """What the KV cache holds after an answer: the prompt and the generated ids that were
    evaluated (all of them after a stop; not the last one when the answer hit the limit)."""
    return list(prompt_ids) + list(answer_ids[:-1] if len(answer_ids) == n_tokens else answer_ids)


def common_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.parametrize("layout", ["new", "old"])
def test_conversation_equals_oracle_and_reuses_the_cache(converted, oracle_for, photo, layout):
    from imp_cli.images import load_image
    from imp_cli.session import Sampling, Turn

    text, mmproj = converted(layout, "float16", "square")
    oracle = oracle_for(layout, "float16", "square")
    expected = oracle.chat_greedy(as_imp_sees_it(photo), QUESTIONS, N_TOKENS)

    history: list[Turn] = []
    answers, prompts = [], []
    with open_session(text, mmproj) as session:
        staged = session.stage(load_image(str(photo)))
        for question in QUESTIONS:
            prompt = session.prompt(staged, question, history)
            # Imp's prompt, token for token: the earlier answers as their text
            assert (prompt.head, prompt.tail) == oracle.prompt_ids(question, history=tuple((t.question, t.answer)
                                                                                           for t in history))
            answer = session.answer(staged, question, history, sampling=Sampling(), max_tokens=N_TOKENS).collect()
            answers.append(answer)
            prompts.append(prompt)
            history.append(Turn(question, answer.text, tuple(answer.tokens)))
        retokenized = [session.engine.tokenize(" " + a.text) for a in answers]

    assert [a.tokens for a in answers] == expected
    for a, ids in zip(answers, expected):
        assert a.text == oracle.tokenizer.decode(ids, skip_special_tokens=True).strip()
        assert len(ids) == N_TOKENS and a.finish_reason == "length"  # full answers: the comparison means something
    assert any(r != a.tokens for r, a in zip(retokenized, answers))  # the case the text and the ids differ

    # Turn 1 evaluates everything (no prompt cache here). Each follow-up keeps the prompt before
    # and the generated ids as far as they equal the re-rendered text's, and evaluates the rest.
    assert answers[0].reused_tokens == 0 and answers[0].timings["prompt_tokens"] == answers[0].prompt_tokens
    image_tokens = prompts[0].image.n_tokens
    for k in range(1, len(QUESTIONS)):
        before, after = answers[k - 1], answers[k]
        kept = common_prefix(kv_after(prompts[k - 1].tail, before.tokens), prompts[k].tail)
        assert kept >= len(prompts[k - 1].tail)  # at least the whole earlier prompt
        assert after.reused_tokens == len(prompts[k].head) + image_tokens + kept
        assert after.timings["prompt_tokens"] == after.prompt_tokens - after.reused_tokens


def test_follow_up_prompt_is_the_answer_text(converted, photo):
    """An earlier answer goes back as its text, whatever ids the model generated for it (Imp's
    conversation re-renders the text): the ids only decide what the KV cache can keep."""
    from imp_cli.images import load_image
    from imp_cli.prompts import PHI2_SYSTEM
    from imp_cli.session import Turn

    q1, q2 = QUESTIONS[:2]
    answer = "The cat sat on the mat."
    with open_session(*converted("new", "float16", "square")) as session:
        tok = session.engine.tokenize
        staged = session.stage(load_image(str(photo)))
        as_text = session.prompt(staged, q2, [Turn(q1, answer)])
        assert as_text.tail == tok(f"\n{q1} ASSISTANT: {answer}</s>USER: {q2} ASSISTANT:")
        odd = tuple(tok("T") + tok("he cat sat on the mat.") + tok("  "))  # no blank, another split
        with_ids = session.prompt(staged, q2, [Turn(q1, answer, odd)])
        assert (with_ids.head, with_ids.tail) == (as_text.head, as_text.tail)

        # the image in the second user turn (as `imp serve` may put it): the text before it
        later = session.prompt(staged, q2, [Turn(q1, answer, odd)], image_turn=1)
        assert later.head == tok(f"{PHI2_SYSTEM} USER: {q1} ASSISTANT: {answer}</s>USER: ")
        assert later.tail == tok(f"\n{q2} ASSISTANT:")
        # and without an image at all
        plain = session.prompt(None, q2, [Turn(q1, answer, odd)])
        assert plain.head == tok(f"{PHI2_SYSTEM} USER: {q1} ASSISTANT: {answer}</s>USER: {q2} ASSISTANT:")


@pytest.mark.parametrize("layout", ["new", "old"])
def test_piped_conversation_equals_oracle(imp_bin, converted, oracle_for, photo, env, layout):
    text, _ = converted(layout, "float16", "square")
    oracle = oracle_for(layout, "float16", "square")
    expected = [oracle.tokenizer.decode(ids, skip_special_tokens=True).strip()
                for ids in oracle.chat_greedy(as_imp_sees_it(photo), QUESTIONS, N_TOKENS)]

    p = chat_piped(imp_bin, photo, text, QUESTIONS, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""  # no prompt, no banner on a pipe
    assert p.stdout == "".join(f"{answer}\n\n" for answer in expected)

    p = chat_piped(imp_bin, photo, text, QUESTIONS, "--json", env=env)
    assert p.returncode == 0, p.stderr
    records = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r["answer"] for r in records] == expected
    assert [r["question"] for r in records] == QUESTIONS
    assert [r["turn"] for r in records] == [1, 2, 3]
    # The first run saved the [system, image] prefix: this one restored it, and the follow-ups
    # found it (and the earlier turns) in memory.
    assert [r["cache"] for r in records] == ["hit", "hit", "hit"]
    assert records[0]["timings"]["image_encode_ms"] == 0
    assert records[0]["usage"]["evaluated_tokens"] < 16
    # a follow-up evaluates at most the previous answer (where its ids and text differ) and its own turn
    assert all(r["usage"]["evaluated_tokens"] < N_TOKENS + 16 for r in records)


def test_conversation_without_an_image(imp_bin, converted, oracle_for, env):
    text, _ = converted("new", "float16", "square")
    oracle = oracle_for("new", "float16", "square")
    expected = oracle.chat_greedy(None, QUESTIONS[:2], N_TOKENS)

    p = chat_piped(imp_bin, None, text, QUESTIONS[:2], "--json", env=env)
    assert p.returncode == 0, p.stderr
    records = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r["answer"] for r in records] == [oracle.tokenizer.decode(ids, skip_special_tokens=True).strip()
                                               for ids in expected]
    assert [(r["image"], r["cache"]) for r in records] == [(None, "off"), (None, "off")]
    # the follow-up evaluates its prompt from the first token that is not in the KV cache
    first = oracle.conversation_ids(QUESTIONS[0])
    second = oracle.conversation_ids(QUESTIONS[1], ((QUESTIONS[0], records[0]["answer"]),))
    kept = common_prefix(kv_after(first, expected[0]), second)
    assert records[1]["usage"]["evaluated_tokens"] == len(second) - kept


def test_chat_after_ask_starts_from_the_prompt_cache(imp_bin, converted, photo, env):
    text, _ = converted("new", "float16", "square")
    [first] = first_turns(imp_bin, text, QUESTIONS[0], env, photo)
    p = chat_piped(imp_bin, photo, text, QUESTIONS[:1], "--json", env=env)
    assert p.returncode == 0, p.stderr
    record = json.loads(p.stdout)
    assert record["answer"] == first
    assert record["cache"] == "hit"
    assert record["timings"]["vision_load_ms"] == 0  # the vision tower was not even loaded


# ----------------------------------------------------------------------- commands on a pipe
def test_reset_and_image_start_new_conversations(imp_bin, converted, photo, flipped, env):
    text, _ = converted("new", "float16", "square")
    other = flipped
    q1, q2 = QUESTIONS[:2]
    fresh_1, fresh_2 = first_turns(imp_bin, text, q2, env, photo, other)
    assert fresh_1 != fresh_2  # the images tell apart

    p = chat_piped(imp_bin, photo, text, [q1, q2, "/reset", q2, f"/image {other}", q2], env=env)
    assert p.returncode == 0, p.stderr
    answers = p.stdout.split("\n\n")[:-1]
    assert len(answers) == 4 and p.stdout.endswith("\n\n")
    assert answers[1] != fresh_1  # a follow-up: the first turn is in its context
    assert answers[2] == fresh_1  # after /reset: a first turn again
    assert answers[3] == fresh_2  # after /image: a first turn about the other image
    assert p.stderr.splitlines() == ["new conversation", f"new conversation about {other} (104x72)"]


def test_save_writes_the_transcript(imp_bin, converted, photo, tmp_path, env):
    text, mmproj = converted("new", "float16", "square")
    out = tmp_path / "talk.json"
    p = chat_piped(imp_bin, photo, text, [*QUESTIONS[:2], "/system Answer briefly.", QUESTIONS[2], f"/save {out}"],
                   env=env)
    assert p.returncode == 0, p.stderr
    answers = p.stdout.split("\n\n")[:-1]
    saved = json.loads(out.read_text())
    assert saved["model"]["text"] == str(text) and saved["model"]["mmproj"] == str(mmproj)
    assert saved["image"]["source"] == str(photo) and (saved["image"]["width"], saved["image"]["height"]) == (104, 72)
    assert saved["system"] == "Answer briefly."
    assert [(t["question"], t["answer"], t["finish_reason"]) for t in saved["turns"]] == \
        [(q, a, "length") for q, a in zip(QUESTIONS, answers)]
    assert [f.name for f in tmp_path.iterdir() if f.name.startswith(".")] == []  # no temporary left


def test_system_text_changes_the_conversation(imp_bin, converted, oracle_for, photo, env):
    """/system replaces the system text for the turns that follow, the earlier turns kept: the
    third answer equals the oracle's for the whole conversation under the new system text."""
    text, _ = converted("new", "float16", "square")
    oracle = oracle_for("new", "float16", "square")
    system = "You describe pictures."
    image = as_imp_sees_it(photo)
    plain = oracle.chat_greedy(image, QUESTIONS, N_TOKENS)
    ids_2 = oracle.chat_greedy(image, QUESTIONS[:2], N_TOKENS)
    # turns 1-2 as answered under the default system text, then turn 3 under the new one
    said = tuple((q, oracle.tokenizer.decode(ids, skip_special_tokens=True).strip()) for q, ids in zip(QUESTIONS, ids_2))
    third = oracle.greedy(image, QUESTIONS[2], N_TOKENS, system=system, history=said)
    expected = oracle.tokenizer.decode(third, skip_special_tokens=True).strip()
    assert third != plain[2]

    p = chat_piped(imp_bin, photo, text, [*QUESTIONS[:2], f"/system {system}", QUESTIONS[2]], env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split("\n\n")[2] == expected


def test_context_overflow_drops_the_oldest_turns(imp_bin, converted, photo, env):
    text, _ = converted("new", "float16", "square")
    questions = [f"Question number {i}: what is in the image?" for i in range(6)]
    p = chat_piped(imp_bin, photo, text, questions, "--ctx", "160", "--json", env=env)
    assert p.returncode == 0, p.stderr
    records = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r["question"] for r in records] == questions  # every question answered
    drops = [line for line in p.stderr.splitlines() if "dropped the oldest" in line]
    assert drops and all(line.startswith("warning: the conversation no longer fits the context of 160 tokens")
                         for line in drops)
    # each prompt (image, system, kept turns) left room for a whole answer
    assert all(r["usage"]["evaluated_tokens"] + r["usage"]["reused_tokens"] + N_TOKENS <= 160 for r in records)
    assert all(r["finish_reason"] == "length" for r in records)


def test_bad_lines_do_not_end_the_conversation(imp_bin, converted, photo, tmp_path, env):
    text, _ = converted("new", "float16", "square")
    [first] = first_turns(imp_bin, text, QUESTIONS[0], env, photo)
    too_long = "Why? " * 200
    nowhere = tmp_path / "no" / "such" / "talk.json"
    lines = ["/frobnicate", f"/image {tmp_path / 'missing.png'}", too_long, "/save", f"/save {nowhere}", QUESTIONS[0]]
    p = chat_piped(imp_bin, photo, text, lines, "--ctx", "256", env=env)
    assert p.returncode == 1  # a script is told that some lines failed
    assert p.stdout == f"{first}\n\n"  # and the good line was still answered, as a first turn
    errors = p.stderr.splitlines()
    assert len(errors) == 5 and all(line.startswith("error: ") for line in errors)
    assert errors[0] == "error: unknown command /frobnicate (/help lists them)"
    assert errors[1] == f"error: cannot read image '{tmp_path / 'missing.png'}': file not found"
    assert "more than the context of 256" in errors[2]
    assert errors[3] == "error: /save needs a file name"
    assert errors[4] == f"error: cannot write '{nowhere}': No such file or directory"
    assert "Traceback" not in p.stderr


def test_exit_command_and_image_on_stdin_without_terminal(imp_bin, converted, photo, env):
    text, _ = converted("new", "float16", "square")
    p = chat_piped(imp_bin, photo, text, [QUESTIONS[0], "/exit", QUESTIONS[1]], env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("\n\n") == 1  # nothing after /exit

    # The image on stdin leaves the conversation to the terminal; with none, one clear line.
    proc = subprocess.run([imp_bin, "chat", "-", "--model", str(text)], input=Path(photo).read_bytes(),
                          capture_output=True, env=env, timeout=60, start_new_session=True)
    assert proc.returncode == 1
    assert proc.stderr.decode() == ("error: the image came on standard input and there is no terminal for the "
                                    "conversation: give the image as a path or URL\n")


# ---------------------------------------------------------------------- a real terminal
def spawn_chat(imp_bin, env, *args):
    import io

    import pexpect

    child = pexpect.spawn(imp_bin, ["chat", *map(str, args)], env=env, encoding="utf-8", timeout=120,
                          dimensions=(50, 400))
    child.logfile_read = io.StringIO()  # all the terminal showed, to look for tracebacks
    return child


def finish(child) -> str:
    """Wait for the end; what the terminal showed, with no traceback in it."""
    import pexpect

    child.expect(pexpect.EOF)
    child.close()
    screen = child.logfile_read.getvalue()
    assert "Traceback" not in screen and "internal error" not in screen, screen
    return screen


def test_terminal_conversation(imp_bin, converted, photo, flipped, env):
    """Prompt, streamed answers, /image, /reset, /help, Tab, line history, Ctrl-D: exit 0."""
    text, _ = converted("new", "float16", "square")
    other = flipped
    q1, q2 = QUESTIONS[:2]
    first, other_first = first_turns(imp_bin, text, q1, env, photo, other)
    follow_up = chat_piped(imp_bin, photo, text, [q1, q2], env=env).stdout.split("\n\n")[1]

    history = Path(env["IMP_HOME"]) / "chat_history"
    history.parent.mkdir(parents=True, exist_ok=True)
    history.write_text("What colour is the sky?\n")  # from an earlier chat

    child = spawn_chat(imp_bin, env, photo, "--model", text, "-n", N_TOKENS)
    child.expect_exact(f", image {photo}. /help for commands, Ctrl-D to leave.")  # the banner
    child.expect_exact(">>> ")
    child.send("\x1b[A")  # arrow up: the earlier chat's line comes back
    child.expect_exact("What colour is the sky?")
    child.send("\x15")  # Ctrl-U: not that one
    child.sendline(q1)
    child.expect_exact(f"{first}\r\n\r\n")  # the answer, then a blank line
    child.expect_exact(">>> ")
    child.sendline(q2)
    child.expect_exact(f"{follow_up}\r\n\r\n")  # with the first turn in its context
    child.expect_exact(">>> ")
    child.send("/he\t")  # Tab completes a command
    child.expect_exact("/help ")
    child.sendline("")
    child.expect_exact("/image PATH|URL")
    child.expect_exact(">>> ")
    child.sendline("/reset")
    child.expect_exact("new conversation")
    child.expect_exact(">>> ")
    child.sendline(q1)
    child.expect_exact(f"{first}\r\n\r\n")  # a first turn again
    child.expect_exact(">>> ")
    child.sendline(f"/image {other}")
    child.expect_exact(f"new conversation about {other} (104x72)")
    child.expect_exact(">>> ")
    child.sendline(q1)
    child.expect_exact(f"{other_first}\r\n\r\n")
    child.expect_exact(">>> ")
    child.sendline("/image nowhere.png")
    child.expect_exact("cannot read image 'nowhere.png': file not found")  # after a red 'error:'
    child.expect_exact(">>> ")
    child.sendeof()  # Ctrl-D
    finish(child)
    assert child.exitstatus == 0

    lines = history.read_text().splitlines()
    assert lines[0] == "What colour is the sky?" and lines[-3:] == [f"/image {other}", q1, "/image nowhere.png"]


def test_terminal_ctrl_c(imp_bin, long_context_model, photo, env):
    """Ctrl-C during an answer stops it and returns to the prompt, the partial answer kept; on a
    half-typed line it drops the line; at an empty prompt it leaves with 0."""
    child = spawn_chat(imp_bin, env, photo, "--model", long_context_model, "-n", 100000, "--ignore-eos",
                       "--ctx", 32768)
    child.expect_exact(">>> ")
    child.sendline(QUESTIONS[0])
    child.expect_exact(QUESTIONS[0] + "\r\n")  # the line as typed
    child.expect(r"\w{3}")  # the answer is streaming
    child.sendintr()
    child.expect_exact("(stopped)")
    child.expect_exact(">>> ")
    child.sendline("/stats")
    child.expect(r"answer +(\d+) tokens")
    assert 0 < int(child.match.group(1)) < 100000
    child.expect(r"finish +interrupted")
    child.expect_exact(">>> ")
    child.sendline("/save " + str(Path(env["IMP_HOME"]) / "t.json"))
    child.expect_exact("saved 1 turn")
    child.expect_exact(">>> ")
    child.send("half a question")
    child.expect_exact("half a question")  # echoed: the line editor has it
    child.sendintr()
    child.expect_exact(">>> ")
    child.sendintr()  # at an empty prompt
    finish(child)
    assert child.exitstatus == 0
    turn = json.loads((Path(env["IMP_HOME"]) / "t.json").read_text())["turns"][0]
    assert turn["finish_reason"] == "interrupted" and turn["answer"]
