"""The llama.cpp bindings that both the converter and the runtime need: log routing and quantize.

This is the bottom of the house: `convert` and `imp_cli` both import it, it imports neither.
Inference (contexts, decoding, images) stays in `imp_cli/engine.py`.
"""

from __future__ import annotations

import ctypes
import sys
from collections import deque
from pathlib import Path

# ggml.h: enum ggml_log_level { NONE = 0, DEBUG = 1, INFO = 2, WARN = 3, ERROR = 4, CONT = 5 }
LOG_WARN, LOG_ERROR, LOG_CONT = 3, 4, 5


class NativeLog:
    """Routes llama.cpp/ggml/mtmd logs: printed with -v, else swallowed but the last warnings and
    errors kept, so a native failure can be reported in one line. The ctypes callback must
    outlive every native call, hence one instance for the process."""

    def __init__(self) -> None:
        self.verbose = False
        self.recent: deque[tuple[int, str]] = deque(maxlen=16)
        self._callback = None
        self._last_level = 0

    def handle(self, level: int, line: str) -> None:
        """One log call from C (also called directly by the tests)."""
        if level == LOG_CONT:  # a continuation of the previous message
            level = self._last_level
            if self.recent and not self.verbose and level in (LOG_WARN, LOG_ERROR):
                lvl, text = self.recent.pop()
                self.recent.append((lvl, (text + line).strip()))
                return
        self._last_level = level
        if self.verbose:
            sys.stderr.write(line)
            sys.stderr.flush()
        elif line.strip() and level in (LOG_WARN, LOG_ERROR):
            self.recent.append((level, line.strip()))

    def install(self, verbose: bool) -> None:
        import llama_cpp

        self.verbose = verbose
        if self._callback is None:
            @llama_cpp.llama_log_callback
            def callback(level, text, user_data):
                self.handle(int(level), text.decode("utf-8", "replace") if text else "")

            self._callback = callback
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))
        if "llama_cpp.mtmd_cpp" in sys.modules:  # else install_vision() does it when mtmd is first used
            self.install_vision()

    def install_vision(self) -> None:
        """Route libmtmd's log too (after install(); importing mtmd_cpp loads libmtmd, which a
        text-only or prompt-cache-hit run never needs)."""
        if self._callback is None:
            return
        try:
            from llama_cpp import mtmd_cpp

            mtmd_cpp.mtmd_log_set(self._callback, ctypes.c_void_p(0))
            mtmd_cpp.mtmd_helper_log_set(self._callback, ctypes.c_void_p(0))
        except (ImportError, OSError, AttributeError):
            pass

    def clear(self) -> None:
        self.recent.clear()

    def last_error(self) -> str:
        """The first ERROR line since clear() (the cause; later ones tend to be "failed to load"
        echoes), else the newest WARN line, else ''."""
        errors = [text for level, text in self.recent if level == LOG_ERROR]
        if errors:
            return errors[0]
        return self.recent[-1][1] if self.recent else ""


native_log = NativeLog()


def quantize_model(src: Path, dst: Path, ftype: int, threads: int, verbose: bool = False) -> int:
    """llama_model_quantize on a GGUF file; returns llama.cpp's status code (0 = ok)."""
    import llama_cpp

    native_log.install(verbose)
    native_log.clear()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    return int(llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)))
