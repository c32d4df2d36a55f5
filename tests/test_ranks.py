"""Rank schedules with exact expected values, the budget search, rank limits, alphas, the LoRA formula."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_gpt2, tiny_llama

from peftlab.config import RankConfig
from peftlab.core.modelmap import LinearSite, build_model_map
from peftlab.core.placement import Target, select_targets
from peftlab.core.ranks import allocate_ranks, alphas_for, budget_rank, lora_param_count, rank_limit
from peftlab.errors import UserError

# Seed 002 (DialoGPT-medium, 24 layers): rank_i = max(4, 16 - (16-4) * i / (24-1)), to the nearest int.
SEED_002_LINEAR_DECAY = [16, 15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8, 7, 7, 6, 6, 5, 5, 4]


def _layered_targets(n_layers: int, roles=("attn_qkv", "mlp_out"), width: int = 64) -> list[Target]:
    """Synthetic targets, one per role per layer: ranks depend only on layer and role."""
    return [Target(LinearSite(f"h.{i}.{role}", i, role, width, width)) for i in range(n_layers) for role in roles]


def _per_layer(ranks: dict[str, int], role: str = "attn_qkv") -> list[int]:
    return [r for name, r in ranks.items() if name.endswith("." + role)]


@pytest.fixture(scope="module")
def llama_targets() -> list[Target]:
    return select_targets(build_model_map(tiny_llama()), "all_linear")


# --- the parameter formula ---------------------------------------------------------------------

def test_lora_param_count_closed_form():
    gpt2 = build_model_map(tiny_gpt2()).by_name()
    c_attn = gpt2["transformer.h.0.attn.c_attn"]  # Conv1D 32 -> 96
    assert lora_param_count(Target(c_attn), 8) == 8 * (32 + 96)
    assert lora_param_count(Target(c_attn, ("q", "v")), 8) == 8 * (32 + 64)  # B covers adapted rows only
    c_fc = gpt2["transformer.h.0.mlp.c_fc"]  # 32 -> 128
    assert lora_param_count(Target(c_fc), 4) == 4 * (32 + 128)
    # DoRA adds one magnitude per adapted output row, whatever the rank
    assert lora_param_count(Target(c_attn, ("q", "v")), 8, dora=True) == 8 * (32 + 64) + 64


def test_budget_rank_counts_dora_magnitudes_and_fixed_parameters():
    targets = _layered_targets(2, width=10)  # per rank: 2 layers x 2 roles x 20 = 80; magnitudes: 40
    assert budget_rank(targets, 300) == 4  # 320 is 20 off, 240 is 60 off
    assert budget_rank(targets, 300, dora=True) == 3  # 40 + 3 * 80 = 280 is 20 off, 360 is 60 off
    assert budget_rank(targets, 300, fixed_params=200) == 1  # 200 + 80 = 280


def test_rank_limit_is_the_full_update_rank(llama_targets):
    k_proj = next(t for t in llama_targets if t.name == "model.layers.0.self_attn.k_proj")  # 32 -> 16
    assert rank_limit(k_proj) == 16


# --- schedules ---------------------------------------------------------------------------------

def test_uniform(llama_targets):
    ranks = allocate_ranks(llama_targets, RankConfig(schedule="uniform", r=4), 3)
    assert ranks == {t.name: 4 for t in llama_targets}
    assert list(ranks) == [t.name for t in llama_targets]


def test_linear_decay_matches_seed_002():
    ranks = allocate_ranks(_layered_targets(24), RankConfig(schedule="linear_decay", start=16, end=4), 24)
    assert _per_layer(ranks) == SEED_002_LINEAR_DECAY
    assert _per_layer(ranks, "mlp_out") == SEED_002_LINEAR_DECAY
    assert SEED_002_LINEAR_DECAY == [round(max(4, 16 - (16 - 4) * i / (24 - 1))) for i in range(24)]


def test_linear_decay_edges():
    assert _per_layer(allocate_ranks(_layered_targets(3), RankConfig(schedule="linear_decay", start=16, end=4), 3)) \
        == [16, 10, 4]
    assert _per_layer(allocate_ranks(_layered_targets(1), RankConfig(schedule="linear_decay"), 1)) == [16]
    ranks = _per_layer(allocate_ranks(_layered_targets(30), RankConfig(schedule="linear_decay", start=8, end=2), 30))
    assert ranks == sorted(ranks, reverse=True) and ranks[0] == 8 and ranks[-1] == 2 and min(ranks) == 2


def test_attention_heavy(llama_targets):
    ranks = allocate_ranks(llama_targets, RankConfig(schedule="attention_heavy", attention_r=16, mlp_r=8), 3)
    layer0 = {name.split(".", 3)[3]: r for name, r in ranks.items() if name.startswith("model.layers.0.")}
    assert layer0 == {"self_attn.q_proj": 16, "self_attn.k_proj": 16, "self_attn.v_proj": 16,
                      "self_attn.o_proj": 16, "mlp.gate_proj": 8, "mlp.up_proj": 8, "mlp.down_proj": 8}
    assert len(ranks) == len(llama_targets)


def test_empirical_thirds_24_layers_match_seed_002():
    # Seed 002: early 60%, middle 120%, late 100% of base rank 16 -> 10, 19, 16.
    ranks = allocate_ranks(_layered_targets(24), RankConfig(schedule="empirical", r=16), 24)
    assert _per_layer(ranks) == [10] * 8 + [19] * 8 + [16] * 8


def test_empirical_thirds_uneven_count():
    # 5 layers: early 3i < 5 -> {0, 1}; middle 3i < 10 -> {2, 3}; late {4}. 0.6*8=4.8, 1.2*8=9.6.
    ranks = allocate_ranks(_layered_targets(5), RankConfig(schedule="empirical", r=8), 5)
    assert _per_layer(ranks) == [5, 5, 10, 10, 8]
    tiny = allocate_ranks(_layered_targets(3), RankConfig(schedule="empirical", r=1, multipliers=[0.1, 2.5, 1]), 3)
    assert _per_layer(tiny) == [1, 3, 1]  # at least 1; 2.5 rounds half up


def test_custom_inline_rank_zero_drops_the_layer():
    spec = RankConfig(schedule="custom", layer_ranks=[8, 0, 4])
    ranks = allocate_ranks(_layered_targets(3), spec, 3)
    assert ranks == {"h.0.attn_qkv": 8, "h.0.mlp_out": 8, "h.2.attn_qkv": 4, "h.2.mlp_out": 4}


def test_custom_from_seed_002_json_file(tmp_path):
    layer_ranks = [16, 16, 14, 12, 10, 8, 8, 6, 6, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4]
    path = tmp_path / "my_strategy.json"
    path.write_text(json.dumps({"strategy_name": "front_loaded", "layer_ranks": layer_ranks}))
    ranks = allocate_ranks(_layered_targets(24), RankConfig(schedule="custom", file=str(path)), 24)
    assert _per_layer(ranks) == layer_ranks


def test_custom_wrong_length_is_refused(tmp_path):
    with pytest.raises(UserError, match="gives 2 ranks but the model has 3 layers"):
        allocate_ranks(_layered_targets(3), RankConfig(schedule="custom", layer_ranks=[8, 8]), 3)
    path = tmp_path / "ranks.json"
    path.write_text(json.dumps({"layer_ranks": [8] * 4}))
    with pytest.raises(UserError, match="ranks.json gives 4 ranks but the model has 3 layers"):
        allocate_ranks(_layered_targets(3), RankConfig(schedule="custom", file=str(path)), 3)


@pytest.mark.parametrize("content,message", [
    (None, "not found"),
    ("{not json", "not valid JSON"),
    (json.dumps([8, 8, 8]), "must hold"),
    (json.dumps({"layer_ranks": [8, -1, 8]}), "must hold"),
    (json.dumps({"layer_ranks": [8, 2.5, 8]}), "must hold"),
])
def test_custom_bad_file_is_refused(tmp_path, content, message):
    path = tmp_path / "ranks.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message):
        allocate_ranks(_layered_targets(3), RankConfig(schedule="custom", file=str(path)), 3)


# --- budget ----------------------------------------------------------------------------------------

def test_budget_lands_closest(llama_targets):
    per_rank = sum(lora_param_count(t, 1) for t in llama_targets)
    # per layer: q, o (32+32); k, v (32+16); gate, up (32+64); down (64+32)
    assert per_rank == 3 * (2 * (32 + 32) + 2 * (32 + 16) + 2 * (32 + 64) + (64 + 32))
    for budget, expected in [(3.4, 3), (3.6, 4), (3.5, 3), (0.2, 1), (1.0, 1), (12.49, 12)]:
        spec = RankConfig(schedule="budget", budget=round(budget * per_rank))
        ranks = allocate_ranks(llama_targets, spec, 3)
        assert set(ranks.values()) == {expected}, budget
        total = sum(lora_param_count(t, ranks[t.name]) for t in llama_targets)
        assert all(abs(total - spec.budget) <= abs(r * per_rank - spec.budget) for r in range(1, 17))


def test_budget_rank_tie_goes_to_the_smaller_rank():
    targets = _layered_targets(1, roles=("attn_q",), width=10)  # 20 parameters per rank
    assert budget_rank(targets, 50) == 2  # 40 and 60 are equally far
    assert budget_rank(targets, 51) == 3


# --- limits and alphas ---------------------------------------------------------------------------

def test_rank_above_a_module_limit_is_refused(llama_targets):
    with pytest.raises(UserError, match=r"rank 20 is too large for model\.layers\.0\.self_attn\.k_proj: "
                                        r"its limit is 16"):
        allocate_ranks(llama_targets, RankConfig(schedule="uniform", r=20), 3)
    qv = select_targets(build_model_map(tiny_gpt2()), "qv_only")  # 32 inputs, 64 adapted rows
    assert set(allocate_ranks(qv, RankConfig(r=32), 2).values()) == {32}
    with pytest.raises(UserError, match="limit is 32"):
        allocate_ranks(qv, RankConfig(r=33), 2)


def test_layer_schedules_need_block_targets():
    outside = [Target(LinearSite("proj", None, "other", 8, 8))]
    assert allocate_ranks(outside, RankConfig(r=4), 0) == {"proj": 4}
    with pytest.raises(UserError, match="outside the transformer blocks"):
        allocate_ranks(outside, RankConfig(schedule="linear_decay"), 0)


def test_alphas_for():
    ranks = {"a": 4, "b": 16}
    assert alphas_for(ranks, 16, "fixed") == {"a": 16.0, "b": 16.0}
    assert alphas_for(ranks, 16, "two_r") == {"a": 8.0, "b": 32.0}
    with pytest.raises(UserError, match="alpha_policy"):
        alphas_for(ranks, 16, "sqrt")
