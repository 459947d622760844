"""The native baseline: llama.cpp's own `llama-mtmd-cli`, built once from the llama.cpp sources
vendored in the llama-cpp-python sdist of the installed version (so both run the same llama.cpp),
and run on the same GGUF pair and image with its defaults.

    python bench/mtmd_cli.py [--cache bench/cache]     # build (or find) it; prints its path

Everything lands in <cache>/ (gitignored): the sdist, the extracted sources, the build tree.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from measure import log, run_measured

DEFAULT_CACHE = Path(__file__).resolve().parent / "cache"
TARGET = "llama-mtmd-cli"
CHAT_TEMPLATE = "vicuna"
# llama.cpp's built-in template closest to each family's own (imp's GGUFs carry none)
FAMILY_TEMPLATES = {"phi2": CHAT_TEMPLATE, "phi3": "phi3", "qwen2": "chatml"}


def llama_cpp_python_version() -> str:
    from importlib.metadata import version

    return version("llama-cpp-python")


def binary_path(cache: Path = DEFAULT_CACHE) -> Path:
    return Path(cache) / f"llama.cpp-{llama_cpp_python_version()}" / "build" / "bin" / TARGET


def ensure_built(cache: Path = DEFAULT_CACHE, jobs: int = 2) -> tuple[Path | None, str]:
    """(path to llama-mtmd-cli, "") once built, else (None, why not). Never raises: a failed
    build only costs the benchmark its native baseline."""
    try:
        return _build(Path(cache), jobs), ""
    except (OSError, subprocess.CalledProcessError, tarfile.TarError, RuntimeError) as e:
        return None, f"{type(e).__name__}: {e}"


def _build(cache: Path, jobs: int) -> Path:
    ver = llama_cpp_python_version()
    root = cache / f"llama.cpp-{ver}"
    binary = binary_path(cache)
    if binary.is_file():
        return binary
    sdist = cache / f"llama_cpp_python-{ver}.tar.gz"
    if not sdist.is_file():
        log(f"downloading the llama-cpp-python {ver} sdist into {cache} ...")
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={ver}", "-d", str(cache)], check=True,
                       stdout=subprocess.DEVNULL)
    src = root / "src"
    if not (src / "CMakeLists.txt").is_file():
        shutil.rmtree(src, ignore_errors=True)
        prefix = f"llama_cpp_python-{ver}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = []
            for m in tar.getmembers():
                if m.name.startswith(prefix) and len(m.name) > len(prefix):
                    m.name = m.name[len(prefix):]
                    members.append(m)
            if not members:
                raise RuntimeError(f"{sdist.name} has no vendor/llama.cpp")
            tar.extractall(src, members=members, filter="data")
    build = root / "build"
    log(f"building {TARGET} from llama.cpp vendored in llama-cpp-python {ver} ({jobs} jobs) ...")
    t0 = time.monotonic()
    with open(root / "build.log", "w") as out:
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                        "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF"],
                       check=True, stdout=out, stderr=subprocess.STDOUT)
        subprocess.run(["cmake", "--build", str(build), "--config", "Release", "--target", TARGET,
                        "-j", str(jobs)], check=True, stdout=out, stderr=subprocess.STDOUT)
    if not binary.is_file():
        raise RuntimeError(f"the build finished but {binary} is missing (see {root / 'build.log'})")
    log(f"built {binary} in {time.monotonic() - t0:.0f} s")
    return binary


# llama.cpp's own log lines (the baseline's only report of its phases), as this version words them
_LOAD = re.compile(r"load time =\s+([\d.]+) ms")
_PROMPT = re.compile(r"prompt eval time =\s+([\d.]+) ms /\s+(\d+) tokens")
_EVAL = re.compile(r"\beval time =\s+([\d.]+) ms /\s+(\d+) runs")
_ENCODE = re.compile(r"mtmd batch encoding done in (\d+) ms")
_DECODE = re.compile(r"image decoded \(batch \d+/\d+\) in (\d+) ms")


def run(binary: Path, text: Path, mmproj: Path, image: Path, prompt: str, tokens: int, threads: int,
        env: dict | None = None, template: str = CHAT_TEMPLATE) -> dict:
    """One `llama-mtmd-cli` process with its defaults (sampling, warm-up, context), timed like
    `imp ask`: wall clock, launch to first stdout byte, peak RSS; its phases from its log.

    Two options are not its defaults: imp's GGUFs carry no chat template (imp renders Imp's own) and
    without one the CLI refuses to start, so `--chat-template vicuna`, which its error message
    suggests for LLaVA-style models and which is Imp-Phi-2's "SYSTEM USER: <image>\nQ ASSISTANT:"
    format (`template`: "phi3" / "chatml" for the 4B / 2B); and `--ignore-eos`, so that both sides generate exactly `tokens` (imp runs with it too).
    `-v` only makes it log its timings (llama_perf_context_print, image decode), on stderr."""
    r = run_measured([str(binary), "-m", str(text), "--mmproj", str(mmproj), "--image", str(image),
                      "-p", prompt, "-n", str(tokens), "-t", str(threads), "--chat-template", template, "--ignore-eos", "-v"],
                     env=env)
    if r["rc"] != 0:
        return {"error": f"exit {r['rc']}: " + " | ".join(r["stderr"].strip().splitlines()[-3:])}
    err = r["stderr"]

    def last(rx):
        found = rx.findall(err)
        return found[-1] if found else None

    prompt_m, eval_m = last(_PROMPT), last(_EVAL)
    enc = [int(x) for x in _ENCODE.findall(err)]
    dec = [int(x) for x in _DECODE.findall(err)]
    return {
        "wall_s": r["wall_s"], "first_output_s": r["first_output_s"], "peak_rss": r["peak_rss"],
        "foreign_cpu": r["foreign_cpu"], "cpu_s": r.get("cpu_s"),
        "load_ms": float(last(_LOAD)) if last(_LOAD) else None,
        "image_encode_ms": sum(enc) if enc else None,
        "image_decode_ms": sum(dec) if dec else None,
        "prompt_tokens": int(prompt_m[1]) if prompt_m else None,
        "prompt_ms": float(prompt_m[0]) if prompt_m else None,
        "generated_tokens": int(eval_m[1]) + 1 if eval_m else None,
        "generation_tokens_per_s": round(int(eval_m[1]) / float(eval_m[0]) * 1000, 2)
        if eval_m and float(eval_m[0]) else None,
        "answer_chars": len(r["stdout"]),
    }


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args()
    binary, why = ensure_built(a.cache, a.jobs)
    if binary is None:
        sys.exit(f"{TARGET}: build failed: {why}")
    print(binary)


if __name__ == "__main__":
    main()
