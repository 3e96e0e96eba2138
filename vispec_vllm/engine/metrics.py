"""vLLM's speculative-decoding counters, read from `LLM.get_metrics()` and differenced between two reads."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SpecDecodeCounters:
    drafts: int = 0  # draft rounds (one per request per step that carried drafts)
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_position: tuple[int, ...] = field(default_factory=tuple)

    @classmethod
    def from_metrics(cls, metrics) -> SpecDecodeCounters:
        values: dict[str, int] = {}
        per_position: tuple[int, ...] = ()
        for metric in metrics:
            name = metric.name.removeprefix("vllm:")
            if name == "spec_decode_num_accepted_tokens_per_pos":
                per_position = tuple(int(v) for v in metric.values)
            elif name.startswith("spec_decode_"):
                values[name] = int(getattr(metric, "value", 0))
        return cls(
            drafts=values.get("spec_decode_num_drafts", 0),
            draft_tokens=values.get("spec_decode_num_draft_tokens", 0),
            accepted_tokens=values.get("spec_decode_num_accepted_tokens", 0),
            accepted_per_position=per_position,
        )

    def __sub__(self, other: SpecDecodeCounters) -> SpecDecodeCounters:
        width = max(len(self.accepted_per_position), len(other.accepted_per_position))
        mine = self.accepted_per_position + (0,) * (width - len(self.accepted_per_position))
        theirs = other.accepted_per_position + (0,) * (width - len(other.accepted_per_position))
        return SpecDecodeCounters(
            self.drafts - other.drafts,
            self.draft_tokens - other.draft_tokens,
            self.accepted_tokens - other.accepted_tokens,
            tuple(a - b for a, b in zip(mine, theirs, strict=True)),
        )

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens per target step including the bonus token (vLLM/EAGLE convention): 1 + accepted / drafts."""
        return 1.0 + self.accepted_tokens / self.drafts if self.drafts else 1.0

    @property
    def per_position_rate(self) -> list[float]:
        return [a / self.drafts for a in self.accepted_per_position] if self.drafts else []
