"""LoRALinear: zero init, merge, Conv1D layout, fused slices (GPT-2 blocks, NeoX strided), DoRA, gradients."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama, tiny_neox
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab.core.methods.lora import (
    LoRALinear,
    apply_lora,
    lora_modules,
    merge_lora,
    unload_lora,
    unmerge_lora,
    weight_as_out_in,
)
from peftlab.core.modelmap import LinearSite, build_model_map
from peftlab.core.params import count_params
from peftlab.core.placement import Target


def all_block_targets(model: nn.Module) -> list[Target]:
    """Every linear module inside the transformer blocks, fused ones whole."""
    return [Target(site) for site in build_model_map(model).block_sites()]


def _apply(model, targets, r=4, alpha=8.0, **kwargs) -> dict[str, LoRALinear]:
    model.requires_grad_(False)  # as prepare() does before applying a method
    return apply_lora(model, targets, {t.name: r for t in targets}, {t.name: alpha for t in targets}, **kwargs)


def _randomise(wrappers: dict[str, LoRALinear]) -> None:
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in wrappers.values():
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * 0.1)
            if module.magnitude is not None:
                module.magnitude.mul_(1 + 0.1 * torch.rand(module.magnitude.shape, generator=generator))


def _logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "bert": tiny_bert}


# --- zero init, merge ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(BUILDERS))
@pytest.mark.parametrize("dora", [False, True])
def test_zero_init_equals_base(family, dora, input_ids):
    model = BUILDERS[family]()
    reference = _logits(model, input_ids)
    targets = all_block_targets(model)
    wrappers = _apply(model, targets, dora=dora)
    assert len(wrappers) == len(targets)
    assert all(isinstance(model.get_submodule(name), LoRALinear) for name in wrappers)
    torch.testing.assert_close(_logits(model, input_ids), reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", sorted(BUILDERS))
@pytest.mark.parametrize("dora", [False, True])
def test_merge_equals_unmerged_and_is_idempotent(family, dora, input_ids):
    model = BUILDERS[family]()
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    wrappers = _apply(model, all_block_targets(model), dora=dora)
    _randomise(wrappers)
    unmerged = _logits(model, input_ids)
    reference = _logits(BUILDERS[family](), input_ids)
    assert (unmerged - reference).abs().max() > 0.01 * reference.abs().max()  # the update does something

    merge_lora(model)
    merged_weights = {name: m.base.weight.clone() for name, m in wrappers.items()}
    torch.testing.assert_close(_logits(model, input_ids), unmerged, atol=1e-5, rtol=0)
    merge_lora(model)  # a second merge must not add the update again
    for name, module in wrappers.items():
        assert module.merged
        assert torch.equal(module.base.weight, merged_weights[name])
    torch.testing.assert_close(_logits(model, input_ids), unmerged, atol=1e-5, rtol=0)

    unmerge_lora(model)
    unmerge_lora(model)
    torch.testing.assert_close(_logits(model, input_ids), unmerged, atol=1e-5, rtol=0)
    for name, module in wrappers.items():
        assert not module.merged
        assert torch.equal(module.base.weight, original[f"{name}.weight"])  # restored bit for bit


def test_eval_does_not_merge(input_ids):
    model = tiny_llama()
    wrappers = _apply(model, all_block_targets(model))
    _randomise(wrappers)
    model.train()
    model.eval()
    assert not any(module.merged for module in wrappers.values())


@pytest.mark.parametrize("merge", [True, False])
def test_unload(merge, input_ids):
    model = tiny_gpt2()
    reference = _logits(model, input_ids)
    wrappers = _apply(model, all_block_targets(model), dora=True)
    _randomise(wrappers)
    adapted = _logits(model, input_ids)
    unload_lora(model, merge=merge)
    assert not lora_modules(model)
    assert type(model.transformer.h[0].attn.c_attn) is Conv1D
    expected = adapted if merge else reference
    torch.testing.assert_close(_logits(model, input_ids), expected, atol=1e-5, rtol=0)


def test_delta_weight_matches_forward_difference():
    model = tiny_llama()
    target = Target(build_model_map(model).by_name()["model.layers.0.mlp.up_proj"])
    module = _apply(model, [target])[target.name]
    _randomise({target.name: module})
    x = torch.randn(5, module.in_features)
    delta = module.delta_weight()
    assert delta.shape == (module.out_features, module.in_features)
    torch.testing.assert_close(module(x) - module.base(x), x @ delta.T, atol=1e-5, rtol=0)


# --- Conv1D layout ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("slices", [None, ("q", "v")])
def test_conv1d_matches_equivalent_linear(dora, slices):
    torch.manual_seed(0)
    conv = Conv1D(12, 8)  # nf=12 outputs, nx=8 inputs; weight [8, 12]
    nn.init.normal_(conv.bias)
    linear = nn.Linear(8, 12)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    assert torch.equal(weight_as_out_in(conv), weight_as_out_in(linear))
    qkv = {"q": ((0, 4),), "k": ((4, 4),), "v": ((8, 4),)}
    wrapped = []
    for base, is_conv in ((conv, True), (linear, False)):
        site = LinearSite("layer", 0, "attn_qkv", 8, 12, is_conv, qkv)
        wrapped.append(LoRALinear(base, Target(site, slices), r=2, alpha=4.0, dora=dora))
    on_conv, on_linear = wrapped
    with torch.no_grad():
        on_linear.lora_A.copy_(on_conv.lora_A)
        for module in wrapped:
            module.lora_B.copy_(torch.arange(module.lora_B.numel()).view_as(module.lora_B) * 0.05)
    x = torch.randn(3, 8)
    torch.testing.assert_close(on_conv(x), on_linear(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(on_conv.delta_weight(), on_linear.delta_weight())
    for module in wrapped:
        module.merge()
    torch.testing.assert_close(conv.weight.T, linear.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(on_conv(x), on_linear(x), atol=1e-5, rtol=0)


# --- fused slices ------------------------------------------------------------------------------------


def _rows_changed(module: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """Bool [out]: which output features differ from the base layer's."""
    with torch.no_grad():
        return (module(x) != module.base(x)).flatten(0, -2).any(dim=0)


