"""`ViSpecDraft.forward` against a slow per-image, per-token loop with the official semantics.

The reference below builds the official *compressed* sequence by physically dropping image slots (text slots
fused with the latest image's g, each image replaced by its num_q-1 compressed tokens at the positions of its
last num_q-1 slots), runs causal attention over it with the original slot indices as positions (RoPE from an
official-style precomputed table), and maps the outputs back, in float64 with Python loops.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from vispec_vllm.draft import ViSpecConfig, ViSpecDraft
from vispec_vllm.draft.image_spans import COMPRESSED, DROPPED
from vispec_vllm.draft.layers import rotary_cos_sin
from vispec_vllm.factory.weights import reinitialize

ATOL = 1e-5


def tiny_config(**overrides) -> ViSpecConfig:
    values = dict(
        hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=4, vocab_size=61,
        max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0, qkv_bias=True,
    )
    values.update(overrides)
    return ViSpecConfig(**values)


def random_draft(config: ViSpecConfig, num_q: int | None = 2, seed: int = 0) -> ViSpecDraft:
    torch.manual_seed(seed)
    model = ViSpecDraft(config, num_q=num_q)
    reinitialize(model, seed)  # img_fc random too, so g matters
    if num_q is not None:
        with torch.no_grad():  # sharper adaptor attention than the factory's 1/fan_in scale
            model.imadpt.q.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(seed + 1))
    lm_head = torch.randn(config.vocab_size, config.hidden_size, generator=torch.Generator().manual_seed(seed + 2))
    model.set_lm_head(lm_head)
    return model.eval()


def random_inputs(batch: int, length: int, hidden: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, length, hidden, generator=generator),
            torch.randn(batch, length, hidden, generator=generator))


def image_mask_from_runs(batch: int, length: int, runs: dict[int, list[tuple[int, int]]]) -> torch.Tensor:
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for row, row_runs in runs.items():
        for first, last in row_runs:
            mask[row, first:last + 1] = True
    return mask


# --------------------------------------------------------------------------------------------- the reference


def reference_forward(model, hidden, embeds, image_mask, lengths, global_feature=None, position_offset=0):
    """Returns (outputs [B, T, H], g after each row [B, H]) in float64."""
    w = {k: v.double() for k, v in model.state_dict().items()}
    cfg = model.config
    num_q = model.num_q
    heads, kv_heads, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    batch, length, hidden_size = hidden.shape
    hidden, embeds = hidden.double(), embeds.double()

    def linear(x, name):
        y = w[f"{name}.weight"] @ x
        return y + w[f"{name}.bias"] if f"{name}.bias" in w else y

    def softmax(scores):
        top = max(scores)
        exps = [math.exp(s - top) for s in scores]
        return [e / sum(exps) for e in exps]

    def adaptor(image):  # [N, H] -> [num_q, H]
        keys = [linear(e, "imadpt.k_proj") for e in image]
        values = [linear(e, "imadpt.v_proj") for e in image]
        rows = []
        for qi in range(num_q):
            per_head = []
            for h in range(heads):
                sl = slice(h * hd, (h + 1) * hd)
                query = w["imadpt.q"][qi, h]
                probs = softmax([float(query @ k[sl]) / math.sqrt(hd) for k in keys])
                per_head.append(sum(p * v[sl] for p, v in zip(probs, values, strict=True)))
            rows.append(w["imadpt.o_proj.weight"] @ torch.cat(per_head))
        return rows

    # official-style RoPE table: float32 angles for 0..P-1, indexed by position
    table_len = position_offset + length + 1
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
    angles = torch.outer(torch.arange(table_len).float(), inv_freq)
    cos_table = torch.cat((angles, angles), -1).cos().double()
    sin_table = torch.cat((angles, angles), -1).sin().double()

    def rope(x, position):
        rotated = torch.cat((-x[hd // 2:], x[:hd // 2]))
        return x * cos_table[position] + rotated * sin_table[position]

    def decoder(sequence, positions):
        attn = "layers.0.self_attn"
        qs = [linear(x, f"{attn}.q_proj") for x in sequence]
        ks = [linear(x, f"{attn}.k_proj") for x in sequence]
        vs = [linear(x, f"{attn}.v_proj") for x in sequence]
        outputs = []
        for i, x in enumerate(sequence):
            per_head = []
            for h in range(heads):
                kvh = h // (heads // kv_heads)
                q_sl, kv_sl = slice(h * hd, (h + 1) * hd), slice(kvh * hd, (kvh + 1) * hd)
                query = rope(qs[i][q_sl], positions[i])
                scores = [float(query @ rope(ks[j][kv_sl], positions[j])) / math.sqrt(hd) for j in range(i + 1)]
                probs = softmax(scores)
                per_head.append(sum(probs[j] * vs[j][kv_sl] for j in range(i + 1)))
            y = x + w[f"{attn}.o_proj.weight"] @ torch.cat(per_head)
            normed = y / torch.sqrt((y * y).mean() + cfg.rms_norm_eps) * w["layers.0.post_attention_layernorm.weight"]
            gate = w["layers.0.mlp.gate_proj.weight"] @ normed
            up = w["layers.0.mlp.up_proj.weight"] @ normed
            act = gate / (1 + torch.exp(-gate))
            outputs.append(y + w["layers.0.mlp.down_proj.weight"] @ (act * up))
        return outputs

    out = torch.zeros(batch, length, hidden_size, dtype=torch.float64)
    g_after = []
    for b in range(batch):
        g = torch.zeros(hidden_size, dtype=torch.float64) if global_feature is None else global_feature[b].double()
        sequence, positions, origins = [], [], []
        t = 0
        while t < lengths[b]:
            if num_q is not None and image_mask is not None and bool(image_mask[b, t]):
                end = t
                while end + 1 < lengths[b] and bool(image_mask[b, end + 1]):
                    end += 1
                compressed = adaptor(list(embeds[b, t:end + 1]))
                for i in range(num_q - 1):
                    slot = end - (num_q - 1) + 1 + i
                    sequence.append(compressed[i])
                    positions.append(slot + position_offset)
                    origins.append(slot)
                g = compressed[-1]
                t = end + 1
            else:
                fused = linear(torch.cat((hidden[b, t], g)), "img_fc")
                sequence.append(linear(torch.cat((embeds[b, t], fused)), "fc"))
                positions.append(t + position_offset)
                origins.append(t)
                t += 1
        for slot, z in zip(origins, decoder(sequence, positions), strict=True):
            out[b, slot] = z
        g_after.append(g)
    return out, torch.stack(g_after)


def check_against_reference(model, hidden, embeds, image_mask, lengths, global_feature=None):
    length = hidden.shape[1]
    valid = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    out = model(hidden, embeds, image_mask, valid, global_feature=global_feature)
    expected, g_after = reference_forward(model, hidden, embeds, image_mask, lengths, global_feature)
    torch.testing.assert_close(out.hidden_states.double(), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.global_feature.double(), g_after, atol=ATOL, rtol=0)
    return out


# --------------------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("num_q", [2, 4])
def test_one_image_matches_reference(num_q):
    model = random_draft(tiny_config(), num_q=num_q)
    hidden, embeds = random_inputs(1, 16, 32)
    image = image_mask_from_runs(1, 16, {0: [(4, 10)]})
    out = check_against_reference(model, hidden, embeds, image, [16])
    dropped = out.layout.kind == DROPPED
    assert int(dropped.sum()) == 7 - (num_q - 1)
    assert (out.hidden_states[dropped] == 0).all()


@pytest.mark.parametrize("num_q", [2, 4])
def test_three_images_with_different_gaps_match_reference(num_q):
    # text gaps of 2, 7 and 4 slots between/after the images (the official code crashes on this prompt)
    model = random_draft(tiny_config(), num_q=num_q, seed=1)
    hidden, embeds = random_inputs(1, 34, 32, seed=1)
    image = image_mask_from_runs(1, 34, {0: [(2, 6), (9, 12), (20, 25)]})
    out = check_against_reference(model, hidden, embeds, image, [34])
    assert out.layout.images_per_row.tolist() == [3]


def test_batch_with_right_padding_matches_reference():
    # rows: 2 images; 1 image at slot 0 (its dropped slots come first); no image; 1 image ending the row
    model = random_draft(tiny_config(), num_q=2, seed=2)
    lengths = [22, 17, 12, 9]
    hidden, embeds = random_inputs(4, 22, 32, seed=2)
    image = image_mask_from_runs(4, 22, {0: [(3, 6), (12, 15)], 1: [(0, 4)], 3: [(4, 8)]})
    image[2, 14:] = True  # image bits in padding are ignored
    carried = torch.randn(4, 32, generator=torch.Generator().manual_seed(9))
    out = check_against_reference(model, hidden, embeds, image, lengths, global_feature=carried)
    for b, n in enumerate(lengths):
        assert (out.hidden_states[b, n:] == 0).all()
    assert torch.equal(out.global_feature[2], carried[2])  # no image: the carried-in g goes out


def test_grouped_query_attention_matches_reference():
    model = random_draft(tiny_config(num_key_value_heads=2, qkv_bias=False, bias=False), num_q=2, seed=3)
    assert "fc.bias" not in model.state_dict() and "layers.0.self_attn.q_proj.bias" not in model.state_dict()
    hidden, embeds = random_inputs(2, 14, 32, seed=3)
    image = image_mask_from_runs(2, 14, {0: [(2, 5)], 1: [(7, 9)]})
    check_against_reference(model, hidden, embeds, image, [14, 12])


def test_stage1_draft_treats_image_slots_as_text():
    model = random_draft(tiny_config(), num_q=None, seed=4)
    assert model.imadpt is None
    hidden, embeds = random_inputs(1, 12, 32, seed=4)
    image = image_mask_from_runs(1, 12, {0: [(3, 7)]})
    out = check_against_reference(model, hidden, embeds, image, [12])
    assert (out.hidden_states.abs().sum(-1) > 0).all()


@pytest.mark.parametrize("num_q", [2, 4])
def test_compressed_tokens_sit_at_the_last_slots_of_each_span(num_q):
    model = random_draft(tiny_config(), num_q=num_q, seed=5)
    hidden, embeds = random_inputs(1, 24, 32, seed=5)
    runs = [(2, 7), (12, 17)]
    image = image_mask_from_runs(1, 24, {0: runs})
    captured = {}

    def capture(_module, args):
        captured["x"] = args[0]  # the decoder layer's input [B, T, H]

    handle = model.layers[0].register_forward_pre_hook(capture)
    out = model(hidden, embeds, image)
    handle.remove()
    for first, last in runs:
        adapted = model.imadpt(embeds[:, first:last + 1])[0]  # [num_q, H]
        slots = list(range(last - num_q + 2, last + 1))
        assert out.layout.kind[0, slots].tolist() == [COMPRESSED] * (num_q - 1)
        assert (out.layout.kind[0, first:slots[0]] == DROPPED).all()
        torch.testing.assert_close(captured["x"][0, slots], adapted[:-1], atol=1e-6, rtol=0)
    torch.testing.assert_close(out.global_feature[0], model.imadpt(embeds[:, 12:18])[0, -1], atol=1e-6, rtol=0)


def test_adaptor_weights_change_outputs_after_an_image_only():
    model = random_draft(tiny_config(), num_q=2, seed=6)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.imadpt.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
    hidden, embeds = random_inputs(1, 20, 32, seed=6)
    image = image_mask_from_runs(1, 20, {0: [(6, 10)]})
    a = model(hidden, embeds, image).hidden_states[0]
    b = other(hidden, embeds, image).hidden_states[0]
    assert torch.equal(a[:6], b[:6])  # before the image: bit-identical
    assert (a[7:10] == 0).all() and (b[7:10] == 0).all()  # dropped
    change = (a[10:] - b[10:]).abs().amax(-1)
    assert (change > 1e-3).all(), change


def test_positions_beyond_max_position_embeddings():
    model = random_draft(tiny_config(max_position_embeddings=16), num_q=2, seed=8)
    hidden, embeds = random_inputs(1, 40, 32, seed=8)
    image = image_mask_from_runs(1, 40, {0: [(5, 12)]})
    check_against_reference(model, hidden, embeds, image, [40])
    # explicit positions far past the table the official code would have built
    offset = 5000
    positions = torch.arange(40)[None] + offset
    out = model(hidden, embeds, image, position_ids=positions)
    expected, _ = reference_forward(model, hidden, embeds, image, [40], position_offset=offset)
    torch.testing.assert_close(out.hidden_states.double(), expected, atol=ATOL, rtol=0)


def test_rotary_values_equal_an_official_table():
    head_dim, theta, size = 16, 1e6, 300
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.einsum("i,j->ij", torch.arange(size).float(), inv_freq)
    table = torch.cat((freqs, freqs), -1)
    cos, sin = rotary_cos_sin(torch.arange(size)[None], head_dim, theta, torch.float32)
    assert torch.equal(cos[0], table.cos()) and torch.equal(sin[0], table.sin())


def greedy_loop(model, hidden, embeds, image, k):
    """One row, unpadded: append (own output, embed(token)) slot by slot."""
    tokens = []
    for _ in range(k):
        out = model(hidden, embeds, image).hidden_states[:, -1]
        token = model.compute_logits(out).argmax(-1)
        tokens.append(int(token))
        hidden = torch.cat([hidden, out[:, None]], dim=1)
        embeds = torch.cat([embeds, model.embed_tokens(token)[:, None]], dim=1)
        image = torch.cat([image, torch.zeros(1, 1, dtype=torch.bool)], dim=1)
    return tokens


def test_propose_greedy_equals_step_by_step_loop():
    model = random_draft(tiny_config(), num_q=2, seed=10)
    lengths = [18, 11, 14]
    hidden, embeds = random_inputs(3, 18, 32, seed=10)
    image = image_mask_from_runs(3, 18, {0: [(2, 6), (9, 12)], 1: [(5, 10)]})  # row 1 ends on its image
    valid = torch.arange(18)[None, :] < torch.tensor(lengths)[:, None]
    drafts = model.propose_greedy(hidden, embeds, image, valid, num_speculative_tokens=4)
    assert drafts.shape == (3, 4) and drafts.dtype == torch.long
    with torch.no_grad():
        for b, n in enumerate(lengths):
            expected = greedy_loop(model, hidden[b:b + 1, :n], embeds[b:b + 1, :n], image[b:b + 1, :n], 4)
            assert drafts[b].tolist() == expected


def test_propose_greedy_rejects_left_padding():
    model = random_draft(tiny_config(), num_q=2)
    hidden, embeds = random_inputs(1, 5, 32)
    with pytest.raises(ValueError, match="right-padded"):
        model.propose_greedy(hidden, embeds, None, torch.tensor([[False, True, True, True, True]]), 2)


def test_compute_logits_needs_lm_head():
    model = ViSpecDraft(tiny_config(), num_q=2)
    with pytest.raises(RuntimeError, match="set_lm_head"):
        model.compute_logits(torch.zeros(1, 32))
    with pytest.raises(ValueError, match=r"expected \[61, 32\]"):
        model.set_lm_head(torch.zeros(60, 32))
    assert "lm_head_weight" not in model.state_dict()
