"""Bottleneck adapters: identity at init, placement per variant, gradients, parameter count."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama

from peftlab.core.methods.adapter import AdaptedOutput, BottleneckAdapter, apply_adapters
from peftlab.core.modelmap import build_model_map
from peftlab.core.params import count_params
from peftlab.errors import UserError

BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "bert": tiny_bert}


def _hidden(model, input_ids) -> torch.Tensor:
    """The last block's hidden state [B, T, d] (BERT's classification logits are tiny at random init)."""
    with torch.no_grad():
        return model(input_ids=input_ids, output_hidden_states=True).hidden_states[-1]


def _adapt(model, variant="houlsby", layers=None, bottleneck=8):
    model_map = build_model_map(model)
    model.requires_grad_(False)  # as prepare() does
    layers = list(range(model_map.n_layers)) if layers is None else layers
    return apply_adapters(model, model_map, layers, variant=variant, bottleneck=bottleneck, activation="gelu")


def test_bottleneck_adapter_is_identity_at_init():
    adapter = BottleneckAdapter(16, 4, "relu")
    h = torch.randn(2, 3, 16)
    assert torch.equal(adapter(h), h)
    assert sum(p.numel() for p in adapter.parameters()) == 2 * 16 * 4 + 4 + 16  # 2md + m + d (Houlsby 2.1)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_fresh_adapters_keep_the_base_output(family, input_ids):
    model = BUILDERS[family]()
    reference = _hidden(model, input_ids)
    wrapped = _adapt(model)
    assert all(isinstance(model.get_submodule(name), AdaptedOutput) for name in wrapped)
    assert torch.equal(_hidden(model, input_ids), reference)
    with torch.no_grad():
        for module in wrapped.values():
            torch.nn.init.normal_(module.adapter.up.weight, std=1.0)
    assert (_hidden(model, input_ids) - reference).abs().max() > 1e-2


def test_houlsby_and_pfeiffer_placement():
    houlsby = _adapt(tiny_gpt2(), "houlsby")
    assert sorted(houlsby) == sorted(f"transformer.h.{i}.{s}" for i in (0, 1) for s in ("attn.c_proj", "mlp.c_proj"))
    pfeiffer = _adapt(tiny_gpt2(), "pfeiffer", layers=[1])
    assert list(pfeiffer) == ["transformer.h.1.mlp.c_proj"]  # after the MLP output only
    llama = _adapt(tiny_llama(), "pfeiffer")
    assert list(llama) == [f"model.layers.{i}.mlp.down_proj" for i in range(3)]


def test_only_adapter_params_get_gradients(input_ids):
    model = tiny_bert()
    wrapped = _adapt(model, bottleneck=4)
    with torch.no_grad():
        for module in wrapped.values():
            torch.nn.init.normal_(module.adapter.up.weight, std=0.1)
    model(input_ids=input_ids).logits.pow(2).sum().backward()
    for name, parameter in model.named_parameters():
        assert (parameter.grad is not None) == (".adapter." in name), name
    d = model.config.hidden_size
    assert count_params(model)[0] == len(wrapped) * (2 * d * 4 + 4 + d)


def test_no_sites_in_layers_is_an_error():
    model = tiny_gpt2()
    model_map = build_model_map(model)
    with pytest.raises(UserError):
        apply_adapters(model, model_map, [7], variant="houlsby", bottleneck=4, activation="gelu")
    with pytest.raises(UserError):
        apply_adapters(model, model_map, [0], variant="parallel", bottleneck=4, activation="gelu")


def test_bf16_hidden_state_keeps_its_dtype():
    adapter = BottleneckAdapter(8, 2)
    torch.nn.init.normal_(adapter.up.weight)
    h = torch.randn(3, 8, dtype=torch.bfloat16)
    assert adapter(h).dtype == torch.bfloat16 and adapter.up.weight.dtype == torch.float32
