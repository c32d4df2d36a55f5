"""LoRADropout: nn.Dropout's distribution and gradient, drawn by uniform_ on the CPU."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_llama
from torch import nn
from torch.utils.checkpoint import checkpoint

from peftlab.core.methods.dropout import LoRADropout, keep_mask
from peftlab.core.methods.lora import LoRALinear, apply_lora
from peftlab.core.modelmap import build_model_map
from peftlab.core.placement import Target


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_drop_rate_and_scale_are_nn_dropouts(p: float):
    torch.manual_seed(0)
    n = 2_000_000
    out = LoRADropout(p).train()(torch.ones(n))
    dropped = (out == 0).double().mean().item()
    # a binomial's share lies within 6 standard deviations of p (p' is within 2^-17 of p)
    assert abs(dropped - p) < 6 * math.sqrt(p * (1 - p) / n) + 2**-17
    kept = out[out != 0]
    p_used = round(p * 2**16) / 2**16
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - p_used)))  # inverted dropout's scale
    assert abs(out.double().mean().item() - 1) < 6 * math.sqrt(p / (1 - p) / n)  # unbiased


def test_every_16_bit_field_of_a_draw_drops_at_p():
    """Each 64-bit draw feeds four neighbouring entries: each of the four must drop at p (a field that
    lost its sign bit, say, would drop half as often or never)."""
    torch.manual_seed(1)
    keep, p_used = keep_mask(torch.Size([400_000, 4]), 0.3, torch.device("cpu"))
    assert p_used == round(0.3 * 2**16) / 2**16
    shares = 1 - keep.double().mean(dim=0)
    assert (shares - 0.3).abs().max().item() < 6 * math.sqrt(0.3 * 0.7 / 400_000)
    # neighbours are independent: both dropped as often as p^2
    both = (~keep[:, 0] & ~keep[:, 1]).double().mean().item()
    assert abs(both - 0.09) < 6 * math.sqrt(0.09 * 0.91 / 400_000)


@pytest.mark.parametrize("p, p_used", [(0.0, 0.0), (1e-7, 0.0), (0.999999, 1 - 2**-16)])
def test_extreme_rates_keep_a_finite_scale(p: float, p_used: float):
    keep, used = keep_mask(torch.Size([1000]), p, torch.device("cpu"))
    assert used == p_used and keep.shape == (1000,)
    assert torch.isfinite(LoRADropout(p).train()(torch.ones(1000))).all()


def test_backward_applies_the_forward_mask():
    torch.manual_seed(1)
    x = torch.randn(64, 48, requires_grad=True)
    upstream = torch.randn(64, 48)
    out = LoRADropout(0.3).train()(x)
    out.backward(upstream)
    keep = out.detach() != 0
    torch.testing.assert_close(x.grad, upstream * keep / (1 - round(0.3 * 2**16) / 2**16))


def test_gradient_matches_autograd_of_the_same_mask():
    torch.manual_seed(2)
    x = torch.randn(32, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_reseeded, (x,))


def _reseeded(t: torch.Tensor) -> torch.Tensor:
    """The dropout with the generator reset on every call, so gradcheck's repeated calls see one mask."""
    torch.manual_seed(4)
    return LoRADropout(0.2).train()(t)


def test_eval_mode_and_zero_p_are_the_identity():
    x = torch.randn(8, 8)
    assert torch.equal(LoRADropout(0.5).eval()(x), x)
    assert torch.equal(LoRADropout(0.0).train()(x), x)


def test_seeded_runs_repeat_and_the_module_is_an_nn_dropout():
    layer = LoRADropout(0.1).train()
    torch.manual_seed(5)
    first = layer(torch.ones(100, 100))
    torch.manual_seed(5)
    assert torch.equal(first, layer(torch.ones(100, 100)))
    assert isinstance(layer, nn.Dropout) and layer.p == 0.1  # the peft export reads .p from an nn.Dropout


def test_gradient_checkpointing_recomputes_the_same_mask():
    """checkpoint() restores the generator before recomputing, so the recomputed mask is the forward's."""
    layer = LoRADropout(0.5).train()
    linear = nn.Linear(16, 16)
    x = torch.randn(10, 16, requires_grad=True)
    torch.manual_seed(6)
    linear(layer(x)).sum().backward()
    plain = x.grad.clone()
    x.grad = None
    torch.manual_seed(6)
    checkpoint(lambda t: linear(layer(t)), x, use_reentrant=False).sum().backward()
    torch.testing.assert_close(x.grad, plain)


def test_lora_layers_use_it():
    model = tiny_llama()
    target = Target(build_model_map(model).block_sites()[0])
    module = apply_lora(model, [target], {target.name: 2}, {target.name: 4.0}, dropout=0.1)[target.name]
    assert isinstance(module, LoRALinear) and type(module.dropout) is LoRADropout


def _trained_lora_output(dora: bool) -> tuple[LoRALinear, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a LoRA layer with dropout 0.25 and a nonzero B, its input x, its training output on x, the
    textbook dropout(x) on the same mask: x * keep / (1 - p'))."""
    model = tiny_llama()
    target = Target(build_model_map(model).block_sites()[0])
    module = apply_lora(model, [target], {target.name: 2}, {target.name: 4.0}, dropout=0.25, dora=dora)[target.name]
    nn.init.normal_(module.lora_B)
    module.train()
    x = torch.randn(3, 5, module.in_features)
    torch.manual_seed(7)
    out = module(x)
    torch.manual_seed(7)  # the same draws again
    keep, p_used = keep_mask(x.shape, 0.25, x.device)
    return module, x, out, x * keep / (1 - p_used)


def test_lora_forward_is_base_plus_scaled_update_of_the_dropped_input():
    """The scale rides on x A^T, not on x: the output equals the textbook formula on the same mask."""
    module, x, out, dropped = _trained_lora_output(dora=False)
    expected = module.base(x) + dropped @ module.lora_A.T @ module.lora_B.T * module.scaling
    torch.testing.assert_close(out, expected)


def test_dora_with_dropout_sees_the_scaled_dropped_input_in_both_terms():
    """DoRA adds (scale - 1) W dropout(x) + scale * dW dropout(x) (peft's form); dropout(x) carries 1/(1-p')."""
    module, x, out, dropped = _trained_lora_output(dora=True)
    weight = module.base.weight
    delta = module.lora_B @ module.lora_A * module.scaling
    scale = module.magnitude / (weight + delta).norm(dim=1).detach()
    expected = module.base(x) + (scale - 1) * (dropped @ weight.T) + scale * (dropped @ delta.T)
    torch.testing.assert_close(out, expected)
