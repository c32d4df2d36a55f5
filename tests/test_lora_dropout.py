"""LoRADropout: the cheaper CPU mask draws nn.Dropout's distribution and gradients flow as through it."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_llama
from torch import nn

from peftlab.config import MethodConfig, RankConfig
from peftlab.core.methods import prepare
from peftlab.core.methods.lora import LoRADropout, LoRALinear
from peftlab.core.modelmap import build_model_map

N = 1_000_000  # elements per draw: the standard error of a keep fraction is sqrt(p (1 - p) / N) <= 5e-4


def _drawn(module: nn.Module, shape=(1000, 1000), seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return module.train()(torch.ones(shape))


@pytest.mark.parametrize("p", [0.05, 0.1, 0.3, 0.5])
def test_mask_keeps_each_element_with_probability_one_minus_p_and_scales_kept_ones(p):
    out = _drawn(LoRADropout(p))
    zero_fraction = float((out == 0).float().mean())
    assert abs(zero_fraction - p) < 5 * math.sqrt(p * (1 - p) / N)
    assert torch.allclose(out[out != 0], torch.tensor(1 / (1 - p)))  # inverted dropout: E[out] = x
    # Moments of out = keep / (1 - p), keep ~ Bernoulli(q = 1 - p): mean 1, variance p / (1 - p); the
    # sample variance's standard error is s^2 sqrt(pq (1 - 4pq) / N) with s = 1 / q. nn.Dropout alike.
    q, variance = 1 - p, p / (1 - p)
    variance_error = math.sqrt(p * q * (1 - 4 * p * q) / N) / q**2
    for module in (LoRADropout(p), nn.Dropout(p)):
        draws = _drawn(module, seed=1).flatten().double()
        assert abs(float(draws.mean()) - 1) < 5 * math.sqrt(variance / N)
        assert abs(float(draws.var()) - variance) < 5 * variance_error + 10 / N  # (p = 0.5: first-order error 0)


def test_mask_elements_are_independent_within_and_across_calls():
    dropout = LoRADropout(0.3)
    torch.manual_seed(2)
    first, second = (dropout.train()(torch.ones(1000, 1000)) != 0 for _ in range(2))
    keep = first.float().flatten()
    bound = 5 / math.sqrt(N)  # correlation of independent draws: standard error 1 / sqrt(N)
    neighbours = torch.corrcoef(torch.stack([keep[:-1], keep[1:]]))[0, 1]  # along a row and across row ends
    rows = torch.corrcoef(torch.stack([first[:-1].float().flatten(), first[1:].float().flatten()]))[0, 1]
    calls = torch.corrcoef(torch.stack([keep, second.float().flatten()]))[0, 1]  # two modules, one input
    assert abs(float(neighbours)) < bound and abs(float(rows)) < bound and abs(float(calls)) < bound
    assert not torch.equal(first, second)


def test_gradient_is_the_mask_times_the_scale_as_through_nn_dropout():
    torch.manual_seed(3)
    x, upstream = torch.randn(64, 48), torch.randn(64, 48)
    for module in (LoRADropout(0.2), nn.Dropout(0.2)):
        leaf = x.clone().requires_grad_()
        out = module.train()(leaf)
        out.backward(upstream)
        keep = out.detach() != 0  # x is never exactly 0
        torch.testing.assert_close(out.detach(), x * keep / 0.8)  # kept elements scaled by 1 / (1 - p)
        torch.testing.assert_close(leaf.grad, upstream * keep / 0.8)


def test_mask_kept_for_backward_is_one_byte_per_element():
    saved = []
    x = torch.randn(32, 16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        LoRADropout(0.1).train()(x)
    assert saved and all(t.dtype == torch.bool for t in saved)  # nn.Dropout's CPU path keeps a float mask


def test_eval_mode_and_zero_p_are_the_identity_and_a_seed_gives_the_same_mask():
    x = torch.randn(8, 8)
    assert LoRADropout(0.5).eval()(x) is x
    off = LoRADropout(0.5).train()
    off.p = 0.0  # tests elsewhere switch dropout off this way
    assert off(x) is x
    torch.testing.assert_close(_drawn(LoRADropout(0.4), (50, 50), seed=7), _drawn(LoRADropout(0.4), (50, 50), seed=7))


def test_lora_layers_use_it_and_training_gradients_reach_a_and_b():
    model = tiny_llama()
    prepare(model, MethodConfig(name="lora", ranks=RankConfig(r=4), alpha=8, dropout=0.1, train_head=False),
            build_model_map(model), train_head=False)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert layers and all(isinstance(m.dropout, LoRADropout) and m.dropout.p == 0.1 for m in layers)
    with torch.no_grad():
        for layer in layers:
            layer.lora_B.normal_(0, 0.1)
    model.train()
    torch.manual_seed(0)
    model(input_ids=torch.randint(3, 100, (2, 12)), labels=torch.randint(3, 100, (2, 12))).loss.backward()
    assert all(m.lora_A.grad is not None and m.lora_A.grad.abs().sum() > 0 for m in layers)
