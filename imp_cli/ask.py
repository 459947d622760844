"""`imp ask`: one answer per (image, question), streamed, through one Session."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .errors import ImpError
from .output import Output


@dataclass
class Request:
    images: list[str]
    questions: list[str]
    model: str | None
    mmproj: str | None = None
    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None  # None: a fresh random seed per answer (with temperature > 0)
    system: str | None = None
    threads: int = 0
    ctx: int = 4096
    verbose: bool = False
    ignore_eos: bool = False
    cache: bool = True  # read the prompt cache (--no-cache / --cache off: False)
    cache_write: bool | None = None  # write it: None = as the command decides (a batch reads only)
    repack: str = "auto"  # weight repacking: auto (imp tune's choice) | on | off
    flash_attn: str = "auto"
    choices: list[str] | None = None  # --choices: score these instead of generating
    constraint: object = None  # --json-schema / --grammar: a constrain.Constraint
    extra: dict = field(default_factory=dict)


def read_questions(source: str, stdin=None) -> list[str]:
    """--questions-from FILE|-: one question per line; blank lines skipped."""
    import sys

    try:
        if source == "-":
            text = (stdin or sys.stdin).read()
        else:
            with open(source, encoding="utf-8") as f:
                text = f.read()
    except FileNotFoundError:
        raise ImpError(f"questions file '{source}' not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ImpError(f"cannot read questions file '{source}': {getattr(e, 'strerror', None) or e}") from None
    questions = [line.strip() for line in text.splitlines() if line.strip()]
    if not questions:
        raise ImpError(f"no questions in '{source}'")
    return questions


def check_images_exist(sources: list[str]) -> None:
    """Fail on a missing image file before any model work; images themselves load one by one.
    (Several images are a batch: batch.check_options checks those.)"""
    for source in sources:
        if source == "-" or source.lower().startswith(("http://", "https://")):
            continue
        if not os.path.exists(source):
            raise ImpError(f"cannot read image '{source}': file not found")
        if os.path.isdir(source):
            raise ImpError(f"cannot read image '{source}': it is a directory")


def check_questions(req: Request) -> None:
    for q in req.questions:
        if not q.strip():
            raise ImpError("the question is empty")


def run_single(req: Request, output: Output, stats: bool) -> int:
    """One image (and one or more questions): its answers stream to stdout as generated; a bad
    image is one error line and exit 1, before the model loads."""
    from .images import load_image
    from .opening import open_pair
    from .stats import summary

    check_images_exist(req.images)
    image = load_image(req.images[0])  # a bad image fails before the model loads
    pair = open_pair(req.model, req.mmproj, output)
    show = not output.json_mode
    status = 0
    with open_for(pair, req, output, cache_write=req.cache_write is not False) as session:
        staged = session.stage(image)
        del image
        sampling = sampling_of(req)
        for n, question in enumerate(req.questions):
            if show and len(req.questions) > 1:  # headers as `head` prints them
                output.answer(("\n" if n else "") + f"==> {staged.source} | {question} <==\n")
            record, result, ok = answer_question(session, staged, question, req, sampling, output, show)
            status = status if ok else 1
            if output.json_mode:
                output.record(record)
            if stats:
                title = "timings" + (f" ({staged.source}: {question})" if len(req.questions) > 1 else "")
                output.table(title, summary(result.timings))
    return status


# -- the per-(image, question) step: `imp ask`, its batches, their worker processes and Ray -----------
def sampling_of(req: Request):
    from .engine import Sampling

    return Sampling(req.temperature, req.top_p, req.top_k, req.seed, req.ignore_eos,
                    grammar=req.constraint.grammar if req.constraint else "")


def open_for(pair, req: Request, output: Output, *, threads: int | None = None, cache_write: bool = True):
    """The Session that answers `req` with `pair` (`threads`: instead of req.threads, a --jobs
    worker's share): its KV cache sized for the request, its settings and prompt cache as asked."""
    from .opening import start_session

    return start_session(pair, output, threads=req.threads if threads is None else threads,
                         ctx=context_size(pair, req), verbose=req.verbose, use_cache=req.cache,
                         cache_write=cache_write, repack=req.repack, flash_attn=req.flash_attn)


def context_size(pair, req: Request) -> int:
    """The KV cache for the longest prompt + answer of this request (session.context_for)."""
    from .prompts import build_prompt
    from .session import context_for

    texts = ["".join(build_prompt(pair.prompt_family, q, system=req.system)) for q in req.questions]
    answer_room = max(len(c.encode("utf-8")) + 2 for c in req.choices) if req.choices else req.max_tokens
    return context_for(pair, texts, answer_room, req.ctx)


def run_fields(pair, tuning, req: Request) -> dict:
    """record.run_fields for every answer of this request (the seed given, if any)."""
    from . import record

    return record.run_fields(pair, tuning, sampling_of(req), req.max_tokens, None if req.choices else req.seed)


def make_record(session, question: str, staged, value, extra: dict, result, req: Request, sampling) -> dict:
    """The --json record of one answer (also a line of --output FILE and a Ray row's record):
    record.build, the one record builder."""
    from .record import from_session

    return from_session(session, result, question=question, image=staged, sampling=sampling,
                        max_tokens=req.max_tokens, answer=value, choices=extra.get("choices"))


def answer_question(session, staged, question: str, req: Request, sampling, output: Output,
                    show: bool) -> tuple[dict, object, bool]:
    """One (image, question): the answer (streamed to stdout as generated when `show`), its
    record, the result, and False if a constrained answer could not be completed."""
    if req.choices:
        from .constrain import decide

        result = decide(session, staged, question, req.choices, req.system)
        if show:
            output.answer(result.text)
    else:
        result = _answer(session, staged, question, req, sampling, output, show)
    value, extra, ok = result.text, {}, True
    if req.choices:
        extra = {"choices": result.probabilities}
    elif req.constraint is not None:
        value = _finish_constrained(result, req.constraint, output, show)
        ok = value is not None
    if show and value is not None:  # an unfinished constrained answer printed nothing
        output.answer("\n")
    if result.finish_reason == "context":
        output.warn("the answer was cut off: the context is full (raise --ctx)")
    return make_record(session, question, staged, value, extra, result, req, sampling), result, ok


def _finish_constrained(result, constraint, output, show: bool):
    """A constrained answer is printed only once complete: the parsed value, or None (and a
    warning) when it stopped before the grammar was satisfied."""
    if result.finish_reason != "stop":
        if result.finish_reason != "context":  # that one has its own warning
            output.warn("the answer reached --max-tokens before it was complete: not printed"
                        if result.finish_reason == "length" else
                        f"the answer could not be completed ({result.finish_reason}): not printed")
        return None
    value = constraint.parse(result.text)
    if show:
        output.answer(result.text)
    return value


def _answer(session, staged, question, req: Request, sampling, output, show: bool):
    stream = session.answer(staged, question, system=req.system, sampling=sampling, max_tokens=req.max_tokens)
    try:
        for piece in stream:
            if show and req.constraint is None:  # constrained: printed once complete
                output.answer(piece)
    except KeyboardInterrupt:
        if stream.text and show and req.constraint is None:
            output.answer("\n")  # end the partial answer's line
        raise
    return stream.result
