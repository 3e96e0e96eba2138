"""Per-request image state for the ViSpec proposer.

vLLM hands the drafter only the slice of an image that falls in the current step, and nothing at decode
steps; ViSpec needs each image's *whole* embedding once (for `num_q-1` compressed tokens and the global
feature `g`) and `g` for every later token. So each request gets a `RequestImages` object, keyed by request
id, holding its image spans and, once the image's encoder output has been seen, the adaptor output.
Adaptor outputs are also kept per image identifier (vLLM's encoder-cache key) in a bounded LRU, because an
image inside a prefix-cache hit is never re-encoded.

Slot convention (vLLM's EAGLE shift): draft slot p pairs (h_p, x_{p+1}). An image whose placeholder tokens
occupy [offset, offset + length) therefore owns slots [offset - 1, offset + length - 2].
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from vispec_vllm.engine.host_copies import host_to_device
from vispec_vllm.kernels.dropped_keys import dropped_block_order

IMAGE_MODALITIES = ("image", "video")


@dataclass
class ImageSpan:
    identifier: str  # vLLM encoder-cache key of this item
    first_slot: int  # offset - 1
    last_slot: int  # offset + length - 2
    adaptor_output: torch.Tensor | None = None  # [num_q, H]: compressed tokens then g


@dataclass
class RequestImages:
    req_id: str
    spans: list[ImageSpan] = field(default_factory=list)

    @property
    def pending(self) -> list[ImageSpan]:
        return [s for s in self.spans if s.adaptor_output is None]


@dataclass
class AfterImages:
    """What a batch whose queries all come after their rows' images needs (decode steps): fixed per batch."""

    global_term: torch.Tensor  # [B, H] global row of each row's last image (zeros: no image)
    block_order: torch.Tensor  # [B, num_blocks] `dropped_block_order` with every dropped block behind the queries
    skipped_keys: torch.Tensor  # [B]


