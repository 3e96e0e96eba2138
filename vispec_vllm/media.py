"""Images as OpenAI-style chat content (base64 data URLs)."""

from __future__ import annotations

import base64
import io

from PIL import Image


def image_data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def image_part(image: Image.Image) -> dict:
    return {"type": "image_url", "image_url": {"url": image_data_url(image)}}
