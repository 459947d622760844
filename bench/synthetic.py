"""The benchmark's model: a full-size synthetic Imp-3B (real shapes, random weights), made once.

    python bench/synthetic.py [--size 384|196] [--cache bench/cache] [--quants Q4_K_M,Q8_0,F16]

writes, unless already there,
    <cache>/imp-synth-<size>/checkpoint/       the Hugging Face checkpoint (6.4 GB of float16)
    <cache>/imp-synth-<size>/gguf/             imp-synth-<size>-{Q4_K_M,Q8_0,F16}.gguf + -mmproj-F16.gguf

Each step is skipped when its marker file exists: a marker is written last, after everything it
vouches for, so an interrupted run is redone instead of trusted. `paths()` gives run.py the
locations without building anything.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = ROOT / "bench" / "cache"
QUANTS = ("Q4_K_M", "Q8_0", "F16")
MMPROJ_TYPE = "F16"
MARKER = ".complete.json"


def base_name(size: int) -> str:
    return f"imp-synth-{size}"


def paths(size: int = 384, cache: Path = DEFAULT_CACHE) -> dict:
    root = Path(cache) / base_name(size)
    gguf = root / "gguf"
    return {
        "root": root,
        "checkpoint": root / "checkpoint",
        "gguf": gguf,
        "mmproj": gguf / f"{base_name(size)}-mmproj-{MMPROJ_TYPE}.gguf",
        **{q: gguf / f"{base_name(size)}-{q}.gguf" for q in QUANTS},
    }


def _log(msg: str) -> None:
    print(f"[synthetic {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _marker_ok(marker: Path, expected: list[Path] = ()) -> bool:
    """The marker exists, lists every expected file, and every file it lists (beside it or
    named in `expected`) still has the size it recorded."""
    if not marker.is_file():
        return False
    try:
        sizes = json.loads(marker.read_text())["sizes"]
    except (ValueError, KeyError):
        return False
    where = {f.name: f for f in expected}
    if not sizes or any(f.name not in sizes for f in expected):
        return False
    for name, n in sizes.items():
        f = where.get(name, marker.parent / name)
        if not f.is_file() or f.stat().st_size != n:
            return False
    return True


def _write_marker(marker: Path, files: list[Path], **extra) -> None:
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"sizes": {f.name: f.stat().st_size for f in files}, **extra}, indent=1))
    tmp.replace(marker)


def ensure_checkpoint(size: int = 384, cache: Path = DEFAULT_CACHE, quiet: bool = False) -> Path:
    p = paths(size, cache)
    ckpt = p["checkpoint"]
    marker = ckpt / MARKER
    if _marker_ok(marker):
        if not quiet:
            _log(f"checkpoint cached: {ckpt}")
        return ckpt
    sys.path.insert(0, str(ROOT / "tests"))
    from factory import FULL, FULL_196, make_checkpoint

    if ckpt.exists():
        shutil.rmtree(ckpt)  # an incomplete earlier attempt
    _log(f"writing the full-size synthetic checkpoint ({size} px) to {ckpt} (~5.6 GB) ...")
    t0 = time.monotonic()
    make_checkpoint(ckpt, layout="new", dtype="float16", aspect="square",
                    sizes=FULL if size == 384 else FULL_196, seed=0)
    files = sorted(f for f in ckpt.iterdir() if f.is_file())
    _write_marker(marker, files, seconds=round(time.monotonic() - t0, 1), size=size)
    _log(f"checkpoint written in {time.monotonic() - t0:.0f} s "
         f"({sum(f.stat().st_size for f in files) / 1e9:.2f} GB)")
    return ckpt


def ensure_gguf(quant: str, size: int = 384, cache: Path = DEFAULT_CACHE) -> tuple[Path, Path]:
    p = paths(size, cache)
    text, mmproj = p[quant], p["mmproj"]
    marker = p["gguf"] / f"{MARKER[:-5]}-{quant}.json"
    if _marker_ok(marker, [text, mmproj]):
        _log(f"{quant} cached: {text.name}")
        return text, mmproj
    ckpt = ensure_checkpoint(size, cache, quiet=True)
    from convert.pipeline import convert

    _log(f"converting {ckpt.name} to {quant} + mmproj {MMPROJ_TYPE} ...")
    result = convert(str(ckpt), p["gguf"], quant=quant, mmproj_type=MMPROJ_TYPE, force=True, name=base_name(size))
    _write_marker(marker, [text, mmproj], seconds=result.seconds)
    _log(f"{quant} done in {result.seconds:.0f} s: {text.name} {text.stat().st_size / 1e9:.2f} GB")
    return text, mmproj


def ensure_all(size: int = 384, cache: Path = DEFAULT_CACHE, quants=QUANTS) -> dict:
    ensure_checkpoint(size, cache)
    for q in quants:
        ensure_gguf(q, size, cache)
    return paths(size, cache)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, choices=(384, 196), default=384, help="image size of the Imp variant")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--quants", default=",".join(QUANTS), help="comma-separated text types to convert to")
    a = ap.parse_args()
    quants = [q.strip().upper() for q in a.quants.split(",") if q.strip()]
    bad = [q for q in quants if q not in QUANTS]
    if bad:
        ap.error(f"unknown quant {bad[0]} (choose from {', '.join(QUANTS)})")
    sys.path.insert(0, str(ROOT))
    p = ensure_all(a.size, a.cache, quants)
    for k in ("checkpoint", "mmproj", *quants):
        print(f"{k}\t{p[k]}")


if __name__ == "__main__":
    main()
