"""Tiny tokenizers for the factory targets, trained offline on generated English-like text.

Two layouts, matching the tokenizer classes the real checkpoints name:

- `train_byte_level_bpe`: GPT-2/Qwen2 byte-level BPE (the Qwen2 pre-tokenizer regex, no unknown token), with the
  special tokens appended after the trained vocabulary, as in Qwen checkpoints. Loads as `Qwen2Tokenizer`.
- `train_byte_fallback_bpe`: Llama/SentencePiece-style BPE (`▁` word prefix, `<0xNN>` byte-fallback tokens), with
  `<unk> <s> </s>` first and the extra special tokens appended last, as in LLaVA checkpoints. Loads as
  `LlamaTokenizer`, whose transformers-5 constructor rebuilds exactly this pipeline from the vocabulary and merges.

Both produce exactly `vocab_size` ids, so every row of the target's logits decodes to a token.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# The pre-tokenization regex of Qwen2Tokenizer: transformers rebuilds the backend with it on load, so training
# with any other split would give merges the loaded tokenizer never applies.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
METASPACE = "▁"
NUM_BYTE_FALLBACK_TOKENS = 256
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

_WORD_LIST = (
    "a about above after again air all also an and animal answer any are around as ask at away back ball be "
    "because bed before behind below best between big bird black blue boat book both bottom box boy bright "
    "brown building but by can car cat chair child city clear close cloud color come could cup dark day "
    "describe detail different do does dog door down each early edge empty even every eye face far field "
    "find first fish five floor flower food for four from front full girl give go good grass green ground "
    "group hand has have he her here high hill his hold horse house how image in inside is it its just keep "
    "kind know lake large last left light like line little long look low make man many may more most mountain "
    "much near new next night no not now number object of off old on one only open or orange other our out "
    "over page part people person picture place plate play point pink purple question red right river road "
    "room round said same say scene see shape she shirt short should side sign sit sky small snow so some "
    "something stand still stone street sun table take tall that the their them then there these they thing "
    "this three through to top tree two under up very view wall water way we wear what when where which "
    "while white who window with woman wood word would yellow you young"
)
_WORDS = tuple(_WORD_LIST.split())
_PUNCTUATION_END = (".", ".", ".", "?", "!")


def english_like_text(seed: int, num_sentences: int = 3000) -> list[str]:
    """Deterministic lines of pseudo-English (words, capitals, commas, digits, chat-style speaker tags)."""
    rng = random.Random(seed)
    speakers = ("USER:", "ASSISTANT:", "user", "assistant", "system", "Human:", "A chat about a picture.")
    lines = []
    for _ in range(num_sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.25:
            words.insert(rng.randint(1, len(words)), str(rng.randint(0, 2024)))
        if rng.random() < 0.3:
            words[rng.randint(0, len(words) - 2)] += ","
        sentence = " ".join(words)
        sentence = sentence[0].upper() + sentence[1:] + rng.choice(_PUNCTUATION_END)
        if rng.random() < 0.2:
            sentence = f"{rng.choice(speakers)} {sentence}"
        if rng.random() < 0.1:
            sentence = f"({sentence}) \"{rng.choice(_WORDS)}\"; {rng.choice(_WORDS)}-{rng.choice(_WORDS)}: 'ok'"
        lines.append(sentence)
    return lines


def _check_size(tokenizer: Tokenizer, vocab_size: int) -> Tokenizer:
    got = tokenizer.get_vocab_size(with_added_tokens=True)
    if got != vocab_size:
        raise RuntimeError(f"trained tokenizer has {got} ids, wanted {vocab_size} (corpus too small?)")
    return tokenizer


def train_byte_level_bpe(seed: int, vocab_size: int, special_tokens: Sequence[str]) -> Tokenizer:
    """Qwen2-style byte-level BPE: ids [0, vocab_size - len(special)) are trained, the special tokens come last."""
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(special_tokens),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(english_like_text(seed), trainer=trainer)
    tokenizer.add_special_tokens([_special(token) for token in special_tokens])
    return _check_size(tokenizer, vocab_size)


def train_byte_fallback_bpe(
    seed: int,
    vocab_size: int,
    leading_special: Sequence[str],
    trailing_special: Sequence[str],
    bos_token: str | None = None,
) -> Tokenizer:
    """Llama-style BPE: `leading_special` (unk first), 256 `<0xNN>` tokens, trained pieces, `trailing_special`.

    With `bos_token` (one of `leading_special`), encoding with special tokens prepends it, as Llama does.
    """
    trained_size = vocab_size - len(leading_special) - NUM_BYTE_FALLBACK_TOKENS - len(trailing_special)
    # Train on words split at the `▁` marker; the saved tokenizer does not split (as LlamaTokenizer), which gives
    # the same pieces because no trained merge spans a word boundary.
    trainer_tokenizer = Tokenizer(models.BPE())
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=trained_size, show_progress=False)
    trainer_tokenizer.train_from_iterator(english_like_text(seed), trainer=trainer)
    trained = json.loads(trainer_tokenizer.to_str())["model"]

    pieces = list(leading_special) + [f"<0x{byte:02X}>" for byte in range(NUM_BYTE_FALLBACK_TOKENS)]
    pieces += sorted(trained["vocab"], key=trained["vocab"].__getitem__)
    vocab = {piece: index for index, piece in enumerate(pieces)}
    if len(vocab) != len(pieces):
        raise RuntimeError("a trained piece collides with a special or byte-fallback token")
    merges = [tuple(merge) for merge in trained["merges"]]
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=leading_special[0], fuse_unk=True, byte_fallback=True)
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(METASPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens([_special(token) for token in (*leading_special, *trailing_special)])
    if bos_token is not None:
        bos = (bos_token, vocab[bos_token])
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos_token}:0 $A:0", pair=f"{bos_token}:0 $A:0 {bos_token}:1 $B:1", special_tokens=[bos]
        )
    return _check_size(tokenizer, vocab_size)


def _special(content: str) -> AddedToken:
    return AddedToken(content, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)


def write_tokenizer(tokenizer: Tokenizer, out_dir: Path, tokenizer_config: dict[str, Any]) -> None:
    """Write `tokenizer.json` and a `tokenizer_config.json` listing every special token in `added_tokens_decoder`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"), pretty=True)
    added = json.loads(tokenizer.to_str())["added_tokens"]
    config = dict(tokenizer_config)
    config["added_tokens_decoder"] = {
        str(token["id"]): {key: token[key] for key in ("content", "lstrip", "normalized", "rstrip", "single_word",
                                                       "special")}
        for token in added
    }
    write_json(out_dir / "tokenizer_config.json", config)


def save_processor(processor: Any, out_dir: Path) -> None:
    """`processor.save_pretrained(out_dir)`, keeping the tokenizer files `write_tokenizer` wrote there.

    (transformers re-serialises the tokenizer in its own format, dropping `added_tokens_decoder`.)
    """
    kept = {name: (out_dir / name).read_bytes() for name in TOKENIZER_FILES}
    processor.save_pretrained(out_dir)
    for name, content in kept.items():
        (out_dir / name).write_bytes(content)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
