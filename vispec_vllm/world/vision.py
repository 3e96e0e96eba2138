"""The world's vision side: a small CLIP tower and LLaVA's two-layer projector, trained here.

The 64 image tokens it emits equal (up to a small, measured error) the language model's own input embeddings
of the scene's caption: four phrases (one per row, `scenes.caption_phrases`), each tokenised into a fixed
slot of `slots_per_phrase` tokens and padded with the embedding of `pad_text`. The frozen LM then reads the
caption where the image was and answers in its own words, so its answers depend on the image.

How: the projector's second layer is a codebook. Its first C input columns hold the embeddings of the C
tokens any caption uses (divided by gelu(CODE_ON)), the rest are zero. The tower and the projector's first
layer are trained to emit, per image token, the code CODE_ON at its caption token's unit and CODE_OFF
(gelu ~ 0) everywhere else: cross-entropy over the C units plus a squared error to that code. So training
is a per-slot classification, cheap on a CPU, and the emitted token is the codebook row of the predicted class.
The computation is exactly LLaVA's (`hidden_states[vision_feature_layer]` without the CLS feature, then the
projector), as vLLM and transformers run it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
VISION_FEATURE_LAYER = -1  # the tower's last layer (no post-norm in LLaVA)
POSITION_INIT_STD = 1.0
CODE_ON = 4.0  # the caption token's unit (gelu(4) = 3.9999)
CODE_OFF = -4.0  # every other unit (gelu(-4) = -1.3e-4)


@dataclass(frozen=True)
class VisionSpec:
    image_size: int = 112
    patch_size: int = 14
    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 3
    num_heads: int = 4
    slots_per_phrase: int = 16
    pad_text: str = " "

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def clip_config(self) -> dict:
        return {
            "model_type": "clip_vision_model",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "projection_dim": self.hidden_size,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
        }

    def image_processor_kwargs(self) -> dict:
        return {
            "size": {"shortest_edge": self.image_size},
            "crop_size": {"height": self.image_size, "width": self.image_size},
            "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD,
        }


def llava_config(spec: VisionSpec, text_config: dict, image_token_id: int):
    from transformers import LlavaConfig

    return LlavaConfig(
        text_config=text_config,
        vision_config=spec.clip_config(),
        image_token_index=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=VISION_FEATURE_LAYER,
        image_seq_length=spec.num_image_tokens,
        tie_word_embeddings=bool(text_config.get("tie_word_embeddings", False)),
        dtype="float32",
    )


class VisionSide(nn.Module):
    """CLIP tower + LLaVA projector: pixel values [B, 3, S, S] -> image tokens [B, num_image_tokens, H_text]."""

    def __init__(self, spec: VisionSpec, text_hidden_size: int) -> None:
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        config = llava_config(spec, {"model_type": "llama", "hidden_size": text_hidden_size}, 0)
        self.vision_tower = CLIPVisionModel(CLIPVisionConfig(**spec.clip_config()))
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        # CLIP's default N(0, 0.02^2) position embeddings are too faint next to the patch embeddings for a tower
        # trained from scratch in minutes: no token could tell which row it is in.
        with torch.no_grad():
            self.vision_tower.embeddings.position_embedding.weight.normal_(0.0, POSITION_INIT_STD)

    def code(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, N, H_text]: the projector's first layer (before its activation)."""
        out = self.vision_tower(pixel_values, output_hidden_states=True)
        features = out.hidden_states[VISION_FEATURE_LAYER][:, 1:]  # "default": drop the CLS feature
        return self.multi_modal_projector.linear_1(features)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        projector = self.multi_modal_projector
        return projector.linear_2(projector.act(self.code(pixel_values)))

    def llava_state_dict(self) -> dict[str, torch.Tensor]:
        """Keys as LlavaForConditionalGeneration names them: `model.vision_tower.*`, `model.multi_modal_projector.*`."""
        return {f"model.{k}": v.detach().clone() for k, v in self.state_dict().items()}


CODEBOOK_KEY = "model.multi_modal_projector.linear_2.weight"


