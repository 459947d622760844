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
    seed: int = 0
    system: str | None = None
    threads: int = 0
    ctx: int = 4096
    verbose: bool = False
    ignore_eos: bool = False
    cache: bool = True
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


def run_ask(req: Request, output: Output, stats: bool = False) -> None:
    """Answer each question about each image in turn. One model load serves every pair; each
    image is loaded when its turn comes (memory stays that of one image), and the questions
    after the first about an image evaluate only their own tokens."""
    from .engine import Sampling
    from .images import load_image
    from .session import Session, context_for

    for q in req.questions:
        if not q.strip():
            raise ImpError("the question is empty")
    check_images_exist(req.images)
    first = load_image(req.images[0])  # a bad first image fails before the model loads
    from .prompts import build_prompt
    from .session import default_cache, open_pair

    pair = open_pair(req.model, req.mmproj, output)
    texts = ["".join(build_prompt(pair.prompt_family, q, system=req.system)) for q in req.questions]
    n_ctx = context_for(pair, texts, req.max_tokens, req.ctx)
    sampling = Sampling(req.temperature, req.top_p, req.top_k, req.seed, req.ignore_eos)
    several = len(req.images) * len(req.questions) > 1
    with Session(pair, threads=req.threads, ctx=n_ctx, verbose=req.verbose,
                 cache=default_cache(output, req.cache), note=output.note) as session:
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
                result = _answer(session, staged, question, req, sampling, output)
                if output.json_mode:
                    output.record({
                        "answer": result.text,
                        "question": question,
                        "model": {"name": pair.name, "text": str(pair.text_path), "mmproj": str(pair.mmproj_path),
                                  "type": pair.text_type},
                        "image": {"source": staged.source, "width": staged.width, "height": staged.height,
                                  "sha256": staged.sha256},
                        "finish_reason": result.finish_reason,
                        "cache": result.cache,
                        "timings": result.timings,
                    })
                else:
                    output.answer("\n")
                if result.finish_reason == "context":
                    output.warn("the answer was cut off: the context is full (raise --ctx)")
                if stats:
                    title = "timings" + (f" ({source}: {question})" if several else "")
                    output.table(title, {k: v for k, v in result.timings.items() if v is not None})


def _answer(session, staged, question, req: Request, sampling, output):
    stream = session.answer(staged, question, system=req.system, sampling=sampling, max_tokens=req.max_tokens)
    try:
        for piece in stream:
            if not output.json_mode:
                output.answer(piece)
    except KeyboardInterrupt:
        if stream.text and not output.json_mode:
            output.answer("\n")  # end the partial answer's line
        raise
    return stream.result
