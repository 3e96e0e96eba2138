"""Deterministic synthetic test images: a colour gradient with a few rectangles and discs, plus mild noise."""

from __future__ import annotations

import numpy as np
from PIL import Image

_NUM_SHAPES = 6


def make_test_image(seed: int, size: tuple[int, int] = (224, 224)) -> Image.Image:
    """RGB image of `size` (width, height) that depends only on `seed`."""
    width, height = size
    rng = np.random.default_rng(seed)
    rows = np.linspace(0.0, 1.0, height, dtype=np.float64)[:, None, None]  # [H, 1, 1]
    cols = np.linspace(0.0, 1.0, width, dtype=np.float64)[None, :, None]  # [1, W, 1]
    corner, down, right = rng.uniform(0, 255, size=(3, 3))  # three RGB colours
    canvas = corner + (down - corner) * rows + (right - corner) * cols  # [H, W, 3]
    ys, xs = np.mgrid[0:height, 0:width]
    for _ in range(_NUM_SHAPES):
        colour = rng.uniform(0, 255, size=3)
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        half_h, half_w = rng.uniform(0.05, 0.3) * height, rng.uniform(0.05, 0.3) * width
        if rng.random() < 0.5:
            mask = (np.abs(ys - cy) <= half_h) & (np.abs(xs - cx) <= half_w)
        else:
            mask = ((ys - cy) / half_h) ** 2 + ((xs - cx) / half_w) ** 2 <= 1.0
        canvas[mask] = colour
    canvas += rng.normal(0.0, 6.0, size=canvas.shape)
    return Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))
