"""`imp ask`: one image, one question, one streamed answer."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ImpError
from .output import Output


@dataclass
class Request:
    image: str
    question: str
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


def run_ask(req: Request, output: Output, stats: bool = False) -> None:
    from .engine import Engine, Sampling
    from .images import load_image, preprocess
    from .prompts import build_prompt
    from .pull import resolve_model

    if not req.question.strip():
        raise ImpError("the question is empty")
    image = load_image(req.image)  # fail on a bad image before any model work
    pair = resolve_model(req.model, req.mmproj, output)
    pixels = preprocess(image.image, size=pair.image_size, aspect=pair.image_aspect)
    before, after = build_prompt(pair.prompt_family, req.question, system=req.system)

    with Engine(pair, n_ctx=req.ctx, threads=req.threads, verbose=req.verbose) as engine:
        head, tail = engine.tokenize(before), engine.tokenize(after)
        needed = len(head) + pair.image_tokens + len(tail)
        if needed >= engine.n_ctx:
            raise ImpError(f"prompt is {needed} tokens (image {pair.image_tokens}), more than the context of "
                           f"{engine.n_ctx}: shorten the question or raise --ctx")
        embedding = engine.encode_image(pixels, image.sha256)
        engine.evaluate([head, embedding, tail])
        sampling = Sampling(req.temperature, req.top_p, req.top_k, req.seed, req.ignore_eos)
        pieces: list[str] = []
        blank = ""  # whitespace held back until more text follows: the answer is stripped
        try:
            for piece in engine.generate(sampling, req.max_tokens):
                text = blank + piece
                if not pieces:  # the answer follows "ASSISTANT:" after a space
                    text = text.lstrip()
                shown = text.rstrip()
                blank = text[len(shown):]
                if shown:
                    pieces.append(shown)
                    if not output.json_mode:
                        output.answer(shown)
        except KeyboardInterrupt:
            if pieces and not output.json_mode:
                output.answer("\n")  # end the partial answer's line
            raise
        answer = "".join(pieces)
        timings = engine.timings.as_dict()

    if output.json_mode:
        output.record({
            "answer": answer,
            "model": {"name": pair.name, "text": str(pair.text_path), "mmproj": str(pair.mmproj_path), "type": pair.text_type},
            "image": {"source": image.source, "width": image.size[0], "height": image.size[1], "sha256": image.sha256},
            "finish_reason": timings["finish_reason"],
            "timings": timings,
        })
    else:
        output.answer("\n")
    if timings["finish_reason"] == "context":
        output.warn("the answer was cut off: the context is full (raise --ctx)")
    if stats:
        output.table("timings", {k: v for k, v in timings.items() if v is not None})
