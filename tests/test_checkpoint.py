"""The official ViSpec draft checkpoint format: keys, round trips, stage-1 loading and one-line errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vispec_vllm.draft import (
    DraftCheckpointError,
    ViSpecConfig,
    ViSpecDraft,
    check_draft_matches_target,
    expected_keys,
    load_draft_checkpoint,
)
from vispec_vllm.draft.model import identity_img_fc_
from vispec_vllm.factory.weights import reinitialize

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs" / "drafts"

# reference §3.1: the official state-dict keys (LLaVA, no qkv_bias)
OFFICIAL_LLAVA_KEYS = [
    "embed_tokens.weight",
    "layers.0.self_attn.q_proj.weight",
    "layers.0.self_attn.k_proj.weight",
    "layers.0.self_attn.v_proj.weight",
    "layers.0.self_attn.o_proj.weight",
    "layers.0.mlp.gate_proj.weight",
    "layers.0.mlp.up_proj.weight",
    "layers.0.mlp.down_proj.weight",
    "layers.0.post_attention_layernorm.weight",
    "fc.weight",
    "fc.bias",
    "imadpt.q",
    "imadpt.k_proj.weight",
    "imadpt.v_proj.weight",
    "imadpt.o_proj.weight",
    "img_fc.weight",
    "img_fc.bias",
]
QWEN_EXTRA_KEYS = [
    "layers.0.self_attn.q_proj.bias",
    "layers.0.self_attn.k_proj.bias",
    "layers.0.self_attn.v_proj.bias",
    "imadpt.k_proj.bias",
    "imadpt.v_proj.bias",
]
OFFICIAL_QWEN_KEYS = OFFICIAL_LLAVA_KEYS + QWEN_EXTRA_KEYS


def stage1(keys: list[str]) -> set[str]:
    return {k for k in keys if not k.startswith(("imadpt.", "img_fc."))}


def shrunk_official(name: str) -> dict:
    """An official config file with tiny sizes; every other key kept as in the file."""
    data = json.loads((CONFIGS / f"{name}.json").read_text())
    data.update(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=4, vocab_size=61)
    return data


def random_model(config: ViSpecConfig, num_q: int | None, seed: int = 0) -> ViSpecDraft:
    model = ViSpecDraft(config, num_q=num_q)
    reinitialize(model, seed)
    return model


def official_style_dir(tmp_path: Path, name: str = "qwen2.5_vl_3B", num_q: int | None = 2) -> Path:
    config = ViSpecConfig.from_dict(shrunk_official(name))
    directory = tmp_path / f"draft-{name}-{num_q}"
    model = random_model(config, num_q)
    if num_q is None:
        identity_img_fc_(model.img_fc)  # a stage-1 draft's img_fc is the identity
    model.save_pretrained(directory)
    return directory


def assert_one_line(err: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(err.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


# --------------------------------------------------------------------------------------------- keys


@pytest.mark.parametrize(
    ("name", "official"), [("qwen2.5_vl_7B", OFFICIAL_QWEN_KEYS), ("llava_1.6_13B", OFFICIAL_LLAVA_KEYS)]
)
def test_keys_equal_the_official_lists(name, official):
    config = ViSpecConfig.from_json_file(CONFIGS / f"{name}.json")
    assert set(expected_keys(config, 2)) == set(official) and len(official) in (17, 22)
    assert set(expected_keys(config, None)) == stage1(official) and len(stage1(official)) in (11, 14)
    small = ViSpecConfig.from_dict(shrunk_official(name))
    model = ViSpecDraft(small, num_q=2)
    assert list(model.state_dict()) == list(expected_keys(small, 2))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected_keys(small, 2)


REFERENCE_TABLE = {  # reference §1.1 (LLaVA-1.5-7B: same text sizes as LLaVA-1.6-7B)
    "llava_1.6_7B": (4096, 11008, 32, 32064, 4096, 1e-5, 10000.0, False),
    "llava_1.6_13B": (5120, 13824, 40, 32064, 4096, 1e-5, 10000.0, False),
    "llava_1.5_7B": (4096, 11008, 32, 32064, 4096, 1e-5, 10000.0, False),
    "qwen2.5_vl_3B": (2048, 11008, 16, 151936, 8192, 1e-6, 1e6, True),
    "qwen2.5_vl_7B": (3584, 18944, 28, 152064, 8192, 1e-6, 1e6, True),
}
# reference §3.1: trainable / embedding parameters with num_q=2, in millions
REFERENCE_SIZES = {"llava_1.6_7B": (320, 131), "llava_1.6_13B": (501, 164), "qwen2.5_vl_3B": (114, 311),
                   "qwen2.5_vl_7B": (345, 545)}


@pytest.mark.parametrize("name", sorted(REFERENCE_TABLE))
def test_shipped_configs(name):
    path = CONFIGS / f"{name}.json"
    config = ViSpecConfig.from_json_file(path)
    hidden, inter, heads, vocab, max_pos, eps, theta, qkv_bias = REFERENCE_TABLE[name]
    assert (config.hidden_size, config.intermediate_size, config.num_attention_heads, config.vocab_size) == (
        hidden, inter, heads, vocab)
    assert (config.max_position_embeddings, config.rms_norm_eps, config.rope_theta, config.qkv_bias) == (
        max_pos, eps, theta, qkv_bias)
    assert config.num_key_value_heads == heads and config.head_dim == 128 and config.bias
    assert config.extra["num_hidden_layers"] == 1
    assert config.to_dict() == json.loads(path.read_text())
    shapes = expected_keys(config, 2)
    assert len(shapes) == (22 if qkv_bias else 17)
    if name in REFERENCE_SIZES:
        embed = torch.Size(shapes["embed_tokens.weight"]).numel()
        trainable = sum(torch.Size(s).numel() for s in shapes.values()) - embed
        assert (round(trainable / 1e6), round(embed / 1e6)) == REFERENCE_SIZES[name]


def test_llava_config_leaves_out_rope_theta_and_qkv_bias():
    data = json.loads((CONFIGS / "llava_1.6_7B.json").read_text())
    assert "rope_theta" not in data and "qkv_bias" not in data
    config = ViSpecConfig.from_dict(data)
    assert config.rope_theta == 10000.0 and not config.qkv_bias and config.pad_token_id == 0
    assert "rope_theta" not in config.to_dict() and list(config.to_dict()) == list(data)


# --------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    ("name", "num_q", "count"),
    [("qwen2.5_vl_3B", 2, 22), ("llava_1.6_7B", 2, 17), ("qwen2.5_vl_7B", None, 14), ("llava_1.6_13B", None, 11),
     ("qwen2.5_vl_3B", 4, 22)],
)
def test_save_load_round_trip_is_bit_exact(tmp_path, name, num_q, count):
    directory = official_style_dir(tmp_path, name, num_q)
    stored = load_file(str(directory / "model.safetensors"))
    assert len(stored) == count
    official = OFFICIAL_QWEN_KEYS if "qwen" in name else OFFICIAL_LLAVA_KEYS
    assert set(stored) == (set(official) if num_q else stage1(official))
    assert json.loads((directory / "config.json").read_text()) == shrunk_official(name)
    assert list(json.loads((directory / "config.json").read_text())) == list(shrunk_official(name))

    loaded = ViSpecDraft.from_pretrained(directory)
    assert loaded.num_q == num_q
    state = loaded.state_dict()
    for key, value in stored.items():
        assert torch.equal(state[key], value), key
    again = tmp_path / "again"
    loaded.save_pretrained(again)
    assert (again / "config.json").read_text() == (directory / "config.json").read_text()
    restored = load_file(str(again / "model.safetensors"))
    assert restored.keys() == stored.keys() and all(torch.equal(restored[k], stored[k]) for k in stored)


def test_pytorch_model_bin_and_dtype(tmp_path):
    directory = official_style_dir(tmp_path)
    state = load_file(str(directory / "model.safetensors"))
    (directory / "model.safetensors").unlink()
    torch.save({k: v.to(torch.bfloat16) for k, v in state.items()}, directory / "pytorch_model.bin")
    config, loaded_state, weights = load_draft_checkpoint(directory)
    assert weights.name == "pytorch_model.bin" and config.qkv_bias
    model = ViSpecDraft.from_pretrained(directory, dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in model.parameters())
    assert torch.equal(model.fc.weight, state["fc.weight"].to(torch.bfloat16).to(torch.float16))


def test_num_q_is_read_from_imadpt_q(tmp_path):
    directory = official_style_dir(tmp_path, "llava_1.6_7B", num_q=5)
    assert ViSpecDraft.from_pretrained(directory).num_q == 5
    with pytest.raises(DraftCheckpointError) as err:
        ViSpecDraft.from_pretrained(directory, num_q=2)
    assert_one_line(err, str(directory / "model.safetensors"), "expected num_q 2", "found imadpt.q with num_q 5")


def test_stage1_checkpoint_loads_with_identity_img_fc(tmp_path, caplog):
    directory = official_style_dir(tmp_path, "qwen2.5_vl_3B", num_q=None)
    with caplog.at_level(logging.INFO, logger="vispec_vllm.draft.model"):
        model = ViSpecDraft.from_pretrained(directory)
    assert model.num_q is None and model.imadpt is None
    hidden = model.config.hidden_size
    assert torch.equal(model.img_fc.weight, torch.cat([torch.eye(hidden), torch.zeros(hidden, hidden)], dim=1))
    assert torch.equal(model.img_fc.bias, torch.zeros(hidden))
    assert any("stage-1" in r.getMessage() and "identity" in r.getMessage() for r in caplog.records)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vispec_vllm.draft.model"):
        fresh = ViSpecDraft.from_pretrained(directory, num_q=3, seed=7)
        same = ViSpecDraft.from_pretrained(directory, num_q=3, seed=7)
    assert fresh.num_q == 3 and torch.equal(fresh.imadpt.q, same.imadpt.q)
    assert any("freshly initialised" in r.getMessage() and "num_q=3" in r.getMessage() for r in caplog.records)
    assert abs(fresh.imadpt.q.std().item() - fresh.config.head_dim**-0.5) < 0.1
    # with g = 0 and the identity img_fc the fresh draft is exactly the stage-1 draft on text
    h = torch.randn(1, 6, hidden)
    e = torch.randn(1, 6, hidden)
    assert torch.equal(fresh(h, e).hidden_states, model(h, e).hidden_states)


def test_stage1_save_refuses_a_trained_img_fc(tmp_path):
    model = ViSpecDraft(ViSpecConfig.from_dict(shrunk_official("llava_1.6_7B")), num_q=None)
    with torch.no_grad():
        model.img_fc.bias.add_(1.0)
    with pytest.raises(ValueError, match="not the identity"):
        model.save_pretrained(tmp_path / "x")


# --------------------------------------------------------------------------------------------- errors


def test_missing_directory_config_and_weights(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DraftCheckpointError) as err:
        load_draft_checkpoint(missing)
    assert_one_line(err, str(missing), "expected a checkpoint directory", "found nothing")

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(DraftCheckpointError) as err:
        load_draft_checkpoint(a_file)
    assert_one_line(err, str(a_file), "found a file")

    directory = official_style_dir(tmp_path)
    (directory / "config.json").rename(directory / "config.bak")
    with pytest.raises(DraftCheckpointError) as err:
        load_draft_checkpoint(directory)
    assert_one_line(err, str(directory), "expected config.json", "found [config.bak, model.safetensors]")

    (directory / "config.bak").rename(directory / "config.json")
    (directory / "model.safetensors").unlink()
    with pytest.raises(DraftCheckpointError) as err:
        load_draft_checkpoint(directory)
    assert_one_line(err, str(directory), "expected a weights file model.safetensors or pytorch_model.bin",
                    "found [config.json]")


def rewrite_weights(directory: Path, edit) -> Path:
    path = directory / "model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))
    return path


def test_unknown_missing_and_misshaped_keys(tmp_path):
    directory = official_style_dir(tmp_path)
    path = rewrite_weights(directory, lambda s: s.update({"lm_head.weight": torch.zeros(61, 32)}))
    with pytest.raises(DraftCheckpointError) as err:
        load_draft_checkpoint(directory)
    assert_one_line(err, str(path), "unknown keys [lm_head.weight]", "expected only the official keys",
                    "ViSpec, 22 keys")

    rewrite_weights(directory, lambda s: (s.pop("lm_head.weight"), s.pop("fc.bias"), s.pop("imadpt.q")))
    with pytest.raises(DraftCheckpointError) as err:
        load_draft_checkpoint(directory)
    assert_one_line(err, str(path), "missing keys [fc.bias, imadpt.q]", "22 keys expected")

    directory = official_style_dir(tmp_path, "llava_1.6_7B")
    path = rewrite_weights(directory, lambda s: s.update({"layers.0.mlp.up_proj.weight": torch.zeros(40, 32)}))
    with pytest.raises(DraftCheckpointError) as err:
        load_draft_checkpoint(directory)
    assert_one_line(err, str(path), "layers.0.mlp.up_proj.weight expected [48, 32] found [40, 32]")


def test_num_q_below_two(tmp_path):
    directory = official_style_dir(tmp_path)
    path = rewrite_weights(directory, lambda s: s.update({"imadpt.q": s["imadpt.q"][:1].clone()}))
    with pytest.raises(DraftCheckpointError) as err:
        load_draft_checkpoint(directory)
    assert_one_line(err, str(path), "expected num_q = imadpt.q.shape[0] >= 2", "found 1")


def test_unreadable_weights_and_bad_config(tmp_path):
    directory = official_style_dir(tmp_path)
    (directory / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DraftCheckpointError) as err:
        load_draft_checkpoint(directory)
    assert_one_line(err, str(directory / "model.safetensors"), "expected a readable model.safetensors file", "found")

    data = shrunk_official("qwen2.5_vl_3B")
    del data["hidden_size"]
    (directory / "config.json").write_text(json.dumps(data))
    with pytest.raises(DraftCheckpointError) as err:
        load_draft_checkpoint(directory)
    assert_one_line(err, str(directory / "config.json"), "expected keys ['hidden_size'] to be present", "found keys")

    data = shrunk_official("qwen2.5_vl_3B") | {"num_hidden_layers": 2}
    (directory / "config.json").write_text(json.dumps(data))
    with pytest.raises(DraftCheckpointError) as err:
        load_draft_checkpoint(directory)
    assert_one_line(err, str(directory / "config.json"), "expected num_hidden_layers 1", "found 2")


def test_validation_happens_before_any_module_is_built(tmp_path, monkeypatch):
    directory = official_style_dir(tmp_path)
    rewrite_weights(directory, lambda s: s.pop("img_fc.bias"))

    def built(*_args, **_kwargs):
        raise AssertionError("a module was built before validation finished")

    monkeypatch.setattr(ViSpecDraft, "__init__", built)
    with pytest.raises(DraftCheckpointError, match=r"missing keys \[img_fc.bias\]"):
        ViSpecDraft.from_pretrained(directory)


def test_draft_must_match_the_target():
    config = ViSpecConfig.from_dict(shrunk_official("qwen2.5_vl_3B"))
    check_draft_matches_target(config, hidden_size=32, vocab_size=61, num_attention_heads=4, source="/d")
    with pytest.raises(DraftCheckpointError) as err:
        check_draft_matches_target(config, hidden_size=64, vocab_size=61, num_attention_heads=4, source="/d")
    assert_one_line(err, "/d/config.json", "hidden_size expected 64 (target) found 32")
    with pytest.raises(DraftCheckpointError) as err:
        check_draft_matches_target(config, hidden_size=32, vocab_size=70, num_attention_heads=8, source="/d")
    assert_one_line(err, "/d/config.json", "vocab_size expected 70 (target) found 61",
                    "num_attention_heads expected 8 (target) found 4")
