"""Image preprocessing as the Pixtral-style encoder expects, and the placeholder token layout.

An image is resized (aspect ratio kept) so its longest side is at most ``image_size`` and both sides
are multiples of ``patch_size * merge``, then scaled to [0, 1] and normalised with the configured
mean/std. Its placeholder layout is one row of image tokens per merged patch row, each row ended by
a row-break token, the last one by an end token instead; only the image tokens are replaced by
projected patch embeddings, so their count equals ``rows * cols`` of the merged grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from vision.config import VisionConfig


@dataclass(frozen=True)
class ImageLayout:
    """Where an image lands: its resized pixel size and its merged patch grid (one token per cell)."""

    height: int
    width: int
    rows: int
    cols: int

    @property
    def num_image_tokens(self) -> int:
        return self.rows * self.cols


@dataclass(frozen=True)
class ImageTokens:
    """The ids of the three placeholder tokens (``[IMG]``, ``[IMG_BREAK]``, ``[IMG_END]`` in Pixtral)."""

    image: int
    row_break: int
    end: int


def layout_for(height: int, width: int, config: VisionConfig, merge: int) -> ImageLayout:
    """The resized size of a ``height x width`` image and its merged grid."""
    unit = config.patch_size * merge
    longest = max(unit, config.image_size // unit * unit)
    scale = min(1.0, config.image_size / max(height, width))

    def side(n: int) -> int:
        return min(longest, max(unit, math.ceil(n * scale / unit) * unit))

    h, w = side(height), side(width)
    return ImageLayout(height=h, width=w, rows=h // unit, cols=w // unit)


def preprocess(image: Image.Image, config: VisionConfig, merge: int) -> tuple[np.ndarray, ImageLayout]:
    """An RGB image -> normalised pixels float32 [C, H, W] and its layout."""
    layout = layout_for(image.height, image.width, config, merge)
    if (image.height, image.width) != (layout.height, layout.width):
        image = image.resize((layout.width, layout.height), Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    mean = np.asarray(config.image_mean, dtype=np.float32)
    std = np.asarray(config.image_std, dtype=np.float32)
    return np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1)), layout


def placeholder_ids(layout: ImageLayout, tokens: ImageTokens) -> list[int]:
    """``([IMG] * cols + [IMG_BREAK]) * rows`` with the last break replaced by ``[IMG_END]``."""
    ids: list[int] = []
    for row in range(layout.rows):
        ids.extend([tokens.image] * layout.cols)
        ids.append(tokens.end if row == layout.rows - 1 else tokens.row_break)
    return ids


def placeholder_text(layout: ImageLayout, tokens: ImageTokens, tokenizer) -> str:
    """The layout as prompt text (the placeholder tokens are special tokens of the VLM's tokenizer),
    so an image can sit anywhere in a chat message that the chat template renders."""
    return "".join(tokenizer.convert_ids_to_tokens(placeholder_ids(layout, tokens)))
