"""Source records: LLaVA-Pretrain / LLaVA-Instruct / ShareGPT JSON, validated and sliced.

All three formats share one schema: a JSON list of
``{"id": ..., "image": "<path relative to --image-folder>" (optional), "conversations": [{"from", "value"}]}``.
A record without ``"image"`` is a text-only (ShareGPT) record.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from PIL import Image

IMAGE_TAG = "<image>"
USER_ROLES = {"human": "user", "user": "user"}
ASSISTANT_ROLES = {"gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant"}


class SkipReason(StrEnum):
    """Why a source record produced no sample (counted in the manifest, never fatal)."""

    INVALID_RECORD = "invalid_record"
    EMPTY_CONVERSATION = "empty_conversation"
    IMAGE_MISSING = "image_missing"
    IMAGE_UNREADABLE = "image_unreadable"
    PROMPT_TOO_LONG = "prompt_too_long"
    NO_ANSWER_TOKENS = "no_answer_tokens"
    PROMPT_MISMATCH = "prompt_mismatch"
    UNSUPPORTED_TEMPLATE = "unsupported_template"
    IMAGE_TOKEN_IN_ANSWER = "image_token_in_answer"


class RecordSkipped(Exception):
    def __init__(self, reason: SkipReason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Turn:
    role: str  # "user" | "assistant"
    text: str  # with the <image> tag removed


@dataclass(frozen=True)
class SourceRecord:
    index: int  # position in the source file
    sample_id: str
    image_path: Path | None
    turns: tuple[Turn, ...]

    @property
    def first_question(self) -> str:
        return next(t.text for t in self.turns if t.role == "user")


def load_source(path: Path, *, start: int = 0, end: int | None = None, shuffle_seed: int | None = None) -> list:
    """The raw JSON list, optionally shuffled (Python `random`, not HF datasets), then sliced [start, end)."""
    with open(path, encoding="utf-8") as f:
        items = json.load(f)
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    order = list(range(len(items)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    stop = len(order) if end is None else min(end, len(order))
    return [(i, items[i]) for i in order[start:stop]]


def parse_record(index: int, raw: object, image_folder: Path | None) -> SourceRecord:
    """Validate one raw record; raises `RecordSkipped` with the reason when it is unusable."""
    if not isinstance(raw, dict) or not isinstance(raw.get("conversations", []), list):
        raise RecordSkipped(SkipReason.INVALID_RECORD, f"record {index} is not a conversation record")
    turns: list[Turn] = []
    for message in raw.get("conversations", []):
        if not isinstance(message, dict) or not isinstance(message.get("value", ""), str):
            raise RecordSkipped(SkipReason.INVALID_RECORD, f"record {index}: malformed message")
        speaker = str(message.get("from", "")).lower()
        role = USER_ROLES.get(speaker) or ASSISTANT_ROLES.get(speaker)
        if role is None:
            continue  # system / unknown speakers are dropped, as the official scripts do
        text = message.get("value", "").replace(IMAGE_TAG, "").strip()
        if not turns and role != "user":
            continue  # conversations must start with the user
        turns.append(Turn(role, text))
    if not turns:
        raise RecordSkipped(SkipReason.EMPTY_CONVERSATION, f"record {index} has no user turn")
    if not raw.get("image") and not any(t.role == "user" and t.text for t in turns):
        raise RecordSkipped(SkipReason.EMPTY_CONVERSATION, f"record {index} has neither user text nor image")
    image_path = None
    if raw.get("image"):
        image_path = Path(image_folder or ".") / str(raw["image"])
        if not image_path.is_file():
            raise RecordSkipped(SkipReason.IMAGE_MISSING, str(image_path))
    return SourceRecord(index, str(raw.get("id", index)), image_path, tuple(turns))


def open_image(path: Path) -> Image.Image:
    """The RGB image, fully decoded now so that a truncated file fails here and not inside the engine."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise RecordSkipped(SkipReason.IMAGE_UNREADABLE, f"{path}: {error}") from error


def iter_records(
    raw_items: list, image_folder: Path | None
) -> Iterator[tuple[int, SourceRecord | None, SkipReason | None]]:
    """(source index, record or None, skip reason or None) for each raw item, in order."""
    for index, raw in raw_items:
        try:
            yield index, parse_record(index, raw, image_folder), None
        except RecordSkipped as skipped:
            yield index, None, skipped.reason
