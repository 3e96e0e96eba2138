"""Assemble the world's target: a LLaVA-1.5-architecture VLM from a plain HF language model and a trained
vision side (`vision.py`), loadable by stock vLLM and transformers.

- Tokenizer: the LM's own, plus one `<image>` special token (appended: vocabulary V+1). Its embedding row is
  never read (image slots carry image features); as an output row it is zero, so the model practically
  never emits it.
- Chat template: ChatML, as the instruct LMs used here were tuned on, with `SYSTEM_PROMPT` unless the
  conversation brings its own system message; image parts come first in a user turn, each inside `IMAGE_WRAP`
  text, then the question. (Without the system prompt, SmolLM2-135M reads "diamond" as jewellery.)
- Weights: the LM's (`model.language_model.*`, `lm_head`), the vision side's, saved in the hub key layout the
  project's factory targets use (vLLM 0.32 loads `vision_tower.vision_model.*`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vispec_vllm.world.vision import VisionSpec, llava_config

IMAGE_TOKEN = "<image>"
IMAGE_WRAP = ("Picture: ", "\n")
SYSTEM_PROMPT = ("You describe pictures of simple coloured shapes arranged in four rows. Mention only the shapes "
                 "in the picture, with their number, size, colour and row.")
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] | rejectattr('type', 'equalto', 'text') %}"
    + IMAGE_WRAP[0] + IMAGE_TOKEN + IMAGE_WRAP[1] + "{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ ' ' if not loop.first }}{{ part['text'] }}{% endfor %}"
    "{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def text_config_of(lm_dir: Path, vocab_size: int) -> dict:
    config = json.loads((lm_dir / "config.json").read_text())
    drop = ("architectures", "quantization_config", "transformers_version", "_name_or_path", "torch_dtype", "dtype")
    text = {k: v for k, v in config.items() if k not in drop}
    text["vocab_size"] = vocab_size
    text["dtype"] = "float32"
    return text


def lm_state_dict(lm_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in sorted(lm_dir.glob("*.safetensors")):
        state.update(load_file(str(path)))
    return state


def assemble_target(lm_dir: Path, vision_weights: Path, spec: VisionSpec, out_dir: Path) -> Path:
    """Write the VLM to `out_dir` (atomically) and return it."""
    import shutil

    from safetensors.torch import load_file
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor

    from vispec_vllm.factory.llava import _hub_clip_key
    from vispec_vllm.factory.weights import save_model

    lm_dir, out_dir = Path(lm_dir), Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    tokenizer = AutoTokenizer.from_pretrained(str(lm_dir))
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id != len(tokenizer) - 1:
        raise ValueError(f"{IMAGE_TOKEN} got id {image_token_id}, expected the last id {len(tokenizer) - 1}")
    tokenizer.chat_template = CHAT_TEMPLATE
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(**spec.image_processor_kwargs()),
                               tokenizer=tokenizer, patch_size=spec.patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               image_token=IMAGE_TOKEN, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(str(tmp))

    state = {f"model.language_model.{k.removeprefix('model.')}" if k.startswith("model.") else k: v
             for k, v in lm_state_dict(lm_dir).items()}
    embed_key = "model.language_model.embed_tokens.weight"
    # Qwen-style LMs pad their matrices beyond the tokenizer: the image token then takes a padding row.
    vocab_size = max(len(tokenizer), state[embed_key].shape[0])
    text_config = text_config_of(lm_dir, vocab_size)
    config = llava_config(spec, text_config, image_token_id)
    with torch.device("cpu"), torch.random.fork_rng(devices=[]):
        model = LlavaForConditionalGeneration(config)
    for key in (embed_key, "lm_head.weight"):
        if key in state:
            state[key] = _with_zero_row(state[key], vocab_size, image_token_id)
    if "lm_head.weight" not in state and not config.tie_word_embeddings:
        raise ValueError(f"{lm_dir}: no lm_head.weight and tie_word_embeddings is false")
    state.update(load_file(str(vision_weights)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"assembling the target: missing {missing[:5]}, unexpected {unexpected[:5]}")
    generation = model.generation_config
    generation.eos_token_id = tokenizer.eos_token_id
    generation.bos_token_id = tokenizer.bos_token_id
    generation.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    save_model(model, tmp, rename=_hub_clip_key)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.replace(out_dir)
    return out_dir


def _with_zero_row(weight: torch.Tensor, rows: int, zero_row: int) -> torch.Tensor:
    """[V, H] -> [rows, H]: zero rows appended, and row `zero_row` (the image token) set to zero."""
    out = torch.cat([weight, weight.new_zeros(rows - weight.shape[0], weight.shape[1])])
    out[zero_row] = 0.0
    return out
