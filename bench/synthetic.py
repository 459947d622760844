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
    cached = _marker_ok(marker, [text, mmproj])
    if cached and not json.loads(marker.read_text()).get("workaround"):
        _log(f"{quant} cached: {text.name}")
        return text, mmproj
    ckpt = ensure_checkpoint(size, cache, quiet=True)
    from convert.errors import ConvertError
    from convert.pipeline import convert

    def run(source: Path):
        _log(f"converting {source.name} to {quant} + mmproj {MMPROJ_TYPE} ...")
        return convert(str(source), p["gguf"], quant=quant, mmproj_type=MMPROJ_TYPE, force=True,
                       name=base_name(size))

    # Always the real checkpoint first; a refusal is instant (convert checks before writing).
    source, workaround = ckpt, ""
    try:
        result = run(ckpt)
    except ConvertError as e:
        if "positions of patch" not in str(e):
            raise
        if cached:
            _log(f"{quant} cached (converter still refuses the real config: {e}): {text.name}")
            return text, mmproj
        source, workaround = _make_compat_checkpoint(ckpt, str(e))
        _log(f"converter refused the real config; {workaround}")
        result = run(source)
    _write_marker(marker, [text, mmproj], seconds=result.seconds, source=str(source), workaround=workaround)
    state = p["root"] / "source.json"
    state.write_text(json.dumps({"source": str(source), "workaround": workaround}) + "\n")
    if not workaround:
        shutil.rmtree(p["root"] / COMPAT, ignore_errors=True)
    _log(f"{quant} done in {result.seconds:.0f} s: {text.name} {text.stat().st_size / 1e9:.2f} GB")
    return text, mmproj


COMPAT = "checkpoint-compat"


def conversion_source(size: int = 384, cache: Path = DEFAULT_CACHE) -> tuple[Path, str]:
    """The folder the cached GGUFs were converted from and, if not the real checkpoint, why.

    Converters before commit 0ba1fe7 required image_size == sqrt(positions) * patch, but
    SigLIP-so400m/14@384 has 729 = 27 x 27 positions and 27 x 14 = 378 != 384 (the patch
    convolution drops the last 6 pixels), so they refused every real 384-px Imp checkpoint. With
    such a converter the benchmark converts a sibling folder (symlinked weights, same tensors)
    whose config says image_size 378: the same 729 image tokens, the same compute per image.
    """
    p = paths(size, cache)
    state = p["root"] / "source.json"
    if state.is_file():
        d = json.loads(state.read_text())
        return Path(d["source"]), d.get("workaround", "")
    return p["checkpoint"], ""


def _make_compat_checkpoint(ckpt: Path, error: str) -> tuple[Path, str]:
    compat = ckpt.parent / COMPAT
    if compat.exists():
        shutil.rmtree(compat)
    compat.mkdir()
    for f in ckpt.iterdir():
        if f.is_file() and f.name not in ("config.json", MARKER):
            (compat / f.name).symlink_to(f.resolve())
    cfg = json.loads((ckpt / "config.json").read_text())
    v = cfg["vision_tower_config"]
    side = v["image_size"] // v["patch_size"]
    old, v["image_size"] = v["image_size"], side * v["patch_size"]
    (compat / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    why = (f"converter refuses vision image_size {old} ({error}); converted a copy whose config says "
           f"image_size {v['image_size']} ({side}x{side} = {side * side} image tokens, identical compute)")
    return compat, why


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
