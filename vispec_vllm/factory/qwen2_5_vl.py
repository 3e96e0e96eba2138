"""Tiny Qwen2.5-VL target: Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2_5_VLProcessor, ChatML.

A 224x224 image becomes a 16x16 patch grid (patch 14), merged 2x2 into 64 `<|image_pad|>` tokens; window attention
(112 px windows = 4x4 merged units) runs in vision block 0 and full attention in block 1.
"""

from __future__ import annotations

from pathlib import Path

from vispec_vllm.factory.tokenizer import save_processor, train_byte_level_bpe, write_tokenizer
from vispec_vllm.factory.weights import save_model, seeded_model

VOCAB_SIZE = 1024
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
MIN_PIXELS = 112 * 112
MAX_PIXELS = 224 * 224
MAX_POSITION_EMBEDDINGS = 4096
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# ChatML; each image part becomes <|vision_start|><|image_pad|><|vision_end|> (the processor expands the pad).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ['image', 'image_url', 'image_pil'] or 'image' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] in ['video', 'video_url'] or 'video' in part %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def token_id(token: str) -> int:
    """Id of a special token: they follow the trained vocabulary in `SPECIAL_TOKENS` order."""
    return VOCAB_SIZE - len(SPECIAL_TOKENS) + SPECIAL_TOKENS.index(token)


def build(out_dir: Path, seed: int) -> None:
    from transformers import (
        AutoTokenizer,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = train_byte_level_bpe(seed, VOCAB_SIZE, SPECIAL_TOKENS)
    tokenizer_config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "processor_class": "Qwen2_5_VLProcessor",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": MAX_POSITION_EMBEDDINGS,
        "split_special_tokens": False,
    }
    write_tokenizer(tokenizer, out_dir, tokenizer_config)

    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": VOCAB_SIZE,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]},
            "bos_token_id": None,
            "eos_token_id": token_id(EOS_TOKEN),
            "pad_token_id": token_id(PAD_TOKEN),
            "dtype": "float32",
        },
        vision_config={
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 4,
            "out_hidden_size": 128,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [1],
        },
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
        tie_word_embeddings=False,
        dtype="float32",
    )
    model = seeded_model(Qwen2_5_VLForConditionalGeneration, config, seed)
    model.generation_config.bos_token_id = None
    model.generation_config.eos_token_id = token_id(EOS_TOKEN)
    model.generation_config.pad_token_id = token_id(PAD_TOKEN)

    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
        video_processor=Qwen2VLVideoProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, cap_pixels_per_frame=True),
        tokenizer=AutoTokenizer.from_pretrained(out_dir),
        chat_template=CHAT_TEMPLATE,
    )
    save_processor(processor, out_dir)
    save_model(model, out_dir)
