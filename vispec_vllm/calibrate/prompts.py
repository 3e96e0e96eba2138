"""Calibration prompts: chat conversations (OpenAI format, images as data URLs), built in or from a JSON file.

A prompts file is a JSON list; each entry is one of
  "a question"                                   a text-only user turn
  {"text": "a question", "image": "photo.png"}   one image (path relative to the file) and a question
  {"messages": [...]}                            a whole OpenAI chat conversation, images as image_url parts
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from vispec_vllm.media import image_part

Conversation = list[dict]

_IMAGE_QUESTIONS = ("Describe the picture in detail.", "What shapes and colours are in this image?",
                    "What is in the top left corner of the image?", "Write a short story about this picture.")
_TEXT_QUESTIONS = ("Explain how a bicycle works.", "Write a short poem about the sea.",
                   "List five facts about the moon.", "What makes a good cup of tea?")


def default_conversations() -> list[Conversation]:
    """Four image questions about the factory's synthetic test images and four text-only questions."""
    from vispec_vllm.factory import make_test_image

    image_turns = [[image_part(make_test_image(900 + i)), {"type": "text", "text": question}]
                   for i, question in enumerate(_IMAGE_QUESTIONS)]
    conversations = [[{"role": "user", "content": content}] for content in image_turns]
    return conversations + [[{"role": "user", "content": question}] for question in _TEXT_QUESTIONS]


def load_conversations(path: Path) -> list[Conversation]:
    """The prompts file's conversations; ValueError naming the file and entry when one is malformed."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read a JSON prompts file ({error})") from error
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty JSON list of prompts")
    return [_conversation(entry, path.parent, f"{path} entry {index}") for index, entry in enumerate(entries)]


def images_in(conversation: Conversation) -> int:
    return sum(1 for message in conversation if isinstance(message.get("content"), list)
               for part in message["content"] if str(part.get("type", "")).startswith("image"))


def _conversation(entry: object, root: Path, where: str) -> Conversation:
    if isinstance(entry, str) and entry.strip():
        return [{"role": "user", "content": entry}]
    if isinstance(entry, dict) and "messages" in entry:
        messages = entry["messages"]
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise ValueError(f"{where}: 'messages' must be a non-empty list of chat messages")
        return messages
    if isinstance(entry, dict) and isinstance(entry.get("text"), str):
        content: list[dict] = [{"type": "text", "text": entry["text"]}]
        if "image" in entry:
            content.insert(0, image_part(_image(root / str(entry["image"]), where)))
        return [{"role": "user", "content": content}]
    raise ValueError(f"{where}: expected a question string, {{\"text\": ..., \"image\": ...}} or {{\"messages\": ...}}")


def _image(path: Path, where: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"{where}: cannot open image {path} ({error})") from error
