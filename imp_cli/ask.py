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
    cache: bool = True
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
    """Fail on a missing image file before any model work; images themselves load one by one."""
    if sources.count("-") > 1:
        raise ImpError("standard input (-) can be given as an image only once")
    for source in sources:
        if source == "-" or source.lower().startswith(("http://", "https://")):
            continue
        if not os.path.exists(source):
            raise ImpError(f"cannot read image '{source}': file not found")
        if os.path.isdir(source):
            raise ImpError(f"cannot read image '{source}': it is a directory")


def run_ask(req: Request, output: Output, stats: bool = False) -> int:
    """Answer each question about each image in turn. One model load serves every pair; each
    image is loaded when its turn comes (memory stays that of one image), and the questions
    after the first about an image evaluate only their own tokens. Returns the exit status: 1
    if a constrained answer could not be completed."""
    from .engine import Sampling
    from .images import load_image
    from .prompts import build_prompt
    from .record import build as build_record
    from .session import Session, context_for, default_cache, open_pair

    if req.choices:
        from .constrain import decide
    for q in req.questions:
        if not q.strip():
            raise ImpError("the question is empty")
    check_images_exist(req.images)
    first = load_image(req.images[0])  # a bad first image fails before the model loads
    pair = open_pair(req.model, req.mmproj, output)
    texts = ["".join(build_prompt(pair.prompt_family, q, system=req.system)) for q in req.questions]
    answer_room = max(len(c.encode("utf-8")) + 2 for c in req.choices) if req.choices else req.max_tokens
    n_ctx = context_for(pair, texts, answer_room, req.ctx)
    sampling = Sampling(req.temperature, req.top_p, req.top_k, req.seed, req.ignore_eos,
                        grammar=req.constraint.grammar if req.constraint else "")
    status = 0
    several = len(req.images) * len(req.questions) > 1
    with Session(pair, threads=req.threads, ctx=n_ctx, verbose=req.verbose,
                 cache=default_cache(output, req.cache), note=output.note,
                 repack=req.repack, flash_attn=req.flash_attn) as session:
        n = 0
        for i, source in enumerate(req.images):
            image = first if i == 0 else load_image(source)
            staged = session.stage(image)
            del image
            for question in req.questions:
                if several and not output.json_mode:  # headers as `head` prints them
                    title = source if len(req.questions) == 1 else f"{source} | {question}"
                    output.answer(("\n" if n else "") + f"==> {title} <==\n")
                n += 1
                if req.choices:
                    result = decide(session, staged, question, req.choices, req.system)
                    if not output.json_mode:
                        output.answer(result.text)
                else:
                    result = _answer(session, staged, question, req, sampling, output)
                value, extra = result.text, {}
                if req.choices:
                    extra = {"choices": result.probabilities}
                elif req.constraint is not None:
                    value = _finish_constrained(result, req.constraint, output)
                    status = status if value is not None else 1
                if output.json_mode:
                    output.record(build_record(result, question=question, pair=pair, image=staged,
                                               tuning=session.engine.tuning, sampling=sampling,
                                               max_tokens=req.max_tokens, answer=value,
                                               choices=extra.get("choices")))
                elif value is not None:  # an unfinished constrained answer printed nothing
                    output.answer("\n")
                if result.finish_reason == "context":
                    output.warn("the answer was cut off: the context is full (raise --ctx)")
                if stats:
                    title = "timings" + (f" ({source}: {question})" if several else "")
                    output.table(title, {k: v for k, v in result.timings.items() if v is not None})
    return status


def _finish_constrained(result, constraint, output):
    """A constrained answer is printed only once complete: the parsed value, or None (and a
    warning) when it stopped before the grammar was satisfied."""
    if result.finish_reason != "stop":
        if result.finish_reason != "context":  # that one has its own warning
            output.warn("the answer reached --max-tokens before it was complete: not printed"
                        if result.finish_reason == "length" else
                        f"the answer could not be completed ({result.finish_reason}): not printed")
        return None
    value = constraint.parse(result.text)
    if not output.json_mode:
        output.answer(result.text)
    return value


def _answer(session, staged, question, req: Request, sampling, output):
    stream = session.answer(staged, question, system=req.system, sampling=sampling, max_tokens=req.max_tokens)
    try:
        for piece in stream:
            if not output.json_mode and req.constraint is None:  # constrained: printed once complete
                output.answer(piece)
    except KeyboardInterrupt:
        if stream.text and not output.json_mode and req.constraint is None:
            output.answer("\n")  # end the partial answer's line
        raise
    return stream.result
