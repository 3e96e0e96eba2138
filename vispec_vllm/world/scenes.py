"""Synthetic scenes: groups of coloured shapes in the four rows (horizontal strips) of a picture, their rendering
and captions.

A scene holds one `Group` per occupied row (2-4 of them); every attribute is drawn independently and uniformly
from the vocabulary below. Geometry is kept in fractions of the image side, so one layout renders at any size.
Rows, not quadrants: a row of the picture is a contiguous run of the vision tower's patches (row-major), so
each caption phrase sits in the image tokens of its own row (see world/vision.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "blue": (20, 60, 230),
    "green": (20, 160, 40),
    "yellow": (240, 210, 0),
    "purple": (140, 30, 190),
    "orange": (255, 128, 0),
}
COLOURS: tuple[str, ...] = tuple(COLOUR_RGB)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
SIZES: tuple[str, ...] = ("small", "large")
COUNT_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three"}
COUNTS: tuple[int, ...] = tuple(COUNT_WORDS)
ROWS: tuple[str, ...] = ("top row", "second row", "third row", "bottom row")  # reading order

# Geometry in fractions of the image side. An object's footprint is its bounding square of side 2 * radius.
_ROW_HEIGHT = 1.0 / len(ROWS)
_RADIUS = {"small": 0.05, "large": 0.095}
_MARGIN = 0.03  # free border inside each row (vertical) and at the picture's sides
_GAP = 0.04  # least free space between the footprints of two objects
_LAYOUT_TRIES = 200
# The fallback layout puts objects into distinct thirds of the row's width; the largest footprint plus the gap
# fits a third, so three large objects always fit.
_THIRD = (1.0 - 2 * _MARGIN) / 3
assert 2 * max(_RADIUS.values()) + _GAP <= _THIRD
assert 2 * max(_RADIUS.values()) + 2 * _MARGIN <= _ROW_HEIGHT


@dataclass(frozen=True)
class Group:
    """`count` objects of one colour, shape and size, all inside `row`."""

    colour: str
    shape: str
    size: str
    count: int
    row: str

    def __post_init__(self) -> None:
        for value, allowed in (
            (self.colour, COLOURS),
            (self.shape, SHAPES),
            (self.size, SIZES),
            (self.count, COUNTS),
            (self.row, ROWS),
        ):
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {allowed}")


@dataclass(frozen=True)
class Scene:
    """Groups in reading order of their rows, at most one a row; `seed` drives layout and background."""

    groups: tuple[Group, ...]
    seed: int

    def __post_init__(self) -> None:
        order = [ROWS.index(group.row) for group in self.groups]
        if order != sorted(set(order)):
            raise ValueError("groups must occupy distinct rows, listed in reading order")
        if self.seed < 0:
            raise ValueError("seed must be non-negative")

    def group_at(self, row: str) -> Group | None:
        return next((group for group in self.groups if group.row == row), None)


@dataclass(frozen=True)
class PlacedObject:
    """One drawn object: centre (x, y) and radius (half its footprint side) in fractions of the image side."""

    group: Group
    x: float
    y: float
    radius: float


def make_scene(seed: int) -> Scene:
    rng = random.Random(seed)
    occupied = sorted(rng.sample(range(len(ROWS)), rng.randint(2, len(ROWS))))
    groups = tuple(
        Group(
            colour=rng.choice(COLOURS),
            shape=rng.choice(SHAPES),
            size=rng.choice(SIZES),
            count=rng.choice(COUNTS),
            row=ROWS[index],
        )
        for index in occupied
    )
    return Scene(groups=groups, seed=seed)


def place_objects(scene: Scene) -> tuple[PlacedObject, ...]:
    """Deterministic positions from the scene's seed: random non-overlapping footprints inside each row."""
    rng = random.Random(f"layout:{scene.seed}")
    return tuple(obj for group in scene.groups for obj in place_group(group, rng, _LAYOUT_TRIES))


