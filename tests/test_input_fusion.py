"""The vLLM draft's folded input fusion equals the official fc([e ; img_fc([h ; g])])."""

import pytest
import torch

from vispec_vllm.engine.draft_model import ViSpecModel


@pytest.mark.parametrize("bias", [True, False])
def test_folded_fusion_equals_the_official_two_linears(bias):
    torch.manual_seed(0)
    hidden, tokens = 16, 5
    fc = torch.nn.Linear(2 * hidden, hidden, bias=bias).double()
    img_fc = torch.nn.Linear(2 * hidden, hidden, bias=bias).double()
    state = {"fc.weight": fc.weight.detach().clone(), "img_fc.weight": img_fc.weight.detach().clone()}
    if bias:
        state |= {"fc.bias": fc.bias.detach().clone(), "img_fc.bias": img_fc.bias.detach().clone()}
    ViSpecModel.fold_input_fusion(state, hidden)
    assert set(state) == {"fused_fc.weight", "global_proj.weight"} | ({"fused_fc.bias"} if bias else set())

    e, h, g = (torch.randn(tokens, hidden, dtype=torch.float64) for _ in range(3))
    official = fc(torch.cat([e, img_fc(torch.cat([h, g], dim=-1))], dim=-1))
    fused = torch.nn.functional.linear(torch.cat([e, h], dim=-1), state["fused_fc.weight"], state.get("fused_fc.bias"))
    folded = fused + g @ state["global_proj.weight"].T
    torch.testing.assert_close(folded, official, rtol=1e-12, atol=1e-12)
    # g = 0 (no image yet) needs no global term at all
    official_no_image = fc(torch.cat([e, img_fc(torch.cat([h, torch.zeros_like(g)], dim=-1))], dim=-1))
    torch.testing.assert_close(fused, official_no_image, rtol=1e-12, atol=1e-12)


def test_a_stage1_checkpoint_without_img_fc_folds_to_its_own_fc():
    torch.manual_seed(0)
    hidden = 8
    fc_weight, fc_bias = torch.randn(hidden, 2 * hidden), torch.randn(hidden)
    state = {"fc.weight": fc_weight.clone(), "fc.bias": fc_bias.clone()}
    ViSpecModel.fold_input_fusion(state, hidden)
    torch.testing.assert_close(state["fused_fc.weight"], fc_weight.double(), rtol=0, atol=0)
    torch.testing.assert_close(state["fused_fc.bias"], fc_bias.double(), rtol=0, atol=0)
    assert not state["global_proj.weight"].any()
