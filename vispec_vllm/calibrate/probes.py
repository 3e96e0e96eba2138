"""Timers around the live parts of an in-process vLLM engine: one record per engine step, opened by the
scheduler's `schedule()`, with the inclusive wall time of every probed method called during that step.

The scheduler's own time is kept as "schedule". A probe replaces a bound method by an instance attribute that
times the original (the device is synchronised before and after through the runner's own `_sync_device`, a
no-op on the CPU), and is removed on exit. The step period (from one `schedule()` call to the next) is the step
time, with or without vLLM's async scheduling.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StepRecord:
    started: float  # time.perf_counter() when the step's schedule() was called
    batch_size: int = 0  # rows scheduled
    steady_k: int | None = None  # K when every row verifies K drafts and K more are scheduled; None otherwise
    ms: dict[str, float] = field(default_factory=dict)  # probe name -> inclusive milliseconds in this step
    calls: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class Probe:
    name: str
    owner: str  # key of the object in LiveParts.objects
    method: str


@dataclass
class LiveParts:
    """The engine's scheduler, model runner, drafter and the two models, as one in-process engine holds them."""

    scheduler: Any
    runner: Any
    drafter: Any

    @property
    def objects(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler, "runner": self.runner, "drafter": self.drafter,
                "target_model": self.runner.model, "draft_model": self.drafter.model}


def steady_k(scheduler_output) -> int | None:
    """K if this step is a pure decode step in which every row verifies K drafts and K are proposed next."""
    tokens = scheduler_output.num_scheduled_tokens
    k = scheduler_output.num_spec_tokens_to_schedule
    if not tokens or scheduler_output.scheduled_new_reqs:
        return None
    drafts = scheduler_output.scheduled_spec_decode_tokens
    if all(n == 1 + k and len(drafts.get(req_id, ())) == k for req_id, n in tokens.items()):
        return k
    return None


class StepRecorder:
    """Opens a StepRecord at every `schedule()` of the live scheduler; probes add their times to it."""

    def __init__(self, parts: LiveParts) -> None:
        self.parts = parts
        self.records: list[StepRecord] = []

    @contextlib.contextmanager
    def recording(self, probes: tuple[Probe, ...] = ()) -> Iterator[StepRecorder]:
        with contextlib.ExitStack() as stack:
            stack.enter_context(_replaced(self.parts.scheduler, "schedule", self._open_step))
            for probe in probes:
                owner = self.parts.objects[probe.owner]
                stack.enter_context(_replaced(owner, probe.method, functools.partial(self._timed, probe.name)))
            yield self

    def _open_step(self, schedule: Callable, *args, **kwargs):
        record = StepRecord(time.perf_counter())
        self.records.append(record)
        output = schedule(*args, **kwargs)
        record.ms["schedule"] = (time.perf_counter() - record.started) * 1000.0
        record.batch_size = len(output.num_scheduled_tokens)
        record.steady_k = steady_k(output)
        return output

    def _timed(self, name: str, method: Callable, *args, **kwargs):
        sync = self.parts.runner._sync_device
        sync()
        started = time.perf_counter()
        result = method(*args, **kwargs)
        sync()
        record = self.records[-1]  # the step under way
        record.ms[name] = record.ms.get(name, 0.0) + (time.perf_counter() - started) * 1000.0
        record.calls[name] += 1
        return result

    def periods(self, first: int, batch_size: int, k: int) -> list[tuple[StepRecord, float]]:
        """(record, period ms) of the steady (batch_size, k) steps from records[first] on that have a successor."""
        pairs = zip(self.records[first:-1], self.records[first + 1 :], strict=True)
        return [(this, (after.started - this.started) * 1000.0) for this, after in pairs
                if this.batch_size == batch_size and this.steady_k == k]


@contextlib.contextmanager
def _replaced(owner: Any, name: str, wrapper: Callable) -> Iterator[None]:
    """owner.name(...) calls wrapper(original, ...) until exit."""
    original = getattr(owner, name)
    shadowed = name in vars(owner)
    setattr(owner, name, functools.partial(wrapper, original))
    try:
        yield
    finally:
        if shadowed:
            setattr(owner, name, original)
        else:
            delattr(owner, name)
