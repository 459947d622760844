"""Imp-exact follow-ups when an answer does not start with a blank.

Imp's conversation re-renders an earlier answer's stripped text after the template's `ASSISTANT: `
and tokenizes the whole prompt again. A model whose first answer token carries no blank
("ASSISTANT:" + "word") must then be fed "ASSISTANT:" + " word" on the next turn, not its own
ids. The tiny model here has its lm_head bias lowered by BLANK_PENALTY for every token whose
text starts with whitespace, so its answers start (and go on) without one; the oracle runs the
same checkpoint. Checked in the Session, `imp chat` (piped) and `imp serve`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from test_ask import _torch_one_thread, as_imp_sees_it  # noqa: F401  (fixtures)
from helpers import clean_env, run_imp

QUESTIONS = ["Describe the image in detail.", "Is there a tree in the picture?", "What is this?"]
N_TOKENS = 12
BLANK_PENALTY = 30.0  # logits of the live rows have a std of ~2: a blank-led token never wins


@pytest.fixture(scope="module")
def blankless(checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint with blank-led tokens pushed down in lm_head.bias."""
    from safetensors.numpy import load_file, save_file
    from tokenizers import Tokenizer

    from factory import predictable_ids

    dest = tmp_path_factory.mktemp("blankless")
    shutil.copytree(checkpoint("new", "float16", "square"), dest, dirs_exist_ok=True)
    tok = Tokenizer.from_file(str(dest / "tokenizer.json"))
    blank = [int(i) for i in predictable_ids() if tok.decode([int(i)], skip_special_tokens=False)[:1].isspace()]
    assert len(blank) > 50
    done = False
    for shard in sorted(dest.glob("*.safetensors")):
        tensors = load_file(str(shard))
        if "lm_head.bias" in tensors:
            bias = tensors["lm_head.bias"]
            changed = bias.astype(np.float32)
            changed[blank] -= BLANK_PENALTY
            tensors["lm_head.bias"] = changed.astype(bias.dtype)
            save_file(tensors, str(shard), metadata={"format": "pt"})
            done = True
    assert done
    return dest


@pytest.fixture(scope="module")
def blankless_pair(blankless, tmp_path_factory) -> tuple[Path, Path]:
    from convert.pipeline import convert

    r = convert(str(blankless), tmp_path_factory.mktemp("blankless-gguf"), quant="F16")
    return Path(r.text_path), Path(r.mmproj_path)


@pytest.fixture(scope="module")
def oracle(blankless):
    from oracle import Oracle

    return Oracle(blankless)


@pytest.fixture(scope="module")
def expected(oracle, photo) -> list[list[int]]:
    """Imp's own three-turn conversation: each answer's text re-rendered in the next prompt."""
    answers = oracle.chat_greedy(as_imp_sees_it(photo), QUESTIONS, N_TOKENS)
    for ids in answers:  # the case this file is about: answers that start without a blank
        assert not oracle.tokenizer.decode(ids[:1])[:1].isspace()
        assert len(oracle.tokenizer.decode(ids, skip_special_tokens=True).strip()) > 5
    return answers


def texts(oracle, answers: list[list[int]]) -> list[str]:
    return [oracle.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in answers]


def test_session_follow_ups_are_imps_prompt(blankless_pair, oracle, expected, photo):
    """Each turn's prompt is the oracle's token for token; the answers are the oracle's; the KV
    cache kept the earlier prompt and re-evaluated from the answer's first token (which the
    re-rendering writes with a blank) onwards."""
    from imp_cli.images import load_image
    from imp_cli.modelfiles import read_pair
    from imp_cli.session import Sampling, Session, Turn

    history: list[Turn] = []
    answers, prompts = [], []
    with Session(read_pair(*blankless_pair), threads=1, ctx=1024) as session:
        staged = session.stage(load_image(str(photo)))
        for question in QUESTIONS:
            prompt = session.prompt(staged, question, history)
            said = tuple((t.question, t.answer) for t in history)
            assert (prompt.head, prompt.tail) == oracle.prompt_ids(question, history=said)
            prompts.append(prompt)
            answer = session.answer(staged, question, history, sampling=Sampling(), max_tokens=N_TOKENS).collect()
            answers.append(answer)
            history.append(Turn(question, answer.text, tuple(answer.tokens)))
    assert [a.tokens for a in answers] == expected
    assert [a.text for a in answers] == texts(oracle, expected)
    for k in (1, 2):
        # the generated first token (no blank) is not the re-rendered one (" word"): the cache
        # keeps everything before it, and only that
        before = prompts[k - 1]
        assert prompts[k].tail[len(before.tail)] != answers[k - 1].tokens[0]
        assert answers[k].reused_tokens == len(before.head) + before.image.n_tokens + len(before.tail)


def test_chat_follow_ups_equal_imps_conversation(imp_bin, blankless_pair, oracle, expected, photo, tmp_path):
    p = run_imp("chat", photo, "--model", blankless_pair[0], "-n", N_TOKENS, "--json", "--temperature", "0",
                env=clean_env(tmp_path), stdin="".join(f"{q}\n" for q in QUESTIONS).encode())
    assert p.returncode == 0, p.stderr
    assert [json.loads(line)["answer"] for line in p.stdout.splitlines()] == texts(oracle, expected)


def test_serve_follow_ups_equal_imps_conversation(imp_bin, blankless_pair, oracle, expected, photo, tmp_path):
    """A client sends the conversation back as text; the server's KV cache held the generated ids."""
    from test_serve import Server, data_url

    want = texts(oracle, expected)
    server = Server(imp_bin, blankless_pair[0], clean_env(tmp_path))
    try:
        client = server.client()
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(photo)}},
                                                 {"type": "text", "text": QUESTIONS[0]}]}]
        for k, question in enumerate(QUESTIONS):
            if k:
                messages += [{"role": "user", "content": question}]
            reply = client.chat.completions.create(model=server.model, messages=messages, max_tokens=N_TOKENS,
                                                   temperature=0)
            assert reply.choices[0].message.content == want[k]
            messages += [{"role": "assistant", "content": want[k]}]
    finally:
        assert server.stop() == 0, server.log()
