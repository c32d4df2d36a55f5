"""select_targets, parse_layers, describe_matches, format_placement_map against tables of expected names."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama, tiny_neox, tiny_phi3
from transformers import BloomConfig, BloomForCausalLM, FalconConfig, FalconForCausalLM

from peftlab.core.modelmap import ModelMap, build_model_map
from peftlab.core.placement import Target, describe_matches, parse_layers, select_targets
from peftlab.core.placement_map import format_placement_map
from peftlab.errors import UserError

_MAPS: dict[str, ModelMap] = {}


def _map(name: str) -> ModelMap:
    """Model maps are pure data: build each tiny model once per test session."""
    builders = {"gpt2": tiny_gpt2, "llama": tiny_llama, "bert": tiny_bert, "neox": tiny_neox, "phi3": tiny_phi3}
    if name not in _MAPS:
        _MAPS[name] = build_model_map(builders[name]())
    return _MAPS[name]


def _names(targets: list[Target]) -> list[str]:
    return [t.name for t in targets]


def _expand(prefix: str, layers, relative: list[str]) -> list[str]:
    return [f"{prefix}.{i}.{rel}" for i in layers for rel in relative]


# --- named placements: tables of expected modules ------------------------------------------------

PLACEMENT_TABLE = {
    ("gpt2", "all_linear"): ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
    ("gpt2", "attention_only"): ["attn.c_attn", "attn.c_proj"],
    ("gpt2", "mlp_only"): ["mlp.c_fc", "mlp.c_proj"],
    ("gpt2", "qv_only"): ["attn.c_attn"],
    ("llama", "all_linear"): ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    ("llama", "attention_only"): ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
    ("llama", "mlp_only"): ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    ("llama", "qv_only"): ["self_attn.q_proj", "self_attn.v_proj"],
    ("bert", "all_linear"): ["attention.self.query", "attention.self.key", "attention.self.value",
                             "attention.output.dense", "intermediate.dense", "output.dense"],
    ("bert", "attention_only"): ["attention.self.query", "attention.self.key", "attention.self.value",
                                 "attention.output.dense"],
    ("bert", "mlp_only"): ["intermediate.dense", "output.dense"],
    ("bert", "qv_only"): ["attention.self.query", "attention.self.value"],
}
PREFIX = {"gpt2": ("transformer.h", 2), "llama": ("model.layers", 3), "bert": ("bert.encoder.layer", 2)}


@pytest.mark.parametrize("model,placement", sorted(PLACEMENT_TABLE))
def test_named_placements(model, placement):
    prefix, n_layers = PREFIX[model]
    targets = select_targets(_map(model), placement)
    assert _names(targets) == _expand(prefix, range(n_layers), PLACEMENT_TABLE[model, placement])
    assert all(t.slices is None for t in targets if model != "gpt2" or placement != "qv_only")
    assert not any(t.role == "head" for t in targets)


def test_gpt2_attention_only_never_takes_mlp_c_proj():
    names = _names(select_targets(_map("gpt2"), "attention_only"))
    assert "transformer.h.0.attn.c_proj" in names
    assert not any(name.endswith("mlp.c_proj") for name in names)


def test_gpt2_qv_only_adapts_q_and_v_rows_of_c_attn():
    targets = select_targets(_map("gpt2"), "qv_only")
    assert [(t.name, t.slices) for t in targets] == [("transformer.h.0.attn.c_attn", ("q", "v")),
                                                     ("transformer.h.1.attn.c_attn", ("q", "v"))]
    assert targets[0].out_runs() == ((0, 32), (64, 32))  # q rows 0..31, v rows 64..95; k untouched
    assert targets[0].adapted_out_features() == 64


def test_neox_qv_only_rows_are_strided_per_head():
    target = select_targets(_map("neox"), "qv_only")[0]
    assert target.slices == ("q", "v")
    assert target.out_runs() == ((0, 8), (24, 8), (48, 8), (72, 8), (16, 8), (40, 8), (64, 8), (88, 8))
    assert target.adapted_out_features() == 64


def test_phi3_qv_only_follows_grouped_query_sizes():
    target = select_targets(_map("phi3"), "qv_only")[0]
    assert target.name == "model.layers.0.self_attn.qkv_proj"
    assert target.out_runs() == ((0, 32), (48, 16))
    assert target.adapted_out_features() == 48


def test_module_order_is_preserved_for_phi3():
    # Phi-3 registers o_proj before qkv_proj: targets follow the model, not a role order.
    assert _names(select_targets(_map("phi3"), "attention_only"))[:2] == [
        "model.layers.0.self_attn.o_proj", "model.layers.0.self_attn.qkv_proj"]


# --- layer selections ---------------------------------------------------------------------------

@pytest.mark.parametrize("layers,expected", [
    ("all", list(range(12))), ([0, 3], [0, 3]), ([3, 0, 3], [0, 3]), ("0-11", list(range(12))),
    ("0-3,8", [0, 1, 2, 3, 8]), ("first_half", list(range(6))), ("last_half", list(range(6, 12))),
    ("every_other", [0, 2, 4, 6, 8, 10]), ("last_4", [8, 9, 10, 11]), ("5", [5]), (5, [5]),
    (" 2 - 4 , 7", [2, 3, 4, 7]),
])
def test_parse_layers(layers, expected):
    assert parse_layers(layers, 12) == expected


def test_parse_layers_odd_count_splits_like_slicing():
    assert parse_layers("first_half", 5) == [0, 1]
    assert parse_layers("last_half", 5) == [2, 3, 4]


@pytest.mark.parametrize("layers,message", [
    ("0-12", "layer 12 is out of range; this model has layers 0..11"),
    ([12], "layer 12 is out of range"),
    ("last_13", "N must be 1..12"),
    ("last_0", "N must be 1..12"),
    ("5-2", "runs backwards"),
    ("middle", 'use one of: "all", a list such as [0, 3]'),
    ("-1", "is not a layer selection"),
    (True, "is not a layer selection"),
    ([1.5], "is not a layer selection"),
    ([], "selects no layers"),
])
def test_parse_layers_errors(layers, message):
    with pytest.raises(UserError, match=re.escape(message)):
        parse_layers(layers, 12)


def test_layer_selection_on_named_placement():
    targets = select_targets(_map("llama"), "qv_only", layers="last_2")
    assert _names(targets) == _expand("model.layers", [1, 2], ["self_attn.q_proj", "self_attn.v_proj"])


def test_layer_selection_applies_to_explicit_targets():
    targets = select_targets(_map("gpt2"), targets=["attn.c_proj"], layers=[1])
    assert _names(targets) == ["transformer.h.1.attn.c_proj"]


# --- explicit targets ---------------------------------------------------------------------------

def test_bare_c_proj_is_refused_naming_the_candidates():
    with pytest.raises(UserError, match=r"'c_proj' matches modules of 2 roles.*'attn\.c_proj' \(attn_out\), "
                                        r"'mlp\.c_proj' \(mlp_out\)"):
        select_targets(_map("gpt2"), targets=["c_proj"])


def test_dotted_suffix_resolves_c_proj():
    assert _names(select_targets(_map("gpt2"), targets=["attn.c_proj"])) == _expand("transformer.h", [0, 1],
                                                                                   ["attn.c_proj"])
    assert _names(select_targets(_map("gpt2"), targets=["mlp.c_proj"])) == _expand("transformer.h", [0, 1],
                                                                                  ["mlp.c_proj"])


def test_suffix_matches_whole_components_only():
    with pytest.raises(UserError, match="matches no linear module"):
        select_targets(_map("gpt2"), targets=["proj"])  # never a substring of c_proj
    with pytest.raises(UserError, match="matches no linear module"):
        select_targets(_map("llama"), targets=["attn.q_proj"])  # "attn" is not the component "self_attn"


def test_exact_name_regex_and_role_name():
    gpt2 = _map("gpt2")
    assert _names(select_targets(gpt2, targets=["transformer.h.1.mlp.c_fc"])) == ["transformer.h.1.mlp.c_fc"]
    assert _names(select_targets(gpt2, targets=[r"re:transformer\.h\.\d+\.(attn|mlp)\.c_proj"])) == _expand(
        "transformer.h", [0, 1], ["attn.c_proj", "mlp.c_proj"])  # a regex may span roles on purpose
    assert _names(select_targets(gpt2, targets=["attn_out"])) == _expand("transformer.h", [0, 1], ["attn.c_proj"])
    assert _names(select_targets(_map("llama"), targets=["mlp_in"], layers=[0])) == [
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]


def test_regex_is_a_fullmatch():
    with pytest.raises(UserError, match="matches no linear module"):
        select_targets(_map("gpt2"), targets=["re:c_fc"])


def test_slice_subsets_and_their_union():
    gpt2 = _map("gpt2")
    targets = select_targets(gpt2, targets=["c_attn:v,q"], layers=[0])
    assert [(t.name, t.slices) for t in targets] == [("transformer.h.0.attn.c_attn", ("q", "v"))]  # site order
    merged = select_targets(gpt2, targets=["c_attn:q", "c_attn:k,v"], layers=[0])
    assert merged[0].slices is None  # every slice = the whole output
    mixed = select_targets(gpt2, targets=["mlp_out", "attn_qkv:v"], layers=[1])
    assert [(t.name, t.slices) for t in mixed] == [("transformer.h.1.attn.c_attn", ("v",)),
                                                   ("transformer.h.1.mlp.c_proj", None)]
    assert select_targets(_map("phi3"), targets=["gate_up_proj:up"])[0].out_runs() == ((64, 64),)


def test_unknown_slice_is_refused():
    with pytest.raises(UserError, match=r"has no slice 'x' \(its slices: q, k, v\)"):
        select_targets(_map("gpt2"), targets=["c_attn:x"])
    with pytest.raises(UserError, match="not a fused projection"):
        select_targets(_map("llama"), targets=["q_proj:q"])


@pytest.mark.parametrize("build", [
    lambda: FalconForCausalLM(FalconConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                           vocab_size=100)),
    lambda: BloomForCausalLM(BloomConfig(n_layer=2, hidden_size=32, n_head=4, vocab_size=100)),
], ids=["falcon", "bloom"])
def test_slicing_a_fused_projection_of_unknown_layout_says_so(build):
    """Falcon's and Bloom's query_key_value are fused, but how q, k and v interleave is not known to peftlab."""
    with torch.device("meta"):
        model_map = build_model_map(build())
    with pytest.raises(UserError) as error:
        select_targets(model_map, targets=["query_key_value:q,v"])
    message = str(error.value)
    assert "not a fused projection" not in message
    assert ("its output layout is not known to peftlab, so it cannot be sliced; layouts known: gpt2 attn.c_attn, "
            "gpt_neox attention.query_key_value, phi3 self_attn.qkv_proj, phi3 mlp.gate_up_proj; adapt the whole "
            "module instead") in message
    assert select_targets(model_map, targets=["query_key_value"])  # the whole module is adaptable


def test_entry_matching_nothing_lists_available_names():
    with pytest.raises(UserError) as error:
        select_targets(_map("llama"), targets=["q_proj", "query"])
    message = str(error.value)
    assert "'query' matches no linear module" in message
    assert "self_attn.q_proj, self_attn.k_proj" in message and "(21 modules)" in message


def test_head_is_never_a_target():
    with pytest.raises(UserError, match="lm_head is the task head"):
        select_targets(_map("gpt2"), targets=["lm_head"])
    assert not any(t.name == "classifier" for t in select_targets(_map("bert"), targets=["re:.*"]))


def test_entry_matching_only_unselected_layers_is_refused():
    with pytest.raises(UserError, match="only outside the selected layers"):
        select_targets(_map("gpt2"), targets=["transformer.h.0.attn.c_attn"], layers=[1])


def test_empty_result_is_refused():
    model_map = build_model_map(tiny_gpt2())
    attention_free = ModelMap(model_map.family, model_map.n_layers, model_map.block_prefix,
                              tuple(s for s in model_map.sites if s.role != "attn_qkv"))
    with pytest.raises(UserError, match="selects no module"):
        select_targets(attention_free, "qv_only")


def test_describe_matches_counts_per_entry():
    counts = describe_matches(_map("gpt2"), ["attn.c_proj", "c_proj", "nope", "c_attn:q"], layers="last_1")
    assert counts == {"attn.c_proj": 1, "c_proj": 2, "nope": 0, "c_attn:q": 1}


# --- the printed placement map ------------------------------------------------------------------

def test_placement_map_gpt2_qv_only_with_ranks():
    gpt2 = _map("gpt2")
    targets = select_targets(gpt2, "qv_only")
    text = format_placement_map(gpt2, targets, {t.name: 8 for t in targets},
                                trainable_params=1536, total_params=100_000)
    assert text.splitlines() == [
        "layers  qkv      out  mlp_in  mlp_out",
        "0-1     q,v r=8  ·    ·       ·",
        "cell: LoRA rank, · not adapted",
        "trainable params: 1,536 / 100,000 (1.536%)",
    ]


def test_placement_map_llama_two_modules_per_role_and_varying_ranks():
    llama = _map("llama")
    targets = select_targets(llama, targets=["q_proj", "gate_proj", "down_proj"])
    ranks = {t.name: 4 if t.layer == 2 else 8 for t in targets}
    ranks.pop("model.layers.1.self_attn.q_proj")  # e.g. a custom rank of 0
    lines = format_placement_map(llama, targets, ranks).splitlines()
    assert lines[:4] == [
        "layers  q  k  v  out  mlp_in  mlp_out",
        "0       8  ·  ·  ·    8/·     8",
        "1       ·  ·  ·  ·    8/·     8",
        "2       4  ·  ·  ·    4/·     4",
    ]
    full = select_targets(llama, "mlp_only")
    assert format_placement_map(llama, full, {t.name: 8 for t in full}).splitlines()[1] == (
        "0-2     ·  ·  ·  ·    2×8     8")


def test_placement_map_without_ranks_marks_modules():
    bert = _map("bert")
    lines = format_placement_map(bert, select_targets(bert, "attention_only", layers=[1]), None).splitlines()
    assert lines == [
        "layers  q  k  v  out  mlp_in  mlp_out",
        "0       ·  ·  ·  ·    ·       ·",
        "1       ✓  ✓  ✓  ✓    ·       ·",
        "cell: ✓ adapted, · not adapted",
    ]


def test_placement_map_shows_the_structural_note():
    model_map = ModelMap("structural", 1, "blocks", _map("gpt2").sites[:4], note="roles inferred from module structure")
    text = format_placement_map(model_map, [], {})
    assert text.splitlines()[-1] == "note: roles inferred from module structure"
