"""imp_cli.images: loading from path / stdin / URL, mode handling, and Imp's preprocessing."""

from __future__ import annotations

import hashlib
import http.server
import io
import socket
import struct
import threading
import time
import zlib

import numpy as np
import pytest

from helpers import quiet_http_server
from hypothesis import given, settings, strategies as st
from PIL import Image, features

from imp_cli.images import ImageError, LoadedImage, load_image, preprocess

GREY = (127, 127, 127)


def save(tmp_path, name, image, **kw):
    path = tmp_path / name
    image.save(path, **kw)
    return str(path)


def solid(color, size=(16, 12), mode="RGB"):
    return Image.new(mode, size, color)


def noise(w, h, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def assert_close(pixel, expected, tol=6):
    assert all(abs(int(a) - b) <= tol for a, b in zip(pixel, expected)), (pixel, expected)


# ---------------------------------------------------------------- formats and modes

def test_jpeg(tmp_path):
    path = save(tmp_path, "a.jpg", solid((200, 30, 60)), quality=95)
    loaded = load_image(path)
    assert isinstance(loaded, LoadedImage)
    assert loaded.image.mode == "RGB" and loaded.size == (16, 12) == loaded.image.size
    assert loaded.source == path
    assert loaded.sha256 == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert_close(loaded.image.getpixel((8, 6)), (200, 30, 60))


def test_rgba_drops_alpha_like_imp(tmp_path):
    # Imp does .convert('RGB'): a fully transparent pixel keeps its stored colour (no white).
    path = save(tmp_path, "a.png", solid((10, 20, 30, 0), mode="RGBA"))
    assert load_image(path).image.getpixel((0, 0)) == (10, 20, 30)


def test_grayscale_L(tmp_path):
    path = save(tmp_path, "g.png", solid(77, mode="L"))
    loaded = load_image(path)
    assert loaded.image.mode == "RGB" and loaded.image.getpixel((3, 3)) == (77, 77, 77)


def test_palette_P_with_transparency(tmp_path):
    image = Image.fromarray(noise(16, 12)).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    path = save(tmp_path, "p.png", image, transparency=0)
    loaded = load_image(path)
    assert np.array_equal(np.asarray(loaded.image), np.asarray(Image.open(path).convert("RGB")))


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 25700, 32768, 65535]], dtype=np.uint16)  # 25700 = 100 * 257
    path = save(tmp_path, "d.png", Image.fromarray(values))
    assert Image.open(path).mode in ("I;16", "I")
    got = np.asarray(load_image(path).image)[0, :, 0]
    assert got.tolist() == [0, 100, 128, 255]


def test_cmyk_jpeg(tmp_path):
    image = Image.new("CMYK", (16, 16), (0, 0, 0, 0))
    image.paste((0, 255, 255, 0), (0, 0, 8, 16))  # left half red
    path = save(tmp_path, "c.jpg", image, quality=95)
    loaded = load_image(path)
    assert loaded.image.mode == "RGB"
    assert_close(loaded.image.getpixel((2, 8)), (255, 0, 0), tol=12)
    assert_close(loaded.image.getpixel((13, 8)), (255, 255, 255), tol=12)


def test_bilevel_1_and_float_F(tmp_path):
    path = save(tmp_path, "b.png", solid(1, mode="1"))
    assert load_image(path).image.getpixel((0, 0)) == (255, 255, 255)
    path = save(tmp_path, "f.tif", Image.fromarray(np.full((4, 4), 0.5, np.float32), "F"))
    assert load_image(path).image.getpixel((0, 0)) == (128, 128, 128)


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")
def test_webp(tmp_path):
    path = save(tmp_path, "w.webp", solid((0, 200, 0)), lossless=True)
    assert load_image(path).image.getpixel((5, 5)) == (0, 200, 0)


def test_animated_gif_first_frame(tmp_path):
    frames = [solid((255, 0, 0)), solid((0, 0, 255))]
    path = save(tmp_path, "a.gif", frames[0], save_all=True, append_images=frames[1:],
                duration=100, loop=0)
    assert Image.open(path).n_frames == 2
    assert load_image(path).image.getpixel((4, 4)) == (255, 0, 0)


@pytest.mark.parametrize("ext", ["bmp", "tif"])
def test_lossless_formats_round_trip(tmp_path, ext):
    pixels = noise(23, 17)
    path = save(tmp_path, f"x.{ext}", Image.fromarray(pixels))
    assert np.array_equal(np.asarray(load_image(path).image), pixels)


def test_exif_orientation_6_rotates_clockwise(tmp_path):
    image = solid((0, 0, 0), size=(40, 20))
    image.paste((255, 0, 0), (0, 0, 20, 10))  # stored top-left quadrant red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = save(tmp_path, "r.jpg", image, exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.size == (20, 40) == loaded.image.size
    assert_close(loaded.image.getpixel((15, 5)), (255, 0, 0), tol=30)  # now top-right
    assert_close(loaded.image.getpixel((5, 5)), (0, 0, 0), tol=30)
    assert_close(loaded.image.getpixel((5, 35)), (0, 0, 0), tol=30)


