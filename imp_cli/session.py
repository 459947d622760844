"""The one corridor from `imp ask`, `imp chat`, `imp serve`, the tests and the benchmark to the
engine: a model pair, its engine and the prompt cache, answering questions about images.

A prompt is [system text, image, question (+ the conversation so far)], rendered by the model
family's template (prompts.py) and tokenized on each side of the image as Imp does. The
[system, image] prefix is reused from the KV cache when it is already there (same process), else
restored from the prompt cache on disk (the vision tower is then not even loaded), else encoded
and evaluated, and saved to the cache after the answer (its KV state is copied out when the prefix
is about to leave the KV cache or the session closes, not before the first answer token).
"""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

from .engine import Engine, ImageRef, Sampling, Tuning, prompt_keys, with_seed
from .errors import ImpError
from .images import LoadedImage, label, preprocess
from .modelfiles import ModelPair
from .prompt_cache import PromptCache, entry_key, file_identity
from .prompts import Turn, build_prompt

__all__ = ["Session", "Sampling", "Turn", "Staged", "Answer", "AnswerStream", "Scores", "PromptTooLong",
           "context_for"]


class PromptTooLong(ImpError):
    """The prompt does not fit the context (a server answers this one with its own status)."""


@dataclass(frozen=True)
class Staged:
    """An image as the model sees it: Imp's preprocessing done, keyed by its pixels."""

    source: str
    width: int
    height: int
    sha256: str  # of the original bytes
    pixels: object = field(repr=False)  # (size, size, 3) uint8
    key: str = ""  # sha256 of the preprocessed pixels: the same picture in another file is a hit


@dataclass
class Prompt:
    head: list[int]  # tokens before the image (the system text)
    image: ImageRef | None
    tail: list[int]  # tokens after it: the question(s), the conversation so far
    staged: Staged | None

    @property
    def n_tokens(self) -> int:
        return len(self.head) + (self.image.n_tokens if self.image else 0) + len(self.tail)

    def prefix(self) -> list:
        return [self.head, self.image] if self.image else [self.head]


@dataclass
class Answer:
    text: str
    finish_reason: str  # stop | length | context | interrupted
    timings: dict
    cache: str  # hit | miss | off
    reused_tokens: int
    prompt_tokens: int
    completion_tokens: int  # as generated, an end-of-turn token included (record.completion_tokens: without)
    tokens: list[int] = field(default_factory=list)  # the answer's ids as generated (no stop token)
    seed: int | None = None  # the seed it was sampled with (None: greedy); give it back to reproduce it
    logprobs: list | None = None  # with Sampling.logprobs >= 0: Engine.generated_logprobs


@dataclass
class Scores:
    """Log-likelihoods of given answers (continuations), in the order they were given."""

    logprobs: list[float]
    tokens: list[list[int]]  # each answer as scored: its text's tokens and the end-of-turn token
    timings: dict
    cache: str
    reused_tokens: int
    prompt_tokens: int


class AnswerStream:
    """Iterate for the answer's text pieces (leading blanks dropped, trailing blanks held back
    until more text follows, as Imp's own `.strip()`); `.result` once iteration has ended, also
    after an interruption (then with what was said so far)."""

    def __init__(self, pieces: Iterator[str], finish):
        self._pieces, self._finish = pieces, finish
        self._said: list[str] = []
        self.result: Answer | None = None

    @property
    def text(self) -> str:
        """What was said so far (also after an interruption)."""
        return "".join(self._said)

    def __iter__(self) -> Iterator[str]:
        said = self._said
        blank = ""
        interrupted = True
        try:
            for piece in self._pieces:
                text = blank + piece
                if not said:
                    text = text.lstrip()
                shown = text.rstrip()
                blank = text[len(shown):]
                if shown:
                    said.append(shown)
                    yield shown
            interrupted = False
        finally:
            close = getattr(self._pieces, "close", None)
            if close is not None:  # an interrupted generator finishes its timings now, not when collected
                close()
            self.result = self._finish(self.text, interrupted)

    def collect(self) -> Answer:
        for _ in self:
            pass
        return self.result


