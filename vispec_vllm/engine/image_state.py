"""Per-request image state for the ViSpec proposer.

vLLM hands the drafter only the slice of an image that falls in the current step, and nothing at decode
steps; ViSpec needs each image's *whole* embedding once (for `num_q-1` compressed tokens and the global
feature `g`) and `g` for every later token. So each request gets a `RequestImages` object, keyed by request
id, holding its image spans and, once the image's encoder output has been seen, the adaptor output (kept for
the request's whole life). Adaptor outputs are also kept per image identifier (vLLM's encoder-cache key) in an
LRU bounded in bytes, because an image inside a prefix-cache hit is never re-encoded by vLLM; an image found in
neither is re-encoded with the target's vision encoder (`reencode`).

Isolation: a request whose images cannot be handled (video, placeholders with non-embedding tokens, any error
while reading or adapting its images) is drafted text-only (its `RequestImages` records why, and it is logged
once): no global term, no compressed tokens, no dropped slots. The target still verifies every draft, so its
output is unchanged; other requests are not affected.

Slot convention (vLLM's EAGLE shift): draft slot p pairs (h_p, x_{p+1}). An image whose placeholder tokens
occupy [offset, offset + length) therefore owns slots [offset - 1, offset + length - 2].
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from vllm.logger import init_logger

from vispec_vllm.engine.host_copies import host_to_device
from vispec_vllm.kernels.dropped_keys import dropped_block_order

IMAGE_MODALITY = "image"
UNSUPPORTED_MODALITIES = ("video",)  # visual inputs the draft was not trained on: the request is drafted text-only
ADAPTOR_CACHE_BYTES_ENV = "VISPEC_ADAPTOR_CACHE_BYTES"
DEFAULT_ADAPTOR_CACHE_BYTES = 64 << 20

logger = init_logger(f"vllm.{__name__}")  # under vLLM's configured logger, so the lines show


class UnsupportedImageInput(ValueError):
    """A request's visual input the draft cannot take: the request is drafted text-only."""


@dataclass
class ImageSpan:
    identifier: str  # vLLM encoder-cache key of this item
    first_slot: int  # offset - 1
    last_slot: int  # offset + length - 2
    feature_index: int  # index of the item in the request's `mm_features` (to re-encode it)
    adaptor_output: torch.Tensor | None = None  # [num_q, H]: compressed tokens then g

    def computed_before(self, num_computed_tokens: int) -> bool:
        """Were all its placeholder tokens computed before this step (a prefix-cache hit)? vLLM then never
        encodes the image again (nor sends its pixels unless `patches` asks it to)."""
        return self.last_slot + 2 <= num_computed_tokens


@dataclass
class RequestImages:
    req_id: str
    spans: list[ImageSpan] = field(default_factory=list)
    text_only_reason: str | None = None  # set when the request is drafted without its images

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
    """Image spans of a request from vLLM's `CachedRequestState.mm_features`, in prompt order (non-visual
    items are left to the text path). Raises `UnsupportedImageInput` for a video, or for image placeholders
    with non-embedding tokens (`is_embed`)."""
    spans = []
    for index, feature in enumerate(mm_features):
        if feature.modality in UNSUPPORTED_MODALITIES:
            raise UnsupportedImageInput(f"{feature.modality} input: the draft adapts images only")
        if feature.modality != IMAGE_MODALITY:
            continue
        pos = feature.mm_position
        if pos.is_embed is not None and not bool(pos.is_embed.all()):
            raise UnsupportedImageInput("image placeholders with non-embedding tokens (is_embed)")
        spans.append(ImageSpan(feature.identifier, pos.offset - 1, pos.offset + pos.length - 2, index))
    spans.sort(key=lambda s: s.first_slot)
    return RequestImages(req_id, spans)


def adaptor_cache_bytes(environ: Mapping[str, str] = os.environ) -> int:
    """The adaptor-output cache budget: `VISPEC_ADAPTOR_CACHE_BYTES` (a whole number of bytes), else 64 MiB."""
    value = environ.get(ADAPTOR_CACHE_BYTES_ENV, "").strip()
    if not value:
        return DEFAULT_ADAPTOR_CACHE_BYTES
    if not value.isdigit():
        raise ValueError(f"{ADAPTOR_CACHE_BYTES_ENV}={value!r}: expected a whole number of bytes")
    return int(value)


