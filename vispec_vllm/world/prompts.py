"""Chat messages for the world's target, in vLLM's chat format (the same prompt the data pipeline builds:
no system message, the image, then the question; the chat template puts image parts first)."""

from __future__ import annotations

from PIL import Image


def chat_messages(image: Image.Image, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_pil", "image_pil": image},
                                         {"type": "text", "text": question}]}]
