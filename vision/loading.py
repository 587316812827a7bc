"""Images from OpenAI ``image_url`` parts: ``data:`` URLs, and http(s) URLs when the server allows them.

Every limit is checked before the pixels are decoded: the encoded size (from the base64 length or
while downloading), then the pixel count from the image header (decompression bombs), then the
format. The first frame of an animation is used, EXIF orientation applied, and the result is RGB
(transparent areas on white). Every failure is an ``ImageError`` whose message the API returns
as a 400.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp", "GIF": "gif"}
MEDIA_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif"}


class ImageError(ValueError):
    """An image input the server will not take (the API answers 400 with this message)."""


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 2**20  # encoded image
    max_pixels: int = 40_000_000  # width * height before decoding
    max_images: int = 8  # per request
    allow_remote: bool = False  # http(s) URLs are fetched only when the deployer turns this on
    remote_timeout_s: float = 5.0


def load_image(url: str, limits: ImageLimits) -> Image.Image:
    """An ``image_url.url`` value -> an RGB Pillow image within ``limits``."""
    if not isinstance(url, str) or not url:
        raise ImageError("image_url.url must be a non-empty string")
    if url.startswith("data:"):
        data = _data_url_bytes(url, limits)
    elif url.startswith(("http://", "https://")):
        if not limits.allow_remote:
            raise ImageError("remote image URLs are disabled on this server; send the image as a base64 data: URL")
        data = _fetch(url, limits)
    else:
        raise ImageError("image_url.url must be a data: URL (or an http(s) URL where the server allows them)")
    return decode_image(data, limits)


def _data_url_bytes(url: str, limits: ImageLimits) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma:
        raise ImageError("malformed data: URL (no comma before the data)")
    parts = header[len("data:") :].split(";")
    media_type = parts[0].strip().lower()
    if "base64" not in parts[1:]:
        raise ImageError("data: URLs for images must be base64-encoded (data:image/png;base64,...)")
    if media_type and media_type not in MEDIA_TYPES:
        raise ImageError(f"unsupported image type {media_type!r}; send png, jpeg, webp or gif")
    if len(payload) * 3 // 4 > limits.max_bytes:
        raise ImageError(f"image is larger than the limit of {limits.max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("the data: URL does not hold valid base64") from None


def _fetch(url: str, limits: ImageLimits) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "triserve"})
    try:
        with urllib.request.urlopen(request, timeout=limits.remote_timeout_s) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > limits.max_bytes:
                raise ImageError(f"remote image is larger than the limit of {limits.max_bytes} bytes")
            data = response.read(limits.max_bytes + 1)
    except ImageError:
        raise
    except (urllib.error.URLError, TimeoutError, OSError, ValueError) as exc:
        raise ImageError(f"could not fetch the image URL: {getattr(exc, 'reason', exc)}") from None
    if len(data) > limits.max_bytes:
        raise ImageError(f"remote image is larger than the limit of {limits.max_bytes} bytes")
    return data


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Encoded bytes -> RGB image; the header is checked before any pixel is decoded."""
    if len(data) > limits.max_bytes:
        raise ImageError(f"image is larger than the limit of {limits.max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(FORMATS))
            width, height = image.size
            if width < 1 or height < 1 or width * height > limits.max_pixels:
                raise ImageError(f"image is {width}x{height} pixels; the limit is {limits.max_pixels} pixels")
            image.seek(0)  # the first frame of an animation
            image.load()
            image = ImageOps.exif_transpose(image)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("could not decode the image: not a png, jpeg, webp or gif file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"image has too many pixels (limit {limits.max_pixels})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"could not decode the image: {exc}") from None
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