def codebook_weight(class_embeds: torch.Tensor, units: int) -> torch.Tensor:
    """[H, units] = [class_embeds^T / gelu(CODE_ON) | 0]: code unit c at CODE_ON -> class c's embedding."""
    classes, _ = class_embeds.shape
    if classes > units:
        raise ValueError(f"{classes} caption tokens > {units} projector units")
    on = nn.functional.gelu(torch.tensor(CODE_ON))
    weight = class_embeds.new_zeros(class_embeds.shape[1], units)
    weight[:, :classes] = class_embeds.T / on
    return weight


def caption_codebook(targets: CaptionTargets) -> torch.Tensor:
    """[H, H] the projector's second layer for `targets` (the LM's embeddings of every caption token)."""
    embeddings = targets.embeddings.float()
    vocab = caption_vocabulary(targets, all_caption_phrases())
    return codebook_weight(embeddings[vocab], embeddings.shape[1])


class CaptionTargets:
    """Token ids of each scene's caption, laid out in the image-token slots, and their embeddings."""

    def __init__(self, tokenizer, embeddings: torch.Tensor, spec: VisionSpec) -> None:
        self.tokenizer = tokenizer
        self.embeddings = embeddings  # [V, H] the LM's input embeddings (frozen)
        self.spec = spec
        pad = tokenizer(spec.pad_text, add_special_tokens=False)["input_ids"]
        if len(pad) != 1:
            raise ValueError(f"pad text {spec.pad_text!r} is {len(pad)} tokens; one is needed")
        self.pad_id = pad[0]
        self._phrase_ids: dict[str, list[int]] = {}

    def phrase_ids(self, phrase: str) -> list[int]:
        if phrase not in self._phrase_ids:
            ids = self.tokenizer(phrase, add_special_tokens=False)["input_ids"]
            if len(ids) > self.spec.slots_per_phrase:
                raise ValueError(f"caption phrase {phrase!r} is {len(ids)} tokens > {self.spec.slots_per_phrase}")
            self._phrase_ids[phrase] = ids
        return self._phrase_ids[phrase]

    def slot_ids(self, phrases: Sequence[str]) -> list[int]:
        """[num_image_tokens] token id per image slot: each phrase in its slot, padded."""
        slots: list[int] = []
        for phrase in phrases:
            ids = self.phrase_ids(phrase)
            slots += ids + [self.pad_id] * (self.spec.slots_per_phrase - len(ids))
        if len(slots) != self.spec.num_image_tokens:
            raise ValueError(f"{len(phrases)} phrases fill {len(slots)} slots, not {self.spec.num_image_tokens}")
        return slots


def all_caption_phrases() -> list[str]:
    """Every phrase any scene can have (row x (empty | count x size x colour x shape))."""
    from vispec_vllm.world.scenes import COLOURS, COUNTS, ROWS, SHAPES, SIZES, Group, Scene, caption_phrases

    phrases = set()
    for row in ROWS:
        for colour in COLOURS:
            for shape in SHAPES:
                for size in SIZES:
                    for count in COUNTS:
                        group = Group(colour=colour, shape=shape, size=size, count=count, row=row)
                        phrases.update(caption_phrases(Scene(groups=(group,), seed=0)))
    return sorted(phrases)


def caption_vocabulary(targets: CaptionTargets, phrases: Sequence[str]) -> torch.Tensor:
    """Sorted unique token ids of all `phrases` and the pad: the classes of the nearest-embedding loss."""
    ids = {targets.pad_id}
    for phrase in phrases:
        ids.update(targets.phrase_ids(phrase))
    return torch.tensor(sorted(ids))


@dataclass
class VisionTrainResult:
    steps: int
    final_loss: float
    train_slot_accuracy: float  # last 20 steps
    heldout_slot_accuracy: float
    heldout_caption_accuracy: float  # share of held-out images whose 64 slots are all right
    heldout_mean_relative_error: float  # |emitted token - caption token's embedding| / |embedding|, right slots
    seconds: float

    def to_json(self) -> dict:
        return asdict(self)


def _pixel_values(processor, images) -> torch.Tensor:
    return processor(images=images, return_tensors="pt")["pixel_values"]


def _batch(scene_seeds: Sequence[int], processor, targets: CaptionTargets, size: int):
    from vispec_vllm.world.scenes import caption_phrases, make_scene, render

    scenes = [make_scene(seed) for seed in scene_seeds]
    pixels = _pixel_values(processor, [render(scene, size) for scene in scenes])
    ids = torch.tensor([targets.slot_ids(caption_phrases(scene)) for scene in scenes])  # [B, N]
    return pixels, ids