def stage_image(pair: ModelPair, image: LoadedImage) -> Staged:
    """Imp's preprocessing for this model (size, pad or squash), keyed by the resulting pixels."""
    pixels = preprocess(image.image, size=pair.image_size, aspect=pair.image_aspect)
    key = hashlib.sha256(pixels.tobytes()).hexdigest()
    return Staged(image.source, image.size[0], image.size[1], image.sha256, pixels, key)


def prompt_texts(family: str, with_image: bool, question: str, history: Sequence[Turn] = (),
                 system: str | None = None, image_turn: int = 0) -> tuple[str, str]:
    """The template's text before and after the image (all of it before, without an image)."""
    before, after = build_prompt(family, question, history, system, image_turn if with_image else 0)
    if not with_image:  # a conversation without a picture: no "<image>\n" at all
        return before + after.removeprefix("\n"), ""
    return before, after


def make_prompt(engine: Engine, staged: Staged | None, question: str, history: Sequence[Turn] = (),
                system: str | None = None, image_turn: int = 0) -> Prompt:
    """The family's template around the image (in user turn `image_turn`); each side tokenized
    on its own, as Imp does.

    Earlier answers go back as Imp's own conversation has them: their (stripped) text
    re-rendered in the template, e.g. Phi-2's `ASSISTANT: {answer}</s>`, and tokenized with the
    rest, whatever ids the model generated (Turn.tokens plays no part here). The KV cache holds
    the ids as generated; Engine.evaluate keeps them up to the first one that differs from these
    and re-evaluates from there. Most answers re-tokenize to their own ids (a first token with
    its blank, as Imp's answers have), so a follow-up then evaluates only its new tokens."""
    pair = engine.pair
    before, after = prompt_texts(pair.prompt_family, staged is not None, question, history, system, image_turn)
    if staged is None:
        return Prompt(engine.tokenize(before + after, first=True), None, [], None)
    image = ImageRef(staged.key, pair.image_tokens)
    return Prompt(engine.tokenize(before, first=True), image, engine.tokenize(after), staged)


