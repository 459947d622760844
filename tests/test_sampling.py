"""Sampling does what its options say, in the Session, `imp ask` and `imp serve`.

Reference: the oracle's logits for the first answer token (transformers, float32), through
llama.cpp's chain as imp builds it (top-k, then top-p on the probabilities at temperature 1,
then temperature, then a draw): `expected()` below.

- Distribution: the first token of N_SEEDS answers (seeds 0..N_SEEDS-1) at a temperature, binned
  as the BINS most likely tokens one by one and the rest together, is within MAX_TV (total
  variation) of the reference. With N_SEEDS = 2000 and 13 bins, sampling noise alone gives a TV
  of about 0.03 at most (0.5 * sqrt(2 * 13 / (pi * N))); an always-greedy sampler gives
  1 - p(top token) (checked > 5 x MAX_TV below), one fixed seed about the same, an ignored
  temperature the distance between the two temperatures' references (checked > 3 x MAX_TV).
- top-k keeps the k best, top-p only the nucleus (every draw in it, drawn as renormalised);
  temperature -> 0 and top-k 1 are greedy; the same seed repeats an answer, other seeds differ.
- The same options through `imp ask` and `imp serve`, with fewer draws (a process or a request
  each): seeds change the answer, a seed repeats it, top-k 1 and a tiny top-p give the greedy one.

Every draw has an explicit seed: the tests hold whatever the default sampling is.
"""

from __future__ import annotations

import numpy as np
import pytest

from test_ask import QUESTION, _torch_one_thread, as_imp_sees_it, ask_ok  # noqa: F401  (fixtures)
from helpers import clean_env

N_SEEDS = 2000
BINS = 12
MAX_TV = 0.06
ANSWER = 8  # tokens, for the seed tests


# -- the reference -------------------------------------------------------------------------------
def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