def place_group(group: Group, rng: random.Random, tries: int) -> tuple[PlacedObject, ...]:
    """Rejection-sample `tries` layouts inside the group's row; if none fits, one object per third of the row."""
    radius = _RADIUS[group.size]
    top = ROWS.index(group.row) * _ROW_HEIGHT
    x_low, x_high = _MARGIN + radius, 1.0 - _MARGIN - radius
    y_low, y_high = top + _MARGIN + radius, top + _ROW_HEIGHT - _MARGIN - radius
    for _ in range(tries):
        centres: list[tuple[float, float]] = []
        for _ in range(group.count):
            candidate = (rng.uniform(x_low, x_high), rng.uniform(y_low, y_high))
            if not all(_apart(candidate, other, radius) for other in centres):
                break
            centres.append(candidate)
        if len(centres) == group.count:
            return tuple(PlacedObject(group, x, y, radius) for x, y in centres)
    slack = (_THIRD - 2 * radius - _GAP) / 2
    centres = [(_MARGIN + _THIRD * (third + 0.5) + rng.uniform(-slack, slack), rng.uniform(y_low, y_high))
               for third in sorted(rng.sample(range(3), group.count))]
    return tuple(PlacedObject(group, x, y, radius) for x, y in centres)


def _apart(a: tuple[float, float], b: tuple[float, float], radius: float) -> bool:
    return max(abs(a[0] - b[0]), abs(a[1] - b[1])) >= 2 * radius + _GAP


def render(scene: Scene, size: int = 112) -> Image.Image:
    """RGB picture: a light background with a faint per-seed tint and noise, then the objects in pure colours."""
    rng = np.random.default_rng(scene.seed)
    tint = rng.integers(-8, 9, size=3)
    noise = rng.integers(-3, 4, size=(size, size, 3))
    background = np.clip(236 + tint + noise, 0, 255).astype(np.uint8)  # [size, size, 3]
    image = Image.fromarray(background, mode="RGB")
    draw = ImageDraw.Draw(image)
    for obj in place_objects(scene):
        left, top = round((obj.x - obj.radius) * size), round((obj.y - obj.radius) * size)
        right, bottom = round((obj.x + obj.radius) * size) - 1, round((obj.y + obj.radius) * size) - 1
        middle_x, middle_y = (left + right) / 2, (top + bottom) / 2
        fill = COLOUR_RGB[obj.group.colour]
        if obj.group.shape == "circle":
            draw.ellipse((left, top, right, bottom), fill=fill)
        elif obj.group.shape == "square":
            draw.rectangle((left, top, right, bottom), fill=fill)
        elif obj.group.shape == "triangle":
            draw.polygon([(middle_x, top), (right, bottom), (left, bottom)], fill=fill)
        else:  # diamond
            draw.polygon([(middle_x, top), (right, middle_y), (middle_x, bottom), (left, middle_y)], fill=fill)
    return image


def group_words(group: Group) -> str:
    """'two small red circles', 'one large blue square'."""
    shape = group.shape if group.count == 1 else f"{group.shape}s"
    return f"{COUNT_WORDS[group.count]} {group.size} {group.colour} {shape}"


def caption_phrases(scene: Scene) -> tuple[str, ...]:
    """One phrase a row, in reading order: 'top row: two small red circles.' or 'second row: empty.'."""
    phrases = []
    for row in ROWS:
        group = scene.group_at(row)
        phrases.append(f"{row}: {group_words(group) if group else 'empty'}.")
    return tuple(phrases)


def scene_key(scene: Scene) -> str:
    """Content identity: equal keys <=> equal groups (the seed, hence layout and background, is left out)."""
    return " ".join(caption_phrases(scene))


def describe(scene: Scene) -> str:
    """One plain-English sentence naming every group with its count, size, colour, shape and row."""
    parts = []
    for group in scene.groups:
        words = group_words(group)
        if group.count == 1:
            words = "a" + words.removeprefix("one")
        parts.append(f"{words} in the {group.row}")
    listing = ", ".join(parts[:-1]) + f" and {parts[-1]}" if len(parts) > 1 else "".join(parts)
    return f"The image shows {listing}." if parts else "The image is empty."