@dataclass
class BatchImageTables:
    """Padded per-row image tables for one drafter batch (B rows, M = max images in a row, >= 1)."""

    first_slot: torch.Tensor  # [B, M] int64 (padding: a huge value, so no slot falls in it)
    last_slot: torch.Tensor  # [B, M] int64
    adaptor_output: torch.Tensor  # [B, M, num_q, H] (zeros where unknown)
    num_q: int
    last_image_slot: np.ndarray  # [B] int64 on the host: each row's last image slot (-1: no image)
    _after_images: dict[tuple[int, int], AfterImages] = field(default_factory=dict, repr=False)

    def global_term(self, row_of_token: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[T, H]: the global row of the latest image of row `row_of_token[t]` that ended before slot
        `positions[t]` (zeros if none). Images are sorted, so those that ended form a prefix of the row's."""
        num_done = (positions[:, None] > self.last_slot[row_of_token]).sum(dim=-1)  # [T]
        latest = self.adaptor_output[row_of_token, (num_done - 1).clamp(min=0), self.num_q - 1]
        return latest * (num_done > 0)[:, None].to(latest.dtype)

    def all_images_before(self, first_query_slot: np.ndarray) -> bool:
        """Host check: does every row's first query slot ([B]) come after all of the row's images?"""
        return bool((first_query_slot > self.last_image_slot).all())

    def after_images(self, num_blocks: int, block_size: int) -> AfterImages:
        """The decode-step inputs, built once per batch (the tables are rebuilt when the batch changes)."""
        key = (num_blocks, block_size)
        if key not in self._after_images:
            rows = torch.arange(self.last_slot.shape[0], device=self.last_slot.device)
            behind_everything = torch.full_like(rows, _PAD_SLOT)  # a query slot after every image and block
            global_term = self.global_term(rows, behind_everything)
            order, skipped = dropped_block_order(self.dropped_ranges, behind_everything, num_blocks, block_size)
            self._after_images[key] = AfterImages(global_term, order, skipped)
        return self._after_images[key]

    @property
    def dropped_ranges(self) -> torch.Tensor:
        """[B, M, 2] half-open slot spans the draft never attends to: all image slots but the last num_q-1."""
        start = self.first_slot.clamp(min=0)  # an image at token 0 owns no slot -1
        end = self.last_slot - (self.num_q - 1) + 1
        return torch.stack([start, torch.maximum(end, start)], dim=-1)


_PAD_SLOT = 2**62


def spans_from_mm_features(req_id: str, mm_features: Iterable) -> RequestImages:
    """Image spans of a request from vLLM's `CachedRequestState.mm_features`, in prompt order."""
    spans = []
    for feature in mm_features:
        if feature.modality not in IMAGE_MODALITIES:
            continue
        pos = feature.mm_position
        if pos.is_embed is not None and not bool(pos.is_embed.all()):
            raise NotImplementedError(
                f"request {req_id}: image placeholders with non-embedding tokens (is_embed) are not supported"
            )
        spans.append(ImageSpan(feature.identifier, pos.offset - 1, pos.offset + pos.length - 2))
    spans.sort(key=lambda s: s.first_slot)
    return RequestImages(req_id, spans)


class AdaptorOutputCache:
    """Bounded LRU of adaptor outputs by image identifier ([num_q, H] each: a few KB)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()

    def get(self, identifier: str) -> torch.Tensor | None:
        value = self._entries.get(identifier)
        if value is not None:
            self._entries.move_to_end(identifier)
        return value

    def put(self, identifier: str, value: torch.Tensor) -> None:
        self._entries[identifier] = value
        self._entries.move_to_end(identifier)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class ImageStateStore:
    """All requests' image state, plus the padded tables for the current batch."""

    def __init__(
        self,
        num_q: int,
        hidden_size: int,
        adapt: Callable[[torch.Tensor], torch.Tensor],  # [N, H] image embedding -> [num_q, H]
        device: torch.device,
        dtype: torch.dtype,
        cache_capacity: int = 16384,
    ) -> None:
        self.num_q = num_q
        self.hidden_size = hidden_size
        self.adapt = adapt
        self.device = device
        self.dtype = dtype
        self.requests: dict[str, RequestImages] = {}
        self._pending: set[str] = set()  # requests with an image not yet adapted
        self.adaptor_cache = AdaptorOutputCache(cache_capacity)
        self._tables_key: tuple[tuple[str, ...], int] | None = None
        self._tables: BatchImageTables | None = None
        self._version = 0

    def update(
        self,
        req_ids: Sequence[str],
        live_requests: Mapping,  # runner.requests: req_id -> CachedRequestState
        encoder_outputs: Mapping[str, torch.Tensor],  # runner.encoder_cache
    ) -> None:
        """Track new requests, forget finished ones, adapt images whose embedding is now available.

        Set operations only: in steady decoding (no new request, no pending image) nothing loops in Python.
        """
        for req_id in self.requests.keys() - live_requests.keys():
            del self.requests[req_id]
            self._pending.discard(req_id)
            self._version += 1
        for req_id in set(req_ids) - self.requests.keys():
            self.requests[req_id] = spans_from_mm_features(req_id, live_requests[req_id].mm_features)
            self._pending.add(req_id)
            self._version += 1
        for req_id in list(self._pending):
            state = self.requests[req_id]
            for span in state.pending:
                self._resolve(span, encoder_outputs)
            if not state.pending:
                self._pending.discard(req_id)

    def _resolve(self, span: ImageSpan, encoder_outputs: Mapping[str, torch.Tensor]) -> None:
        cached = self.adaptor_cache.get(span.identifier)
        if cached is None:
            embedding = encoder_outputs.get(span.identifier)
            if embedding is None:
                return
            cached = self.adapt(embedding.to(self.dtype))  # encoder outputs are on the device already
            self.adaptor_cache.put(span.identifier, cached)
        span.adaptor_output = cached
        self._version += 1

    def tables(self, req_ids: Sequence[str]) -> BatchImageTables:
        """Padded tables for the batch rows `req_ids`; rebuilt only when the batch or any state changed."""
        key = (tuple(req_ids), self._version)
        if key != self._tables_key or self._tables is None:
            self._tables = self._build_tables(req_ids)
            self._tables_key = key
        return self._tables

    def _build_tables(self, req_ids: Sequence[str]) -> BatchImageTables:
        """Slot tables built on the host and sent in one non-blocking copy; the adaptor outputs (already on the
        device) placed with one `index_copy_`."""
        rows = [self.requests[r].spans for r in req_ids]
        width = max([len(spans) for spans in rows] + [1])
        slots = np.full((2, len(rows), width), _PAD_SLOT, dtype=np.int64)  # first and last slots
        known_cells: list[int] = []  # b * width + m of each image whose adaptor output is known
        known_outputs: list[torch.Tensor] = []
        for b, spans in enumerate(rows):
            for m, span in enumerate(spans):
                slots[:, b, m] = span.first_slot, span.last_slot
                if span.adaptor_output is not None:
                    known_cells.append(b * width + m)
                    known_outputs.append(span.adaptor_output)
        first, last = host_to_device(torch.from_numpy(slots), self.device)
        adaptor = torch.zeros(len(rows) * width, self.num_q, self.hidden_size, dtype=self.dtype, device=self.device)
        if known_outputs:
            cells = host_to_device(torch.tensor(known_cells, dtype=torch.int64), self.device)
            adaptor.index_copy_(0, cells, torch.stack(known_outputs))
        last_image_slot = np.array([max((s.last_slot for s in spans), default=-1) for spans in rows], dtype=np.int64)
        adaptor = adaptor.view(len(rows), width, self.num_q, self.hidden_size)
        return BatchImageTables(first, last, adaptor, self.num_q, last_image_slot)
