"""The ViSpec draft as a vLLM model (registered as `Eagle<target architecture>`), built from vLLM layers.

The same math as the reference `ViSpecDraft` (tested token for token against it), on vLLM's GEMM, norm, RoPE
and paged-attention ops. The decoder layer's attention heads are widened by `FlaggedHeads` so vLLM's own
kernels hide dropped image slots; its KV lives in the target's KV group (same block table, same slots).
vLLM shares the target's embedding and `lm_head` (`has_own_embed_tokens` / `has_own_lm_head` are False).
Linear layers are tensor-parallel like vLLM's own EAGLE drafts; the image adaptor is replicated (it runs
once per image, off the decode path).

A reduced-vocabulary draft (`d2t`, `draft_vocab_size`) computes its logits with the target's lm_head rows
at d2t only (`DraftVocabHead`, one [N, H] GEMM) and scatters them into [T, V] logits that are -inf at every
other target id: the proposer's argmax gives target ids, and a draft distribution is zero outside the subset.

Official checkpoint keys map onto this module as `model.<key>`, with q/k/v and gate/up stacked
(`layers.0.self_attn.{q,k,v}_proj` -> `qkv_proj`, `layers.0.mlp.{gate,up}_proj` -> `gate_up_proj`), the
attention weights widened (`ViSpecAttention.widen_checkpoint`) and `fc`/`img_fc` folded into `fused_fc` and
`global_proj` (`ViSpecModel.fold_input_fusion`), all at load time.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.utils import _merge_multimodal_embeddings

from vispec_vllm.draft.adaptor import ImgAdaptor
from vispec_vllm.draft.checkpoint import DRAFT_VOCAB_KEY, validate_state_dict
from vispec_vllm.draft.config import DraftCheckpointError, ViSpecConfig
from vispec_vllm.engine.attention_backend import choose_draft_backend, log_draft_backend
from vispec_vllm.engine.step_inputs import StepInputBuffers

# checkpoint sub-name -> (stacked parameter, shard id)
STACKED_PARAMS = {
    ".self_attn.q_proj.": (".self_attn.qkv_proj.", "q"),
    ".self_attn.k_proj.": (".self_attn.qkv_proj.", "k"),
    ".self_attn.v_proj.": (".self_attn.qkv_proj.", "v"),
    ".mlp.gate_proj.": (".mlp.gate_up_proj.", 0),
    ".mlp.up_proj.": (".mlp.gate_up_proj.", 1),
}
# the compiled core's arguments, all [T, ...] (T dynamic)
STEP_TENSORS = (
    "embeds", "positions", "hidden_states", "global_term", "compressed_token", "is_compressed", "is_dropped"
)


class ViSpecAttention(nn.Module):
    """MHA/GQA with optional q/k/v bias and 1-D RoPE over the given (raw token) positions, on heads widened by
    `FlaggedHeads` (the projections emit the widened q, k, v; `load_weights` widens the checkpoint's weights)."""

    def __init__(self, config: ViSpecConfig, vllm_config, layer_name: str, prefix: str) -> None:
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        head_dim = config.head_dim
        scale = head_dim**-0.5
        cache_config = vllm_config.cache_config
        choice = choose_draft_backend(
            head_dim,
            scale,
            torch.get_default_dtype(),  # the layer's dtype: vLLM builds the model under it, as Attention reads it
            cache_config.cache_dtype,
            use_mm_prefix=vllm_config.model_config.is_mm_prefix_lm,
            has_sliding_window=cache_config.sliding_window is not None,
        )
        self.flags = choice.flags
        padded = self.flags.padded_dim
        self.num_heads = config.num_attention_heads // tp
        self.num_kv_heads = max(1, config.num_key_value_heads // tp)
        log_draft_backend(choice, self.num_kv_heads, vllm_config)
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            padded,
            config.num_attention_heads,
            config.num_key_value_heads,
            bias=True,  # carries the query flag even where the draft has no q/k/v bias
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * padded, config.hidden_size, bias=False, prefix=f"{prefix}.o_proj"
        )
        max_position = max(config.max_position_embeddings, vllm_config.model_config.max_model_len) + 64
        self.rotary_emb = get_rope(
            padded,
            max_position=max_position,
            is_neox_style=True,
            rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta, "rope_dim": head_dim},
        )
        self.attn = Attention(
            num_heads=self.num_heads,
            head_size=padded,
            scale=scale,
            num_kv_heads=self.num_kv_heads,
            cache_config=cache_config,
            prefix=layer_name,
            attn_backend=choice.backend,  # the backend padded_dim was chosen for: no second pick
        )

    def forward(self, x: torch.Tensor, positions: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
        """x [T, H], positions [T], dropped [T] bool (slots no query may see) -> [T, H]."""
        padded = self.flags.padded_dim
        qkv, _ = self.qkv_proj(x)
        q, k, v = qkv.split([self.num_heads * padded, self.num_kv_heads * padded, self.num_kv_heads * padded], -1)
        q, k = self.rotary_emb(positions, q, k)
        k = self.flags.hide(k.view(-1, self.num_kv_heads, padded), dropped)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out

    def widen_checkpoint(self, state: dict[str, torch.Tensor], prefix: str, config: ViSpecConfig) -> None:
        """Rewrite `prefix`{q,k,v,o}_proj tensors of an official state dict into the widened layout, in place."""
        flags = self.flags
        heads = {"q": config.num_attention_heads, "k": config.num_key_value_heads, "v": config.num_key_value_heads}
        for name, count in heads.items():
            weight = state[f"{prefix}{name}_proj.weight"]
            state[f"{prefix}{name}_proj.weight"] = flags.widen(weight, count)
            bias = state.get(f"{prefix}{name}_proj.bias", weight.new_zeros(weight.shape[0]))
            widen_bias = flags.query_bias if name == "q" else flags.widen
            state[f"{prefix}{name}_proj.bias"] = widen_bias(bias, count)
        state[f"{prefix}o_proj.weight"] = flags.widen(state[f"{prefix}o_proj.weight"], heads["q"], dim=1)


class ViSpecMLP(nn.Module):
    def __init__(self, config: ViSpecConfig, prefix: str) -> None:
        super().__init__()
        intermediate = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [intermediate] * 2, bias=False, prefix=f"{prefix}.gate_up_proj"
        )
        self.down_proj = RowParallelLinear(intermediate, config.hidden_size, bias=False, prefix=f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        out, _ = self.down_proj(self.act_fn(gate_up))
        return out


class ViSpecDecoderLayer(nn.Module):
    """Official layout: no input norm (y = x + attn(x)), then a post-attention norm and the MLP."""

    def __init__(self, config: ViSpecConfig, vllm_config, layer_name: str, prefix: str) -> None:
        super().__init__()
        self.self_attn = ViSpecAttention(config, vllm_config, layer_name, prefix=f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = ViSpecMLP(config, prefix=f"{prefix}.mlp")

    def forward(self, x: torch.Tensor, positions: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
        y = x + self.self_attn(x, positions, dropped)
        return y + self.mlp(self.post_attention_layernorm(y))


@support_torch_compile(dynamic_arg_dims={name: 0 for name in STEP_TENSORS})
class ViSpecModel(nn.Module):
    """The draft's compiled core: one call per draft forward, always the same seven [T, ...] tensors.

    The official input fusion is folded (exact algebra, done once in `fold_input_fusion`):

        fc([e ; img_fc([h ; g])]) = W_e e + W_i (W_h h + W_g g + b_img) + b_fc
                                  = fused_fc([e ; h]) + global_proj(g)

    with fused_fc = [W_e | W_i W_h], bias b_fc + W_i b_img, and global_proj = W_i W_g. So a token costs what an
    EAGLE draft's fc costs, plus one add; global_proj runs once per image (`adapt_image`).
    Compiled like vLLM's EAGLE drafts (`support_torch_compile`, traced once with T dynamic; the attention op
    splits it into pieces for CUDA graphs); eager under `enforce_eager`.
    """

    def __init__(self, *, vllm_config, prefix: str = "", config: ViSpecConfig, layer_name: str) -> None:
        super().__init__()
        hidden = config.hidden_size
        # A width-only placeholder: vLLM swaps in the target's embedding (checking only the width), so the
        # draft never allocates its own [V, H] copy.
        self.embed_tokens = nn.Embedding(1, hidden)
        self.fused_fc = ReplicatedLinear(2 * hidden, hidden, bias=config.bias, prefix=f"{prefix}.fused_fc")
        self.global_proj = ReplicatedLinear(hidden, hidden, bias=False, prefix=f"{prefix}.global_proj")
        self.imadpt: ImgAdaptor | None = None  # created by load_weights when the checkpoint has `imadpt.q`
        self.layers = nn.ModuleList([ViSpecDecoderLayer(config, vllm_config, layer_name, prefix=f"{prefix}.layers.0")])

    def forward(
        self,
        embeds: torch.Tensor,  # [T, H] embeddings of the next tokens x_{p+1}
        positions: torch.Tensor,  # [T] raw token index p
        hidden_states: torch.Tensor,  # [T, H] target (or draft) hidden state h_p
        global_term: torch.Tensor,  # [T, H] global_proj(g) of the latest image before the slot (zeros: none)
        compressed_token: torch.Tensor,  # [T, H] the adaptor's token for a compressed slot
        is_compressed: torch.Tensor,  # [T] bool
        is_dropped: torch.Tensor,  # [T] bool: an image slot no query may see
    ) -> torch.Tensor:
        fused, _ = self.fused_fc(torch.cat([embeds, hidden_states], dim=-1))
        x = torch.where(is_compressed[:, None], compressed_token.to(fused.dtype), fused + global_term)
        return self.layers[0](x, positions, is_dropped)

    @staticmethod
    def fold_input_fusion(state: dict[str, torch.Tensor], hidden: int) -> None:
        """Replace fc.* and img_fc.* of an official state dict by fused_fc.* and global_proj.weight, in place.
        A stage-1 checkpoint has no img_fc: it is the official initialisation, img_fc([h ; g]) = h."""
        fc_w = state.pop("fc.weight").double()  # [H, 2H]
        img_w = state.pop("img_fc.weight", None)  # [H, 2H]
        img_w = torch.eye(hidden, 2 * hidden, dtype=torch.float64) if img_w is None else img_w.double()
        w_e, w_i = fc_w[:, :hidden], fc_w[:, hidden:]
        w_h, w_g = img_w[:, :hidden], img_w[:, hidden:]
        state["fused_fc.weight"] = torch.cat([w_e, w_i @ w_h], dim=1)
        state["global_proj.weight"] = w_i @ w_g
        if "fc.bias" in state:
            img_b = state.pop("img_fc.bias", None)
            state["fused_fc.bias"] = state.pop("fc.bias").double() + (0 if img_b is None else w_i @ img_b.double())


class DraftVocabHead(nn.Module):
    """The target's lm_head restricted to the draft vocabulary: [T, H] -> [T, N] logits with one GEMM, run by
    vLLM's own unquantized-embedding method (on the CPU its prepacked GEMM, as for the target's lm_head)."""

    def __init__(self, lm_head: nn.Module, d2t: torch.Tensor, source: str) -> None:
        super().__init__()
        if not isinstance(getattr(lm_head, "quant_method", None), UnquantizedEmbeddingMethod):
            raise DraftCheckpointError(
                f"ViSpec draft {source}: a reduced draft vocabulary ({DRAFT_VOCAB_KEY}) expects the target's "
                f"unquantized lm_head, found {type(getattr(lm_head, 'quant_method', None)).__name__}"
            )
        bias = getattr(lm_head, "bias", None)
        self.register_buffer("weight", lm_head.weight.detach()[d2t].contiguous())  # [N, H]
        self.register_buffer("bias", None if bias is None else bias.detach()[d2t].contiguous())
        self.quant_method = UnquantizedEmbeddingMethod()
        self.quant_method.process_weights_after_loading(self)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, hidden_states, bias=self.bias)


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
        target_layers = vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
        layer_name = f"model.layers.{target_layers}.self_attn.attn"  # after the target's layers
        self.model = ViSpecModel(
            vllm_config=vllm_config, prefix="model", config=self.vispec_config, layer_name=layer_name
        )
        self.lm_head = nn.Identity()  # replaced by the target's lm_head
        # per-token image inputs of each forward, at fixed addresses (CUDA graphs); created on the load device
        self.step_inputs = StepInputBuffers(
            vllm_config.scheduler_config.max_num_batched_tokens,
            self.vispec_config.hidden_size,
            vllm_config.model_config.dtype,
            device=None,
        )
        self.logits_processor = LogitsProcessor(self.vispec_config.vocab_size)
        draft_vocab_size = self.vispec_config.draft_vocab_size
        if draft_vocab_size is not None and get_tensor_model_parallel_world_size() > 1:
            raise DraftCheckpointError(
                f"ViSpec draft {self.source}: a reduced draft vocabulary ({DRAFT_VOCAB_KEY}) needs "
                f"tensor_parallel_size 1, found {get_tensor_model_parallel_world_size()}"
            )
        # [N] int64 draft id -> target id, from the checkpoint; None: the draft predicts over the whole vocabulary
        d2t = None if draft_vocab_size is None else torch.zeros(draft_vocab_size, dtype=torch.int64)
        self.register_buffer(DRAFT_VOCAB_KEY, d2t, persistent=False)
        # built on the first compute_logits, once vLLM has shared the target's lm_head (after load_weights)
        self.draft_vocab_head: DraftVocabHead | None = None

    @property
    def num_q(self) -> int | None:
        imadpt = self.model.imadpt
        return None if imadpt is None else imadpt.num_q

    # ------------------------------------------------------------------ vLLM model contract
    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings=None, is_multimodal=None) -> torch.Tensor:
        embeds = self.model.embed_tokens(input_ids)
        if multimodal_embeddings is None or is_multimodal is None or len(multimodal_embeddings) == 0:
            return embeds
        return _merge_multimodal_embeddings(embeds, multimodal_embeddings, is_multimodal.to(embeds.device))

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[T, H] -> [T, V] logits over the target vocabulary (-inf outside a reduced draft vocabulary)."""
        if self.d2t is None:
            return self.logits_processor(self.lm_head, hidden_states)
        if self.draft_vocab_head is None:
            self.draft_vocab_head = DraftVocabHead(self.lm_head, self.d2t, self.source)
        draft_logits = self.draft_vocab_head(hidden_states)  # [T, N]
        logits = draft_logits.new_full((*draft_logits.shape[:-1], self.vispec_config.vocab_size), float("-inf"))
        return logits.index_copy_(-1, self.d2t, draft_logits)

    @torch.no_grad()
    def adapt_image(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """[N, H] one image's input embeddings -> [num_q, H]: the num_q-1 compressed tokens, then the global
        feature g already projected into the fused input (global_proj(g))."""
        adapted = self.model.imadpt(image_embeds[None])[0]
        global_term, _ = self.model.global_proj(adapted[-1:])
        return torch.cat([adapted[:-1], global_term])

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] the next tokens x_{p+1}
        positions: torch.Tensor,  # [T] raw token index p
        hidden_states: torch.Tensor,  # [T, H] target (or draft) hidden state h_p
        inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The image inputs are read from `step_inputs` (written by `ViSpecProposer`; zeros for a text-only draft
        and in vLLM's dummy runs), so vLLM's own callers need nothing ViSpec-specific."""
        embeds = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        step = self.step_inputs.view(embeds.shape[0])
        z = self.model(
            embeds=embeds,
            positions=positions,
            hidden_states=hidden_states,
            global_term=step.global_term,
            compressed_token=step.compressed_token,
            is_compressed=step.is_compressed,
            is_dropped=step.is_dropped,
        )
        return z, z

    # ------------------------------------------------------------------ weights
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        state = dict(weights)
        num_q = validate_state_dict(self.vispec_config, state, source=f"{self.source} (weights)")
        state.pop("embed_tokens.weight")  # a frozen copy of the target's, which vLLM shares instead
        if self.d2t is not None:
            self.d2t.copy_(state.pop(DRAFT_VOCAB_KEY))
        model = self.model
        reference = model.fused_fc.weight
        if num_q is not None:  # a stage-1 EAGLE checkpoint has no adaptor: g stays zero
            model.imadpt = ImgAdaptor(self.vispec_config, num_q).to(reference.device, reference.dtype)
        model.fold_input_fusion(state, self.vispec_config.hidden_size)
        model.layers[0].self_attn.widen_checkpoint(state, "layers.0.self_attn.", self.vispec_config)
        params = dict(model.named_parameters())
        loaded = set()
        for name, tensor in state.items():
            target, shard = name, None
            for part, (stacked, shard_id) in STACKED_PARAMS.items():
                if part in name:
                    target, shard = name.replace(part, stacked), shard_id
                    break
            param = params[target]
            loader = getattr(param, "weight_loader", default_weight_loader)
            tensor = tensor.to(param.dtype)
            if shard is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard)
            loaded.add(f"model.{target}")
        # The placeholder embedding is replaced by the target's right after loading.
        return loaded | {"model.embed_tokens.weight"}


def draft_config_file(model: str, revision: str | None) -> Path:
    """The draft's config.json: in its directory, or in the hub cache vLLM already filled."""
    local = Path(model) / "config.json"
    if local.is_file():
        return local
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(model, "config.json", revision=revision))
