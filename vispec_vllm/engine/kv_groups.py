"""The draft layer must sit in the KV-cache group of the target's attention layers.

ViSpec's draft KV lives 1:1 in the target's slots: the draft layer reads and writes through the block table of
the target's attention layers. vLLM only checks that the draft layers share one group; a target whose attention
layers vLLM splits into several groups (sliding-window and full-attention layers, for instance) would give the
draft a block table of its own, or one that covers only some of the target's layers, without any error.
"""

from __future__ import annotations

from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheConfig, KVCacheSpec, UniformTypeKVCacheSpecs


def check_draft_shares_target_kv_group(kv_cache_config: KVCacheConfig, draft_layer_names: set[str]) -> int:
    """The id of the one KV-cache group that holds the draft layers and every attention layer of the target;
    ValueError (naming the groups) when there is no such group."""
    groups = kv_cache_config.kv_cache_groups
    draft_groups = [gid for gid, group in enumerate(groups) if draft_layer_names & set(group.layer_names)]
    problem = kv_group_problem(kv_cache_config, draft_layer_names, draft_groups)
    if problem is not None:
        raise ValueError(
            f"ViSpec: {problem} ({describe_groups(kv_cache_config, draft_layer_names)}). A ViSpec draft keeps its KV "
            "in the target's slots, through one block table, so it needs a target whose attention layers are all "
            "in one KV-cache group (no sliding-window/full-attention mix, no attention kinds vLLM groups apart)."
        )
    return draft_groups[0]


def kv_group_problem(
    kv_cache_config: KVCacheConfig, draft_layer_names: set[str], draft_groups: list[int]
) -> str | None:
    """What keeps the draft layers (in groups `draft_groups`) from sharing the target's attention group, if anything."""
    groups = kv_cache_config.kv_cache_groups
    grouped_layers = {name for group in groups for name in group.layer_names}
    if missing := sorted(draft_layer_names - grouped_layers):
        return f"draft layers {missing} are in no KV-cache group"
    if len(draft_groups) != 1:
        return f"the draft layers are in {len(draft_groups)} KV-cache groups, not 1"
    (draft_group,) = draft_groups
    if set(groups[draft_group].layer_names) <= draft_layer_names:
        return f"the draft layers have KV-cache group {draft_group} to themselves"
    attention_groups = [gid for gid, group in enumerate(groups) if holds_attention(group.kv_cache_spec)]
    if attention_groups != draft_groups:
        return f"the target's attention layers are spread over KV-cache groups {attention_groups}"
    return None


def holds_attention(spec: KVCacheSpec) -> bool:
    """Whether a group's spec is attention's (one spec, or a uniform-type bundle of per-layer ones)."""
    if isinstance(spec, UniformTypeKVCacheSpecs):
        return any(isinstance(layer_spec, AttentionSpec) for layer_spec in spec.kv_cache_specs.values())
    return isinstance(spec, AttentionSpec)


def describe_groups(kv_cache_config: KVCacheConfig, draft_layer_names: set[str]) -> str:
    """'group 0: 14 layers, SlidingWindowSpec; group 1: 15 layers (1 draft), FullAttentionSpec'."""
    parts = []
    for gid, group in enumerate(kv_cache_config.kv_cache_groups):
        drafts = len(draft_layer_names & set(group.layer_names))
        draft_note = f" ({drafts} draft)" if drafts else ""
        layers = f"{len(group.layer_names)} layer{'s' if len(group.layer_names) != 1 else ''}"
        parts.append(f"group {gid}: {layers}{draft_note}, {spec_kind(group.kv_cache_spec)}")
    return "; ".join(parts) or "no KV-cache groups"


def spec_kind(spec: KVCacheSpec) -> str:
    """The spec's type name; a uniform-type bundle names the types it bundles."""
    if isinstance(spec, UniformTypeKVCacheSpecs):
        kinds = sorted({type(layer_spec).__name__ for layer_spec in spec.kv_cache_specs.values()})
        return f"{type(spec).__name__}[{', '.join(kinds)}]"
    return type(spec).__name__