def context_for(pair: ModelPair, texts: Sequence[str], max_tokens: int, ctx: int) -> int:
    """A KV cache sized to the longest prompt + answer rather than to --ctx: a token is at least
    one byte, so this bounds it, and saves up to ~1 GB on a one-shot answer."""
    bound = pair.image_tokens + max((len(t.encode("utf-8")) for t in texts), default=0) + max_tokens + 1
    return min(ctx, -(-bound // 256) * 256)


class Session:
    def __init__(self, pair: ModelPair, *, threads: int = 0, ctx: int = 4096, verbose: bool = False,
                 cache: PromptCache | None = None, note=lambda message: None, tuning: Tuning = Tuning()):
        """`tuning`: llama.cpp's settings for this pair here; the caller chooses them (opening.py:
        `imp tune`'s measurement or the CPU family's default), as it resolves and pulls the model."""
        self.pair = pair
        self.cache = cache
        self.note = note
        # The files' identities (a hash, ~1 s the first time a file is seen) are computed while
        # llama.cpp loads the model; only the prompt cache needs them.
        self._identity: Future | None = None
        if cache is not None:
            self._identity = Future()
            threading.Thread(target=self._identify, daemon=True).start()
        self.engine = Engine(pair, n_ctx=ctx, threads=threads, verbose=verbose, tuning=tuning)

    # -- inputs ---------------------------------------------------------------------------------
    def stage(self, image: LoadedImage) -> Staged:
        return stage_image(self.pair, image)

    def prompt(self, staged: Staged | None, question: str, history: Sequence[Turn] = (),
               system: str | None = None, image_turn: int = 0) -> Prompt:
        return make_prompt(self.engine, staged, question, history, system, image_turn)

    def turns_that_fit(self, staged: Staged | None, question: str, history: Sequence[Turn], system: str | None,
                       max_tokens: int) -> int:
        """How many of the latest turns of `history` leave room for an answer of `max_tokens`
        after the prompt (all while they fit; the oldest go first). The question alone not
        fitting is for check_fits to say."""
        keep = len(history)
        while keep and (self.prompt(staged, question, history[len(history) - keep:], system).n_tokens
                        + max_tokens > self.engine.n_ctx):
            keep -= 1
        return keep

    def check_fits(self, prompt: Prompt) -> None:
        if prompt.n_tokens + 1 > self.engine.n_ctx:
            raise PromptTooLong(f"prompt is {prompt.n_tokens} tokens"
                           + (f" (image {prompt.image.n_tokens})" if prompt.image else "")
                           + f", more than the context of {self.engine.n_ctx}: shorten it or raise --ctx")

    # -- evaluation -----------------------------------------------------------------------------
    def prefill(self, prompt: Prompt) -> tuple[str, int]:
        """Bring the KV cache to the whole prompt; returns (cache status, tokens reused)."""
        engine = self.engine
        self.check_fits(prompt)
        evaluated = 0
        prefix = prompt.prefix()
        n_prefix = len(prompt_keys(prefix))
        status = "off" if self.cache is None or prompt.image is None else "miss"
        image_segment = prompt.image
        if prompt.image is not None and engine.cached_prefix(prefix) < n_prefix:
            key = self._cache_key(prompt) if status == "miss" else None
            if key and self._restore(key, prompt):
                status = "hit"
            else:
                image_segment = engine.encode_image(prompt.staged.pixels, prompt.staged.key)
                engine.evaluate([prompt.head, image_segment], logits=False)
                evaluated += engine.timings.prompt_tokens
                if key and self.cache.writable:  # a read-only cache (a batch's) skips the state copy too
                    self._save(key, prompt, n_prefix)
        elif prompt.image is not None and status == "miss":
            status = "hit"  # the prefix is still in memory from an earlier answer
        segments = [prompt.head, image_segment, prompt.tail] if prompt.image else [prompt.head]
        engine.evaluate([s for s in segments if s])
        evaluated += engine.timings.prompt_tokens
        reused = prompt.n_tokens - evaluated
        engine.timings.prompt_tokens, engine.timings.reused_tokens = evaluated, reused
        return status, reused

    def _cache_key(self, prompt: Prompt) -> str:
        text_id, mmproj_id = self._identity.result()
        return entry_key(text=text_id, mmproj=mmproj_id, pixels=prompt.image.key, prefix=prompt.head,
                         image_tokens=prompt.image.n_tokens, family=self.pair.prompt_family)

    def _restore(self, key: str, prompt: Prompt) -> bool:
        t0 = time.perf_counter()
        loaded = self.cache.load(key, self.engine.kv_layout())
        if loaded is None:
            return False
        try:
            restored = self.engine.restore_state(loaded.payload, prompt_keys(prompt.prefix()))
        finally:
            loaded.close()
        if not restored:
            self.cache.discard(key, "llama.cpp refused the saved state")
            return False
        self.engine.timings.cache_read_ms = (time.perf_counter() - t0) * 1000
        return True

    def _save(self, key: str, prompt: Prompt, n_prefix: int) -> None:
        """The entry for this prefix, written once its KV state is copied out: not now, in front
        of the answer, but when the prefix is about to leave the KV cache or at close()
        (Engine.keep_prefix_state); the write itself then runs in the background."""
        header = {"layout": self.engine.kv_layout(), "prefix_tokens": n_prefix,
                  "model": self.pair.name, "image": label(prompt.staged.source)}
        cache = self.cache

        def store(state, error: str) -> None:
            if state is None:
                self.note(f"prompt cache: not saving the prefix ({error}); answer unaffected")
            else:
                cache.store_async(key, header, state)

        self.engine.keep_prefix_state(n_prefix, store)

    # -- answers --------------------------------------------------------------------------------
    def answer(self, image: Staged | None, question: str, history: Sequence[Turn] = (),
               system: str | None = None, sampling: Sampling = Sampling(), max_tokens: int = 512,
               image_turn: int = 0) -> AnswerStream:
        """Prefill now (errors surface here), stream the answer as the result is iterated.
        With temperature > 0 and no seed, a fresh seed is drawn (Answer.seed says which)."""
        t_start = time.perf_counter()
        sampling = with_seed(sampling)
        self.engine.start_request()
        prompt = self.prompt(image, question, history, system, image_turn)
        status, reused = self.prefill(prompt)
        engine = self.engine
        if sampling.grammar:
            sampling = self._grammar_after_lead(sampling)

        def finish(text: str, interrupted: bool) -> Answer:
            t = engine.timings
            if interrupted and t.finish_reason in ("", "length"):
                t.finish_reason = "interrupted"
            timings = t.as_dict()
            timings.update(cache=status, reused_tokens=reused,
                           total_ms=round((time.perf_counter() - t_start) * 1000, 2))
            return Answer(text, t.finish_reason, timings, status, reused, prompt.n_tokens, t.generated_tokens,
                          list(engine.generated), sampling.seed,
                          list(engine.generated_logprobs) if sampling.logprobs >= 0 else None)

        return AnswerStream(engine.generate(sampling, max_tokens), finish)

    def _grammar_after_lead(self, sampling: Sampling) -> Sampling:
        """A grammar constrains the answer itself: the text the template puts before an answer
        (Phi-2's space after `ASSISTANT:`) comes first, as the model learned to write it."""
        import json

        from .prompts import answer_frame

        lead, _ = answer_frame(self.pair.prompt_family)
        if not lead:
            return sampling
        rule = f"imp-answer-lead-{sampling.grammar_root}"
        grammar = f"{sampling.grammar}\n{rule} ::= {json.dumps(lead)} {sampling.grammar_root}\n"
        return replace(sampling, grammar=grammar, grammar_root=rule)

    def score(self, image: Staged | None, question: str, answers: Sequence[str], history: Sequence[Turn] = (),
              system: str | None = None) -> Scores:
        """How likely the model is to give each of `answers` (exactly that text, then end its
        turn): the sum of the log-probabilities of its tokens, teacher-forced after the prompt.
        The prompt is evaluated once for all answers; each answer is written as the family's
        template writes one (Phi-2: " yes</s>")."""
        from .prompts import answer_frame

        t_start = time.perf_counter()
        self.engine.start_request()
        prompt = self.prompt(image, question, history, system)
        status, reused = self.prefill(prompt)
        engine = self.engine
        lead, after = answer_frame(self.pair.prompt_family)
        end = engine.tokenize(after)[:1]
        if not end or not engine.is_end_of_generation(end[0]):
            raise ImpError(f"the {self.pair.prompt_family} template ends an answer with {after[:12]!r}, "
                           "which is not an end-of-turn token of this model")
        before, after_image = prompt_texts(self.pair.prompt_family, image is not None, question, history, system)
        context, asked = (after_image, prompt.tail) if image is not None else (before, prompt.head)
        tokens = [_answer_tokens(engine, context, asked, lead + a) + end for a in answers]
        logprobs = engine.score_continuations(tokens)
        timings = engine.timings.as_dict()
        timings.update(cache=status, reused_tokens=reused, total_ms=round((time.perf_counter() - t_start) * 1000, 2))
        return Scores(logprobs, tokens, timings, status, reused, prompt.n_tokens)

    # -- lifecycle ------------------------------------------------------------------------------
    def _identify(self) -> None:
        try:
            self._identity.set_result((file_identity(self.pair.text_path), file_identity(self.pair.mmproj_path)))
        except BaseException as e:  # surfaced where the key is needed
            self._identity.set_exception(e)

    def close(self) -> None:
        if self.cache is not None:
            self.engine.flush_prefix_state()  # the last prefix's entry, copied after its answer
            self.cache.wait()  # a pending entry is written before the process ends
        self.engine.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _answer_tokens(engine: Engine, context: str, context_tokens: list[int], answer: str) -> list[int]:
    """The answer's tokens as the model saw answers in training: the conversation tokenized as
    one text (a SentencePiece tokenizer writes a word after a newline differently from a word
    that starts a text), unless that re-tokenizes the prompt's end; then the answer on its own."""
    joint = engine.tokenize(context + answer)
    if joint[:len(context_tokens)] == context_tokens and len(joint) > len(context_tokens):
        return joint[len(context_tokens):]
    return engine.tokenize(answer)


def default_cache(output, use_cache: bool = True, write: bool = True) -> PromptCache | None:
    """The prompt cache in $IMP_HOME/cache unless --no-cache or IMP_CACHE=off; `write` False:
    entries are read, none written (a batch's default)."""
    from .prompt_cache import enabled_by_env

    if not use_cache or not enabled_by_env():
        return None
    return PromptCache(note=output.note, writable=write)