def _losses(code: torch.Tensor, ids: torch.Tensor, class_of: torch.Tensor, classes: int):
    """code [B, N, H_text], ids [B, N] -> (loss, correct slots [B, N] bool)."""
    labels = class_of[ids]  # [B, N]
    logits = code[..., :classes]
    ce = nn.functional.cross_entropy(logits.reshape(-1, classes), labels.reshape(-1))
    wanted = torch.full_like(code, CODE_OFF)
    wanted.scatter_(-1, labels[..., None], CODE_ON)
    squared = (code - wanted).pow(2).mean()
    return ce + squared, logits.argmax(-1) == labels


def _class_index(vocab: torch.Tensor) -> torch.Tensor:
    class_of = torch.full((int(vocab.max()) + 1,), -1, dtype=torch.long)
    class_of[vocab] = torch.arange(len(vocab))
    return class_of


def train_vision_side(
    spec: VisionSpec,
    targets: CaptionTargets,
    train_seeds: Sequence[int],
    heldout_seeds: Sequence[int],
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> tuple[VisionSide, VisionTrainResult]:
    """Train on `train_seeds` scenes (cycled in order), report slot accuracy on `heldout_seeds` scenes."""
    import time

    from transformers import CLIPImageProcessor

    started = time.perf_counter()
    processor = CLIPImageProcessor(**spec.image_processor_kwargs())
    embeddings = targets.embeddings.float()
    vocab = caption_vocabulary(targets, all_caption_phrases())
    class_of = _class_index(vocab)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VisionSide(spec, embeddings.shape[1])
    codebook = model.multi_modal_projector.linear_2
    with torch.no_grad():
        codebook.weight.copy_(caption_codebook(targets))
        codebook.bias.zero_()
    codebook.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    recent: list[float] = []
    loss_value = float("nan")
    bar = tqdm(range(steps), desc="train vision side", unit="step", disable=not progress)
    for step in bar:
        batch_seeds = [train_seeds[(step * batch_size + i) % len(train_seeds)] for i in range(batch_size)]
        pixels, ids = _batch(batch_seeds, processor, targets, spec.image_size)
        loss, correct = _losses(model.code(pixels), ids, class_of, len(vocab))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        loss_value = float(loss.detach())
        recent = (recent + [float(correct.float().mean())])[-20:]
        bar.set_postfix(loss=f"{loss_value:.3f}", slot_acc=f"{recent[-1]:.3f}")
    model.eval()
    heldout = evaluate_vision_side(model, spec, targets, heldout_seeds, vocab, processor)
    result = VisionTrainResult(steps, loss_value, sum(recent) / max(1, len(recent)), *heldout,
                               round(time.perf_counter() - started, 1))
    return model, result


@torch.no_grad()
def evaluate_vision_side(model: VisionSide, spec: VisionSpec, targets: CaptionTargets, seeds: Sequence[int],
                         vocab: torch.Tensor, processor, batch_size: int = 64) -> tuple[float, float, float]:
    """(slot accuracy, whole-caption accuracy, mean relative error of an emitted token vs its class's embedding
    at right slots) on the `seeds` scenes, through the whole projector."""
    embeddings = targets.embeddings.float()
    class_of = _class_index(vocab)
    slots = captions = total = 0
    errors = 0.0
    for start in range(0, len(seeds), batch_size):
        pixels, ids = _batch(seeds[start:start + batch_size], processor, targets, spec.image_size)
        _, correct = _losses(model.code(pixels), ids, class_of, len(vocab))
        slots += int(correct.sum())
        captions += int(correct.all(-1).sum())
        total += len(ids)
        tokens = model(pixels)
        wanted = embeddings[ids]
        error = (tokens - wanted).norm(dim=-1) / wanted.norm(dim=-1)
        errors += float(error[correct].sum())
    return slots / (total * spec.num_image_tokens), captions / total, errors / max(1, slots)


def save_vision_side(model: VisionSide, path: Path) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.float().contiguous() for k, v in sorted(model.llava_state_dict().items())}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)
    return path
