"""Where each image sits in the draft's slot sequence, and what every slot becomes.

Slot convention (vLLM's EAGLE shift): slot t pairs (h_t, x_{t+1}), and `image_mask[b, t]` is True iff
x_{t+1} is an image placeholder token, i.e. the mask is already shifted (official `image_mask[:, 1:]`).
Each maximal run of True slots in a row is one image; two images with no text slot between them form one
run and are treated as one image, as in the official code.

Per image run, the adaptor yields `num_q` vectors: the first `num_q-1` (compressed tokens) take the run's
last `num_q-1` slots, in query order; the other slots of the run are *dropped*: never visible as keys, and
their outputs are zeros. The last adaptor vector is the image's global feature `g`, fused into every later
text slot of the row, up to the next image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# values of `SlotLayout.kind`
TEXT = 0  # u_t = fc([e_t ; img_fc([h_t ; g])])
COMPRESSED = 1  # an adaptor output, fed to the decoder layer directly
DROPPED = 2  # an image slot the draft does not see
PADDING = 3  # attention_mask False


@dataclass(frozen=True)
class SlotLayout:
    kind: torch.Tensor  # [B, T] int64, TEXT / COMPRESSED / DROPPED / PADDING
    image_index: torch.Tensor  # [B, T] int64: index of the slot's image within its row; -1 off images
    query_index: torch.Tensor  # [B, T] int64: adaptor output row of a COMPRESSED slot (0..num_q-2); -1 elsewhere
    global_image: torch.Tensor  # [B, T] int64: image (within the row) whose g a TEXT slot uses; -1: carried-in g
    key_visible: torch.Tensor  # [B, T] bool: TEXT or COMPRESSED
    images_per_row: torch.Tensor  # [B] int64
    image_runs: tuple[tuple[int, int, int], ...]  # (row, first_slot, last_slot), row-major: the flat image order
    num_q: int | None  # None: images were not looked for (stage-1 draft or no image_mask)

    @property
    def image_offset(self) -> torch.Tensor:
        """[B] int64: flat index of each row's first image (flat index = offset[row] + image_index)."""
        return torch.cumsum(self.images_per_row, 0) - self.images_per_row


def find_image_runs(image_mask_row: torch.Tensor) -> list[tuple[int, int]]:
    """Maximal runs of True in a [T] bool row, as inclusive (first_slot, last_slot)."""
    mask = image_mask_row.bool()
    padded = F.pad(mask.to(torch.int8), (1, 1))
    change = torch.diff(padded)
    firsts = torch.nonzero(change == 1).flatten().tolist()
    lasts = (torch.nonzero(change == -1).flatten() - 1).tolist()
    return list(zip(firsts, lasts, strict=True))


def compressed_slots(run: tuple[int, int], num_q: int) -> range:
    """The slots of an image run that hold its compressed tokens: the last num_q-1."""
    first, last = run
    if last - first + 1 < num_q - 1:
        raise ValueError(f"image run at slots [{first}, {last}] is shorter than num_q-1 = {num_q - 1} slots")
    return range(last - (num_q - 1) + 1, last + 1)


def build_slot_layout(
    image_mask: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    num_q: int | None,
    *,
    shape: tuple[int, int] | None = None,
    device: torch.device | str | None = None,
) -> SlotLayout:
    """Vectorised layout of a batch. `image_mask`/`num_q` None: every valid slot is TEXT.

    `shape` (B, T) and `device` are used when both masks are None. Image slots outside `attention_mask` count
    as padding.
    """
    reference = image_mask if image_mask is not None else attention_mask
    if reference is None and shape is None:
        raise ValueError("build_slot_layout needs image_mask, attention_mask or shape")
    batch, length = tuple(reference.shape) if reference is not None else shape
    device = reference.device if reference is not None else torch.device(device or "cpu")
    valid = (
        attention_mask.bool() if attention_mask is not None
        else torch.ones(batch, length, dtype=torch.bool, device=device)
    )
    if image_mask is not None and tuple(image_mask.shape) != tuple(valid.shape):
        raise ValueError(
            f"image_mask has shape {list(image_mask.shape)} but attention_mask has shape {list(valid.shape)}"
        )
    if image_mask is None or num_q is None:
        image = torch.zeros_like(valid)
    else:
        if num_q < 2:
            raise ValueError(f"num_q must be >= 2 (compressed tokens + global feature), got {num_q}")
        image = image_mask.bool() & valid

    slot = torch.arange(length, device=device).expand(batch, length)
    before = F.pad(image[:, :-1], (1, 0))
    after = F.pad(image[:, 1:], (0, 1))
    is_first = image & ~before
    is_last = image & ~after
    # for each slot: first slot of the latest run starting at or before it, last slot of the next run ending at or
    # after it (meaningful on image slots)
    run_first = torch.cummax(torch.where(is_first, slot, -1), dim=1).values
    run_last = torch.cummin(torch.where(is_last, slot, length).flip(1), dim=1).values.flip(1)

    no_index = torch.full_like(slot, -1)
    image_index = torch.where(image, torch.cumsum(is_first.long(), 1) - 1, no_index)
    global_image = torch.cumsum(is_last.long(), 1) - is_last.long() - 1
    kind = torch.full_like(slot, TEXT)
    query_index = no_index
    if num_q is not None and bool(image.any()):
        run_length = run_last - run_first + 1
        short = is_last & (run_length < num_q - 1)
        if bool(short.any()):
            row, last = (int(i) for i in torch.nonzero(short)[0])
            first = int(run_first[row, last])
            raise ValueError(
                f"row {row}: image run at slots [{first}, {last}] has {last - first + 1} slots, "
                f"fewer than num_q-1 = {num_q - 1}"
            )
        from_end = run_last - slot  # 0 at a run's last slot
        compressed = image & (from_end < num_q - 1)
        kind = torch.where(compressed, COMPRESSED, torch.where(image, DROPPED, kind))
        query_index = torch.where(compressed, num_q - 2 - from_end, no_index)
    kind = torch.where(valid, kind, PADDING)

    firsts = torch.nonzero(is_first).tolist()
    lasts = torch.nonzero(is_last).tolist()
    runs = tuple((row, first, last) for (row, first), (_, last) in zip(firsts, lasts, strict=True))
    return SlotLayout(
        kind=kind,
        image_index=image_index,
        query_index=query_index,
        global_image=global_image,
        key_visible=(kind == TEXT) | (kind == COMPRESSED),
        images_per_row=is_first.sum(1),
        image_runs=runs,
        num_q=num_q if image_mask is not None else None,
    )
