"""`build_tiny_draft`: official-format drafts for each tiny target family."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vispec_vllm.draft import ViSpecDraft, expected_keys, load_draft_checkpoint
from vispec_vllm.factory.drafts import build_tiny_draft, read_target_tensor
from vispec_vllm.factory.info import target_info

FAMILY_NAMES = {
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", 22, 14),
    "llava": ("LlavaForConditionalGeneration", 17, 11),
    "llava_next": ("LlavaNextForConditionalGeneration", 17, 11),
}


@pytest.mark.parametrize("family", sorted(FAMILY_NAMES))
def test_tiny_draft_for_each_family(family, tiny_target, tiny_draft):
    architecture, vispec_keys, eagle_keys = FAMILY_NAMES[family]
    target = tiny_target(family)
    info = target_info(target)
    draft_dir = tiny_draft(family)
    config, state, _ = load_draft_checkpoint(draft_dir)
    raw = json.loads((draft_dir / "config.json").read_text())
    assert raw["architectures"] == [architecture] and raw["model_type"] == family
    assert raw["num_hidden_layers"] == 1 and raw["num_key_value_heads"] == raw["num_attention_heads"]
    assert config.qkv_bias == (family == "qwen2_5_vl")
    assert (config.hidden_size, config.vocab_size, config.num_attention_heads) == (
        info.hidden_size, info.vocab_size, info.num_attention_heads)
    assert (config.rms_norm_eps, config.rope_theta) == (info.rms_norm_eps, info.rope_theta)
    assert len(state) == vispec_keys
    assert {k: tuple(v.shape) for k, v in state.items()} == expected_keys(config, 2)
    assert torch.equal(state["embed_tokens.weight"], read_target_tensor(target, info.embed_key).float())
    hidden = config.hidden_size
    assert not torch.equal(state["img_fc.weight"][:, :hidden], torch.eye(hidden))  # random, so g matters

    eagle = load_file(str(tiny_draft(family, stage="eagle") / "model.safetensors"))
    assert len(eagle) == eagle_keys and not any(k.startswith(("imadpt.", "img_fc.")) for k in eagle)
    assert torch.equal(eagle["embed_tokens.weight"], state["embed_tokens.weight"])

    model = ViSpecDraft.from_pretrained(draft_dir)
    model.set_lm_head(read_target_tensor(target, info.lm_head_key).float())
    generator = torch.Generator().manual_seed(0)
    h, e = torch.randn(1, 12, hidden, generator=generator), torch.randn(1, 12, hidden, generator=generator)
    image = torch.zeros(1, 12, dtype=torch.bool)
    image[0, 3:8] = True
    with_image = model(h, e, image).hidden_states
    without = model(h, e).hidden_states
    assert not torch.allclose(with_image[0, 8:], without[0, 8:], atol=1e-3)
    assert torch.isfinite(model.compute_logits(with_image)).all()


def test_tiny_draft_is_idempotent_and_seeded(tiny_target, tmp_path):
    target = tiny_target("llava")
    first = build_tiny_draft(target, tmp_path / "d", seed=1, num_q=3)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_draft(target, tmp_path / "d", seed=1, num_q=3) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert load_file(str(first / "model.safetensors"))["imadpt.q"].shape[0] == 3
    other = build_tiny_draft(target, tmp_path / "e", seed=2, num_q=3)
    a, b = load_file(str(first / "model.safetensors")), load_file(str(other / "model.safetensors"))
    assert torch.equal(a["embed_tokens.weight"], b["embed_tokens.weight"])
    assert not torch.equal(a["fc.weight"], b["fc.weight"])
    rebuilt = build_tiny_draft(target, tmp_path / "d", seed=2, num_q=3)  # another build replaces the old one
    assert torch.equal(load_file(str(rebuilt / "model.safetensors"))["fc.weight"], b["fc.weight"])
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="holds no tiny-draft build"):
        build_tiny_draft(target, tmp_path / "f")
    with pytest.raises(ValueError, match="unknown draft stage"):
        build_tiny_draft(target, tmp_path / "g", stage="medusa")
