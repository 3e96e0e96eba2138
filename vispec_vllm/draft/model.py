"""`ViSpecDraft`: the reference ViSpec draft model in pure PyTorch (the oracle for the vLLM integration).

Slot convention (vLLM's EAGLE shift, as in the official code):

* slot t pairs (h_t, x_{t+1}): `hidden_states[b, t]` is the target's post-final-norm last hidden state at
  token t, `inputs_embeds[b, t]` is the target's *merged* input embedding of token x_{t+1} (vision features
  at image placeholders, `embed_tokens(x_{t+1})` elsewhere);
* `image_mask[b, t]` is True iff x_{t+1} is an image placeholder: the mask is ALREADY shifted (official
  `image_mask[:, 1:]`, vLLM's `is_mm_embed` shifted by one);
* each maximal run of True in a row is one image; two images with no text slot between them merge into one
  run (official behaviour);
* `attention_mask[b, t]` False marks padding (right padding); positions default to the raw slot index t.

Per slot (see `image_spans`): a TEXT slot's input is `fc([e_t ; img_fc([h_t ; g])])` (embedding first in
`fc`, hidden first in `img_fc`), with g the global feature of the latest image that ended before t (the
`global_feature` argument, zeros by default, before the row's first image). An image run's last num_q-1
slots take the adaptor's compressed tokens, fed to the decoder layer as they are; its other slots are
dropped: no query sees them as keys and their output rows are zeros. Attention is causal over the visible
slots, with 1-D RoPE at the given positions. This is exactly the official compressed-sequence computation
(dropping a key and masking it are the same), extended to batches with padding, any number of images per
row (the official multi-image path crashes), and positions beyond `max_position_embeddings`.

The module holds no per-request state: the global feature goes in and out explicitly.

Optional reduced draft vocabulary (ours, see `vispec_vllm.draft.checkpoint`): with the `d2t` buffer set
(`set_draft_vocab`), `compute_logits` gives [..., N] logits over those target ids only (the target's lm_head
rows at d2t) and `propose_greedy` maps its draft ids back to target ids.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vispec_vllm.draft.adaptor import ImgAdaptor
from vispec_vllm.draft.checkpoint import (
    CONFIG_FILE,
    DRAFT_VOCAB_KEY,
    check_draft_vocab,
    checkpoint_num_q,
    expected_keys,
    load_draft_checkpoint,
)
from vispec_vllm.draft.config import DraftCheckpointError, ViSpecConfig
from vispec_vllm.draft.image_spans import COMPRESSED, TEXT, SlotLayout, build_slot_layout
from vispec_vllm.draft.layers import DraftDecoderLayer

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"


@dataclass
class ViSpecDraftOutput:
    hidden_states: torch.Tensor  # [B, T, H]; zeros at dropped image slots and padding
    global_feature: torch.Tensor  # [B, H]: g in force after each row's last slot
    layout: SlotLayout


def identity_img_fc_(img_fc: nn.Linear) -> None:
    """img_fc([h ; g]) = h: W = [I | 0], b = 0 (the official initialisation; stage-1 drafts use it as is)."""
    hidden = img_fc.out_features
    with torch.no_grad():
        img_fc.weight.zero_()
        img_fc.weight[:, :hidden].copy_(torch.eye(hidden))
        if img_fc.bias is not None:
            img_fc.bias.zero_()


class ViSpecDraft(nn.Module):
    """Submodule names are the official checkpoint keys. `num_q` None: stage-1 EAGLE draft (no adaptor;
    image slots are treated as text, and g is the `global_feature` argument everywhere). `config` has no
    draft_vocab_size: a draft vocabulary is set afterwards, with `set_draft_vocab`."""

    def __init__(self, config: ViSpecConfig, num_q: int | None = 2) -> None:
        super().__init__()
        if config.draft_vocab_size is not None:
            raise ValueError(
                f"ViSpecDraft(config) takes a config without draft_vocab_size (found {config.draft_vocab_size}): "
                "set the draft vocabulary with set_draft_vocab(d2t)"
            )
        self.config = config
        hidden = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, hidden, padding_idx=config.pad_token_id)
        self.embed_tokens.weight.requires_grad_(False)  # a frozen copy of the target's embedding (official)
        self.layers = nn.ModuleList([DraftDecoderLayer(config)])
        self.fc = nn.Linear(2 * hidden, hidden, bias=config.bias)
        self.imadpt = ImgAdaptor(config, num_q) if num_q is not None else None
        self.img_fc = nn.Linear(2 * hidden, hidden, bias=config.bias)
        if not self.img_fc.weight.is_meta:
            identity_img_fc_(self.img_fc)
        # the target's lm_head [V, H] via set_lm_head; only its rows at d2t ([N, H]) with a draft vocabulary
        self.register_buffer("lm_head_weight", None, persistent=False)
        self.register_buffer(DRAFT_VOCAB_KEY, None)  # [N] int64 draft id -> target id; None: the full vocabulary

    @property
    def num_q(self) -> int | None:
        return None if self.imadpt is None else self.imadpt.num_q

    # ------------------------------------------------------------------------------------------ forward

    def forward(
        self,
        hidden_states: torch.Tensor,
        inputs_embeds: torch.Tensor,
        image_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        global_feature: torch.Tensor | None = None,
    ) -> ViSpecDraftOutput:
        batch, length, hidden = hidden_states.shape
        dtype, device = hidden_states.dtype, hidden_states.device
        if tuple(inputs_embeds.shape) != (batch, length, hidden):
            raise ValueError(
                f"inputs_embeds has shape {list(inputs_embeds.shape)}, expected {[batch, length, hidden]}"
            )
        inputs_embeds = inputs_embeds.to(dtype)
        layout = build_slot_layout(
            image_mask if self.imadpt is not None else None,
            attention_mask,
            self.num_q,
            shape=(batch, length),
            device=device,
        )
        if layout.kind.device != device:
            raise ValueError(f"masks are on {layout.kind.device}, hidden_states on {device}")
        if tuple(layout.kind.shape) != (batch, length):
            raise ValueError(f"masks have shape {list(layout.kind.shape)}, expected {[batch, length]}")
        carried = (
            torch.zeros(batch, hidden, dtype=dtype, device=device) if global_feature is None
            else global_feature.to(dtype)
        )
        adapted = self._adapt_images(inputs_embeds, layout)  # [n_img, num_q, H]
        image_offset = layout.image_offset  # [B]
        rows = torch.arange(batch, device=device)

        # g of every slot: row b's carried-in g, or the latest finished image's (flat table: carried rows first)
        g_table = torch.cat([carried, adapted[:, -1]], dim=0)  # [B + n_img, H]
        g_index = torch.where(
            layout.global_image >= 0, batch + image_offset[:, None] + layout.global_image, rows[:, None]
        )
        g = g_table[g_index]  # [B, T, H]
        x = self.fuse_inputs(hidden_states, inputs_embeds, g)
        is_compressed = layout.kind == COMPRESSED
        if bool(is_compressed.any()):
            b_idx, t_idx = torch.nonzero(is_compressed, as_tuple=True)
            flat_image = image_offset[b_idx] + layout.image_index[b_idx, t_idx]
            tokens = adapted[flat_image, layout.query_index[b_idx, t_idx]]  # [n_compressed, H]
            compressed = torch.zeros_like(x).index_put((b_idx, t_idx), tokens)
            x = torch.where(is_compressed[..., None], compressed, x)

        if position_ids is None:
            position_ids = torch.arange(length, device=device)
        position_ids = position_ids.expand(batch, length)  # [T] or [B, T]
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        diagonal = torch.eye(length, dtype=torch.bool, device=device)
        # a dropped or padding query with no visible key would give NaN: let it see itself (its output is zeroed)
        allowed = causal & layout.key_visible[:, None, :] | diagonal
        out = self.layers[0](x, position_ids, allowed)
        keep = (layout.kind == TEXT) | is_compressed
        out = out * keep[..., None].to(dtype)

        # g after the last slot: the row's last image's, else the carried-in one
        after_index = torch.where(layout.images_per_row > 0, batch + image_offset + layout.images_per_row - 1, rows)
        return ViSpecDraftOutput(hidden_states=out, global_feature=g_table[after_index], layout=layout)

    def fuse_inputs(self, hidden_states: torch.Tensor, inputs_embeds: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """A text slot's layer input: fc([e ; img_fc([h ; g])]) (embedding first in fc, hidden first in img_fc)."""
        return self.fc(torch.cat([inputs_embeds, self.img_fc(torch.cat([hidden_states, g], dim=-1))], dim=-1))

    def _adapt_images(self, inputs_embeds: torch.Tensor, layout: SlotLayout) -> torch.Tensor:
        """Adaptor outputs of every image run, flat in row-major order: [n_img, num_q, H] (n_img may be 0)."""
        hidden = inputs_embeds.shape[-1]
        if not layout.image_runs:
            return inputs_embeds.new_zeros(0, self.num_q or 1, hidden)
        device = inputs_embeds.device
        runs = torch.tensor(layout.image_runs, device=device)  # [n_img, 3]: row, first, last
        lengths = runs[:, 2] - runs[:, 1] + 1
        offsets = torch.arange(int(lengths.max()), device=device)
        slots = (runs[:, 1:2] + offsets).clamp(max=inputs_embeds.shape[1] - 1)  # [n_img, N_max]
        image_embeds = inputs_embeds[runs[:, :1], slots]  # [n_img, N_max, H]
        return self.imadpt(image_embeds, key_padding_mask=offsets >= lengths[:, None])

    # ------------------------------------------------------------------------------------------ logits

    def set_lm_head(self, weight: torch.Tensor) -> None:
        """Use the target's lm_head weight [V, H] (not part of the draft checkpoint); with a draft vocabulary
        only its rows at d2t are kept."""
        expected = (self.config.vocab_size, self.config.hidden_size)
        if tuple(weight.shape) != expected:
            raise ValueError(f"lm_head weight has shape {list(weight.shape)}, expected {list(expected)}")
        self.lm_head_weight = weight if self.d2t is None else weight[self.d2t.to(weight.device)]

    def set_draft_vocab(self, d2t: torch.Tensor) -> None:
        """Predict over the target ids `d2t` only (int64 [N], strictly increasing): sets the buffer, the config's
        draft_vocab_size and, if the lm_head is already set, restricts it to those rows."""
        if self.d2t is not None:
            raise ValueError(f"this draft already has a draft vocabulary ({self.d2t.numel()} ids)")
        check_draft_vocab(d2t, self.config.vocab_size, source="<set_draft_vocab>")
        self.config = dataclasses.replace(self.config, draft_vocab_size=d2t.numel())
        self.d2t = d2t.to(self.embed_tokens.weight.device)
        if self.lm_head_weight is not None:
            self.lm_head_weight = self.lm_head_weight[self.d2t.to(self.lm_head_weight.device)]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., V] logits, or [..., N] over the draft vocabulary (draft ids)."""
        if self.lm_head_weight is None:
            raise RuntimeError("ViSpecDraft has no lm_head: call set_lm_head(target lm_head weight) first")
        return nn.functional.linear(hidden, self.lm_head_weight.to(hidden.dtype))

    def target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Argmax indices of `compute_logits` -> target token ids (the same ids without a draft vocabulary)."""
        return draft_ids if self.d2t is None else self.d2t[draft_ids]

    @torch.no_grad()
    def propose_greedy(
        self,
        hidden_states: torch.Tensor,
        inputs_embeds: torch.Tensor,
        image_mask: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        num_speculative_tokens: int,
        global_feature: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """EAGLE chain drafting: [B, K] greedy draft tokens after each row's last valid slot.

        d_1 = argmax at the last valid slot; each next step appends a slot whose hidden state is the draft's
        own output at the previous slot and whose embedding is embed_tokens(d_k), at the next position, with
        the same g. The whole sequence is recomputed each step (clarity over speed).
        """
        batch, length, _ = hidden_states.shape
        if num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
        device = hidden_states.device
        valid = (
            torch.ones(batch, length, dtype=torch.bool, device=device) if attention_mask is None
            else attention_mask.bool()
        )
        lengths = valid.sum(1)
        if bool((lengths == 0).any()) or not torch.equal(valid, torch.arange(length, device=device) < lengths[:, None]):
            raise ValueError("propose_greedy needs right-padded rows with at least one valid slot each")
        image = torch.zeros_like(valid) if image_mask is None else image_mask.bool() & valid
        rows = torch.arange(batch, device=device)
        drafts = []
        for step in range(num_speculative_tokens):
            out = self.forward(hidden_states, inputs_embeds, image, valid, global_feature=global_feature)
            last_hidden = out.hidden_states[rows, lengths - 1]  # [B, H]
            token = self.target_ids(self.compute_logits(last_hidden).argmax(-1))
            drafts.append(token)
            if step + 1 == num_speculative_tokens:
                break
            hidden_states = _append_slot(hidden_states, lengths, last_hidden)
            inputs_embeds = _append_slot(inputs_embeds, lengths, self.embed_tokens(token).to(inputs_embeds.dtype))
            image = _append_slot(image, lengths, torch.zeros(batch, dtype=torch.bool, device=device))
            valid = _append_slot(valid, lengths, torch.ones(batch, dtype=torch.bool, device=device))
            lengths = lengths + 1
        return torch.stack(drafts, dim=1)

    # ------------------------------------------------------------------------------------------ checkpoints

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, num_q: int | None = None, dtype: torch.dtype = torch.float32, seed: int = 0
    ) -> ViSpecDraft:
        """Load an official draft directory. num_q comes from `imadpt.q`; for a stage-1 checkpoint, `num_q`
        given means a freshly initialised adaptor (from `seed`), and img_fc is the identity either way.
        A reduced-vocabulary draft (`d2t`) gets its draft vocabulary back."""
        config, state, weights = load_draft_checkpoint(path)
        d2t = state.pop(DRAFT_VOCAB_KEY, None)
        found_q = checkpoint_num_q(state)
        if num_q is not None and num_q < 2:
            raise ValueError(f"num_q must be >= 2, got {num_q}")
        if found_q is not None and num_q is not None and num_q != found_q:
            raise DraftCheckpointError(
                f"ViSpec draft {weights}: expected num_q {num_q} (requested), found imadpt.q with num_q {found_q}"
            )
        state = {k: v.to(dtype) for k, v in state.items()}
        model_q = found_q if found_q is not None else num_q
        with torch.device("meta"):
            model = cls(dataclasses.replace(config, draft_vocab_size=None), num_q=model_q)
        if found_q is None:
            img_fc = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=config.bias)
            identity_img_fc_(img_fc)
            state.update({f"img_fc.{k}": v.to(dtype) for k, v in img_fc.state_dict().items()})
            logger.info("ViSpec draft %s: stage-1 (EAGLE) checkpoint, img_fc set to the identity ([I | 0], bias 0)",
                        weights)
            if num_q is not None:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    adaptor = ImgAdaptor(config, num_q)
                state.update({f"imadpt.{k}": v.to(dtype) for k, v in adaptor.state_dict().items()})
                logger.info("ViSpec draft %s: no imadpt weights, imadpt freshly initialised (num_q=%d, seed=%d)",
                            weights, num_q, seed)
        model.load_state_dict(state, strict=True, assign=True)
        if d2t is not None:
            model.set_draft_vocab(d2t)
        return model.eval()

    def save_pretrained(self, path: str | Path) -> None:
        """Write config.json + model.safetensors with exactly the official keys (stage-1 keys when num_q None)."""
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        if self.num_q is None:
            reference = nn.Linear(2 * self.config.hidden_size, self.config.hidden_size, bias=self.config.bias)
            identity_img_fc_(reference)
            img_fc = {k: state.pop(f"img_fc.{k}") for k in reference.state_dict()}
            if any(not torch.equal(img_fc[k].float(), v) for k, v in reference.state_dict().items()):
                raise ValueError("a stage-1 draft (num_q None) stores no img_fc, but this one's is not the identity")
        expected = expected_keys(self.config, self.num_q)
        if list(state) != list(expected):
            raise RuntimeError(f"state dict keys {sorted(state)} differ from the official keys {sorted(expected)}")
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        self.config.to_json_file(directory / CONFIG_FILE)


def _append_slot(x: torch.Tensor, at: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """x [B, T, ...] -> [B, T+1, ...] with row b's slot at[b] set to value[b] (at[b] <= T: right padding)."""
    grown = torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)
    grown[torch.arange(x.shape[0], device=x.device), at] = value
    return grown
