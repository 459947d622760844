"""imp on a Ray cluster: a callable class for Ray Data's `Dataset.map_batches` (`pip install 'imp[ray]'`).

Ray schedules, retries and moves the data; imp only answers. Each actor builds one Session when
Ray constructs it (the model loads once per actor, not per batch), then answers every row of each
batch through the same per-image step as `imp ask` (batch.Answerer), and returns the `imp ask
--json` records:

    import ray
    from imp_cli.ray_data import ImpPredictor

    ds = ray.data.read_binary_files("/data/photos", include_paths=True)  # or from_items([{"path": p}, ...])
    answers = ds.map_batches(ImpPredictor, concurrency=8, batch_size=4, num_cpus=4,
                             fn_constructor_kwargs={"model": "imp-v1-3b", "questions": ["What is it?"],
                                                    "threads": 4})
    answers.write_json("/data/answers")

Input columns, in this order of preference:
  - `bytes` (+ `path`): the file's bytes, as `read_binary_files(..., include_paths=True)` gives them:
    decoded exactly as `imp ask` decodes a file (EXIF orientation, any mode to RGB), so the records
    equal `imp ask --json`'s, sha256 of the bytes included;
  - `path` (or `image` holding strings): a path or URL each actor reads itself (a path must exist on
    the actor's node);
  - `image` holding pixel arrays, as `read_images(..., include_paths=True)` gives them: Ray decoded
    those (no EXIF orientation), and `image.sha256` is then the hash of the pixels, not of a file.
Output columns: `source`, `question`, `answer` (text; JSON text for --json-schema answers),
`error` (null unless the image could not be read or decoded: then `answer` is null) and `record`
(the whole `imp ask --json` record as one JSON string). One row per (image, question).
"""

from __future__ import annotations

import hashlib
import json

__all__ = ["ImpPredictor"]


class ImpPredictor:
    """Constructed once per Ray actor (loads the model); called with each batch of rows."""

    def __init__(self, model: str | None = None, questions=("What is in the image?",), *, mmproj: str | None = None,
                 threads: int = 1, max_tokens: int = 512, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, system: str | None = None, ctx: int = 4096, repack: str = "auto",
                 flash_attn: str = "auto", cache: str = "read", verbose: bool = False):
        from .ask import Request
        from .batch import Answerer
        from .output import Output
        from .opening import open_pair

        if isinstance(questions, str):
            questions = [questions]
        if cache not in ("read", "write", "off"):
            raise ValueError(f"cache must be read, write or off, not {cache!r}")
        self.output = Output(json_mode=True, verbose=verbose)
        req = Request(images=[], questions=list(questions), model=model, mmproj=mmproj, max_tokens=max_tokens,
                      temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, system=system, threads=threads,
                      ctx=ctx, verbose=verbose, cache=cache != "off", repack=repack, flash_attn=flash_attn)
        # not pulled here: N actors would download at once; install the model on each node first
        pair = open_pair(model, mmproj, self.output, pull=False)
        self.answerer = Answerer(pair, req, self.output, cache_write=cache == "write")

    def __call__(self, batch: dict) -> dict:
        out: dict = {"source": [], "question": [], "answer": [], "error": [], "record": []}
        for source, data, image, sha in _rows(batch):
            for record, _ in self.answerer.answer(source, data, image=image, sha256=sha):
                answer = record.get("answer")
                out["source"].append(source)
                out["question"].append(record["question"])
                out["answer"].append(answer if answer is None or isinstance(answer, str)
                                     else json.dumps(answer, ensure_ascii=False))
                out["error"].append(record.get("error"))
                out["record"].append(json.dumps(record, ensure_ascii=False))
        return out

    def __del__(self) -> None:
        answerer = getattr(self, "answerer", None)
        if answerer is not None:
            answerer.close()


def _rows(batch: dict):
    """(source, bytes or None, LoadedImage or None, sha256 or None) for each row of a batch."""
    n = len(next(iter(batch.values()))) if batch else 0
    paths = batch.get("path")
    for i in range(n):
        path = None if paths is None else str(paths[i])
        if "bytes" in batch:
            data = bytes(batch["bytes"][i])
            yield path or f"row {i}", data, None, hashlib.sha256(data).hexdigest()
            continue
        value = batch["image"][i] if "image" in batch else None
        if value is None or isinstance(value, str):
            source = value if isinstance(value, str) else path
            if source is None:
                raise ValueError("a batch row needs a `bytes`, `path` or `image` column")
            yield source, None, None, None
            continue
        yield (path or f"row {i}",) + _from_pixels(value, path or f"row {i}")


def _from_pixels(pixels, source: str):
    """An array Ray decoded (read_images) -> (None, LoadedImage, sha256 of the pixels)."""
    import numpy as np
    from PIL import Image

    from .images import LoadedImage

    array = np.ascontiguousarray(pixels)
    image = Image.fromarray(array)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return None, LoadedImage(image, source, image.size, hashlib.sha256(array.tobytes()).hexdigest()), None
