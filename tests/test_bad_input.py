"""A ViSpec draft that does not fit its target fails at start-up with a one-line message naming expected and found.

Config-level mismatches fail in the main process while vLLM builds its config (no engine starts); whether the
draft is vision-aware is read from a local `model.safetensors` header there, and from the loaded weights in the
worker otherwise (the `pytorch_model.bin` case below, one engine start). Per-request bad input is in
test_server.py.
"""

import json
import shutil

import pytest
import torch
from conftest import vllm_engine

from vispec_vllm.draft.config import DraftCheckpointError
from vispec_vllm.engine.validation import MAX_SPECULATIVE_TOKENS, ViSpecConfigError
from vispec_vllm.factory import target_info

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def qwen(tiny_target, tiny_draft):
    return tiny_target("qwen2_5_vl"), tiny_draft("qwen2_5_vl")


@pytest.fixture(scope="module")
def text_only_target(tmp_path_factory, qwen):
    """A plain Qwen2 language model with the Qwen factory target's sizes and tokenizer (no vision tower)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    vlm, _ = qwen
    info = target_info(vlm)
    out = tmp_path_factory.mktemp("text-only-target")
    config = Qwen2Config(
        hidden_size=info.hidden_size,
        intermediate_size=info.intermediate_size,
        num_hidden_layers=1,
        num_attention_heads=info.num_attention_heads,
        num_key_value_heads=info.num_attention_heads,
        vocab_size=info.vocab_size,
        max_position_embeddings=info.max_position_embeddings,
        bos_token_id=None,
        eos_token_id=info.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(vlm).save_pretrained(out)
    return out


def edited_draft(draft, out, **config_changes):
    """A copy of `draft` whose config.json has `config_changes` (the weights are linked, unchanged)."""
    out.mkdir()
    config = json.loads((draft / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, **config_changes}, indent=2))
    (out / "model.safetensors").symlink_to(draft / "model.safetensors")
    return out


def start(target, draft, num_speculative_tokens=3):
    spec = {"method": "eagle", "model": str(draft), "num_speculative_tokens": num_speculative_tokens}
    with vllm_engine(model=str(target), speculative_config=spec):
        pass


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


def raised_in(err: pytest.ExceptionInfo) -> set[str]:
    """Names of the functions the exception passed through."""
    return {entry.name for entry in err.traceback}


def test_draft_of_another_family_is_rejected(qwen, tiny_draft):
    target, _ = qwen
    llava_draft = tiny_draft("llava")
    with pytest.raises(ViSpecConfigError) as err:
        start(target, llava_draft)
    assert "check_vispec_config" in raised_in(err)  # the main process, before any engine starts
    message = one_line(err)
    assert "made for the llava family" in message
    assert f"target {target} is qwen2_5_vl" in message


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("hidden_size", 256, "hidden_size expected 128 (target) found 256"),
        ("vocab_size", 2048, "vocab_size expected 1024 (target) found 2048"),
    ],
)
def test_draft_sizes_that_do_not_fit_the_target_are_rejected(qwen, tmp_path, key, value, expected):
    target, draft = qwen
    assert getattr(target_info(target), key) != value
    bad = edited_draft(draft, tmp_path / "draft", **{key: value})
    with pytest.raises(DraftCheckpointError) as err:
        start(target, bad)
    message = one_line(err)
    assert expected in message
    assert str(bad) in message


def test_vision_aware_draft_with_text_only_target_is_rejected(qwen, text_only_target):
    _, draft = qwen
    with pytest.raises(ViSpecConfigError) as err:
        start(text_only_target, draft)
    message = one_line(err)
    assert f"ViSpec draft {draft} is vision-aware" in message
    assert f"target {text_only_target} is text-only" in message


def test_stage1_draft_with_text_only_target_passes_the_config_check(tiny_draft, text_only_target):
    from vllm.engine.arg_utils import EngineArgs

    draft = tiny_draft("qwen2_5_vl", stage="eagle")
    args = EngineArgs(
        model=str(text_only_target),
        dtype="float32",
        enforce_eager=True,
        max_model_len=1024,
        speculative_config={"method": "eagle", "model": str(draft), "num_speculative_tokens": 3},
    )
    config = args.create_engine_config()  # patched: runs the ViSpec check
    assert config.speculative_config.draft_model_config.hf_config.architectures == [
        "EagleQwen2_5_VLForConditionalGeneration"
    ]


def test_too_many_speculative_tokens_are_rejected(qwen):
    target, draft = qwen
    with pytest.raises(ViSpecConfigError) as err:
        start(target, draft, num_speculative_tokens=MAX_SPECULATIVE_TOKENS + 1)
    message = one_line(err)
    assert f"must be in [1, {MAX_SPECULATIVE_TOKENS}]" in message
    assert f"got {MAX_SPECULATIVE_TOKENS + 1}" in message


def test_zero_speculative_tokens_are_rejected_by_vllm(qwen):
    from pydantic import ValidationError

    target, draft = qwen
    with pytest.raises(ValidationError) as err:
        start(target, draft, num_speculative_tokens=0)
    message = str(err.value)
    assert "num_speculative_tokens" in message
    assert "greater than 0" in message
    assert "input_value=0" in message


def test_worker_rejects_vision_aware_weights_the_main_process_could_not_read(qwen, text_only_target, tmp_path):
    """A `pytorch_model.bin` draft: vision-awareness is known only once the worker has loaded the weights."""
    from safetensors.torch import load_file

    _, draft = qwen
    bin_draft = tmp_path / "bin-draft"
    bin_draft.mkdir()
    shutil.copy(draft / "config.json", bin_draft / "config.json")
    torch.save(load_file(draft / "model.safetensors"), bin_draft / "pytorch_model.bin")
    with pytest.raises(ViSpecConfigError) as err:
        start(text_only_target, bin_draft)
    assert "check_draft_against_target" in raised_in(err)  # ViSpecProposer.load_model
    message = one_line(err)
    assert f"ViSpec draft {bin_draft} is vision-aware" in message
    assert f"target {text_only_target} is text-only" in message
