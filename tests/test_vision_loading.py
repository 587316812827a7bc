"""Image inputs: data: URLs in every accepted format, limits checked before decoding, remote URLs
only when allowed (served from 127.0.0.1 here), and a clear ImageError for each bad input."""

from __future__ import annotations

import base64
import http.server
import io
import socket
import threading

import pytest
from PIL import Image

from vision.loading import ImageError, ImageLimits, load_image

LIMITS = ImageLimits()


def encode(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


@pytest.mark.parametrize("fmt,media", [("PNG", "png"), ("JPEG", "jpeg"), ("WEBP", "webp"), ("GIF", "gif")])
def test_formats_decode_to_rgb(fmt, media):
    image = Image.new("RGB", (40, 30), (200, 20, 20))
    loaded = load_image(data_url(encode(image, fmt), f"image/{media}"), LIMITS)
    assert loaded.mode == "RGB" and loaded.size == (40, 30)
    r, g, b = loaded.getpixel((20, 15))
    assert r > 150 and g < 80 and b < 80


def test_gif_first_frame_exif_and_transparency():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert load_image(data_url(gif, "image/gif"), LIMITS).getpixel((8, 8))[0] > 200  # red: the first frame
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated = load_image(data_url(encode(Image.new("RGB", (40, 20)), "JPEG", exif=exif), "image/jpeg"), LIMITS)
    assert rotated.size == (20, 40)
    clear = load_image(data_url(encode(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "PNG")), LIMITS)
    assert clear.getpixel((4, 4)) == (255, 255, 255)


def test_bad_inputs_are_image_errors():
    png = encode(Image.effect_noise((64, 64), 64), "PNG")  # noise: a few kB
    cases = {
        "data:image/png,abc": "base64",
        "data:image/png;base64": "malformed",
        "data:image/png;base64,@@not-base64@@": "valid base64",
        data_url(png, "image/tiff"): "unsupported image type",
        data_url(b"hello, not an image"): "could not decode",
        data_url(png[: len(png) // 2]): "could not decode",
        "file:///etc/hostname": "data: URL",
        "http://127.0.0.1:9/x.png": "disabled",
        "": "non-empty",
    }
    for url, message in cases.items():
        with pytest.raises(ImageError, match=message):
            load_image(url, LIMITS)
    with pytest.raises(ImageError, match="larger than the limit"):
        load_image(data_url(png), ImageLimits(max_bytes=100))


def test_decompression_bomb_rejected_before_decoding():
    bomb = encode(Image.new("1", (8000, 8000)), "PNG")  # 64 M pixels in a few kB
    assert len(bomb) < 100_000
    with pytest.raises(ImageError, match="pixels"):
        load_image(data_url(bomb), LIMITS)
    with pytest.raises(ImageError, match="pixels"):
        load_image(data_url(encode(Image.new("RGB", (300, 300)), "PNG")), ImageLimits(max_pixels=250 * 250))


@pytest.fixture
def image_server():
    """A 127.0.0.1 HTTP server with a small PNG at /small.png and a large body at /large.png."""
    small = encode(Image.new("RGB", (20, 10), (0, 200, 0)), "PNG")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the http.server hook name)
            body = small if self.path == "/small.png" else b"\0" * 50_000
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_remote_urls_when_allowed(image_server):
    allowed = ImageLimits(allow_remote=True, max_bytes=10_000, remote_timeout_s=2.0)
    assert load_image(f"{image_server}/small.png", allowed).size == (20, 10)
    with pytest.raises(ImageError, match="disabled"):
        load_image(f"{image_server}/small.png", LIMITS)
    with pytest.raises(ImageError, match="larger than the limit"):
        load_image(f"{image_server}/large.png", allowed)


def test_remote_timeout():
    silent = socket.socket()  # accepts connections (backlog) but never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    try:
        limits = ImageLimits(allow_remote=True, remote_timeout_s=0.3)
        with pytest.raises(ImageError, match="could not fetch"):
            load_image(f"http://127.0.0.1:{silent.getsockname()[1]}/x.png", limits)
    finally:
        silent.close()


def test_app_config_image_limits():
    from deployments.config import parse_config

    base = {"models": [{"name": "m", "path": "/models/m"}]}
    assert parse_config(base).images == ImageLimits()  # remote URLs off by default
    config = parse_config({**base, "images": {"allow_remote": True, "max_bytes": 1000, "remote_timeout_s": 1.5}})
    assert config.images == ImageLimits(allow_remote=True, max_bytes=1000, remote_timeout_s=1.5)
    with pytest.raises(ValueError, match="unknown images fields: max_size"):
        parse_config({**base, "images": {"max_size": 3}})
