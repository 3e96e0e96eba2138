"""ViSpec training data: the target's answers (vLLM) and its teacher-forced states (transformers), sharded.

See `python -m vispec_vllm.data --help` and `shards.py` for the on-disk format.
"""

from vispec_vllm.data.conversation import DEFAULT_EXTRA_INSTRUCTION, DEFAULT_SYSTEM_PROMPT, PromptStyle
from vispec_vllm.data.manifest import DatasetSpec, load_spec
from vispec_vllm.data.records import SkipReason
from vispec_vllm.data.shards import ShardReader, TargetSample

__all__ = [
    "DEFAULT_EXTRA_INSTRUCTION",
    "DEFAULT_SYSTEM_PROMPT",
    "DatasetSpec",
    "PromptStyle",
    "ShardReader",
    "SkipReason",
    "TargetSample",
    "load_spec",
]
