"""Training pieces without a draft: loss terms, slot construction, padding, schedule, data order, noise."""

from __future__ import annotations

import math

import torch

from vispec_vllm.data.shards import TargetSample
from vispec_vllm.train.batches import collate, sample_slots
from vispec_vllm.train.losses import listmle, stage1_position_loss, stage2_position_loss
from vispec_vllm.train.schedule import epoch_batches, steps_per_epoch, warmup_then_linear_decay
from vispec_vllm.train.step import uniform_noise


def test_listmle_is_the_plackett_luce_likelihood_of_the_target_top_k():
    g = torch.Generator().manual_seed(0)
    draft_logits = torch.randn(3, 20, generator=g)
    target_probs = torch.softmax(torch.randn(3, 20, generator=g) * 3, dim=-1)
    got = listmle(draft_logits, target_probs, k=10)
    for n in range(3):
        order = sorted(range(20), key=lambda v: -float(target_probs[n, v]))[:10]
        nll = 0.0
        for i, v in enumerate(order):
            rest = order[i:]
            nll -= float(draft_logits[n, v]) - math.log(sum(math.exp(float(draft_logits[n, u])) for u in rest))
        assert math.isclose(float(got[n]), nll, rel_tol=1e-5)


def test_loss_terms_follow_the_official_weights():
    g = torch.Generator().manual_seed(1)
    logits, target_logits = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    probs = torch.softmax(target_logits, -1)
    s2 = stage2_position_loss(logits, probs)
    l1 = (torch.softmax(logits, -1) - probs).abs().sum(-1)
    assert torch.allclose(s2["loss"], 10 * l1 + 0.1 * listmle(logits, probs))
    pred, target = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    s1 = stage1_position_loss(pred, target, logits, probs)
    smooth = torch.where((pred - target).abs() < 1, 0.5 * (pred - target) ** 2, (pred - target).abs() - 0.5).mean(-1)
    ce = -(probs * torch.log_softmax(logits, -1)).sum(-1)
    assert torch.allclose(s1["loss"], smooth + 0.1 * (ce + 0.1 * listmle(logits, probs)))
    # a draft equal to the target has zero distribution distance
    assert torch.allclose(stage2_position_loss(target_logits, probs)["ploss"], torch.zeros(4), atol=1e-6)


def _sample(length: int, image_at=(), answer_from: int = 3, hidden: int = 2) -> TargetSample:
    image_mask = torch.zeros(length, dtype=torch.bool)
    image_mask[list(image_at)] = True
    return TargetSample(
        sample_id="x", record_index=0,
        input_ids=torch.arange(100, 100 + length),
        answer_mask=torch.arange(length) >= answer_from,
        image_mask=image_mask,
        hidden_states=torch.arange(length, dtype=torch.float32)[:, None].repeat(1, hidden),
        image_embeds=torch.arange(len(image_at), dtype=torch.float32)[:, None].repeat(1, hidden) + 50,
    )


def test_slots_pair_h_t_with_the_next_token_and_train_on_generated_targets():
    slots = sample_slots(_sample(7, image_at=(0, 1, 2), answer_from=4))
    assert slots["hidden_states"][:, 0].tolist() == [0, 1, 2, 3, 4, 5]  # h_t
    assert slots["target_hidden"][:, 0].tolist() == [1, 2, 3, 4, 5, 6]  # h_{t+1}
    assert slots["next_ids"].tolist() == [101, 102, 103, 104, 105, 106]  # x_{t+1}
    assert slots["image_mask"].tolist() == [True, True, False, False, False, False]  # x_{t+1} is an image token
    assert slots["image_embeds"][:, 0].tolist() == [51, 52]  # token 0's image row is not a draft input
    # slot t predicts x_{t+2}: trained iff x_{t+2} is an answer token (x_4, x_5, x_6), never past the end
    assert slots["loss_mask"].tolist() == [False, False, True, True, True, False]


def test_collate_pads_on_the_right_and_keeps_image_rows_in_order():
    batch = collate([_sample(4, image_at=(2,)), _sample(6, image_at=(1, 2), answer_from=2)])
    assert batch.hidden_states.shape == (2, 5, 2)
    assert batch.attention_mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert not batch.loss_mask[0, 3:].any() and not batch.image_mask[0, 3:].any()
    assert batch.sequence_lengths.tolist() == [4, 6]
    assert batch.image_embeds[:, 0].tolist() == [50, 50, 51]  # row-major order of image_mask
    assert batch.image_mask.sum() == len(batch.image_embeds)


def test_warmup_then_linear_decay_to_zero():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = warmup_then_linear_decay(optimizer, warmup_steps=4, total_steps=12)
    lrs = []
    for _ in range(12):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs == [0.0, 0.25, 0.5, 0.75, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8]


def test_epoch_batches_cover_the_data_once_per_epoch_across_ranks():
    n, batch_size, world = 10, 2, 2
    per_rank = [epoch_batches(n, batch_size, world, rank, seed=3, epoch=1) for rank in range(world)]
    assert all(len(b) == steps_per_epoch(n, batch_size, world) == 3 for b in per_rank)
    seen = [i for batches in per_rank for batch in batches for i in batch]
    assert set(seen) == set(range(n)) and len(seen) == 12  # padded by wrapping around to whole steps
    assert epoch_batches(n, 2, 1, 0, seed=3, epoch=1) != epoch_batches(n, 2, 1, 0, seed=3, epoch=2)
    assert epoch_batches(n, 2, 1, 0, seed=3, epoch=1) == epoch_batches(n, 2, 1, 0, seed=3, epoch=1)


def test_uniform_noise_amplitude_scales_with_one_over_the_sample_length():
    batch = collate([_sample(257, hidden=64), _sample(65, hidden=64)])
    noise = uniform_noise(batch, 0.2, torch.Generator().manual_seed(0))
    for b, length in enumerate((257, 65)):
        bound = 0.2 * 512 / length / 2
        assert noise[b].abs().max() <= bound and noise[b].abs().max() > 0.9 * bound
