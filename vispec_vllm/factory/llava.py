"""Tiny LLaVA-1.5 and LLaVA-NeXT (1.6, anyres) targets: a CLIP vision tower, a 2-layer MLP projector, a tiny Llama.

Both use a Llama-style tokenizer (`<unk>`=0, `<s>`=1, `</s>`=2, byte fallback, `<image>` and `<pad>` last).
CLIP sees 112 px crops in 14 px patches: 8x8 = 64 features per crop (the CLS feature is dropped, "default").

- LLaVA-1.5: one 112x112 crop, so every image is 64 `<image>` tokens.
- LLaVA-NeXT: a 112x112 overview plus the best of `IMAGE_GRID_PINPOINTS` cut into 112 px tiles, with an
  `image_newline` after each feature row; a 224x224 image gives 64 + 16 * (16 + 1) = 336 tokens.

transformers 5 saves the CLIP tower as `vision_tower.embeddings.*`/`vision_tower.encoder.*`, which vLLM 0.32
rejects; the checkpoint keeps the hub layout `vision_tower.vision_model.*`, which transformers also loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vispec_vllm.factory.tokenizer import save_processor, train_byte_fallback_bpe, write_tokenizer
from vispec_vllm.factory.weights import save_model, seeded_model

VOCAB_SIZE = 1024
LEADING_SPECIAL = ("<unk>", "<s>", "</s>")
TRAILING_SPECIAL = ("<image>", "<pad>")
IMAGE_SIZE = 112
PATCH_SIZE = 14
IMAGE_GRID_PINPOINTS = [[112, 224], [224, 112], [224, 224]]
MAX_POSITION_EMBEDDINGS = 4096
VISION_FEATURE_LAYER = -2
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
VICUNA_SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

# USER/ASSISTANT turns; in a user turn the image placeholders come first, each followed by a newline, then the text.
_TURNS = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% elif message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] | rejectattr('type', 'equalto', 'text') %}<image>\n{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ ' ' if not loop.first }}{{ part['text'] }}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %} {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
# LLaVA-1.5: "<s>USER: <image>\nWhat is this? ASSISTANT:"
LLAVA_CHAT_TEMPLATE = "{{ bos_token }}" + _TURNS
# LLaVA-NeXT (vicuna): the same turns after the vicuna system prompt unless the conversation brings its own.
LLAVA_NEXT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] != 'system' %}" + VICUNA_SYSTEM_PROMPT + " {% endif %}" + _TURNS
)


def token_id(token: str) -> int:
    if token in LEADING_SPECIAL:
        return LEADING_SPECIAL.index(token)
    return VOCAB_SIZE - len(TRAILING_SPECIAL) + TRAILING_SPECIAL.index(token)


def build_llava(out_dir: Path, seed: int) -> None:
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    _build(
        out_dir,
        seed,
        model=(LlavaForConditionalGeneration, LlavaConfig(**_llava_config_fields())),
        processor=(LlavaProcessor, CLIPImageProcessor(**_clip_preprocessing())),
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def build_llava_next(out_dir: Path, seed: int) -> None:
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    config = LlavaNextConfig(**_llava_config_fields(image_grid_pinpoints=IMAGE_GRID_PINPOINTS))
    image_processor = LlavaNextImageProcessor(**_clip_preprocessing(), image_grid_pinpoints=IMAGE_GRID_PINPOINTS)
    _build(
        out_dir,
        seed,
        model=(LlavaNextForConditionalGeneration, config),
        processor=(LlavaNextProcessor, image_processor),
        chat_template=LLAVA_NEXT_CHAT_TEMPLATE,
    )


def _build(
    out_dir: Path, seed: int, *, model: tuple[type, Any], processor: tuple[type, Any], chat_template: str
) -> None:
    """Tokenizer files, then the processor around the saved tokenizer, then the weights (hub key layout)."""
    from transformers import AutoTokenizer

    processor_class, image_processor = processor
    _write_tokenizer(out_dir, seed, processor_class.__name__)
    save_processor(
        processor_class(
            image_processor=image_processor,
            tokenizer=AutoTokenizer.from_pretrained(out_dir),
            patch_size=PATCH_SIZE,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLIP's CLS feature, dropped by the "default" strategy
            image_token="<image>",
            chat_template=chat_template,
        ),
        out_dir,
    )
    model_class, config = model
    target = seeded_model(model_class, config, seed)
    generation = target.generation_config
    generation.bos_token_id, generation.eos_token_id = token_id("<s>"), token_id("</s>")
    generation.pad_token_id = token_id("<pad>")
    save_model(target, out_dir, rename=_hub_clip_key)


def _write_tokenizer(out_dir: Path, seed: int, processor_class: str) -> None:
    tokenizer = train_byte_fallback_bpe(seed, VOCAB_SIZE, LEADING_SPECIAL, TRAILING_SPECIAL, bos_token="<s>")
    write_tokenizer(
        tokenizer,
        out_dir,
        {
            "tokenizer_class": "LlamaTokenizer",
            "processor_class": processor_class,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": "<pad>",
            "add_bos_token": True,
            "add_eos_token": False,
            "legacy": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": MAX_POSITION_EMBEDDINGS,
            "padding_side": "left",
        },
    )


def _llava_config_fields(**extra: Any) -> dict[str, Any]:
    text_config = {
        "model_type": "llama",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "bos_token_id": token_id("<s>"),
        "eos_token_id": token_id("</s>"),
        "pad_token_id": token_id("<pad>"),
        "tie_word_embeddings": False,
        "dtype": "float32",
    }
    vision_config = {
        "model_type": "clip_vision_model",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "projection_dim": 64,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    }
    return {
        "text_config": text_config,
        "vision_config": vision_config,
        "image_token_index": token_id("<image>"),
        "projector_hidden_act": "gelu",
        "vision_feature_select_strategy": "default",
        "vision_feature_layer": VISION_FEATURE_LAYER,
        "image_seq_length": (IMAGE_SIZE // PATCH_SIZE) ** 2,  # features per 112 px crop
        "tie_word_embeddings": False,
        "dtype": "float32",
        **extra,
    }


def _clip_preprocessing() -> dict[str, Any]:
    return {
        "size": {"shortest_edge": IMAGE_SIZE},
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
    }


def _hub_clip_key(key: str) -> str:
    """`vision_tower.encoder.*` -> `vision_tower.vision_model.encoder.*` (the layout vLLM loads)."""
    prefix = "vision_tower."
    if key.startswith(prefix) and not key.startswith(prefix + "vision_model."):
        return prefix + "vision_model." + key[len(prefix):]
    return key
