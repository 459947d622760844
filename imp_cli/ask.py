"""`imp ask`: one image, one question, one streamed answer."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ImpError
from .output import Output


@dataclass
class Request:
    images: list[str]
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
    """Answer the question about each image in turn. One model load serves every image, and the
    system prompt's evaluation is reused from one image to the next."""
    from .engine import Engine, Sampling
    from .images import load_image
    from .prompts import build_prompt
    from .pull import resolve_model

    if not req.question.strip():
        raise ImpError("the question is empty")
    images = [load_image(source) for source in req.images]  # fail on a bad image before model work
    pair = resolve_model(req.model, req.mmproj, output)
    before, after = build_prompt(pair.prompt_family, req.question, system=req.system)
    sampling = Sampling(req.temperature, req.top_p, req.top_k, req.seed, req.ignore_eos)

    # A token is at least one byte, so this bounds prompt + answer: a KV cache sized to it rather
    # than to --ctx saves up to ~1 GB of memory on a one-shot answer.
    bound = pair.image_tokens + len((before + after).encode("utf-8")) + req.max_tokens + 1
    n_ctx = min(req.ctx, -(-bound // 256) * 256)
    with Engine(pair, n_ctx=n_ctx, threads=req.threads, verbose=req.verbose) as engine:
        head, tail = engine.tokenize(before, first=True), engine.tokenize(after)
        needed = len(head) + pair.image_tokens + len(tail)
        if needed >= engine.n_ctx:
            raise ImpError(f"prompt is {needed} tokens (image {pair.image_tokens}), more than the context of "
                           f"{engine.n_ctx}: shorten the question or raise --ctx")
        for n, image in enumerate(images):
            if len(images) > 1 and not output.json_mode:  # headers as `head` prints them
                output.answer(("\n" if n else "") + f"==> {image.source} <==\n")
            answer, timings = _answer(engine, pair, image, head, tail, sampling, req.max_tokens, output)
            if output.json_mode:
                output.record({
                    "answer": answer,
                    "model": {"name": pair.name, "text": str(pair.text_path), "mmproj": str(pair.mmproj_path),
                              "type": pair.text_type},
                    "image": {"source": image.source, "width": image.size[0], "height": image.size[1],
                              "sha256": image.sha256},
                    "finish_reason": timings["finish_reason"],
                    "timings": timings,
                })
            else:
                output.answer("\n")
            if timings["finish_reason"] == "context":
                output.warn("the answer was cut off: the context is full (raise --ctx)")
            if stats:
                title = "timings" + (f" ({image.source})" if len(images) > 1 else "")
                output.table(title, {k: v for k, v in timings.items() if v is not None})


def _answer(engine, pair, image, head, tail, sampling, max_tokens, output) -> tuple[str, dict]:
    """Stream one answer to stdout (unless --json); returns it stripped, with its timings."""
    from .images import preprocess

    engine.start_request()
    pixels = preprocess(image.image, size=pair.image_size, aspect=pair.image_aspect)
    embedding = engine.encode_image(pixels, image.sha256)
    engine.evaluate([head, embedding, tail])
    pieces: list[str] = []
    blank = ""  # whitespace held back until more text follows: the answer is stripped
    try:
        for piece in engine.generate(sampling, max_tokens):
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
    return "".join(pieces), engine.timings.as_dict()