# ---------------------------------------------------------------- bad inputs

def test_truncated_jpeg(tmp_path):
    data = io.BytesIO()
    Image.fromarray(noise(64, 64)).save(data, "JPEG")
    path = tmp_path / "t.jpg"
    path.write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    with pytest.raises(ImageError, match=r"^image '.*t\.jpg' is truncated or corrupt"):
        load_image(str(path))


def test_text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, not an image\n")
    with pytest.raises(ImageError, match=r"^'.*notes\.txt' is not an image imp reads \(JPEG, PNG, WebP, GIF, BMP or TIFF\)$"):
        load_image(str(path))


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(ImageError, match=r"^cannot read image 'x\.jpg': file not found$"):
        load_image("x.jpg")
    with pytest.raises(ImageError, match="directory"):
        load_image(str(tmp_path))


def test_empty_stdin():
    with pytest.raises(ImageError, match="^no image data on standard input$"):
        load_image("-", stdin=io.BytesIO(b""))


def test_stdin_bytes():
    data = io.BytesIO()
    solid((1, 2, 3)).save(data, "PNG")
    loaded = load_image("-", stdin=io.BytesIO(data.getvalue()))
    assert loaded.source == "-" and loaded.image.getpixel((0, 0)) == (1, 2, 3)
    assert loaded.sha256 == hashlib.sha256(data.getvalue()).hexdigest()
    with pytest.raises(ImageError, match="standard input is larger than 10 bytes"):
        load_image("-", stdin=io.BytesIO(data.getvalue()), max_bytes=10)


def test_stdin_is_read_with_a_cap():
    class Endless(io.RawIOBase):
        def readable(self): return True
        def read(self, amt=-1):
            assert 0 <= amt <= 11, f"unbounded read ({amt})"
            return b"x" * amt
    with pytest.raises(ImageError, match="^image on standard input is larger than 10 bytes$"):
        load_image("-", stdin=Endless(), max_bytes=10)


def png_header_only(width, height):
    def chunk(kind, body):
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_decompression_bomb_crafted_header(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(png_header_only(100_000, 100_000))
    with pytest.raises(ImageError, match=r"^image '.*huge\.png' is too large \(10,000,000,000 "
                                         r"pixels; limit [\d,]+\)$"):
        load_image(str(path))


def test_decompression_bomb_warning_range_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = save(tmp_path, "w.png", solid((0, 0, 0), size=(40, 40)))  # 1600: only a warning
    with pytest.raises(ImageError, match=r"too large \(1,600 pixels; limit 1,000\)"):
        load_image(path)


# ---------------------------------------------------------------- URLs

PNG = io.BytesIO()
Image.fromarray(noise(9, 7)).save(PNG, "PNG")
PNG = PNG.getvalue()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        if self.path == "/ok.png":
            assert self.headers["User-Agent"] == "imp"
            self.reply(200, PNG)
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/ok.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/big":
            self.reply(200, b"x" * 5000)
        elif self.path == "/big-no-length":  # HTTP/1.0: the body ends when the server closes
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"x" * 5000)
        elif self.path == "/slow":
            time.sleep(1.5)
            self.reply(200, PNG)
        else:
            self.reply(404, b"not here")

    def reply(self, code, body):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = quiet_http_server(Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_url_ok_and_redirect(server):
    for url in (f"{server}/ok.png", f"{server}/redirect"):
        loaded = load_image(url)
        assert loaded.source == url and loaded.size == (9, 7)
        assert np.array_equal(np.asarray(loaded.image), noise(9, 7))
        assert loaded.sha256 == hashlib.sha256(PNG).hexdigest()


def test_url_404(server):
    with pytest.raises(ImageError, match=rf"^image URL {server}/nope returned HTTP 404$"):
        load_image(f"{server}/nope")


@pytest.mark.parametrize("path", ["/big", "/big-no-length"])
def test_url_too_large(server, path):
    url = server + path
    with pytest.raises(ImageError, match=rf"^image URL {url} is larger than 1,000 bytes$"):
        load_image(url, max_bytes=1000)


def test_url_body_is_read_with_a_cap(monkeypatch):
    # An endless body (e.g. a stream) must not be read to the end: at most max_bytes + 1.
    class Endless:
        headers: dict = {}
        def __enter__(self): return self
        def __exit__(self, *exc): return False
        def read(self, amt=None):
            assert amt is not None and amt <= 1001, f"unbounded read ({amt})"
            return b"x" * amt
    monkeypatch.setattr("urllib.request.urlopen", lambda *a, **kw: Endless())
    with pytest.raises(ImageError, match="is larger than 1,000 bytes"):
        load_image("http://example.invalid/stream", max_bytes=1000)


def test_url_timeout(server):
    start = time.monotonic()
    with pytest.raises(ImageError, match="timed out"):
        load_image(f"{server}/slow", timeout=0.2)
    assert time.monotonic() - start < 1.2


def test_url_connection_refused():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ImageError, match=rf"^cannot fetch image URL http://127\.0\.0\.1:{port}/x"):
        load_image(f"http://127.0.0.1:{port}/x", timeout=2)


