"""prepare(): freeze all, then exactly the method's parameters (and the head if asked) train."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama
from transformers import BertConfig, BertModel, LlamaForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

from peftlab.config import MethodConfig, RankConfig
from peftlab.core.methods import Prepared, prepare
from peftlab.core.methods.lora import LoRALinear
from peftlab.core.modelmap import build_model_map
from peftlab.core.params import count_params
from peftlab.errors import UserError


def _prepare(model, task_head=False, **method) -> Prepared:
    """prepare() with MethodConfig(**method); ``task_head`` is prepare's own train_head (classification)."""
    return prepare(model, MethodConfig(**method), build_model_map(model), train_head=task_head)


def _trainable(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def _grads_after_backward(model, input_ids) -> set[str]:
    output = model(input_ids=input_ids).logits
    output.float().pow(2).mean().backward()
    return {name for name, p in model.named_parameters() if p.grad is not None}


def test_lora_qv_only_on_gpt2_fused_c_attn(input_ids):
    model = tiny_gpt2()
    prepared = _prepare(model, name="lora", placement="qv_only", ranks=RankConfig(r=4), alpha=8.0)
    n = model.config.n_embd
    assert [t.name for t in prepared.targets] == [f"transformer.h.{i}.attn.c_attn" for i in (0, 1)]
    assert all(t.slices == ("q", "v") for t in prepared.targets)
    assert prepared.ranks == {t.name: 4 for t in prepared.targets}
    assert prepared.alphas == {t.name: 8.0 for t in prepared.targets}
    assert prepared.trainable_params == 2 * 4 * (n + 2 * n)  # r * (d_in + adapted d_out) per layer
    assert (prepared.trainable_params, prepared.total_params) == count_params(model)
    assert prepared.percent_trainable == pytest.approx(100 * prepared.trainable_params / prepared.total_params)
    # LoRA gets its gradient through the whole model; nothing else does (the tied lm_head stays frozen).
    assert _trainable(model) == _grads_after_backward(model, input_ids)
    assert all(name.endswith(("lora_A", "lora_B")) for name in _trainable(model))


def test_lora_on_bert_classification_trains_lora_and_head(input_ids):
    model = tiny_bert()
    model_map = build_model_map(model)
    prepared = prepare(model, MethodConfig(name="lora", placement="attention_only", dora=True), model_map,
                       train_head=True)
    trainable = _trainable(model)
    heads = tuple(f"{head}." for head in model_map.head_names)
    assert {n for n in trainable if not n.startswith(heads)} == {
        f"{t.name}.{p}" for t in prepared.targets for p in ("lora_A", "lora_B", "magnitude")}
    assert any(n.startswith("classifier.") for n in trainable)
    assert _grads_after_backward(model, input_ids) == trainable


def test_rank_zero_layers_are_left_out():
    model = tiny_llama()
    ranks = RankConfig(schedule="custom", layer_ranks=[2, 0, 4])
    prepared = _prepare(model, name="lora", placement="mlp_only", ranks=ranks)
    assert {t.layer for t in prepared.targets} == {0, 2}
    assert set(prepared.ranks) == {t.name for t in prepared.targets} == set(prepared.alphas)
    assert not isinstance(model.model.layers[1].mlp.up_proj, LoRALinear)
    expected = sum(prepared.ranks[t.name] * (t.site.in_features + t.adapted_out_features()) for t in prepared.targets)
    assert prepared.trainable_params == expected


def test_adapter_houlsby(input_ids):
    model = tiny_gpt2()
    prepared = _prepare(model, name="adapter", bottleneck=4, layers="last_half")
    assert [t.name for t in prepared.targets] == ["transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj"]
    d = model.config.n_embd
    assert prepared.trainable_params == 2 * (2 * d * 4 + 4 + d)
    assert prepared.ranks == {} and prepared.alphas == {}
    assert all(".adapter." in name for name in _trainable(model))


def test_partial_last_block_and_head(input_ids):
    model = tiny_bert()
    model_map = build_model_map(model)
    prepared = prepare(model, MethodConfig(name="partial", last_n=1), model_map, train_head=True)
    prefixes = ("bert.encoder.layer.1.", *(f"{head}." for head in model_map.head_names))
    expected = {n for n, _ in model.named_parameters() if n.startswith(prefixes)}
    assert _trainable(model) == expected
    assert _grads_after_backward(model, input_ids) == expected
    assert prepared.targets == [] and prepared.ranks == {}


def test_partial_bitfit_without_head(input_ids):
    model = tiny_bert()
    _prepare(model, name="partial", bitfit=True, train_head=False)  # MethodConfig.train_head
    biases = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert _trainable(model) == biases
    assert _grads_after_backward(model, input_ids) == biases


def test_full_and_prepare_freezes_first():
    model = tiny_gpt2()
    prepared = _prepare(model, name="full")
    assert prepared.trainable_params == prepared.total_params
    # a model that arrives fully trainable is frozen before the method's own params are switched on
    prepared = _prepare(model, name="lora", placement="attention_only")
    assert all(name.endswith(("lora_A", "lora_B")) for name in _trainable(model))


def test_meta_device_counts_without_allocating():
    real = tiny_llama()
    expected = _prepare(real, name="lora", placement="all_linear", dora=True)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(real.config)
    prepared = _prepare(skeleton, name="lora", placement="all_linear", dora=True)
    assert all(p.is_meta for p in skeleton.parameters())
    assert (prepared.trainable_params, prepared.total_params) == (expected.trainable_params, expected.total_params)


# --- the budget schedule pays for everything the method trains ------------------------------------

BUDGET_CASES = {
    # DoRA: one magnitude per adapted row on top of A and B (mlp_in rows outnumber inputs 2:1)
    "dora": (tiny_llama, False, {"targets": ["mlp_in"], "dora": True}),
    # classification: the head (BERT's classifier and pooler) trains too
    "head": (tiny_bert, True, {"placement": "attention_only"}),
    # a causal LM's lm_head trained by choice
    "train_head": (tiny_llama, False, {"placement": "attention_only", "train_head": True}),
}


@pytest.mark.parametrize("case", sorted(BUDGET_CASES))
def test_budget_picks_the_rank_whose_real_trainable_count_is_closest(case):
    build, task_head, method = BUDGET_CASES[case]
    real = {r: _prepare(build(), task_head, name="lora", ranks=RankConfig(r=r), **method).trainable_params
            for r in (2, 3, 4, 5, 6)}
    budget = real[3] + 1  # r = 3 is off by 1; every other rank is farther, by a whole rank's cost or more
    prepared = _prepare(build(), task_head, name="lora", ranks=RankConfig(schedule="budget", budget=budget), **method)
    assert set(prepared.ranks.values()) == {3}
    assert prepared.trainable_params == real[3]


# --- scalar gates, heads ------------------------------------------------------------------------


@pytest.mark.parametrize("placement", ["all_linear", "mlp_only"])
def test_qwen2_moe_named_placements_leave_the_scalar_gate_alone(placement):
    config = Qwen2MoeConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(config)
    prepared = _prepare(model, name="lora", placement=placement, ranks=RankConfig(r=8))
    names = {t.name.split(".", 3)[3] for t in prepared.targets}
    assert "mlp.shared_expert_gate" not in names
    assert {"mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj"} <= names
    assert set(prepared.ranks.values()) == {8}
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[3, 4, 5]])).logits.isfinite().all()


def test_training_a_head_that_is_not_there_is_refused():
    encoder = BertModel(BertConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                   num_attention_heads=4, vocab_size=100))
    with pytest.raises(UserError, match="no head was found in this model"):
        _prepare(encoder, True, name="lora", placement="attention_only")