@pytest.mark.parametrize("dora", [False, True])
def test_gpt2_c_attn_q_v_slices(dora, input_ids):
    model = tiny_gpt2()
    n_embd = model.config.n_embd
    site = build_model_map(model).by_name()["transformer.h.0.attn.c_attn"]
    r = 4
    module = _apply(model, [Target(site, ("q", "v"))], r=r, dora=dora)[site.name]
    lora_params = module.lora_A.numel() + module.lora_B.numel()
    assert lora_params == r * (n_embd + 2 * n_embd)
    assert count_params(model)[0] == lora_params + (2 * n_embd if dora else 0)
    if dora:
        assert module.magnitude.shape == (2 * n_embd,)  # one magnitude per adapted row
    _randomise({site.name: module})
    changed = _rows_changed(module, torch.randn(2, 5, n_embd))
    assert changed[:n_embd].all() and changed[2 * n_embd:].all()
    assert not changed[n_embd:2 * n_embd].any()  # k rows identical to base
    model(input_ids=input_ids)  # the whole model still runs


@pytest.mark.parametrize("dora", [False, True])
def test_neox_strided_v_slice(dora):
    model = tiny_neox()
    site = build_model_map(model).by_name()["gpt_neox.layers.1.attention.query_key_value"]
    module = _apply(model, [Target(site, ("v",))], r=2, dora=dora)[site.name]
    heads, head_dim = model.config.num_attention_heads, site.out_features // (3 * model.config.num_attention_heads)
    v_rows = torch.tensor([h * 3 * head_dim + 2 * head_dim + d for h in range(heads) for d in range(head_dim)])
    assert torch.equal(module.out_index, v_rows)  # interleaved, not one block
    assert module.lora_B.shape == (heads * head_dim, 2)
    _randomise({site.name: module})
    changed = _rows_changed(module, torch.randn(4, site.in_features))
    expected = torch.zeros(site.out_features, dtype=torch.bool)
    expected[v_rows] = True
    assert torch.equal(changed, expected)
    # merge writes only the v rows too
    before = module.base.weight.clone()
    x = torch.randn(4, site.in_features)
    unmerged = module(x)
    module.merge()
    changed_rows = (module.base.weight != before).any(dim=1)
    assert not changed_rows[~expected].any()
    torch.testing.assert_close(module(x), unmerged, atol=1e-5, rtol=0)


def test_slice_delta_weight_is_zero_outside_slices():
    model = tiny_gpt2()
    site = build_model_map(model).by_name()["transformer.h.1.attn.c_attn"]
    module = _apply(model, [Target(site, ("v", "q"))])[site.name]
    _randomise({site.name: module})
    delta = module.delta_weight()
    n = model.config.n_embd
    assert delta.shape == (3 * n, n)
    assert torch.count_nonzero(delta[n:2 * n]) == 0
    assert torch.count_nonzero(delta[:n]) > 0 and torch.count_nonzero(delta[2 * n:]) > 0


# --- scaling, dropout, dtype ------------------------------------------------------------------------