def expected(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """llama.cpp's chain as Engine._sampler builds it: top-k, top-p (on the softmax of what is
    left, at temperature 1: the smallest set of best tokens whose probability reaches top_p),
    temperature, then a draw from the softmax of what is left."""
    keep = np.ones(len(logits), dtype=bool)
    order = np.argsort(-logits, kind="stable")
    if top_k > 0:
        keep[:] = False
        keep[order[:top_k]] = True
    if top_p < 1.0:
        p = softmax(np.where(keep, logits, -np.inf))
        cum = np.cumsum(p[order])
        n = int(np.searchsorted(cum, top_p) + 1)  # the first count whose mass reaches top_p
        nucleus = np.zeros_like(keep)
        nucleus[order[:n]] = True
        keep &= nucleus
    return softmax(np.where(keep, logits, -np.inf), temperature)


def binned(p: np.ndarray, top: np.ndarray) -> np.ndarray:
    return np.append(p[top], 1.0 - p[top].sum())


def tv(p: np.ndarray, q: np.ndarray) -> float:
    return 0.5 * float(np.abs(p - q).sum())


def empirical(tokens: list[int], top: np.ndarray) -> np.ndarray:
    counts = np.array([sum(t == i for t in tokens) for i in top], dtype=float)
    counts = np.append(counts, len(tokens) - counts.sum())
    return counts / len(tokens)


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(oracle_for, photo) -> np.ndarray:
    """The oracle's logits for the first answer token."""
    return oracle_for("new", "float16", "square").first_logits(as_imp_sees_it(photo), QUESTION)


def first_tokens(session, staged, n: int = N_SEEDS, **options) -> list[int]:
    """The first answer token for seeds 0..n-1, each a whole Session.answer (prompt reused)."""
    from imp_cli.session import Sampling

    out = []
    for seed in range(n):
        sampling = Sampling(seed=seed, ignore_eos=True, **options)
        out.append(session.answer(staged, QUESTION, sampling=sampling, max_tokens=1).collect().tokens[0])
    return out


def answer_ids(session, staged, **options) -> tuple[int, ...]:
    from imp_cli.session import Sampling

    return tuple(session.answer(staged, QUESTION, sampling=Sampling(ignore_eos=True, **options),
                                max_tokens=ANSWER).collect().tokens)


# -- the Session ---------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_first_token_follows_the_softmax(session, staged, reference, temperature):
    p = expected(reference, temperature)
    top = np.argsort(-p)[:BINS]
    want = binned(p, top)
    assert 1 - want[0] > 5 * MAX_TV  # a spread distribution: greedy (or one seed) would be far from it
    other = binned(expected(reference, 1.5 - temperature), top)  # the other temperature of the two
    assert tv(want, other) > 3 * MAX_TV  # an ignored temperature would show
    got = empirical(first_tokens(session, staged, temperature=temperature), top)
    assert tv(got, want) <= MAX_TV, (got.round(3), want.round(3))


def test_top_k_keeps_the_k_best(session, staged, reference):
    p = expected(reference, 1.0, top_k=5)
    best = set(np.argsort(-reference)[:5].tolist())
    tokens = first_tokens(session, staged, N_SEEDS // 2, temperature=1.0, top_k=5)
    assert set(tokens) <= best and len(set(tokens)) == 5
    top = np.argsort(-p)[:5]
    assert tv(empirical(tokens, top), binned(p, top)) <= MAX_TV


def test_top_p_keeps_only_the_nucleus(session, staged, reference):
    """top_p between the mass of the 3 and the 4 best tokens: exactly those 4 are drawn, as
    renormalised."""
    p1 = softmax(reference)
    order = np.argsort(-p1)
    cum = np.cumsum(p1[order])
    top_p = float((cum[2] + cum[3]) / 2)
    p = expected(reference, 1.0, top_p=top_p)
    nucleus = order[:4]
    assert set(np.flatnonzero(p).tolist()) == set(nucleus.tolist())
    tokens = first_tokens(session, staged, N_SEEDS // 2, temperature=1.0, top_p=top_p)
    assert set(tokens) == set(nucleus.tolist())
    assert tv(empirical(tokens, nucleus), binned(p, nucleus)) <= MAX_TV


def test_cold_temperature_and_top_k_1_are_greedy(session, staged, reference):
    greedy = answer_ids(session, staged, temperature=0.0)
    assert greedy[0] == int(np.argmax(reference))
    assert set(first_tokens(session, staged, 200, temperature=0.01)) == {greedy[0]}
    assert set(first_tokens(session, staged, 200, temperature=1.0, top_k=1)) == {greedy[0]}
    assert answer_ids(session, staged, temperature=1.0, top_k=1, seed=3) == greedy
    assert answer_ids(session, staged, temperature=0.01, seed=3) == greedy


def test_seeds(session, staged):
    answers = [answer_ids(session, staged, temperature=1.0, seed=seed) for seed in range(20)]
    assert len(set(answers)) >= 15  # 8 tokens from a spread distribution: seeds differ
    assert [answer_ids(session, staged, temperature=1.0, seed=seed) for seed in (0, 7)] == [answers[0], answers[7]]


# -- the command and the server ------------------------------------------------------------------
def test_ask_uses_the_sampling_options(imp_bin, converted, photo, tmp_path):
    text, _ = converted("new", "float16", "square")
    env = clean_env(tmp_path)

    def ask(*options) -> str:
        return ask_ok(imp_bin, photo, text, "--temperature", *options, env=env, n=ANSWER)

    greedy = ask("0")
    sampled = [ask("1", "--seed", str(seed)) for seed in range(4)]
    assert len(set(sampled)) >= 3 and greedy not in sampled
    assert ask("1", "--seed", "2") == sampled[2]
    assert ask("1", "--seed", "2", "--top-k", "1") == greedy
    assert ask("1", "--seed", "2", "--top-p", "0.01") == greedy


def test_server_uses_the_sampling_options(imp_bin, converted, photo, tmp_path):
    from test_serve import Server, data_url

    server = Server(imp_bin, converted("new", "float16", "square")[0], clean_env(tmp_path))
    try:
        client = server.client()
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(photo)}},
                                                 {"type": "text", "text": QUESTION}]}]

        def ask(**options) -> str:
            extra = {k: options.pop(k) for k in ("top_k",) if k in options}
            reply = client.chat.completions.create(model=server.model, messages=messages, max_tokens=ANSWER,
                                                   extra_body=extra or None, **options)
            return reply.choices[0].message.content

        greedy = ask(temperature=0)
        sampled = [ask(temperature=1, seed=seed) for seed in range(4)]
        assert len(set(sampled)) >= 3 and greedy not in sampled
        assert ask(temperature=1, seed=2) == sampled[2]
        assert ask(temperature=1, seed=2, top_k=1) == greedy
        assert ask(temperature=1, seed=2, top_p=0.01) == greedy
    finally:
        assert server.stop() == 0, server.log()


def test_no_entry_point_fixes_the_seed_by_default():
    """With a temperature, an answer is random unless a seed is given (engine.with_seed, the one
    rule of ask, chat, serve and the Python API): no entry point may default to a fixed seed.
    Ray's ImpPredictor defaulted to 0, so every row of a sampled run drew the same way."""
    import inspect

    from imp_cli.api import _Call
    from imp_cli.ask import Request
    from imp_cli.ray_data import ImpPredictor
    from imp_cli.serve import ServeOptions

    assert inspect.signature(ImpPredictor).parameters["seed"].default is None
    assert Request(images=[], questions=[], model=None).seed is None
    assert _Call().seed is None and ServeOptions().seed is None
