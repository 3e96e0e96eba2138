"""The `--speculative-config` (or `LLM(speculative_config=...)`) dict for a ViSpec or EAGLE draft."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

# vLLM 0.32's draft_sample_method: "greedy" (its default) proposes the draft's argmax and the rejection sampler
# treats it as certain; "probabilistic" samples drafts from the draft's distribution and passes that
# distribution to the rejection sampler. Both are lossless; at T > 0 the second accepts more.
DRAFT_SAMPLE_METHODS = ("greedy", "probabilistic")


def eagle_config(draft: Path, num_speculative_tokens: int, *, schedule: Sequence[Sequence[int]] | None = None,
                 draft_sample_method: str = "greedy") -> dict:
    """schedule: vLLM's `num_speculative_tokens_per_batch_size` ([first batch, last batch, K] ranges)."""
    if draft_sample_method not in DRAFT_SAMPLE_METHODS:
        raise ValueError(f"draft_sample_method {draft_sample_method!r}: expected one of {DRAFT_SAMPLE_METHODS}")
    config: dict = {"method": "eagle", "model": str(draft), "num_speculative_tokens": num_speculative_tokens}
    if schedule is not None:
        config["num_speculative_tokens_per_batch_size"] = [list(entry) for entry in schedule]
    if draft_sample_method != "greedy":  # vLLM's default stays implicit
        config["draft_sample_method"] = draft_sample_method
    return config
