"""The benchmark's models: full-size synthetic Imp checkpoints (real shapes, random weights), made once.

    python bench/synthetic.py [--family phi2|phi3|qwen2] [--size 384|196] [--cache bench/cache]
                              [--quants Q4_K_M,Q8_0,F16] [--threads N]

writes, unless already there,
    <cache>/<base>/checkpoint/       the Hugging Face checkpoint (float16: 6.4 GB for the 3B)
    <cache>/<base>/gguf/             <base>-{Q4_K_M,Q8_0,F16}.gguf + <base>-mmproj-F16.gguf
where <base> is imp-synth-<size> for Imp-3B (Phi-2), imp-synth-phi3-384 for Imp-v1.5-4B (Phi-3)
and imp-synth-qwen2-384 for Imp-v1.5-2B (Qwen1.5); only the 3B has a 196-px variant. Each
conversion's marker keeps its wall time and the converting process's peak RSS.

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


# family -> (model it stands for, image sizes it comes in)
FAMILIES = {"phi2": ("Imp-3B (Phi-2 2.7B)", (384, 196)),
            "phi3": ("Imp-v1.5-4B (Phi-3-mini 3.8B)", (384,)),
            "qwen2": ("Imp-v1.5-2B (Qwen1.5-1.8B)", (384,))}


def base_name(size: int, family: str = "phi2") -> str:
    if size not in FAMILIES[family][1]:
        raise ValueError(f"the {family} model has no {size}-px variant")
    # the 3B keeps its original name so the caches made before the families stay valid
    return f"imp-synth-{size}" if family == "phi2" else f"imp-synth-{family}-{size}"


def paths(size: int = 384, cache: Path = DEFAULT_CACHE, family: str = "phi2") -> dict:
    base = base_name(size, family)
    root = Path(cache) / base
    gguf = root / "gguf"
    return {
        "root": root,
        "checkpoint": root / "checkpoint",
        "gguf": gguf,
        "mmproj": gguf / f"{base}-mmproj-{MMPROJ_TYPE}.gguf",
        "marker": {q: gguf / f"{MARKER[:-5]}-{q}.json" for q in QUANTS},
        **{q: gguf / f"{base}-{q}.gguf" for q in QUANTS},
    }


def conversion(quant: str, size: int = 384, cache: Path = DEFAULT_CACHE, family: str = "phi2") -> dict | None:
    """What the marker of a finished conversion recorded (seconds, peak_rss), or None."""
    p = paths(size, cache, family)
    marker = p["marker"][quant]
    if not _marker_ok(marker, [p[quant], p["mmproj"]]):
        return None
    return {k: v for k, v in json.loads(marker.read_text()).items() if k != "sizes"}


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


def ensure_checkpoint(size: int = 384, cache: Path = DEFAULT_CACHE, quiet: bool = False, family: str = "phi2",
                      sizes=None) -> Path:
    """sizes: the factory's Sizes to write instead of the family's full size (the tests' tiny one)."""
    p = paths(size, cache, family)
    ckpt = p["checkpoint"]
    marker = ckpt / MARKER
    if _marker_ok(marker):
        if not quiet:
            _log(f"checkpoint cached: {ckpt}")
        return ckpt
    sys.path.insert(0, str(ROOT / "tests"))
    import factory as F

    if sizes is None:
        sizes = {"phi2": F.FULL if size == 384 else F.FULL_196, "phi3": F.FULL_PHI3, "qwen2": F.FULL_QWEN2}[family]
    if ckpt.exists():
        shutil.rmtree(ckpt)  # an incomplete earlier attempt
    _log(f"writing the synthetic {FAMILIES[family][0]} checkpoint ({size} px) to {ckpt} ...")
    t0 = time.monotonic()
    # the published 4B pads images to a square (image_aspect_ratio "pad"), the others squash them
    F.make_checkpoint(ckpt, layout="new", dtype="float16", aspect="pad" if family == "phi3" else "square",
                      sizes=sizes, seed=0, family=family)
    files = sorted(f for f in ckpt.iterdir() if f.is_file())
    _write_marker(marker, files, seconds=round(time.monotonic() - t0, 1), size=size, family=family)
    _log(f"checkpoint written in {time.monotonic() - t0:.0f} s "
         f"({sum(f.stat().st_size for f in files) / 1e9:.2f} GB)")
    return ckpt


def ensure_gguf(quant: str, size: int = 384, cache: Path = DEFAULT_CACHE, family: str = "phi2",
                threads: int | None = None) -> tuple[Path, Path]:
    p = paths(size, cache, family)
    text, mmproj = p[quant], p["mmproj"]
    marker = p["marker"][quant]
    if _marker_ok(marker, [text, mmproj]):
        _log(f"{quant} cached: {text.name}")
        return text, mmproj
    ckpt = ensure_checkpoint(size, cache, quiet=True, family=family)
    import resource

    from convert.pipeline import convert

    _log(f"converting {ckpt.parent.name} to {quant} + mmproj {MMPROJ_TYPE} ...")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = convert(str(ckpt), p["gguf"], quant=quant, mmproj_type=MMPROJ_TYPE, force=True,
                     name=base_name(size, family), threads=threads)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # this process's high-water mark; it is the conversion's only when nothing bigger ran before it
    _write_marker(marker, [text, mmproj], seconds=round(result.seconds, 1), peak_rss=rss,
                  peak_rss_before=rss0, threads=threads)
    _log(f"{quant} done in {result.seconds:.0f} s: {text.name} {text.stat().st_size / 1e9:.2f} GB")
    return text, mmproj


def ensure_all(size: int = 384, cache: Path = DEFAULT_CACHE, quants=QUANTS, family: str = "phi2",
               threads: int | None = None) -> dict:
    p = paths(size, cache, family)
    if not all(_marker_ok(p["marker"][q], [p[q], p["mmproj"]]) for q in quants):
        ensure_checkpoint(size, cache, family=family)
    for q in quants:
        ensure_gguf(q, size, cache, family, threads)
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=tuple(FAMILIES), default="phi2",
                    help="language backbone: phi2 (Imp-3B), phi3 (Imp-v1.5-4B), qwen2 (Imp-v1.5-2B)")
    ap.add_argument("--size", type=int, choices=(384, 196), default=384, help="image size of the Imp variant")
    ap.add_argument("--threads", type=int, default=None, help="quantization threads (default: convert's)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--quants", default=",".join(QUANTS), help="comma-separated text types to convert to")
    a = ap.parse_args()
    quants = [q.strip().upper() for q in a.quants.split(",") if q.strip()]
    bad = [q for q in quants if q not in QUANTS]
    if bad:
        ap.error(f"unknown quant {bad[0]} (choose from {', '.join(QUANTS)})")
    if a.size not in FAMILIES[a.family][1]:
        ap.error(f"the {a.family} model has no {a.size}-px variant")
    sys.path.insert(0, str(ROOT))
    p = ensure_all(a.size, a.cache, quants, a.family, a.threads)
    for k in ("checkpoint", "mmproj", *quants):
        print(f"{k}\t{p[k]}")


if __name__ == "__main__":
    main()
