"""Token ids, answer masks and vision inputs of one conversation, produced by the target's HF processor.

Two sources of answers:
* generated: prompt = the generation messages, answer = the token ids the target produced (vLLM);
* dataset: the conversation's own assistant turns, located by rendering prefixes of the chat and mapping
  their character spans onto tokens (the official stage-1 recipe teacher-forces ShareGPT's own answers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from vispec_vllm.data.records import RecordSkipped, SkipReason

# Processor outputs with one entry per token (transformers 5 Qwen2.5-VL needs `mm_token_type_ids`, 0 = text).
TOKEN_ALIGNED_KEYS = ("mm_token_type_ids", "token_type_ids")


@dataclass
class EncodedConversation:
    input_ids: torch.Tensor  # [L] int64, image placeholders expanded
    answer_mask: torch.Tensor  # [L] bool, True on answer (assistant) tokens
    vision_inputs: dict[str, torch.Tensor]  # per-image processor outputs (pixel_values, grid, sizes)
    token_features: dict[str, torch.Tensor]  # [L] per-token processor outputs (TOKEN_ALIGNED_KEYS)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of the HF VLM forward (batch of one)."""
        return {"input_ids": self.input_ids[None], **self.vision_inputs,
                **{k: v[None] for k, v in self.token_features.items()}}

    def cut(self, length: int) -> EncodedConversation:
        return EncodedConversation(self.input_ids[:length], self.answer_mask[:length], self.vision_inputs,
                                   {k: v[:length] for k, v in self.token_features.items()})


def render(processor, messages: list[dict], *, add_generation_prompt: bool) -> str:
    return processor.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _process(processor, text: str, image: Image.Image | None) -> EncodedConversation:
    """The processor's encoding of `text` (+ image), with an all-False answer mask."""
    # The rendered chat already holds its special tokens (LLaVA's <s>): vLLM's chat path adds none either.
    features = dict(processor(text=[text], images=[image] if image is not None else None, return_tensors="pt",
                              add_special_tokens=False))
    input_ids = features.pop("input_ids")[0].long()
    features.pop("attention_mask", None)
    token_features = {k: features.pop(k)[0] for k in TOKEN_ALIGNED_KEYS if k in features}
    return EncodedConversation(input_ids, torch.zeros(len(input_ids), dtype=torch.bool), features, token_features)


def encode_prompt(processor, messages: list[dict], image: Image.Image | None) -> EncodedConversation:
    """The prompt (with the generation prompt) as the target's processor encodes it."""
    return _process(processor, render(processor, messages, add_generation_prompt=True), image)


def encode_generated(
    processor, messages: list[dict], image: Image.Image | None, answer_ids: list[int]
) -> EncodedConversation:
    prompt = encode_prompt(processor, messages, image)
    answer = torch.tensor(answer_ids, dtype=torch.long)
    return EncodedConversation(
        torch.cat([prompt.input_ids, answer]),
        torch.cat([prompt.answer_mask, torch.ones(len(answer), dtype=torch.bool)]),
        prompt.vision_inputs,
        {k: torch.cat([v, v.new_zeros(len(answer))]) for k, v in prompt.token_features.items()},  # 0 = text
    )


def _answer_char_spans(processor, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of every assistant turn (incl. its end-of-turn text)."""
    full = render(processor, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(processor, messages[:i], add_generation_prompt=True)
        through = render(processor, messages[: i + 1], add_generation_prompt=False)
        if not (through.startswith(before) and full.startswith(through)):
            raise RecordSkipped(SkipReason.UNSUPPORTED_TEMPLATE, "chat template renders non-prefix turns")
        spans.append((len(before), len(through)))
    return full, spans


def expand_image_runs(
    unexpanded_ids: list[int], unexpanded_mask: list[bool], expanded_ids: list[int], image_token_id: int
) -> list[bool] | None:
    """Carry a per-token mask over the processor's expansion of image placeholders (one run per image).

    Returns None when the two id sequences do not align outside image runs.
    """
    mask: list[bool] = []
    i = j = 0
    while i < len(unexpanded_ids) and j < len(expanded_ids):
        if unexpanded_ids[i] == image_token_id:
            run_u = i
            while run_u < len(unexpanded_ids) and unexpanded_ids[run_u] == image_token_id:
                run_u += 1
            run_e = j
            while run_e < len(expanded_ids) and expanded_ids[run_e] == image_token_id:
                run_e += 1
            if run_e == j:
                return None
            mask.extend([unexpanded_mask[i]] * (run_e - j))
            i, j = run_u, run_e
        elif unexpanded_ids[i] == expanded_ids[j]:
            mask.append(unexpanded_mask[i])
            i, j = i + 1, j + 1
        else:
            return None
    return mask if (i, j) == (len(unexpanded_ids), len(expanded_ids)) else None


def encode_dataset_conversation(
    processor, messages: list[dict], image: Image.Image | None, image_token_id: int
) -> EncodedConversation:
    full, spans = _answer_char_spans(processor, messages)
    tokenized = processor.tokenizer(full, return_offsets_mapping=True, add_special_tokens=False)
    unexpanded_mask = [any(a <= start < b for a, b in spans) for start, _ in tokenized["offset_mapping"]]
    encoded = _process(processor, full, image)
    mask = expand_image_runs(tokenized["input_ids"], unexpanded_mask, encoded.input_ids.tolist(), image_token_id)
    if mask is None:
        raise RecordSkipped(SkipReason.UNSUPPORTED_TEMPLATE, "tokenizer and processor ids do not align")
    encoded.answer_mask = torch.tensor(mask, dtype=torch.bool)
    return encoded


def checked_and_truncated(encoded: EncodedConversation, max_len: int | None,
                          image_token_id: int) -> EncodedConversation:
    """Cut to `max_len` tokens, or raise `RecordSkipped` for a sample that cannot be used:
    an answer holding the image placeholder token (a tiny random target can emit it; the target's forward
    would count it as an image), a cut inside an image (it would break that forward), no answer token left."""
    if bool((encoded.input_ids[encoded.answer_mask] == image_token_id).any()):
        raise RecordSkipped(SkipReason.IMAGE_TOKEN_IN_ANSWER, "the answer contains the image placeholder token")
    if max_len is not None and len(encoded.input_ids) > max_len:
        image_positions = (encoded.input_ids == image_token_id).nonzero()
        if len(image_positions) and int(image_positions[-1]) >= max_len:
            raise RecordSkipped(SkipReason.PROMPT_TOO_LONG, f"image tokens beyond max_len {max_len}")
        encoded = encoded.cut(max_len)
    if not bool(encoded.answer_mask.any()):
        raise RecordSkipped(SkipReason.NO_ANSWER_TOKENS, "no answer token within max_len")
    return encoded
