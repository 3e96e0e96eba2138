"""Train / held-out splits of (scene seed, question) samples, disjoint in seeds AND in scene content.

Each split walks its own range of scene seeds. On top of that, a scene's content key (its caption, seed left out)
is hashed into one of `CONTENT_BUCKETS` buckets, and a split keeps only seeds whose scene falls in its own buckets.
The splits own disjoint bucket sets, so two scenes from different splits can never have the same content: equal
content means equal key, hence equal bucket, hence the same split.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from vispec_vllm.world.questions import HELDOUT_QUESTIONS, TRAIN_QUESTIONS
from vispec_vllm.world.scenes import Scene, make_scene, scene_key

CONTENT_BUCKETS = 10
SEEDS_PER_SPLIT = 1_000_000_000


@dataclass(frozen=True)
class SplitSpec:
    first_seed: int  # seeds [first_seed, first_seed + SEEDS_PER_SPLIT)
    buckets: frozenset[int]  # content buckets this split owns
    questions: tuple[str, ...]


SPLITS: dict[str, SplitSpec] = {
    "train": SplitSpec(0, frozenset(range(2, CONTENT_BUCKETS)), TRAIN_QUESTIONS),
    "heldout_images": SplitSpec(SEEDS_PER_SPLIT, frozenset({0}), TRAIN_QUESTIONS),
    "heldout_questions": SplitSpec(2 * SEEDS_PER_SPLIT, frozenset({1}), HELDOUT_QUESTIONS),
}


@dataclass(frozen=True)
class Sample:
    split: str
    index: int
    scene_seed: int
    question: str


def content_bucket(scene: Scene) -> int:
    digest = hashlib.sha256(scene_key(scene).encode()).digest()
    return int.from_bytes(digest[:8], "big") % CONTENT_BUCKETS


def content_split(scene: Scene) -> str:
    """The one split whose scenes may have this content."""
    bucket = content_bucket(scene)
    return next(name for name, spec in SPLITS.items() if bucket in spec.buckets)


def split_scene_seeds(split: str, num: int) -> list[int]:
    """The first `num` seeds of the split's range whose scenes fall in the split's content buckets."""
    spec = _spec(split)
    seeds: list[int] = []
    seed = spec.first_seed
    while len(seeds) < num:
        if seed >= spec.first_seed + SEEDS_PER_SPLIT:
            raise ValueError(f"split {split!r} has fewer than {num} scenes")
        if content_bucket(make_scene(seed)) in spec.buckets:
            seeds.append(seed)
        seed += 1
    return seeds


def split_samples(split: str, num: int, *, seed: int = 0) -> list[Sample]:
    """Sample i pairs the split's i-th scene with a question; `seed` only changes which question goes where.

    Questions cycle through a `seed`-shuffled order of the split's list, so every phrasing is used equally often.
    """
    if num < 0:
        raise ValueError("num must be non-negative")
    questions = list(_spec(split).questions)
    random.Random(f"questions:{split}:{seed}").shuffle(questions)
    return [
        Sample(split=split, index=index, scene_seed=scene_seed, question=questions[index % len(questions)])
        for index, scene_seed in enumerate(split_scene_seeds(split, num))
    ]


def _spec(split: str) -> SplitSpec:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    return SPLITS[split]