class AdaptorOutputCache:
    """LRU of adaptor outputs by image identifier, bounded in bytes ([num_q, H] each: a few KB on a 7B draft).

    It lives on the device; an output larger than the whole budget is not kept."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()

    def get(self, identifier: str) -> torch.Tensor | None:
        value = self._entries.get(identifier)
        if value is not None:
            self._entries.move_to_end(identifier)
        return value

    def put(self, identifier: str, value: torch.Tensor) -> None:
        previous = self._entries.pop(identifier, None)
        if previous is not None:
            self.num_bytes -= previous.nbytes
        self._entries[identifier] = value
        self.num_bytes += value.nbytes
        while self.num_bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.num_bytes -= evicted.nbytes

    def __len__(self) -> int:
        return len(self._entries)


class ImageStateStore:
    """All requests' image state, plus the padded tables for the current batch."""

    def __init__(
        self,
        num_q: int,
        hidden_size: int,
        adapt: Callable[[torch.Tensor], torch.Tensor],  # [N, H] image embedding -> [num_q, H]
        reencode: Callable[[Any], torch.Tensor],  # vLLM's MultiModalFeatureSpec -> [N, H] encoder output
        device: torch.device,
        dtype: torch.dtype,
        cache_bytes: int = DEFAULT_ADAPTOR_CACHE_BYTES,
    ) -> None:
        self.num_q = num_q
        self.hidden_size = hidden_size
        self.adapt = adapt
        self.reencode = reencode
        self.device = device
        self.dtype = dtype
        self.requests: dict[str, RequestImages] = {}
        self._pending: set[str] = set()  # requests with an image not yet adapted
        self.adaptor_cache = AdaptorOutputCache(cache_bytes)
        self.reencoded_images = 0  # images inside a prefix-cache hit whose adaptor output had been evicted
        self.text_only_requests = 0  # requests drafted without their images (see `RequestImages.text_only_reason`)
        self._tables_key: tuple[tuple[str, ...], int] | None = None
        self._tables: BatchImageTables | None = None
        self._version = 0

    def update(
        self,
        req_ids: Sequence[str],
        live_requests: Mapping,  # runner.requests: req_id -> CachedRequestState
        encoder_outputs: Mapping[str, torch.Tensor],  # runner.encoder_cache
    ) -> None:
        """Track new requests, forget finished ones, adapt images whose embedding is now available. An error in
        one request's images makes that request text-only; the others go on.

        Set operations only: in steady decoding (no new request, no pending image) nothing loops in Python.
        """
        for req_id in self.requests.keys() - live_requests.keys():
            del self.requests[req_id]
            self._pending.discard(req_id)
            self._version += 1
        for req_id in set(req_ids) - self.requests.keys():
            self.requests[req_id] = self._track(req_id, live_requests[req_id].mm_features)
            self._version += 1
        for req_id in list(self._pending):
            state = self.requests[req_id]
            try:
                self._resolve(state, live_requests[req_id], encoder_outputs)
            except Exception as error:  # whatever went wrong, it concerns this request's images only
                self._draft_text_only(state, error)
            if not state.pending:
                self._pending.discard(req_id)

    def _track(self, req_id: str, mm_features: Iterable) -> RequestImages:
        try:
            state = spans_from_mm_features(req_id, mm_features)
        except Exception as error:
            state = RequestImages(req_id)
            self._draft_text_only(state, error)
            return state
        if state.spans:
            self._pending.add(req_id)
        return state

    def _resolve(self, state: RequestImages, live_request, encoder_outputs: Mapping[str, torch.Tensor]) -> None:
        """Adaptor outputs of the request's pending images: from the shared cache, else adapted from vLLM's
        encoder output, else, for an image inside a prefix-cache hit (vLLM never encodes it again), adapted from
        a re-encoding. An image whose placeholders vLLM has yet to compute waits: vLLM encodes it then."""
        for span in state.pending:
            output = self.adaptor_cache.get(span.identifier)
            if output is None:
                embedding = encoder_outputs.get(span.identifier)
                if embedding is None:
                    if not span.computed_before(live_request.num_computed_tokens):
                        continue
                    embedding = self.reencode(live_request.mm_features[span.feature_index])
                    self.reencoded_images += 1
                output = self.adapt(embedding.to(self.dtype))  # encoder outputs are on the device already
                if tuple(output.shape) != (self.num_q, self.hidden_size):
                    raise ValueError(f"adaptor output of shape {tuple(output.shape)}, expected "
                                     f"{(self.num_q, self.hidden_size)}")
                self.adaptor_cache.put(span.identifier, output)
            span.adaptor_output = output
            self._version += 1

    def _draft_text_only(self, state: RequestImages, error: Exception) -> None:
        state.spans = []
        state.text_only_reason = f"{type(error).__name__}: {error}"
        self.text_only_requests += 1
        self._pending.discard(state.req_id)
        self._version += 1
        logger.warning(
            "vispec-vllm: request %s is drafted without its images (%s); the target verifies every draft, so its "
            "output is unchanged",
            state.req_id,
            state.text_only_reason,
        )

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
