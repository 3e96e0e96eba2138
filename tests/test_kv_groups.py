"""The draft layer must share the KV-cache group of every target attention layer (`check_draft_shares_target_kv_group`),
on vLLM's own KV-cache config objects and on the groups vLLM's grouping makes for plain and hybrid targets."""

import pytest
import torch
from vllm.config import VllmConfig
from vllm.v1.core.kv_cache_utils import get_kv_cache_groups
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheSpec,
    MambaSpec,
    SlidingWindowSpec,
)

from vispec_vllm.engine.kv_groups import check_draft_shares_target_kv_group

BLOCK = 16
TARGET = [f"model.layers.{index}.self_attn.attn" for index in range(4)]
DRAFT = "model.layers.4.self_attn.attn"  # after the target's layers, as ViSpecDraftForVLLM names it


def full(kv_heads: int = 4, head_size: int = 128) -> FullAttentionSpec:
    return FullAttentionSpec(block_size=BLOCK, num_kv_heads=kv_heads, head_size=head_size, dtype=torch.bfloat16)


def sliding() -> SlidingWindowSpec:
    return SlidingWindowSpec(block_size=BLOCK, num_kv_heads=4, head_size=128, dtype=torch.bfloat16, sliding_window=512)


def widened_draft() -> FullAttentionSpec:
    """Qwen2.5-VL-7B's official draft: 28 KV heads of 128, widened to 136."""
    return full(kv_heads=28, head_size=136)


def config_of(*groups: tuple[list[str], KVCacheSpec]) -> KVCacheConfig:
    kv_cache_groups = [KVCacheGroupSpec(layer_names=names, kv_cache_spec=spec) for names, spec in groups]
    return KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=kv_cache_groups)


def grouped_by_vllm(layer_specs: dict[str, KVCacheSpec]) -> KVCacheConfig:
    """The groups vLLM's engine core makes from these per-layer specs (layer-outermost layout, as on the CPU)."""
    vllm_config = VllmConfig()
    vllm_config.cache_config.kv_cache_layout = "LBHNC"
    groups = get_kv_cache_groups(vllm_config, layer_specs)
    return KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=groups)


def test_plain_target_shares_its_one_full_attention_group():
    config = config_of(([*TARGET, DRAFT], full()))
    assert check_draft_shares_target_kv_group(config, {DRAFT}) == 0


def test_plain_target_grouped_by_vllm_puts_the_widened_draft_in_its_group():
    specs = {name: full() for name in TARGET} | {DRAFT: widened_draft()}
    config = grouped_by_vllm(specs)
    assert len(config.kv_cache_groups) == 1  # one uniform-type group: same kind, different head sizes
    assert check_draft_shares_target_kv_group(config, {DRAFT}) == 0


def test_non_attention_groups_of_the_target_are_allowed():
    """A hybrid whose other groups hold no attention (Mamba state): the draft is in the one attention group."""
    mamba = MambaSpec(block_size=BLOCK, shapes=((4, 64),), dtypes=(torch.bfloat16,))
    config = config_of((TARGET[0::2], mamba), ([*TARGET[1::2], DRAFT], full()))
    assert check_draft_shares_target_kv_group(config, {DRAFT}) == 1


def test_sliding_window_hybrid_target_is_refused_with_its_groups_named():
    config = config_of((TARGET[0::2], sliding()), ([*TARGET[1::2], DRAFT], full()))
    with pytest.raises(ValueError) as refused:
        check_draft_shares_target_kv_group(config, {DRAFT})
    message = str(refused.value)
    assert "spread over KV-cache groups [0, 1]" in message
    assert "group 0: 2 layers, SlidingWindowSpec" in message
    assert "group 1: 3 layers (1 draft), FullAttentionSpec" in message
    assert "attention layers are all in one KV-cache group" in message


def test_sliding_window_hybrid_grouped_by_vllm_is_refused():
    """vLLM's own grouping of a target alternating sliding-window and full layers, with the widened draft."""
    specs = {name: sliding() if i % 2 == 0 else full() for i, name in enumerate(TARGET)} | {DRAFT: widened_draft()}
    config = grouped_by_vllm(specs)
    assert len(config.kv_cache_groups) > 1
    with pytest.raises(ValueError, match="SlidingWindowSpec") as refused:
        check_draft_shares_target_kv_group(config, {DRAFT})
    assert "attention layers are all in one KV-cache group" in str(refused.value)


def test_draft_in_a_group_of_its_own_is_refused():
    config = config_of((TARGET, full()), ([DRAFT], widened_draft()))
    with pytest.raises(ValueError) as refused:
        check_draft_shares_target_kv_group(config, {DRAFT})
    assert "the draft layers have KV-cache group 1 to themselves" in str(refused.value)
    assert "group 0: 4 layers, FullAttentionSpec; group 1: 1 layer (1 draft), FullAttentionSpec" in str(refused.value)


def test_draft_layers_spread_over_groups_or_missing_are_refused():
    second_draft = "model.layers.5.self_attn.attn"
    spread = config_of(([*TARGET, DRAFT], full()), ([second_draft], full()))
    with pytest.raises(ValueError, match="the draft layers are in 2 KV-cache groups, not 1"):
        check_draft_shares_target_kv_group(spread, {DRAFT, second_draft})
    missing = config_of((TARGET, full()))
    with pytest.raises(ValueError, match=r"draft layers \['model.layers.4.self_attn.attn'\] are in no KV-cache group"):
        check_draft_shares_target_kv_group(missing, {DRAFT})


def test_the_proposer_refuses_a_hybrid_target_at_start_up():
    """`ViSpecProposer.validate_same_kv_cache_group` (which vLLM calls when it sets up the draft's attention)
    runs the check for a ViSpec draft, and keeps vLLM's own check for any other draft."""
    from vispec_vllm.engine.proposer import ViSpecProposer

    hybrid = grouped_by_vllm({name: sliding() if index % 2 else full() for index, name in enumerate(TARGET)}
                             | {DRAFT: widened_draft()})
    def proposer(is_vispec: bool) -> ViSpecProposer:
        bare = object.__new__(ViSpecProposer)  # only what the check reads
        bare.is_vispec, bare._draft_attn_layer_names = is_vispec, {DRAFT}
        return bare

    with pytest.raises(ValueError, match="one KV-cache group"):
        proposer(is_vispec=True).validate_same_kv_cache_group(hybrid)
    proposer(is_vispec=False).validate_same_kv_cache_group(hybrid)  # vLLM's check: the draft layers share a group
