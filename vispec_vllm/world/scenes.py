"""Synthetic scenes: groups of coloured shapes in the four quadrants of a picture, their rendering and captions.

A scene holds one `Group` per occupied quadrant (2-4 of them); every attribute is drawn independently and uniformly
from the vocabulary below. Geometry is kept in fractions of the image side, so one layout renders at any size.
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
QUADRANTS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")  # reading order

# Geometry in units of the quadrant side. An object's footprint is its bounding square of side 2 * radius.
_RADIUS = {"small": 0.10, "large": 0.19}
_MARGIN = 0.05  # free border inside each quadrant
_GAP = 0.05  # least free space between the footprints of two objects
_LAYOUT_TRIES = 200
# The fallback layout puts objects into distinct cells of a 2x2 grid inside the margin. The largest footprint plus
# the gap fits a cell, so three large objects always fit (they land there ~90% of the time; other groups ~never).
_CELL = (1.0 - 2 * _MARGIN) / 2
assert 2 * max(_RADIUS.values()) + _GAP <= _CELL


@dataclass(frozen=True)
class Group:
    """`count` objects of one colour, shape and size, all inside `quadrant`."""

    colour: str
    shape: str
    size: str
    count: int
    quadrant: str

    def __post_init__(self) -> None:
        for value, allowed in (
            (self.colour, COLOURS),
            (self.shape, SHAPES),
            (self.size, SIZES),
            (self.count, COUNTS),
            (self.quadrant, QUADRANTS),
        ):
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {allowed}")


@dataclass(frozen=True)
class Scene:
    """Groups in reading order of their quadrants, at most one a quadrant; `seed` drives layout and background."""

    groups: tuple[Group, ...]
    seed: int

    def __post_init__(self) -> None:
        order = [QUADRANTS.index(group.quadrant) for group in self.groups]
        if order != sorted(set(order)):
            raise ValueError("groups must occupy distinct quadrants, listed in reading order")
        if self.seed < 0:
            raise ValueError("seed must be non-negative")

    def group_at(self, quadrant: str) -> Group | None:
        return next((group for group in self.groups if group.quadrant == quadrant), None)


@dataclass(frozen=True)
class PlacedObject:
    """One drawn object: centre (x, y) and radius (half its footprint side) in fractions of the image side."""

    group: Group
    x: float
    y: float
    radius: float


def make_scene(seed: int) -> Scene:
    rng = random.Random(seed)
    occupied = sorted(rng.sample(range(len(QUADRANTS)), rng.randint(2, len(QUADRANTS))))
    groups = tuple(
        Group(
            colour=rng.choice(COLOURS),
            shape=rng.choice(SHAPES),
            size=rng.choice(SIZES),
            count=rng.choice(COUNTS),
            quadrant=QUADRANTS[index],
        )
        for index in occupied
    )
    return Scene(groups=groups, seed=seed)


def place_objects(scene: Scene) -> tuple[PlacedObject, ...]:
    """Deterministic positions from the scene's seed: random non-overlapping footprints inside each quadrant."""
    rng = random.Random(f"layout:{scene.seed}")
    return tuple(obj for group in scene.groups for obj in place_group(group, rng, _LAYOUT_TRIES))


def place_group(group: Group, rng: random.Random, tries: int) -> tuple[PlacedObject, ...]:
    """Rejection-sample `tries` layouts; if none fits, use the 2x2-cell layout, which always fits."""
    radius = _RADIUS[group.size]
    low, high = _MARGIN + radius, 1.0 - _MARGIN - radius
    for _ in range(tries):
        centres: list[tuple[float, float]] = []
        for _ in range(group.count):
            candidate = (rng.uniform(low, high), rng.uniform(low, high))
            if not all(_apart(candidate, other, radius) for other in centres):
                break
            centres.append(candidate)
        if len(centres) == group.count:
            return _to_image(group, centres, radius)
    slack = (_CELL - 2 * radius - _GAP) / 2
    centres = []
    for cell in rng.sample(range(4), group.count):
        cell_x = _MARGIN + _CELL * (cell % 2 + 0.5)
        cell_y = _MARGIN + _CELL * (cell // 2 + 0.5)
        centres.append((cell_x + rng.uniform(-slack, slack), cell_y + rng.uniform(-slack, slack)))
    return _to_image(group, centres, radius)


def _apart(a: tuple[float, float], b: tuple[float, float], radius: float) -> bool:
    return max(abs(a[0] - b[0]), abs(a[1] - b[1])) >= 2 * radius + _GAP


def _to_image(group: Group, centres: list[tuple[float, float]], radius: float) -> tuple[PlacedObject, ...]:
    """Quadrant units -> image fractions (a quadrant is half the image side)."""
    index = QUADRANTS.index(group.quadrant)
    left, top = 0.5 * (index % 2), 0.5 * (index // 2)
    return tuple(PlacedObject(group, left + 0.5 * x, top + 0.5 * y, 0.5 * radius) for x, y in centres)


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
    """One phrase a quadrant, in reading order: 'top left: two small red circles.' or 'top right: empty.'."""
    phrases = []
    for quadrant in QUADRANTS:
        group = scene.group_at(quadrant)
        phrases.append(f"{quadrant}: {group_words(group) if group else 'empty'}.")
    return tuple(phrases)


def scene_key(scene: Scene) -> str:
    """Content identity: equal keys <=> equal groups (the seed, hence layout and background, is left out)."""
    return " ".join(caption_phrases(scene))


def describe(scene: Scene) -> str:
    """One plain-English sentence naming every group with its count, size, colour, shape and quadrant."""
    parts = []
    for group in scene.groups:
        words = group_words(group)
        if group.count == 1:
            words = "a" + words.removeprefix("one")
        parts.append(f"{words} in the {group.quadrant}")
    listing = ", ".join(parts[:-1]) + f" and {parts[-1]}" if len(parts) > 1 else "".join(parts)
    return f"The image shows {listing}." if parts else "The image is empty."
