"""Get an image from where the user said (path, ``-`` or URL) and turn it into exactly what
Imp's vision tower sees: an RGB uint8 buffer of size x size, ready for llama.cpp (which then
only normalises it)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from .errors import ImpError
from .limits import MAX_DECODE_BYTES, MAX_IMAGE_BYTES as MAX_BYTES

# The formats imp decodes: what cameras, phones, browsers and screenshot tools write, each read by
# an in-process library (libjpeg, zlib, libwebp, libtiff) or pure Python. Never EPS/PS/PDF (Pillow
# runs Ghostscript for those) nor the long tail of rare formats (more parser code, no user).
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
FORMAT_NAMES = "JPEG, PNG, WebP, GIF, BMP or TIFF"
# data: URL media types, for those formats (the bytes decide the format; a label is only checked)
MEDIA_TYPES = {"image/jpeg", "image/jpg", "image/pjpeg", "image/png", "image/x-png", "image/apng", "image/webp",
               "image/gif", "image/bmp", "image/x-bmp", "image/x-ms-bmp", "image/tiff", "image/tif"}
PAD_COLOR = (127, 127, 127)  # Imp pads with int(255 * image_mean) = int(127.5) per channel
ASPECTS = ("square", "pad")  # the values of Imp's config `image_aspect_ratio`


class ImageError(ImpError):
    """A user-facing, one-line reason why an image could not be loaded."""


@dataclass(frozen=True)
class LoadedImage:
    image: Image.Image  # 8-bit RGB, EXIF orientation applied
    source: str  # what the user gave, for messages and JSON records
    size: tuple[int, int]  # (width, height) after EXIF orientation
    sha256: str  # of the original bytes: the key for caching image encodes


def load_image(source: str, *, stdin: BinaryIO | None = None, timeout: float = 30,
               max_bytes: int = MAX_BYTES) -> LoadedImage:
    """Read `source` (a path, '-' for stdin, or an http(s) URL), decode it fully, return RGB."""
    return decode_source(source, read_source(source, stdin=stdin, timeout=timeout, max_bytes=max_bytes))


def read_source(source: str, *, stdin: BinaryIO | None = None, timeout: float = 30,
                max_bytes: int = MAX_BYTES) -> bytes:
    """The bytes of `source` (a path, '-' for stdin, or an http(s) URL), not yet decoded."""
    if source == "-":
        return _read_stdin(stdin if stdin is not None else sys.stdin.buffer, max_bytes)
    if source.lower().startswith(("http://", "https://")):
        return _read_url(source, timeout, max_bytes)
    return _read_file(source)


def decode_source(source: str, data: bytes) -> LoadedImage:
    """Bytes read by read_source -> the image, with errors naming the source as the user gave it."""
    if source == "-":
        what, image_what = "standard input", "image on standard input"
    elif source.lower().startswith(("http://", "https://")):
        what = image_what = f"image URL {source}"
    else:
        what, image_what = f"'{source}'", f"image '{source}'"
    return image_from_bytes(data, source, what, image_what)


def image_from_bytes(data: bytes, source: str, what: str, image_what: str,
                     budget: int | None = None) -> LoadedImage:
    """Decode and validate image bytes from anywhere (a file, a URL, a data: URL): the one path
    every image takes. `what`/`image_what` name it in errors ("'x.png'", "image 'x.png'");
    `budget`: the decode's memory in bytes (default MAX_DECODE_BYTES or IMP_MAX_IMAGE_MEMORY)."""
    image = _decode(data, what, image_what, decode_budget() if budget is None else budget)
    return LoadedImage(image, source, image.size, hashlib.sha256(data).hexdigest())


def image_from_pil(image: Image.Image) -> LoadedImage:
    """A PIL image a program holds (the Python API) -> as a file's would be: EXIF orientation
    applied, 8-bit RGB. With no file bytes to hash, its key is the hash of its RGB pixels."""
    try:
        image.load()
        image = ImageOps.exif_transpose(image)  # as for a file (a no-op once applied)
        rgb = _to_rgb(image)
    except (OSError, ValueError) as e:
        raise ImageError(f"the PIL image cannot be used: {e}") from None
    digest = hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()
    return LoadedImage(rgb, f"{type(image).__name__} {rgb.size[0]}x{rgb.size[1]}", rgb.size, digest)


