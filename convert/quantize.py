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

# llama_ftype values (llama.h) and roughly how many bytes each stores per F16 byte.
TEXT_FTYPES = {"Q4_K_M": (15, 0.30), "Q8_0": (7, 0.53)}


def quantize_text(src: Path, dst: Path, quant: str, threads: int, on_fraction=lambda f: None) -> None:
    from imp_cli.engine import quantize_model

    ftype, ratio = TEXT_FTYPES[quant]
    expected = max(1, int(src.stat().st_size * ratio))
    result: dict[str, object] = {}

    def work() -> None:
        try:
            result["rc"] = quantize_model(src, dst, ftype, threads)
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
        raise ConvertError(f"quantization to {quant} failed inside llama.cpp (code {result.get('rc')})")
    on_fraction(1.0)


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))

