"""imp as a Python library: a facade over the one Session that `imp ask`, `imp chat` and
`imp serve` use (same preprocessing, templates, prompt cache and answers; no second pipeline).

    import imp_cli
    with imp_cli.load("imp-v1-3b") as model:
        print(model.ask("photo.jpg", "What is in the picture?"))

Every problem a caller can act on is an :class:`imp_cli.ImpError` carrying the one-line message
the CLI prints (a missing image, a prompt too long for the context, an unknown model, ...).

Threads: a :class:`Model` may be shared by threads. It holds one llama.cpp context, so it answers
one call at a time: a lock inside the model serialises `ask`, `choose`, `extract`,
`ask_many` and every `Chat.ask` (a streamed answer holds it until the stream is read to its end or
closed). For answers in parallel, load one model per thread (each costs the model's memory).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Literal, Sequence, Union, overload

from .errors import ImpError

if TYPE_CHECKING:  # only for type checkers: importing these costs time
    import numpy
    import PIL.Image

    from .images import LoadedImage
    from .session import Answer, AnswerStream, Session, Staged

__all__ = ["load", "Model", "Chat", "Choice", "TextStream", "ImageInput", "ImpError", "ArgumentError"]

log = logging.getLogger("imp_cli")

#: What an image may be: a path, an http(s) URL, the file's bytes, a PIL image or a numpy array
#: (height x width x 3 or 4, or height x width; uint8).
ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, "PIL.Image.Image", "numpy.ndarray"]

_SWITCHES = {"auto": "auto", "on": "on", "off": "off", True: "on", False: "off", None: "auto"}


class ArgumentError(ImpError, ValueError):
    """An argument that cannot be used (the CLI's usage errors): empty question, bad choices,
    a schema the grammar converter cannot honour, an unknown setting."""


# -- loading --------------------------------------------------------------------------------------
def load(model: str | os.PathLike[str] | None = None, *, mmproj: str | os.PathLike[str] | None = None,
         threads: int | None = None, ctx: int = 4096, repack: str | bool = "auto", flash_attn: str | bool = "auto",
         cache: bool = True, system: str | None = None, pull: bool = True, verbose: bool = False) -> "Model":
    """Load a model for questions about images.

    model: a store name (``imp-v1-3b``, the default), a Hugging Face repo id (``MILVLG/imp-v1-3b``),
    a text GGUF path (its mmproj found beside it, or given as `mmproj`) or a folder holding a pair.
    A known model or repo id that is not installed is pulled first (downloaded and converted into
    the store, as ``imp pull`` does) unless ``pull=False``.

    model and threads default to $IMP_MODEL and $IMP_THREADS when set, as for the commands.

    threads: llama.cpp threads (0: the physical cores). ctx: the context (KV cache) size, capped
    at the model's trained context. repack / flash_attn: ``"auto"`` (what ``imp tune`` measured,
    else the CPU family's default), ``"on"``/``"off"`` (or True/False). cache: use the prompt cache
    in ``$IMP_HOME/cache`` (the KV state of [system, image] prefixes, shared with the CLI).
    system: replaces Imp's system sentence for every call (each call may override it).
    verbose: llama.cpp's own logging on stderr.

    Progress and warnings go to the ``imp_cli`` logger (silent unless logging is configured).
    Raises ImpError (one line, as the CLI prints it).
    """
    if model is None:
        model = os.environ.get("IMP_MODEL") or None
    if threads is None:
        env = os.environ.get("IMP_THREADS", "")
        threads = int(env) if env.isdigit() else 0
    settings = {}
    for name, value in (("repack", repack), ("flash_attn", flash_attn)):
        if value not in _SWITCHES or isinstance(value, int) and not isinstance(value, bool):
            raise ArgumentError(f"{name} must be 'auto', 'on' or 'off' (or True/False), not {value!r}")
        settings[name] = _SWITCHES[value]
    if not isinstance(threads, int) or threads < 0:
        raise ArgumentError(f"threads must be 0 (the physical cores) or a positive number, not {threads!r}")
    if not isinstance(ctx, int) or ctx < 64:
        raise ArgumentError(f"ctx must be a number of tokens (at least 64), not {ctx!r}")
    from convert.errors import ConvertError

    from .opening import open_session  # the commands' way: resolve, pull if allowed, tuning, Session

    output = _LogOutput(verbose)
    try:
        session = open_session(os.fspath(model) if model is not None else None,
                               os.fspath(mmproj) if mmproj is not None else None, output, pull=pull,
                               use_cache=cache, threads=threads, ctx=ctx, verbose=verbose, **settings)
    except ConvertError as e:  # a pull whose conversion failed: the same one line, as an ImpError
        raise ImpError(str(e)) from None
    return Model(session, system=system)


class _LogOutput:
    """The CLI's Output interface for library use: everything goes to the `imp_cli` logger."""

    json_mode = False
    quiet = True
    interactive = False

    def __init__(self, verbose: bool = False):
        self.verbose = verbose

    def info(self, message: str) -> None:
        log.info(message)

    def warn(self, message: str) -> None:
        log.warning(message)

    def note(self, message: str) -> None:
        log.debug(message)

    def error(self, message: str) -> None:
        log.error(message)

    def table(self, title: str, rows: dict) -> None:
        log.debug("%s: %s", title, rows)

    def answer(self, text: str) -> None:
        pass

    def record(self, obj: dict) -> None:
        pass

    @contextlib.contextmanager
    def phase(self, description: str, total: float):
        log.info("%s ...", description)
        yield lambda done: None


# -- results --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Choice:
    """What `Model.choose` decided: the likeliest answer and every choice's probability
    (normalised over the choices, in the order given)."""

    answer: str
    probabilities: dict[str, float]
    logprobs: list[float] = field(repr=False)  # each choice's summed log-likelihood as the whole answer

    def __str__(self) -> str:
        return self.answer


class TextStream:
    """A streamed answer: iterate for its text pieces (as `imp ask` prints them). After the end
    (or `close()`), `.text` is the whole answer, `.finish_reason` why it ended (``stop``,
    ``length``, ``context`` or ``interrupted``) and `.timings` the figures of `--json`.

    It holds the model until read to its end or closed (a ``with`` block or ``close()``): read
    it in the thread that asked."""

    def __init__(self, stream: "AnswerStream", release: Callable[[], None],
                 on_end: Callable[["Answer | None", str], None] = lambda answer, text: None):
        self._stream = stream
        self._pieces = iter(stream)
        self._release, self._on_end = release, on_end
        self._done = False

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        if self._done:
            raise StopIteration
        try:
            return next(self._pieces)
        except BaseException:  # the end, an error or Ctrl-C: the model is free again
            self._end()
            raise

    def close(self) -> None:
        """Stop the answer here (generation stops at once); what was said stays in `.text`."""
        if not self._done:
            try:
                self._pieces.close()
            finally:
                self._end()

    def _end(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            self._on_end(self._stream.result, self._stream.text)
        finally:
            self._release()

    def __enter__(self) -> "TextStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    @property
    def text(self) -> str:
        """What was said so far."""
        return self._stream.text

    @property
    def finish_reason(self) -> str | None:
        return self._stream.result.finish_reason if self._stream.result else None

    @property
    def timings(self) -> dict | None:
        return self._stream.result.timings if self._stream.result else None


# -- the model ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Call:
    """Sampling and prompt settings of one call (the CLI's options of the same names)."""

    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None  # None: with temperature > 0, a fresh random seed per answer (the record says which)
    ignore_eos: bool = False

    def sampling(self, grammar: str = ""):
        from .engine import Sampling

        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ArgumentError(f"max_tokens must be a positive number, not {self.max_tokens!r}")
        if not 0 <= self.temperature <= 100:
            raise ArgumentError(f"temperature must be between 0 and 100, not {self.temperature!r}")
        if not 0 <= self.top_p <= 1:
            raise ArgumentError(f"top_p must be between 0 and 1, not {self.top_p!r}")
        return Sampling(float(self.temperature), float(self.top_p), int(self.top_k),
                        None if self.seed is None else int(self.seed), bool(self.ignore_eos), grammar=grammar)


class Model:
    """A loaded model pair (language model + vision projector) with its engine and the prompt
    cache. Made by :func:`imp_cli.load`; close it (or use ``with``) to free its memory.

    Sampling keywords, the same on `ask`, `ask_many`, `extract` and `Chat.ask`: ``max_tokens``
    (512), ``temperature`` (0: greedy), ``top_p`` (1), ``top_k`` (0: off), ``seed`` (None: with
    a temperature, a fresh random seed per answer; give one to repeat an answer),
    ``ignore_eos`` (False: generate exactly max_tokens), and ``system`` (replaces the system text).

    Thread safety: one call at a time, through a lock inside the model; other threads wait their
    turn. A streamed answer holds the lock until read to the end or closed, so a thread that asks
    again while its own stream is open gets an ImpError instead of waiting for itself.
    """

    def __init__(self, session: "Session", system: str | None = None):
        self._session: Session | None = session
        self._system = system
        self._lock = threading.Lock()
        self._owner: int | None = None  # the thread holding the lock

    # -- what it is -------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The store name, or the text GGUF's file name without .gguf."""
        return self._open().pair.name

    @property
    def info(self) -> dict:
        """The pair and the engine settings, as `--json` records name them (record.model_info,
        record.settings_info), with the prompt family, image tokens, context and threads."""
        from .record import model_info, settings_info

        session = self._open()
        pair = session.pair
        return {**model_info(pair), "family": pair.prompt_family, "image_tokens": pair.image_tokens,
                "ctx": session.engine.n_ctx, "threads": session.engine.threads,
                "settings": settings_info(session.engine.tuning)}

    def __repr__(self) -> str:
        return f"<imp_cli.Model {self._session.pair.name if self._session else '(closed)'}>"

    # -- answers ----------------------------------------------------------------------------------
    @overload
    def ask(self, image: ImageInput | None, question: str, *, stream: Literal[False] = False,
            system: str | None = None, **sampling: Any) -> str: ...

    @overload
    def ask(self, image: ImageInput | None, question: str, *, stream: Literal[True],
            system: str | None = None, **sampling: Any) -> TextStream: ...

    def ask(self, image, question, *, stream=False, system=None, **sampling):
        """The answer to `question` about `image` (None: a question without a picture), as `imp ask`
        gives it: the text, or with ``stream=True`` a :class:`TextStream` of its pieces. Errors
        (a bad image, a prompt too long) are raised here, before any piece."""
        call = _Call(**_sampling_kw(sampling))
        _check_question(question)
        loaded = _load_image(image)
        with self._turn() as (session, hold):
            staged = session.stage(loaded) if loaded is not None else None
            answer = session.answer(staged, question, system=self._sys(system), sampling=call.sampling(),
                                    max_tokens=call.max_tokens)
            if stream:
                return TextStream(answer, hold())
            return answer.collect().text

    def choose(self, image: ImageInput | None, question: str, choices: Sequence[str], *,
               system: str | None = None) -> Choice:
        """Score each of `choices` as the model's whole answer (as ``imp ask --choices``) and
        return the likeliest with the probabilities of all; deterministic, no generation."""
        from .constrain import decide

        choices = _check_choices(choices)
        _check_question(question)
        loaded = _load_image(image)
        with self._turn() as (session, _):
            staged = session.stage(loaded) if loaded is not None else None
            d = decide(session, staged, question, choices, self._sys(system))
        return Choice(d.text, d.probabilities, d.logprobs)

    def extract(self, image: ImageInput | None, question: str, schema: dict | str, *,
                system: str | None = None, **sampling: Any) -> Any:
        """An answer generated only through what the JSON `schema` allows (as ``imp ask
        --json-schema``), parsed: a dict, list, str, number... Raises ImpError if `max_tokens`
        (or the context) ends the answer before it is complete."""
        call = _Call(**_sampling_kw(sampling))
        constraint = _constraint(schema)
        _check_question(question)
        loaded = _load_image(image)
        with self._turn() as (session, _):
            staged = session.stage(loaded) if loaded is not None else None
            answer = session.answer(staged, question, system=self._sys(system),
                                    sampling=call.sampling(constraint.grammar), max_tokens=call.max_tokens).collect()
        if answer.finish_reason != "stop":
            raise ImpError(f"the answer reached max_tokens={call.max_tokens} before it was complete"
                           if answer.finish_reason == "length" else
                           f"the answer could not be completed ({answer.finish_reason})")
        return constraint.parse(answer.text)

    def chat(self, image: ImageInput | None = None, *, system: str | None = None) -> "Chat":
        """A conversation about `image` (as ``imp chat``): each `Chat.ask` is answered with the
        conversation so far, and a follow-up evaluates only its own tokens."""
        loaded = _load_image(image)
        with self._turn() as (session, _):
            staged = session.stage(loaded) if loaded is not None else None
        return Chat(self, staged, self._sys(system))

    def ask_many(self, images: Iterable[ImageInput], questions: Sequence[str] | str, *,
                 choices: Sequence[str] | None = None, schema: dict | str | None = None,
                 system: str | None = None, **sampling: Any) -> Iterator[dict]:
        """One record per (image, question), lazily, in that order: the dicts ``imp ask --json``
        prints (imp_cli/schema/record.schema.json: answer, question, model, image, sampling,
        settings, finish_reason, cache, usage, timings; with `choices` also their probabilities,
        with `schema` the parsed answer, None if unfinished).
        Each image is read when its turn comes; later questions about it evaluate only their
        own tokens. The model is held only while each record is made."""
        from .ask import Request, answer_question, sampling_of

        call = _Call(**_sampling_kw(sampling))
        questions = [questions] if isinstance(questions, str) else list(questions)
        if not questions:
            raise ArgumentError("give at least one question")
        for q in questions:
            _check_question(q)
        if choices is not None and schema is not None:
            raise ArgumentError("choices and schema cannot be combined: give one")
        # The request `imp ask --json` would make: its per-pair step builds the same records.
        req = Request(images=[], questions=questions, model=None, max_tokens=call.max_tokens,
                      temperature=call.temperature, top_p=call.top_p, top_k=call.top_k, seed=call.seed,
                      system=self._sys(system), ignore_eos=call.ignore_eos,
                      choices=_check_choices(choices) if choices is not None else None,
                      constraint=_constraint(schema) if schema is not None else None)
        call.sampling()  # the same checks as ask's
        sampler = sampling_of(req)
        output = _LogOutput()

        def records() -> Iterator[dict]:
            for image in images:
                loaded = _load_image(image)
                staged = None
                for question in questions:
                    with self._turn() as (session, _):
                        if staged is None:
                            staged, loaded = session.stage(loaded), None  # the decoded picture can go
                        record, _, _ = answer_question(session, staged, question, req, sampler, output, False)
                    yield record

        return records()

    # -- lifecycle --------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the model (waits for a call in another thread to finish; a pending prompt-cache
        entry is written first). Closing twice is harmless."""
        if self._owner == threading.get_ident():
            raise ImpError("an answer is still streaming from this model: close it first")
        with self._lock:
            session, self._session = self._session, None
        if session is not None:
            session.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------------
    def _open(self) -> "Session":
        if self._session is None:
            raise ImpError("the model is closed")
        return self._session

    def _sys(self, system: str | None) -> str | None:
        return self._system if system is None else system

    @contextlib.contextmanager
    def _turn(self):
        """Hold the model for one call: yields (session, hold); `hold()` keeps it held past the
        block (for a stream) and returns the function that frees it."""
        me = threading.get_ident()
        if self._owner == me:
            raise ImpError("an answer is still streaming from this model: read it to the end or close() it first")
        self._lock.acquire()
        self._owner = me
        kept = False

        def hold() -> Callable[[], None]:
            nonlocal kept
            kept = True
            return self._free

        try:
            yield self._open(), hold
        finally:
            if not kept:
                self._free()

    def _free(self) -> None:
        self._owner = None
        self._lock.release()


class Chat:
    """A conversation with a model about one image (or none), as ``imp chat`` holds it. Made by
    `Model.chat`. `turns` lists (question, answer) pairs; `reset()` forgets them."""

    def __init__(self, model: Model, staged: "Staged | None", system: str | None):
        self.model, self._staged, self.system = model, staged, system
        self._turns: list = []  # prompts.Turn, with the answer's generated tokens

    @property
    def turns(self) -> list[tuple[str, str]]:
        return [(t.question, t.answer) for t in self._turns]

    def reset(self) -> None:
        self._turns = []

    @overload
    def ask(self, question: str, *, stream: Literal[False] = False, **sampling: Any) -> str: ...

    @overload
    def ask(self, question: str, *, stream: Literal[True], **sampling: Any) -> TextStream: ...

    def ask(self, question, *, stream=False, **sampling):
        """The next turn: the answer with the conversation so far (str, or a TextStream with
        ``stream=True``). A streamed answer joins the conversation when it ends (a stopped one
        with what was said). When the conversation no longer leaves room for `max_tokens`, the
        oldest turns are dropped (never the image or system text)."""
        from .prompts import Turn

        call = _Call(**_sampling_kw(sampling))
        _check_question(question)
        with self.model._turn() as (session, hold):
            history = self._fitting(session, question, call.max_tokens)
            answer = session.answer(self._staged, question, history, self.system, call.sampling(), call.max_tokens)

            def said(result, text: str) -> None:
                if result is None or (result.finish_reason == "interrupted" and not text):
                    return  # nothing said: as if not asked
                self._turns = history + [Turn(question, text, tuple(result.tokens))]

            if stream:
                return TextStream(answer, hold(), said)
            answer.collect()
            said(answer.result, answer.text)
            return answer.text

    def _fitting(self, session, question: str, max_tokens: int) -> list:
        keep = session.turns_that_fit(self._staged, question, self._turns, self.system, max_tokens)
        return self._turns[len(self._turns) - keep:]


# -- checks and conversions -----------------------------------------------------------------------
_SAMPLING = {"max_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos"}


def _sampling_kw(kw: dict) -> dict:
    unknown = sorted(set(kw) - _SAMPLING)
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r} (sampling takes {', '.join(sorted(_SAMPLING))})")
    return kw


def _check_question(question) -> None:
    if not isinstance(question, str):
        raise ArgumentError(f"the question must be a string, not {type(question).__name__}")
    if not question.strip():
        raise ArgumentError("the question is empty")


def _check_choices(choices) -> list[str]:
    """The CLI's rules for --choices, on a list: blanks around each dropped; at least two, none
    empty, none twice."""
    from .constrain import ConstraintError, check_choices

    if isinstance(choices, str) or not all(isinstance(c, str) for c in choices):
        raise ArgumentError("choices must be a list of strings")
    try:
        return check_choices([c.strip() for c in choices], option="choices")
    except ConstraintError as e:
        raise ArgumentError(str(e)) from None


def _constraint(schema):
    from .constrain import ConstraintError, from_schema

    text = schema if isinstance(schema, str) else json.dumps(schema)
    try:
        return from_schema(text, option="schema")
    except ConstraintError as e:
        raise ArgumentError(str(e)) from None
    except TypeError as e:
        raise ArgumentError(f"schema is not JSON: {e}") from None


def _load_image(image) -> "LoadedImage | None":
    """Any ImageInput -> the decoded image, through the same checks as the CLI's images."""
    from .images import ImageError, LoadedImage, image_from_array, image_from_bytes, image_from_pil, load_image

    if image is None or isinstance(image, LoadedImage):
        return image
    if isinstance(image, (str, os.PathLike)):
        source = os.fspath(image)
        if isinstance(source, bytes):
            source = os.fsdecode(source)
        return load_image(source)
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        return image_from_bytes(data, f"bytes ({len(data):,})", "the image bytes", "the image bytes")
    import numpy as np
    from PIL import Image

    if isinstance(image, np.ndarray):
        return image_from_array(image)
    if isinstance(image, Image.Image):
        return image_from_pil(image)
    raise ImageError(f"an image must be a path, a URL, bytes, a PIL image or a numpy array, "
                     f"not {type(image).__name__}")
