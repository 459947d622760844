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

MAX_BYTES = 50 * 1024 * 1024
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


def image_from_bytes(data: bytes, source: str, what: str, image_what: str) -> LoadedImage:
    """Decode and validate image bytes from anywhere (a file, a URL, a data: URL): the one path
    every image takes. `what`/`image_what` name it in errors ("'x.png'", "image 'x.png'")."""
    image = _decode(data, what, image_what)
    return LoadedImage(image, source, image.size, hashlib.sha256(data).hexdigest())


def load_data_url(url: str, *, max_bytes: int = MAX_BYTES) -> LoadedImage:
    """A `data:image/...;base64,...` URL (what OpenAI-style clients send) -> the decoded image."""
    import base64
    import binascii

    header, comma, payload = url.partition(",")
    media = header[len("data:"):].split(";")
    if not header.lower().startswith("data:") or not comma or media[-1].strip().lower() != "base64":
        raise ImageError("the image URL is not a base64 data: URL (expected data:image/...;base64,...)")
    if not media[0].strip().lower().startswith("image/"):
        raise ImageError(f"the data: URL holds {media[0].strip() or 'no media type'}, not an image")
    payload = "".join(payload.split())  # some clients wrap base64 lines
    if len(payload) // 4 * 3 > max_bytes:
        raise ImageError(f"the data: URL image is larger than {_fmt_bytes(max_bytes)}")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("the data: URL is not valid base64") from None
    if not data:
        raise ImageError("the data: URL holds no image data")
    source = f"data:{media[0].strip().lower()} ({len(data):,} bytes)"
    return image_from_bytes(data, source, "the data: URL", "the data: URL image")


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


def _decode(data: bytes, what: str, image_what: str) -> Image.Image:
    # Pillow only warns between MAX_IMAGE_PIXELS and twice that; make both an error. The check
    # runs on the header, before any pixel is decompressed.
    native: list[str] = []
    with _DECODE_LOCK, warnings.catch_warnings(), _decoder_chatter(native, data.startswith(_TIFF_MAGIC)):
        warnings.simplefilter("ignore", UserWarning)  # e.g. "Corrupt EXIF data": noise to the user
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))  # multi-frame formats open on the first frame
            image.load()  # decode now, so a truncated file fails here (LOAD_TRUNCATED_IMAGES off)
            image = ImageOps.exif_transpose(image)
            error = None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            m = re.search(r"\((\d+) pixels\) exceeds limit of (\d+)", str(e))
            detail = f"{int(m[1]):,} pixels; limit {int(m[2]):,}" if m else str(e)
            error = f"{image_what} is too large ({detail})"
        except Image.UnidentifiedImageError:
            error = f"{what} is not an image Pillow can read"
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
        a = np.asarray(image).astype(np.int64).clip(0, 65535)
        return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
    if image.mode == "F":
        # Float images are usually either 0..1 or 0..255; Pillow would clip 0..1 to near-black.
        a = np.nan_to_num(np.asarray(image, dtype=np.float64))
        if a.size and a.min() >= 0 and a.max() <= 1:
            a = a * 255
        return Image.fromarray(np.round(a.clip(0, 255)).astype(np.uint8), "L").convert("RGB")
    if image.mode == "RGB":
        return image
    with warnings.catch_warnings():  # e.g. Pillow's note about palette transparency as bytes
        warnings.simplefilter("ignore", UserWarning)
        return image.convert("RGB")