def image_from_array(array: np.ndarray) -> LoadedImage:
    """A numpy image (height x width, or x 3 or 4 channels; uint8) -> image_from_pil's result."""
    if array.dtype.name != "uint8":
        raise ImageError(f"a numpy image must be uint8 (0..255), not {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))) or 0 in array.shape:
        raise ImageError(f"a numpy image must be height x width (x 3 or 4), not {'x'.join(map(str, array.shape))}")
    return image_from_pil(Image.fromarray(array.copy(order="C")))


def decode_budget() -> int:
    value = os.environ.get("IMP_MAX_IMAGE_MEMORY", "").strip()
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            raise ImageError(f"IMP_MAX_IMAGE_MEMORY must be a number of bytes, not {value[:40]!r}") from None
    return MAX_DECODE_BYTES


def load_data_url(url: str, *, max_bytes: int = MAX_BYTES, budget: int | None = None) -> LoadedImage:
    """A `data:image/...;base64,...` URL (what OpenAI-style clients send) -> the decoded image."""
    import base64
    import binascii

    header, comma, payload = url.partition(",")
    media = header[len("data:"):].split(";")
    if not header.lower().startswith("data:") or not comma or media[-1].strip().lower() != "base64":
        raise ImageError("the image URL is not a base64 data: URL (expected data:image/...;base64,...)")
    kind = media[0].strip().lower()
    if kind not in MEDIA_TYPES:
        # the label is the client's text: shown only bounded and printable (it also names the
        # image in the prompt cache's entry headers)
        shown = "".join(c if c.isprintable() else "?" for c in kind[:40]) + ("…" if len(kind) > 40 else "")
        raise ImageError(f"the data: URL holds {shown or 'no media type'!s}, not an image imp reads ({FORMAT_NAMES})")
    payload = "".join(payload.split())  # some clients wrap base64 lines
    if len(payload) // 4 * 3 > max_bytes:
        raise ImageError(f"the data: URL image is larger than {_fmt_bytes(max_bytes)}")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("the data: URL is not valid base64") from None
    if not data:
        raise ImageError("the data: URL holds no image data")
    source = f"data:{kind} ({len(data):,} bytes)"
    return image_from_bytes(data, source, "the data: URL", "the data: URL image", budget)


def preprocess(image: Image.Image, *, size: int, aspect: str) -> np.ndarray:
    """Imp's own preprocessing up to (not including) normalisation: (size, size, 3) uint8."""
    if aspect not in ASPECTS:
        raise ValueError(f"unknown image aspect {aspect!r} (expected one of {', '.join(ASPECTS)})")
    if image.mode != "RGB":
        image = image.convert("RGB")
    if aspect == "pad":  # LLaVA's expand2square: centre on a grey square of the longer side
        w, h = image.size
        if w != h:
            if max(w, h) ** 2 > Image.MAX_IMAGE_PIXELS:  # a 65535 x 1 strip would need 17 GB
                raise ImageError(f"a {w} x {h} image is too long and thin to pad to a square "
                                 f"({max(w, h) ** 2:,} pixels; limit {Image.MAX_IMAGE_PIXELS:,})")
            canvas = Image.new("RGB", (max(w, h),) * 2, PAD_COLOR)
            canvas.paste(image, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
            image = canvas
    # A squash, not a crop: the SigLIP processor resizes straight to size x size.
    return np.array(image.resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)


def redact(url: str, limit: int = 200) -> str:
    """A URL as it may be shown or recorded: scheme, host, port and path only (query strings
    and fragments often carry access tokens; user:password too), bounded and printable."""
    import urllib.parse

    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        shown = f"{parts.scheme}://{f'[{host}]' if ':' in host else host}{port}{parts.path}"
    except ValueError:
        shown = url.split("?", 1)[0].split("#", 1)[0]
    shown = "".join(c if c.isprintable() and not c.isspace() else "?" for c in shown)
    return shown if len(shown) <= limit else shown[:limit - 1] + "…"


def label(source: str, limit: int = 200) -> str:
    """An image's source as a file may record it (the prompt cache's entry header): URLs
    redacted, any text bounded and printable."""
    if source.lower().startswith(("http://", "https://")):
        return redact(source, limit)
    shown = "".join(c if c.isprintable() else "?" for c in source)
    return shown if len(shown) <= limit else shown[:limit - 1] + "…"


def _fmt_mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n:,} bytes"


def _fmt_bytes(n: int) -> str:
    return f"{n // 2**20} MB" if n % 2**20 == 0 else f"{n:,} bytes"


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        reason = "file not found"
    except IsADirectoryError:
        reason = "it is a directory"
    except PermissionError:
        reason = "permission denied"
    except OSError as e:
        reason = e.strerror or str(e)
    raise ImageError(f"cannot read image '{path}': {reason}")


def _read_stdin(stream: BinaryIO, max_bytes: int) -> bytes:
    if stream.isatty():  # reading would just wait for the user to type binary data
        raise ImageError("no image data on standard input (it is a terminal; pipe an image in)")
    data = stream.read(max_bytes + 1)
    if not data:
        raise ImageError("no image data on standard input")
    if len(data) > max_bytes:
        raise ImageError(f"image on standard input is larger than {_fmt_bytes(max_bytes)}")
    return data


def _read_url(url: str, timeout: float, max_bytes: int) -> bytes:
    import socket  # here, not at the top: ~60 ms of imports (ssl, email) a local file never uses
    import urllib.error
    import urllib.request
    from http.client import HTTPException

    request = urllib.request.Request(url, headers={"User-Agent": "imp"})
    too_large = ImageError(f"image URL {url} is larger than {_fmt_bytes(max_bytes)}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # follows redirects
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise too_large  # refuse before downloading anything
            data = response.read(max_bytes + 1)  # the header may lie or be absent
    except urllib.error.HTTPError as e:
        raise ImageError(f"image URL {url} returned HTTP {e.code}") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, (TimeoutError, socket.timeout)):
            raise ImageError(f"image URL {url} timed out after {timeout:g} s") from None
        raise ImageError(f"cannot fetch image URL {url}: {e.reason}") from None
    except (TimeoutError, socket.timeout):
        raise ImageError(f"image URL {url} timed out after {timeout:g} s") from None
    except (OSError, HTTPException, ValueError) as e:
        raise ImageError(f"cannot fetch image URL {url}: {e or type(e).__name__}") from None
    if len(data) > max_bytes:
        raise too_large
    if not data:
        raise ImageError(f"image URL {url} returned no data")
    return data


def _pixel_bytes(mode: str) -> int:
    """Bytes per pixel of a decoded image of this mode, as Pillow stores it."""
    if mode in ("1", "L", "P"):
        return 1
    if mode.startswith("I;16"):
        return 2
    return 4  # RGB is stored in 4 bytes too; I and F are 32-bit


def decode_bytes(size: tuple[int, int], mode: str) -> int:
    """What decoding an image of this size and mode holds at its peak: the decoded pixels, an 8-bit
    copy for 16-bit and float modes, and the RGB image (4 bytes per pixel) made from them."""
    w, h = size
    extra = 0 if mode == "RGB" else 4 + (1 if mode.startswith("I") or mode == "F" else 0)
    return w * h * (_pixel_bytes(mode) + extra)


def _decode(data: bytes, what: str, image_what: str, budget: int = MAX_DECODE_BYTES) -> Image.Image:
    # Pillow only warns between MAX_IMAGE_PIXELS and twice that; make both an error. That check
    # and the memory budget run on the header, before any pixel is decompressed.
    native: list[str] = []
    with _DECODE_LOCK, warnings.catch_warnings(), _decoder_chatter(native, data.startswith(_TIFF_MAGIC)):
        warnings.simplefilter("ignore", UserWarning)  # e.g. "Corrupt EXIF data": noise to the user
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            # only the allowed formats' plugins ever see the bytes (multi-frame formats open on the first frame)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            need = decode_bytes(image.size, image.mode)
            if need > budget:
                w, h = image.size
                error = (f"{image_what} is too large to decode: {w:,} x {h:,} pixels of mode {image.mode} need "
                         f"{_fmt_mb(need)} ({_pixel_bytes(image.mode)} bytes per pixel"
                         f"{'' if image.mode == 'RGB' else ' + its RGB copy'}); limit {_fmt_mb(budget)}")
            else:
                image.load()  # decode now, so a truncated file fails here (LOAD_TRUNCATED_IMAGES off)
                image = ImageOps.exif_transpose(image)
                error = None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            m = re.search(r"\((\d+) pixels\)", str(e))
            # the limit enforced is MAX_IMAGE_PIXELS (Pillow's error names twice that: its warning's range is ours too)
            detail = f"{int(m[1]):,} pixels; limit {Image.MAX_IMAGE_PIXELS:,}" if m else str(e)
            error = f"{image_what} is too large ({detail})"
        except Image.UnidentifiedImageError:
            error = f"{what} is not an image imp reads ({FORMAT_NAMES})"
        except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
            error = e
    if isinstance(error, BaseException):
        # the decoder's own line (libtiff's, say) says more than Pillow's "decoder error -2"
        lines = [line.strip() for line in "".join(native).splitlines() if line.strip()]
        raise ImageError(f"{image_what} is truncated or corrupt ({lines[-1] if lines else error})")
    if error:
        raise ImageError(error)
    try:
        return _to_rgb(image)
    except ValueError as e:
        raise ImageError(f"{image_what} has an unsupported mode {image.mode} ({e})") from None


# One decode at a time changes the process-wide state below (warning filters, the PIL logger, and
# for TIFF file descriptor 2): `imp serve` decodes in several threads, and two interleaved swaps
# of fd 2 would leave stderr pointing at a deleted file for good.
_DECODE_LOCK = threading.Lock()
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")  # libtiff is the decoder that writes to fd 2 itself


@contextlib.contextmanager
def _decoder_chatter(captured: list[str], capture_fd2: bool = True):
    """Decoders report problems beside our error: libtiff prints straight to file descriptor 2,
    Pillow's plugins log (with no handler, Python prints those on stderr). Either breaks the
    one-line error; collect them instead (fd 2 only for TIFF, so that other threads' stderr is
    not swallowed while any other image decodes)."""
    import logging
    import tempfile

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            captured.append(record.getMessage() + "\n")

    logger, handler = logging.getLogger("PIL"), Collect(logging.WARNING)
    propagate, logger.propagate = logger.propagate, False
    logger.addHandler(handler)
    saved = None
    if capture_fd2:
        try:
            saved = os.dup(2)
        except OSError:  # no stderr at all: nothing to protect
            saved = None
    try:
        with tempfile.TemporaryFile() as tmp:
            if saved is not None:
                sys.stderr.flush()
                os.dup2(tmp.fileno(), 2)
            try:
                yield
            finally:
                if saved is not None:
                    os.dup2(saved, 2)
                    os.close(saved)
                    tmp.seek(0)
                    captured.append(tmp.read(4096).decode("utf-8", "replace"))
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode -> 8-bit RGB. Alpha is dropped, not composited: Imp's own code does
    .convert('RGB'), and our pixels must match the reference."""
    if image.mode.startswith("I"):
        # 16-bit data ('I;16*', or 'I' as Pillow may open 16-bit PNGs): Pillow's convert clips
        # at 255 instead of scaling, so map 0..65535 to 0..255 ourselves (rounded).
        def scale16(a):
            a = a.astype(np.int64).clip(0, 65535)
            return (a * 255 + 32767) // 65535

        return _rows_to_l(image, scale16).convert("RGB")
    if image.mode == "F":
        # Float images are usually either 0..1 or 0..255; Pillow would clip 0..1 to near-black.
        lo, hi = np.inf, -np.inf
        for a in _row_blocks(image):
            if a.size:
                a = np.nan_to_num(a.astype(np.float64))
                lo, hi = min(lo, a.min()), max(hi, a.max())
        unit = lo >= 0 and hi <= 1

        def scale_float(a):
            a = np.nan_to_num(a.astype(np.float64))
            return np.round((a * 255 if unit else a).clip(0, 255))

        return _rows_to_l(image, scale_float).convert("RGB")
    if image.mode == "RGB":
        return image
    with warnings.catch_warnings():  # e.g. Pillow's note about palette transparency as bytes
        warnings.simplefilter("ignore", UserWarning)
        return image.convert("RGB")


def _row_blocks(image: Image.Image, pixels: int = 1 << 20):
    """The image's pixels as numpy arrays of whole rows, about `pixels` at a time: converting a
    16-bit or float image never holds a 64-bit copy of all of it."""
    w, h = image.size
    step = max(1, pixels // max(w, 1))
    for y in range(0, h, step):
        yield np.asarray(image.crop((0, y, w, min(h, y + step))))


def _rows_to_l(image: Image.Image, scale) -> Image.Image:
    w, h = image.size
    out = np.empty((h, w), np.uint8)
    y = 0
    for a in _row_blocks(image):
        out[y:y + a.shape[0]] = scale(a).astype(np.uint8)
        y += a.shape[0]
    return Image.fromarray(out, "L")
