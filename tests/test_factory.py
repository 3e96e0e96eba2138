"""The tiny target factory: deterministic builds that transformers and vLLM both load and decode identically."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vispec_vllm.factory import FAMILIES, build_tiny_target, make_test_image, target_info
from vispec_vllm.factory.__main__ import main as factory_cli
from vispec_vllm.factory.targets import MARKER_NAME, file_digests, read_marker

ROOT = Path(__file__).resolve().parent.parent
VOCAB_SIZE = 1024
MAX_NEW_TOKENS = 16


@dataclass(frozen=True)
class Expected:
    tokenizer_class: str
    image_token: str
    eos_token: str
    image_tokens_224: int  # placeholder tokens for one 224x224 image


EXPECTED = {
    # 224 px / 14 px patches = 16x16, merged 2x2 -> 8x8
    "qwen2_5_vl": Expected("Qwen2Tokenizer", "<|image_pad|>", "<|im_end|>", (224 // 14 // 2) ** 2),
    # one 112 px crop / 14 px patches = 8x8, CLS dropped
    "llava": Expected("LlamaTokenizer", "<image>", "</s>", (112 // 14) ** 2),
    # 8x8 overview + a 2x2 grid of 112 px tiles = 16x16 features with a newline token after each row
    "llava_next": Expected("LlamaTokenizer", "<image>", "</s>", (112 // 14) ** 2 + (224 // 14) * (224 // 14 + 1)),
}


def conversation(num_images: int, image_part) -> list[dict]:
    parts = [image_part(index) for index in range(num_images)]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "Describe the picture."}]}]


def hf_inputs(processor, images) -> dict[str, torch.Tensor]:
    messages = conversation(len(images), lambda index: {"type": "image", "image": images[index]})
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


@dataclass
class HfTarget:
    path: Path
    processor: object
    model: torch.nn.Module
    loading_info: dict

    def greedy(self, image) -> tuple[list[int], list[int]]:
        """(prompt ids, greedy new ids) for the one-image test conversation."""
        inputs = hf_inputs(self.processor, [image])
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        prompt = inputs["input_ids"][0].tolist()
        return prompt, out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def hf_target(tiny_target):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    loaded: dict[str, HfTarget] = {}

    def load(family: str) -> HfTarget:
        if family not in loaded:
            path = tiny_target(family)
            model, info = AutoModelForImageTextToText.from_pretrained(
                path, dtype=torch.float32, output_loading_info=True
            )
            loaded[family] = HfTarget(path, AutoProcessor.from_pretrained(path), model.eval(), info)
        return loaded[family]

    return load


# --- building -------------------------------------------------------------------------------------------------


def test_unknown_family_is_rejected_naming_the_valid_ones(tmp_path):
    assert FAMILIES == ("qwen2_5_vl", "llava", "llava_next")
    with pytest.raises(ValueError, match="qwen2_5_vl, llava, llava_next"):
        build_tiny_target("llama", tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_builds_byte_identical_files(family, tiny_target, tmp_path):
    cached = tiny_target(family)  # built earlier (possibly by another process) with the same seed
    fresh = build_tiny_target(family, tmp_path / family, seed=0)
    assert (fresh / "model.safetensors").read_bytes() == (cached / "model.safetensors").read_bytes(), (
        "same seed, different weights: if the factory changed on purpose, bump FACTORY_VERSION"
    )
    assert file_digests(fresh) == file_digests(cached)
    assert read_marker(fresh) == read_marker(cached)


def test_other_seed_replaces_an_older_build_and_clears_dead_partials(tiny_target, tmp_path):
    out = tmp_path / "llava"
    shutil.copytree(tiny_target("llava"), out)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_partial = tmp_path / f".llava.partial-{int(finished.stdout)}"
    dead_partial.mkdir()
    (dead_partial / "model.safetensors").write_bytes(b"half")

    build_tiny_target("llava", out, seed=1)

    assert read_marker(out)["seed"] == 1
    assert not dead_partial.exists()
    seed0, seed1 = file_digests(tiny_target("llava")), file_digests(out)
    assert seed1["model.safetensors"] != seed0["model.safetensors"]
    assert seed1["tokenizer.json"] != seed0["tokenizer.json"]  # the corpus depends on the seed too
    assert seed1["config.json"] == seed0["config.json"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["llava"]


def test_complete_build_is_returned_without_rewriting(tiny_target):
    path = tiny_target("qwen2_5_vl")
    before = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    assert build_tiny_target("qwen2_5_vl", path, seed=0) == path
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == before


def test_refuses_to_replace_a_directory_it_did_not_build(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_tiny_target("llava", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("family", FAMILIES)
def test_config_matches_the_checked_in_tiny_config(family, tiny_target):
    built = json.loads((tiny_target(family) / "config.json").read_text())
    checked_in = json.loads((ROOT / "configs" / "tiny" / f"{family}.json").read_text())
    for config in (built, checked_in):
        config.pop("transformers_version", None)
    assert built == checked_in


# --- tokenizer and processor ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_covers_the_vocabulary_with_the_family_special_tokens(family, tiny_target):
    from transformers import AutoTokenizer

    path = tiny_target(family)
    expected = EXPECTED[family]
    config = json.loads((path / "config.json").read_text())
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(path)
    info = target_info(path)

    assert tokenizer_config["tokenizer_class"] == expected.tokenizer_class
    assert len(tokenizer) == info.vocab_size == config["text_config"]["vocab_size"] == VOCAB_SIZE
    pieces = tokenizer.convert_ids_to_tokens(list(range(VOCAB_SIZE)))
    assert None not in pieces and len(set(pieces)) == VOCAB_SIZE
    assert all(isinstance(tokenizer.decode([index]), str) for index in range(VOCAB_SIZE))
    assert tokenizer.convert_tokens_to_ids(expected.image_token) == info.image_token_id
    assert tokenizer.eos_token == expected.eos_token and tokenizer.eos_token_id == info.eos_token_id
    assert tokenizer.chat_template is not None

    # The named class (which rebuilds its pipeline from vocab and merges in transformers 5) encodes the same.
    import transformers

    named = getattr(transformers, expected.tokenizer_class).from_pretrained(path)
    text = "USER: What is in the picture? A red ball, 3 trees & 日本.\nASSISTANT: a dog"
    assert named(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_expands_each_image_to_the_expected_tokens(family, hf_target):
    target = hf_target(family)
    info = target_info(target.path)
    per_image = EXPECTED[family].image_tokens_224
    for num_images in (1, 2):
        images = [make_test_image(seed) for seed in range(num_images)]
        ids = hf_inputs(target.processor, images)["input_ids"][0].tolist()
        assert ids.count(info.image_token_id) == num_images * per_image
    bos = target.processor.tokenizer.bos_token_id
    if bos is not None:  # exactly one BOS: the template writes it, the processor must not add another
        assert ids[0] == bos and ids.count(bos) == 1


# --- transformers -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_loads_every_float32_weight(family, hf_target):
    target = hf_target(family)
    assert not any(target.loading_info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert {param.dtype for param in target.model.parameters()} == {torch.float32}


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_greedy_is_deterministic_and_depends_on_the_image(family, hf_target):
    target = hf_target(family)
    prompt, first = target.greedy(make_test_image(0))
    assert len(first) >= 1 and all(0 <= token < VOCAB_SIZE for token in first)
    assert target.greedy(make_test_image(0)) == (prompt, first)
    other_prompt, other = target.greedy(make_test_image(1))
    assert other_prompt == prompt  # same placeholders...
    assert other != first  # ...but the pixels reach the logits


@pytest.mark.parametrize("family", FAMILIES)
def test_target_info_matches_config_and_weights(family, tiny_target):
    path = tiny_target(family)
    info = target_info(path)
    config = json.loads((path / "config.json").read_text())
    text = config["text_config"]
    assert info.family == family == config["model_type"]
    assert (info.hidden_size, info.num_hidden_layers, info.num_attention_heads) == (
        text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"])
    assert (info.intermediate_size, info.max_position_embeddings) == (
        text["intermediate_size"], text["max_position_embeddings"])
    assert (info.rms_norm_eps, info.rope_theta) == (text["rms_norm_eps"], text["rope_parameters"]["rope_theta"])
    assert info.image_token_id == config.get("image_token_id", config.get("image_token_index"))
    assert info.eos_token_id == text["eos_token_id"]
    weights = load_file(path / "model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.float32}
    embed, lm_head = weights[info.embed_key], weights[info.lm_head_key]
    assert embed.shape == lm_head.shape == (info.vocab_size, info.hidden_size)
    assert info.embed_key != info.lm_head_key
    assert 0.45 < lm_head.std().item() < 0.55  # re-initialised wide, so greedy never rides on near-ties


# --- images and CLI ---------------------------------------------------------------------------------------------


def test_test_images_are_deterministic_per_seed():
    import numpy as np

    first = make_test_image(3)
    assert first.mode == "RGB" and first.size == (224, 224)
    assert np.array_equal(np.asarray(first), np.asarray(make_test_image(3)))
    assert not np.array_equal(np.asarray(first), np.asarray(make_test_image(4)))
    assert make_test_image(3, size=(300, 200)).size == (300, 200)


def test_cli_reports_an_existing_build(tiny_target, capsys):
    path = tiny_target("llava")
    assert factory_cli(["--family", "llava", "--out", str(path), "--seed", "0"]) == 0
    printed = capsys.readouterr().out
    assert str(path) in printed
    for name in ("model.safetensors", "tokenizer.json", "config.json", MARKER_NAME):
        assert name in printed


def test_cli_builds_all_families_in_a_fresh_process_identically(tiny_target, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "vispec_vllm.factory", "--all", "--out", str(tmp_path), "--seed", "0"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    for family in FAMILIES:
        assert f"{family} (seed 0): {tmp_path / family}" in done.stdout
        assert file_digests(tmp_path / family) == file_digests(tiny_target(family))


def test_cli_rejects_a_missing_or_unknown_family(tmp_path, capsys):
    for argv in (["--out", str(tmp_path)], ["--family", "gpt2", "--out", str(tmp_path)]):
        with pytest.raises(SystemExit) as exit_info:
            factory_cli(argv)
        assert exit_info.value.code == 2
    assert "--family" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# --- vLLM ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=FAMILIES)
def vllm_target(request, tiny_target):
    """One engine per family, shut down before the next family's starts."""
    from conftest import vllm_engine

    family = request.param
    with vllm_engine(model=str(tiny_target(family)), limit_mm_per_prompt={"image": 2}, max_num_seqs=4) as llm:
        yield family, llm


@pytest.mark.vllm
def test_vllm_greedy_with_an_image_equals_transformers(vllm_target, hf_target):
    from vllm import SamplingParams

    family, llm = vllm_target
    images = [make_test_image(0), make_test_image(1, size=(300, 200))]  # square and not (anyres unpadding)
    conversations = [conversation(1, lambda _, image=image: {"type": "image_pil", "image_pil": image})
                     for image in images]
    outputs = llm.chat(conversations, SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS),
                       use_tqdm=False)
    target = hf_target(family)
    for image, output in zip(images, outputs, strict=True):
        prompt, generated = target.greedy(image)
        assert output.prompt_token_ids == prompt
        assert list(output.outputs[0].token_ids) == generated
