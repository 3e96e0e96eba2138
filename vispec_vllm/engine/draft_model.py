"""The ViSpec draft as a vLLM model (registered as `Eagle<target architecture>`).

It holds a `ViSpecDraft` (the reference modules: fc, img_fc, imgadaptor, one decoder layer) so the math is
defined once, and swaps only the attention core for the paged one. vLLM shares the target's embedding and
`lm_head` (`has_own_embed_tokens` / `has_own_lm_head` are False) and allocates the draft layer's KV cache in
the target's KV group through a vLLM `Attention` layer whose cache this module reads and writes itself.
The draft is replicated on every tensor-parallel rank (it is one layer).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.models.utils import _merge_multimodal_embeddings

from vispec_vllm.draft.adaptor import ImgAdaptor
from vispec_vllm.draft.checkpoint import validate_state_dict
from vispec_vllm.draft.config import ViSpecConfig
from vispec_vllm.draft.model import ViSpecDraft, identity_img_fc_
from vispec_vllm.engine.step_inputs import ViSpecStepInputs
from vispec_vllm.kernels.paged_attention import DraftAttentionBackend, TorchGatherAttention


class ViSpecDraftForVLLM(nn.Module):
    has_own_embed_tokens = False  # a frozen copy of the target's: vLLM shares the target's embedding
    has_own_lm_head = False
    # Stage-1 (no adaptor) drafts take the target's vision features at image slots, as in training; ViSpec
    # drafts compress whole images instead (the proposer then turns per-step embeddings off).
    supports_multimodal_embeddings = True

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__()
        draft_model_config = vllm_config.speculative_config.draft_model_config
        self.config = draft_model_config.hf_config
        self.source = str(draft_model_config.model)
        # The official config.json as written (vLLM's parsed copy has been through transformers' VLM configs).
        self.vispec_config = ViSpecConfig.from_json_file(
            draft_config_file(draft_model_config.model, draft_model_config.revision)
        )
        # `num_q` is not in config.json: the adaptor is created when `load_weights` sees `imadpt.q`.
        self.model = ViSpecDraft(self.vispec_config, num_q=None)
        self.lm_head = nn.Identity()  # replaced by the target's lm_head
        self.logits_processor = LogitsProcessor(self.vispec_config.vocab_size)

        cfg = self.vispec_config
        target_layers = vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
        self.attn = Attention(
            num_heads=cfg.num_attention_heads,
            head_size=cfg.head_dim,
            scale=cfg.head_dim**-0.5,
            num_kv_heads=cfg.num_key_value_heads,
            cache_config=vllm_config.cache_config,
            prefix=f"model.layers.{target_layers}.self_attn.attn",
        )
        self.attention_backend: DraftAttentionBackend = TorchGatherAttention()

    @property
    def num_q(self) -> int | None:
        return self.model.num_q

    # ------------------------------------------------------------------ vLLM model contract
    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings=None, is_multimodal=None) -> torch.Tensor:
        embeds = self.model.embed_tokens(input_ids)
        if multimodal_embeddings is None or is_multimodal is None or len(multimodal_embeddings) == 0:
            return embeds
        return _merge_multimodal_embeddings(embeds, multimodal_embeddings, is_multimodal.to(embeds.device))

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden_states)

    @torch.no_grad()
    def adapt_image(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """[N, H] one image's input embeddings -> [num_q, H] (compressed tokens, then the global feature)."""
        return self.model.imadpt(image_embeds[None])[0]

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] the next tokens x_{p+1}
        positions: torch.Tensor,  # [T] raw token index p
        hidden_states: torch.Tensor,  # [T, H] target (or draft) hidden state h_p
        inputs_embeds: torch.Tensor | None = None,
        vispec_step: ViSpecStepInputs | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if vispec_step is None and is_forward_context_available() and get_forward_context().attn_metadata is not None:
            raise RuntimeError(
                "the ViSpec draft was called by a proposer other than ViSpecProposer (V1 runner): "
                "unset VLLM_USE_V2_MODEL_RUNNER or set it to 0"
            )
        model = self.model
        embeds = model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        images = None if vispec_step is None else vispec_step.images
        if images is None:
            global_feature = hidden_states.new_zeros(hidden_states.shape)
        else:
            global_feature = images.global_feature.to(hidden_states.dtype)
        x = model.fuse_inputs(hidden_states, embeds.to(hidden_states.dtype), global_feature)  # [T, H]
        if images is not None:
            x = torch.where(images.is_compressed[:, None], images.compressed_token.to(x.dtype), x)

        layer = model.layers[0]
        q, k, v = layer.self_attn.project(x, positions)  # [T, heads, hd]
        scale = self.vispec_config.head_dim**-0.5
        if vispec_step is None:  # profiling / dummy run: no cache, one causal sequence
            out = _causal_attention(q, k, v, scale)
        else:
            out = self.attention_backend(q, k, v, self.attn.kv_cache, vispec_step.batch, scale)
        z = layer.after_attention(x, layer.self_attn.output(out))
        return z, z

    # ------------------------------------------------------------------ weights
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        state = dict(weights)
        num_q = validate_state_dict(self.vispec_config, state, source=f"{self.source} (weights)")
        reference = self.model.fc.weight
        if num_q is not None:
            self.model.imadpt = ImgAdaptor(self.vispec_config, num_q).to(reference.device, reference.dtype)
        else:  # stage-1 EAGLE checkpoint: no adaptor, img_fc stays the identity
            identity_img_fc_(self.model.img_fc)
        state.pop("embed_tokens.weight")  # a frozen copy of the target's, which vLLM shares instead
        self.model.load_state_dict({k: v.to(reference.dtype) for k, v in state.items()}, strict=False)
        # Every parameter is now set: embed_tokens is replaced by the target's right after loading.
        return {name for name, _ in self.named_parameters()}


def draft_config_file(model: str, revision: str | None) -> Path:
    """The draft's config.json: in its directory, or in the hub cache vLLM already filled."""
    local = Path(model) / "config.json"
    if local.is_file():
        return local
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(model, "config.json", revision=revision))


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """[T, H, D] causal attention over one sequence (dummy runs only)."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True,
                                         scale=scale)
    return out.transpose(0, 1)
