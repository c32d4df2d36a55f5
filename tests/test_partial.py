"""Partial fine-tuning: last-N blocks, BitFit, head; full fine-tuning."""

from __future__ import annotations

import pytest
from conftest import tiny_bert, tiny_gpt2, tiny_llama

from peftlab.core.methods.partial import apply_full, apply_partial, set_head_trainable
from peftlab.core.modelmap import build_model_map
from peftlab.core.params import count_params
from peftlab.errors import UserError


def _trainable(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def _partial(model, *, train_head: bool, **kwargs):
    model_map = build_model_map(model)
    model.requires_grad_(False)  # as prepare() does, and it sets the head trainable first
    if train_head:
        set_head_trainable(model, model_map)
    apply_partial(model, model_map, **kwargs)
    return model_map


def test_last_block_and_head(input_ids):
    model = tiny_bert()
    model_map = _partial(model, last_n=1, bitfit=False, train_head=True)
    prefixes = ("bert.encoder.layer.1.", *(f"{head}." for head in model_map.head_names))
    expected = {n for n, _ in model.named_parameters() if n.startswith(prefixes)}
    assert any(n.startswith("classifier.") for n in expected)
    assert _trainable(model) == expected
    model(input_ids=input_ids).logits.pow(2).sum().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == expected


def test_last_n_without_head():
    model = tiny_llama()
    _partial(model, last_n=2, bitfit=False, train_head=False)
    assert _trainable(model) == {n for n, _ in model.named_parameters()
                                 if n.startswith(("model.layers.1.", "model.layers.2."))}


def test_bitfit_trains_biases_only(input_ids):
    model = tiny_bert()
    _partial(model, last_n=0, bitfit=True, train_head=False)
    biases = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert _trainable(model) == biases
    model(input_ids=input_ids).logits.pow(2).sum().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == biases


def test_bitfit_without_biases_is_an_error():
    with pytest.raises(UserError, match="no bias"):
        _partial(tiny_llama(), last_n=0, bitfit=True, train_head=False)


def test_last_n_above_n_layers_is_an_error():
    with pytest.raises(UserError, match="last_n=3"):
        _partial(tiny_gpt2(), last_n=3, bitfit=False, train_head=False)


def test_full():
    model = tiny_gpt2()
    model.requires_grad_(False)
    apply_full(model)
    trainable, total = count_params(model)
    assert trainable == total == sum(p.numel() for p in model.parameters())


def test_count_params_dedups_tied_weights():
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    unique = {id(p): p.numel() for m in model.modules() for p in m.parameters(recurse=False)}
    assert count_params(model)[1] == sum(unique.values())
    assert count_params(model)[1] < sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))


def test_last_blocks_of_an_encoder_decoder_are_the_decoder_s():
    """Layers number through the encoder stack, then the decoder's: the last two are decoder blocks 1-2."""
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=3,
                                                num_heads=4, vocab_size=50))
    _partial(model, last_n=2, bitfit=False, train_head=False)
    assert {name.split(".layer.")[0] for name in _trainable(model)} == {"decoder.block.1", "decoder.block.2"}
