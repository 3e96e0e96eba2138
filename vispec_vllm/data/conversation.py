"""Chat messages built from a source record (HF content-part format, shared by vLLM and transformers)."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from vispec_vllm.data.records import SourceRecord

# Official stage-2 system prompt (ge_data_all_*_pretrain_gen.py) and answer-lengthening instruction.
DEFAULT_SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
DEFAULT_EXTRA_INSTRUCTION = "Please answer with at least 1000 words."


@dataclass(frozen=True)
class PromptStyle:
    system_prompt: str = DEFAULT_SYSTEM_PROMPT  # "" = no system message
    extra_instruction: str = DEFAULT_EXTRA_INSTRUCTION  # appended to the generation prompt; "" = none


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def _system(style: PromptStyle) -> list[dict]:
    return [{"role": "system", "content": [_text(style.system_prompt)]}] if style.system_prompt else []


def _user_content(question: str, with_image: bool, extra: str) -> list[dict]:
    """Official order for image prompts: question, image, extra instruction."""
    if not with_image:
        return [_text("\n".join(part for part in (question, extra) if part))]
    parts = [_text(question)] if question else []
    parts.append({"type": "image"})
    if extra:
        parts.append(_text(extra))
    return parts


def generation_messages(record: SourceRecord, style: PromptStyle) -> list[dict]:
    """System + the first user turn (with the image and the extra instruction), ready for a generation prompt."""
    content = _user_content(record.first_question, record.image_path is not None, style.extra_instruction)
    return [*_system(style), {"role": "user", "content": content}]


def dataset_messages(record: SourceRecord, style: PromptStyle) -> list[dict]:
    """The whole conversation with its own answers (the image goes into the first user turn)."""
    messages = _system(style)
    image_pending = record.image_path is not None
    for turn in record.turns:
        if turn.role == "user":
            messages.append({"role": "user", "content": _user_content(turn.text, image_pending, "")})
            image_pending = False
        else:
            messages.append({"role": "assistant", "content": [_text(turn.text)]})
    return messages


def with_pil_image(messages: list[dict], image: Image.Image | None) -> list[dict]:
    """The messages in vLLM's chat format: the `{"type": "image"}` placeholder carries the PIL image."""
    if image is None:
        return messages
    converted = []
    for message in messages:
        content = [
            {"type": "image_pil", "image_pil": image} if part.get("type") == "image" else part
            for part in message["content"]
        ]
        converted.append({**message, "content": content})
    return converted