def test_url_not_an_image(server):
    with pytest.raises(ImageError, match=r"^image URL .*/big is not an image imp reads \(JPEG, PNG, WebP, GIF, BMP or TIFF\)$"):
        load_image(f"{server}/big")


# ---------------------------------------------------------------- preprocess

def test_preprocess_shape_dtype():
    out = preprocess(Image.fromarray(noise(50, 30)), size=24, aspect="pad")
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8 and out.flags.c_contiguous


def test_pad_wide_puts_grey_bands_top_and_bottom():
    # 41 x 20: the extra row goes to the bottom band, as in expand2square ((w - h) // 2 on top).
    out = preprocess(solid((200, 10, 10), size=(41, 20)), size=41, aspect="pad")
    assert (out[:10] == GREY).all() and (out[30:] == GREY).all()
    assert (out[10:30] == (200, 10, 10)).all()
    small = preprocess(solid((200, 10, 10), size=(40, 20)), size=20, aspect="pad")
    assert (small[0] == GREY).all() and (small[-1] == GREY).all()
    assert (small[8:12] == (200, 10, 10)).all()


def test_pad_tall_puts_grey_bands_left_and_right():
    out = preprocess(solid((10, 200, 10), size=(20, 41)), size=41, aspect="pad")
    assert (out[:, :10] == GREY).all() and (out[:, 30:] == GREY).all()
    assert (out[:, 10:30] == (10, 200, 10)).all()


def test_square_squashes_without_padding():
    image = solid((255, 0, 0), size=(40, 20))
    image.paste((0, 0, 255), (20, 0, 40, 20))
    out = preprocess(image, size=20, aspect="square")
    assert (out[:, :8] == (255, 0, 0)).all() and (out[:, 12:] == (0, 0, 255)).all()
    assert not (out == GREY).all(axis=-1).any()


@pytest.mark.parametrize("w,h", [(37, 23), (23, 37), (30, 30)])
def test_preprocess_matches_independent_computation(w, h):
    pixels = noise(w, h, seed=w * h)
    side = max(w, h)
    canvas = np.full((side, side, 3), 127, np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top:top + h, left:left + w] = pixels
    expected_pad = np.asarray(Image.fromarray(canvas).resize((16, 16), Image.BICUBIC))
    expected_square = np.asarray(Image.fromarray(pixels).resize((16, 16), Image.BICUBIC))
    image = Image.fromarray(pixels)
    assert np.array_equal(preprocess(image, size=16, aspect="pad"), expected_pad)
    assert np.array_equal(preprocess(image, size=16, aspect="square"), expected_square)


def test_unknown_aspect():
    with pytest.raises(ValueError, match="aspect"):
        preprocess(solid((0, 0, 0)), size=8, aspect="crop")


@settings(max_examples=60, deadline=None)
@given(w=st.integers(1, 300), h=st.integers(1, 300), aspect=st.sampled_from(["pad", "square"]),
       size=st.sampled_from([1, 14, 27, 64]))
def test_preprocess_any_size(w, h, aspect, size):
    out = preprocess(Image.new("RGB", (w, h), (w % 256, h % 256, 3)), size=size, aspect=aspect)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8 and out.flags.c_contiguous


def test_concurrent_decodes_leave_stderr_where_it_was(tmp_path):
    """`imp serve` decodes images in several threads: stderr (fd 2) must still point where it did
    afterwards (two interleaved swaps used to leave it on a deleted temporary file), with broken
    TIFFs (whose decoder writes to fd 2) among them."""
    import io as _io
    import os as _os
    from concurrent.futures import ThreadPoolExecutor

    good = _io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(good, "PNG")
    tiff = _io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(tiff, "TIFF", compression="tiff_lzw")
    broken = tiff.getvalue()[: len(tiff.getvalue()) // 2]
    files = []
    for i, data in enumerate([good.getvalue(), tiff.getvalue(), broken] * 20):
        path = tmp_path / f"img{i}"
        path.write_bytes(data)
        files.append(str(path))
    before = _os.readlink("/proc/self/fd/2")

    def load(path):
        try:
            return load_image(path).size
        except ImageError as e:
            assert "\n" not in str(e)
            return None

    with ThreadPoolExecutor(4) as pool:
        sizes = list(pool.map(load, files))
    assert sizes.count((64, 48)) == 40 and sizes.count(None) == 20
    assert _os.readlink("/proc/self/fd/2") == before
