"""`imp convert`: checkpoint -> (text GGUF, mmproj GGUF), checked before anything is written."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, ContextManager, Protocol

from gguf import GGMLQuantizationType as QType
from gguf import GGUFWriter

from . import hub
from .atomic import Staging
from .chat_templates import chat_template
from .checkpoint import Checkpoint
from .errors import ConvertError
from .families import detect
from .formats import MMPROJ_TYPES, TEXT_TYPES
from .gguf_out import write_gguf
from .quantize import default_threads, quantize_text
from .vision import VisionTower

SUPPORTED_SELECT_LAYER = -2  # Imp reads the last of the kept SigLIP layers


class Progress(Protocol):
    def phase(self, description: str, total: float) -> ContextManager[Callable[[float], None]]:
        """A progress phase; the yielded function sets how much of `total` is done."""


class NoProgress:
    def phase(self, description: str, total: float):
        return contextlib.nullcontext(lambda done: None)


@dataclass
class ConvertResult:
    text_path: str
    text_type: str
    text_bytes: int
    mmproj_path: str
    mmproj_type: str
    mmproj_bytes: int
    source: str
    family: str
    layout: str
    image_tokens: int
    seconds: float
    # Where what no single file is sure to state was read from (for the info line and --json).
    tokenizer_from: str = ""
    context_length: int = 0
    context_from: str = ""
    vision_config_from: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def check_imp_config(config: dict, where: Path) -> None:
    """Refuse anything that is not an Imp checkpoint, naming what it is instead."""
    model_type = str(config.get("model_type", ""))
    archs = [str(a) for a in config.get("architectures") or []]
    if not (model_type.startswith("imp") or any(a.startswith("Imp") for a in archs)):
        what = model_type or (archs[0] if archs else "unknown")
        raise ConvertError(f"{where}: not an Imp checkpoint (model_type {what!r}); imp converts MILVLG Imp models")
    projector = config.get("mm_projector_type", "mlp2x_gelu")
    if projector != "mlp2x_gelu":
        raise ConvertError(f"{where}: unsupported mm_projector_type {projector!r} (only mlp2x_gelu)")
    select = config.get("mm_vision_select_layer", SUPPORTED_SELECT_LAYER)
    if select != SUPPORTED_SELECT_LAYER:
        raise ConvertError(f"{where}: unsupported mm_vision_select_layer {select} (only -2)")
    feature = config.get("mm_vision_select_feature", "patch")
    if feature != "patch":
        raise ConvertError(f"{where}: unsupported mm_vision_select_feature {feature!r} (only 'patch')")
    aspect = config.get("image_aspect_ratio", "square")
    if aspect not in ("square", "pad"):
        raise ConvertError(f"{where}: unsupported image_aspect_ratio {aspect!r} (square or pad)")


def output_names(base: str, quant: str, mmproj_type: str) -> tuple[str, str]:
    return f"{base}-{quant}.gguf", f"{base}-mmproj-{mmproj_type}.gguf"


def convert(
    source: "str | hub.Source",
    out_dir: Path | None = None,
    quant: str = "Q4_K_M",
    mmproj_type: str = "F16",
    force: bool = False,
    progress: Progress = NoProgress(),
    threads: int | None = None,
    name: str | None = None,
    verbose: bool = False,
) -> ConvertResult:
    if quant not in TEXT_TYPES:
        raise ConvertError(f"unknown text quantization {quant!r} (choose from {', '.join(TEXT_TYPES)})")
    if mmproj_type not in MMPROJ_TYPES:
        raise ConvertError(f"unknown mmproj type {mmproj_type!r} (choose from {', '.join(MMPROJ_TYPES)})")
    started = time.monotonic()
    src = hub.resolve(source)
    ckpt = Checkpoint(src.folder)
    check_imp_config(ckpt.config, src.folder)

    # Plan everything (which validates every tensor's presence and shape) before writing a byte.
    family = detect(ckpt)
    vision = VisionTower(ckpt, QType.Q8_0 if mmproj_type == "Q8_0" else QType.F16)
    if vision.proj_out != family.embedding_length:
        raise ConvertError(
            f"projector outputs width {vision.proj_out} but the language model's embeddings are "
            f"{family.embedding_length} wide"
        )
    text_tensors, vision_tensors = family.tensors(), vision.tensors()

    base = name or (src.repo_id.split("/")[-1] if src.repo_id else src.folder.resolve().name)
    out_dir = Path(out_dir) if out_dir is not None else Path.cwd()
    text_name, mmproj_name = output_names(base, quant, mmproj_type)
    text_path, mmproj_path = out_dir / text_name, out_dir / mmproj_name
    _check_outputs(out_dir, [text_path, mmproj_path], force)

    aspect = ckpt.config.get("image_aspect_ratio", "square")

    def imp_metadata(w: GGUFWriter) -> None:
        w.add_name(family.gguf_name(f"Imp {base}"))
        w.add_string("imp.source", src.label)
        w.add_string("imp.prompt_family", family.name)
        w.add_string("imp.image_aspect_ratio", aspect)
        w.add_uint32("imp.image_token_count", vision.n_tokens)

    def text_metadata(w: GGUFWriter) -> None:
        imp_metadata(w)
        w.add_string("imp.checkpoint_layout", family.layout)
        family.add_metadata(w)
        w.add_chat_template(chat_template(family.name))  # Imp's format, for llama.cpp's own tools

    def mmproj_metadata(w: GGUFWriter) -> None:
        imp_metadata(w)
        vision.add_metadata(w)

    with Staging() as staging:
        mmproj_tmp = staging.path_for(mmproj_path)
        _write(progress, f"mmproj ({mmproj_type})", mmproj_tmp, "clip", mmproj_metadata, vision_tensors)
        if quant == "F16":
            _write(progress, "language model (F16)", staging.path_for(text_path), family.arch, text_metadata, text_tensors)
        else:
            f16 = staging.scratch(text_path, "f16")
            _write(progress, "language model (F16 intermediate)", f16, family.arch, text_metadata, text_tensors)
            with progress.phase(f"quantize to {quant}", 1.0) as done:
                quantize_text(f16, staging.path_for(text_path), quant, threads or default_threads(), done,
                              verbose=verbose)
            f16.unlink()
        _check_outputs(out_dir, [text_path, mmproj_path], force)  # nothing appeared meanwhile
        staging.commit()

    return ConvertResult(
        text_path=str(text_path), text_type=quant, text_bytes=text_path.stat().st_size,
        mmproj_path=str(mmproj_path), mmproj_type=mmproj_type, mmproj_bytes=mmproj_path.stat().st_size,
        source=src.label, family=family.name, layout=family.layout, image_tokens=vision.n_tokens,
        seconds=round(time.monotonic() - started, 2), tokenizer_from=family.tokenizer_from,
        context_length=family.n_ctx, context_from=family.context_from, vision_config_from=vision.config_from,
    )


def _write(progress: Progress, what: str, path: Path, arch: str, metadata, tensors) -> None:
    total = sum(t.nbytes for t in tensors)
    written = 0
    with progress.phase(f"write {what}", total) as done:
        def on_bytes(n: int) -> None:
            nonlocal written
            written += n
            done(written)

        try:
            write_gguf(path, arch, metadata, tensors, on_bytes)
        except OSError as e:
            raise ConvertError(f"cannot write to {path.parent}: {e.strerror or e}") from None


def _check_outputs(out_dir: Path, paths: list[Path], force: bool) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConvertError(f"cannot create output folder {out_dir}: {e.strerror or e}") from None
    if not out_dir.is_dir():
        raise ConvertError(f"output path {out_dir} is not a folder")
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ConvertError(f"output folder {out_dir} is not writable")
    folders = [p for p in paths if p.is_dir()]
    if folders:
        raise ConvertError(f"output path {folders[0]} is a folder")
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise ConvertError(f"{existing[0]} already exists (use --force to replace it)")

