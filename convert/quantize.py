"""K-quants and Q8_0 of the text model through llama.cpp's own `llama_model_quantize`.

gguf-py has no K-quant kernels, so the F16 intermediate is handed to libllama. The call blocks
in C for minutes on a 3B model: it runs in a worker thread so the main thread can report
progress (the output file's growth against its expected size) and react to Ctrl-C at once.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from .errors import ConvertError
from .formats import TEXT_TYPES


def quantize_text(src: Path, dst: Path, quant: str, threads: int, on_fraction=lambda f: None,
                  verbose: bool = False) -> None:
    from .native import native_log, quantize_model

    ftype, ratio = TEXT_TYPES[quant]
    expected = max(1, int(src.stat().st_size * ratio))
    result: dict[str, object] = {}

    def work() -> None:
        try:
            result["rc"] = quantize_model(src, dst, ftype, threads, verbose)
        except BaseException as e:  # surfaced in the main thread below
            result["error"] = e

    worker = threading.Thread(target=work, name="quantize", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
        size = dst.stat().st_size if dst.exists() else 0
        on_fraction(min(0.99, size / expected))
    if "error" in result:
        raise ConvertError(f"quantization failed: {result['error']}")
    if result.get("rc") != 0:
        why = native_log.last_error() or f"code {result.get('rc')}"
        raise ConvertError(f"quantization to {quant} failed inside llama.cpp: {why}")
    on_fraction(1.0)


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))

