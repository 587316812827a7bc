"""Synthetic pictures for the tiny VLM: one Pillow-drawn shape in one colour on a plain background.

Shape, colour, size, position and background shade vary (shapes stand upright); the caption names shape and colour
("a red circle"). Used to train the bundled ``tiny-vlm`` and to test it on fresh pictures.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (235, 200, 20)}
QUESTIONS = ("What is in this picture?", "What do you see?", "Describe the image.", "What is this?")


@dataclass(frozen=True)
class Picture:
    image: Image.Image
    shape: str
    colour: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape}"


def _polygon(shape: str, cx: float, cy: float, r: float, turn: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners, radii = 4, [r] * 4
    elif shape == "triangle":
        corners, radii = 3, [r] * 3
    else:  # a five-pointed star: outer and inner points alternate
        corners, radii = 10, [r if i % 2 == 0 else r * 0.42 for i in range(10)]
    return [
        (cx + rad * math.cos(turn + 2 * math.pi * i / corners), cy + rad * math.sin(turn + 2 * math.pi * i / corners))
        for i, rad in enumerate(radii)
    ]


def draw(rng: random.Random, size: int = 84) -> Picture:
    """One random picture, ``size`` pixels square."""
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    grey = rng.randint(225, 255)
    image = Image.new("RGB", (size, size), (grey, grey, grey))
    pen = ImageDraw.Draw(image)
    r = rng.uniform(0.24, 0.4) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    if shape == "circle":
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLOURS[colour])
    else:
        turn = math.pi / 4 if shape == "square" else -math.pi / 2  # upright: a square's sides level, a point up
        pen.polygon(_polygon(shape, cx, cy, r, turn), fill=COLOURS[colour])
    return Picture(image, shape, colour)