@pytest.mark.parametrize("rslora", [False, True])
def test_scaling(rslora):
    model = tiny_llama()
    (module,) = _apply(model, all_block_targets(model)[:1], r=4, alpha=8.0, rslora=rslora).values()
    assert module.scaling == pytest.approx(8.0 / (math.sqrt(4) if rslora else 4))
    assert module.r == 4 and module.alpha == 8.0


def test_dropout_only_on_lora_input():
    model = tiny_llama()
    target = all_block_targets(model)[0]
    module = _apply(model, [target], dropout=0.5)[target.name]
    module.train()
    x = torch.randn(6, module.in_features)
    torch.testing.assert_close(module(x), module.base(x))  # B = 0: dropout leaves the base path alone
    _randomise({target.name: module})
    torch.manual_seed(0)
    first = module(x)
    torch.manual_seed(1)
    assert not torch.equal(first, module(x))  # dropout is live in training
    module.eval()
    assert torch.equal(module(x), module(x))


def test_bf16_base_keeps_fp32_lora_params():
    model = tiny_llama().to(torch.bfloat16)
    wrappers = _apply(model, all_block_targets(model), dora=True)
    module = next(iter(wrappers.values()))
    assert module.lora_A.dtype == module.lora_B.dtype == module.magnitude.dtype == torch.float32
    x = torch.randn(2, 3, module.in_features, dtype=torch.bfloat16)
    assert module(x).dtype == torch.bfloat16


# --- gradients, counts, meta ------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_only_lora_params_get_gradients(family, input_ids):
    model = BUILDERS[family]()
    wrappers = _apply(model, all_block_targets(model), dora=family == "llama")
    _randomise(wrappers)  # with B = 0, A's gradient is exactly zero; still present, but make it real
    model(input_ids=input_ids).logits.float().pow(2).mean().backward()
    for name, parameter in model.named_parameters():
        is_lora = name.endswith(("lora_A", "lora_B", "magnitude"))
        assert (parameter.grad is not None) == is_lora, name
        if is_lora:
            assert parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_param_count_closed_form(family):
    model = BUILDERS[family]()
    _, total_before = count_params(model)
    targets = all_block_targets(model)
    ranks = {t.name: 2 + i % 3 for i, t in enumerate(targets)}
    model.requires_grad_(False)
    apply_lora(model, targets, ranks, {t.name: 16.0 for t in targets})
    expected = sum(ranks[t.name] * (t.site.in_features + t.adapted_out_features()) for t in targets)
    trainable, total = count_params(model)
    assert trainable == expected
    assert total == total_before + expected


def test_targets_absent_from_ranks_are_skipped():
    model = tiny_llama()
    targets = all_block_targets(model)
    kept = {t.name: 4 for t in targets if t.layer != 1}  # layer 1 got rank 0
    model.requires_grad_(False)
    wrappers = apply_lora(model, targets, kept, {name: 8.0 for name in kept})
    assert set(wrappers) == set(kept) == set(lora_modules(model))
    assert not isinstance(model.model.layers[1].self_attn.q_proj, LoRALinear)


def test_meta_device_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = tiny_llama().config
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**config.to_dict()))
    targets = all_block_targets(model)
    wrappers = _apply(model, targets, dora=True)
    module = next(iter(wrappers.values()))
    assert module.lora_A.is_meta and module.magnitude.is_meta
    expected = sum(4 * (t.site.in_features + t.site.out_features) + t.site.out_features for t in targets)
    assert count_params(model)[0] == expected


# --- parity with HF peft -----------------------------------------------------------------------------


@pytest.mark.parametrize("family,target_module", [("gpt2", "c_attn"), ("llama", "v_proj")])
@pytest.mark.parametrize("dora,rslora", [(False, False), (True, False), (False, True)])
def test_parity_with_peft(family, target_module, dora, rslora, input_ids):
    peft = pytest.importorskip("peft")
    ours = BUILDERS[family]()
    theirs = BUILDERS[family]()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=[target_module], use_dora=dora,
                             use_rslora=rslora, fan_in_fan_out=family == "gpt2", init_lora_weights=True)
    theirs = peft.get_peft_model(theirs, config)
    targets = [t for t in all_block_targets(ours) if t.name.endswith(target_module)]
    wrappers = _apply(ours, targets, r=4, alpha=8.0, dora=dora, rslora=rslora)
    _randomise(wrappers)
    for name, module in wrappers.items():
        layer = theirs.base_model.model.get_submodule(name)
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(module.lora_A)
            layer.lora_B["default"].weight.copy_(module.lora_B)
            if dora:
                layer.lora_magnitude_vector["default"].weight.copy_(module.magnitude)
    torch.testing.assert_close(_logits(ours, input_ids), _logits(theirs, input_ids), atol=1e-5, rtol=0)
