"""build_model_map: roles, layers and fused-slice layouts per family, meta device, structural fallback."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama, tiny_neox, tiny_phi3
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    FalconConfig,
    FalconForCausalLM,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
    T5ForSequenceClassification,
    XLNetConfig,
    XLNetForSequenceClassification,
)

from peftlab.core.modelmap import LinearSite, ModelMap, build_model_map
from peftlab.core.placement import select_targets
from peftlab.errors import UserError


def _layer0(model_map: ModelMap) -> list[tuple[str, str]]:
    """(block-relative name, role) of layer 0's sites, in module order."""
    prefix = model_map.block_name(0) + "."
    return [(s.name[len(prefix):], s.role) for s in model_map.sites if s.layer == 0]


def _on_meta(build):
    with torch.device("meta"):
        return build()


# --- known families: roles per block --------------------------------------------------------------

LLAMA_LAYER0 = [("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                ("self_attn.o_proj", "attn_out"), ("mlp.gate_proj", "mlp_in"), ("mlp.up_proj", "mlp_in"),
                ("mlp.down_proj", "mlp_out")]

FAMILY_TABLE = {
    "gpt2": (tiny_gpt2, "transformer.h", 2, ("lm_head",),
             [("attn.c_attn", "attn_qkv"), ("attn.c_proj", "attn_out"), ("mlp.c_fc", "mlp_in"),
              ("mlp.c_proj", "mlp_out")]),
    "llama": (tiny_llama, "model.layers", 3, ("lm_head",), LLAMA_LAYER0),
    "bert": (tiny_bert, "bert.encoder.layer", 2, ("bert.pooler.dense", "classifier"),
             [("attention.self.query", "attn_q"), ("attention.self.key", "attn_k"),
              ("attention.self.value", "attn_v"), ("attention.output.dense", "attn_out"),
              ("intermediate.dense", "mlp_in"), ("output.dense", "mlp_out")]),
    "gpt_neox": (tiny_neox, "gpt_neox.layers", 2, ("lm_head",),
                 [("attention.query_key_value", "attn_qkv"), ("attention.dense", "attn_out"),
                  ("mlp.dense_h_to_4h", "mlp_in"), ("mlp.dense_4h_to_h", "mlp_out")]),
    "phi3": (tiny_phi3, "model.layers", 2, ("lm_head",),  # o_proj is registered before qkv_proj
             [("self_attn.o_proj", "attn_out"), ("self_attn.qkv_proj", "attn_qkv"),
              ("mlp.gate_up_proj", "mlp_in"), ("mlp.down_proj", "mlp_out")]),
}


@pytest.mark.parametrize("family", sorted(FAMILY_TABLE))
def test_family_roles(family):
    build, prefix, n_layers, heads, layer0 = FAMILY_TABLE[family]
    model_map = build_model_map(build())
    assert (model_map.family, model_map.block_prefix, model_map.n_layers) == (family, prefix, n_layers)
    assert _layer0(model_map) == layer0
    assert model_map.head_names == heads
    assert [s.name for s in model_map.sites if s.role == "head"] == list(heads)
    assert all(s.layer is None for s in model_map.sites if s.role == "head")
    assert len(model_map.block_sites()) == n_layers * len(layer0)
    assert model_map.note == ""


def test_every_layer_has_the_same_roles():
    model_map = build_model_map(tiny_llama())
    for layer in range(3):
        roles = [s.role for s in model_map.sites if s.layer == layer]
        assert roles == [role for _, role in LLAMA_LAYER0]
        assert all(s.name.startswith(f"model.layers.{layer}.") for s in model_map.sites if s.layer == layer)


def test_gpt2_conv1d_shapes_and_contiguous_qkv():
    by_name = build_model_map(tiny_gpt2()).by_name()
    c_attn = by_name["transformer.h.0.attn.c_attn"]
    assert (c_attn.in_features, c_attn.out_features, c_attn.is_conv1d) == (32, 96, True)
    assert c_attn.slices == {"q": ((0, 32),), "k": ((32, 32),), "v": ((64, 32),)}
    c_fc = by_name["transformer.h.0.mlp.c_fc"]
    assert (c_fc.in_features, c_fc.out_features) == (32, 128)
    assert not by_name["lm_head"].is_conv1d


def test_neox_qkv_is_interleaved_per_head():
    site = build_model_map(tiny_neox()).by_name()["gpt_neox.layers.0.attention.query_key_value"]
    # 4 heads of head_dim 8: the output is [head, (q, k, v), 8]
    assert site.slices["q"] == ((0, 8), (24, 8), (48, 8), (72, 8))
    assert site.slices["k"] == ((8, 8), (32, 8), (56, 8), (80, 8))
    assert site.slices["v"] == ((16, 8), (40, 8), (64, 8), (88, 8))


def test_phi3_grouped_query_and_gate_up_sizes():
    by_name = build_model_map(tiny_phi3()).by_name()
    qkv = by_name["model.layers.0.self_attn.qkv_proj"]
    # q = 4 heads * 8, k and v = 2 key/value heads * 8
    assert qkv.slices == {"q": ((0, 32),), "k": ((32, 16),), "v": ((48, 16),)}
    assert qkv.out_features == 64
    assert by_name["model.layers.0.mlp.gate_up_proj"].slices == {"gate": ((0, 64),), "up": ((64, 64),)}


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_neox, tiny_phi3])
def test_slices_partition_the_output_rows(build):
    for site in build_model_map(build()).sites:
        if site.is_fused:
            rows = sorted(row for runs in site.slices.values() for start, n in runs for row in range(start, start + n))
            assert rows == list(range(site.out_features))


# --- the slice layout matches the model's real computation ---------------------------------------


def _zero_rows(module: nn.Module, runs, conv1d: bool) -> None:
    with torch.no_grad():
        for start, length in runs:
            if conv1d:
                module.weight[:, start:start + length] = 0  # Conv1D weight is [in, out]
            else:
                module.weight[start:start + length] = 0
            if module.bias is not None:
                module.bias[start:start + length] = 0


@pytest.mark.parametrize("build,qkv,out", [
    (tiny_gpt2, "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"),
    (tiny_neox, "gpt_neox.layers.0.attention.query_key_value", "gpt_neox.layers.0.attention.dense"),
    (tiny_phi3, "model.layers.0.self_attn.qkv_proj", "model.layers.0.self_attn.o_proj"),
])
def test_v_slice_is_the_real_value_rows(build, qkv, out, input_ids):
    """Zeroing the mapped v rows zeroes the attention output (softmax(qk) @ v); k or q rows would not."""
    model = build()
    site = build_model_map(model).by_name()[qkv]
    seen = {}
    model.get_submodule(out).register_forward_pre_hook(lambda _, args: seen.update(x=args[0]))
    model(input_ids)
    assert seen["x"].abs().max() > 0
    _zero_rows(model.get_submodule(qkv), site.slices["v"], site.is_conv1d)
    model(input_ids)
    assert torch.count_nonzero(seen["x"]) == 0


def test_phi3_gate_and_up_slices_are_the_real_halves(input_ids):
    model = tiny_phi3()
    site = build_model_map(model).by_name()["model.layers.0.mlp.gate_up_proj"]
    seen = {}
    model.get_submodule(site.name).register_forward_hook(lambda _, __, y: seen.update(y=y))
    model.get_submodule("model.layers.0.mlp.down_proj").register_forward_pre_hook(
        lambda _, args: seen.update(x=args[0]))
    model(input_ids)
    (g0, gn), = site.slices["gate"]
    (u0, un), = site.slices["up"]
    expected = nn.functional.silu(seen["y"][..., g0:g0 + gn]) * seen["y"][..., u0:u0 + un]
    torch.testing.assert_close(seen["x"], expected)


# --- heads, other family members, meta device ----------------------------------------------------


def test_classification_heads():
    gpt2_cls = build_model_map(_on_meta(lambda: GPT2ForSequenceClassification(
        GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, num_labels=3))))
    assert gpt2_cls.head_names == ("score",)
    bare_bert = build_model_map(_on_meta(lambda: BertModel(BertConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=100))))
    # Without a classifier the pooler is neither a block linear nor a head: not listed.
    assert bare_bert.head_names == ()
    assert "pooler.dense" not in bare_bert.by_name()
    assert bare_bert.block_prefix == "encoder.layer"


def test_distilbert():
    model_map = build_model_map(_on_meta(lambda: DistilBertForSequenceClassification(
        DistilBertConfig(n_layers=2, dim=32, hidden_dim=64, n_heads=4, vocab_size=100))))
    assert model_map.family == "distilbert"
    assert _layer0(model_map) == [("attention.q_lin", "attn_q"), ("attention.k_lin", "attn_k"),
                                  ("attention.v_lin", "attn_v"), ("attention.out_lin", "attn_out"),
                                  ("ffn.lin1", "mlp_in"), ("ffn.lin2", "mlp_out")]
    assert model_map.head_names == ("pre_classifier", "classifier")


@pytest.mark.parametrize("model_cls,config_cls", [(MistralForCausalLM, MistralConfig),
                                                  (Qwen2ForCausalLM, Qwen2Config)])
def test_llama_family_members(model_cls, config_cls):
    config = config_cls(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=100)
    model_map = build_model_map(_on_meta(lambda: model_cls(config)))
    assert model_map.family == "llama"
    assert _layer0(model_map) == LLAMA_LAYER0


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama, tiny_phi3, tiny_neox])
def test_meta_device_maps_identically(build):
    model = build()
    with torch.device("meta"):
        meta_model = type(model)(model.config)
    assert next(meta_model.parameters()).is_meta
    assert build_model_map(meta_model) == build_model_map(model)


def test_meta_gpt2_from_config():
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=100)
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    assert build_model_map(model) == build_model_map(tiny_gpt2())


# --- structural fallback ----------------------------------------------------------------------------


def test_structural_opt():
    model = _on_meta(lambda: OPTForCausalLM(OPTConfig(
        num_hidden_layers=2, hidden_size=32, ffn_dim=64, num_attention_heads=4, vocab_size=100,
        max_position_embeddings=64, word_embed_proj_dim=32)))
    model_map = build_model_map(model)
    assert (model_map.family, model_map.block_prefix, model_map.n_layers) == ("structural", "model.decoder.layers", 2)
    assert model_map.note == "roles inferred from module structure"
    assert _layer0(model_map) == [("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                                  ("self_attn.q_proj", "attn_q"), ("self_attn.out_proj", "attn_out"),
                                  ("fc1", "mlp_in"), ("fc2", "mlp_out")]
    assert model_map.head_names == ("lm_head",)


def test_structural_falcon_fused_qkv_has_no_slices():
    """Falcon's fused layout is not known to peftlab: whole-module roles, but no slices to guess."""
    model = _on_meta(lambda: FalconForCausalLM(FalconConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=100)))
    model_map = build_model_map(model)
    assert model_map.family == "structural"
    assert _layer0(model_map) == [("self_attention.query_key_value", "attn_qkv"),
                                  ("self_attention.dense", "attn_out"), ("mlp.dense_h_to_4h", "mlp_in"),
                                  ("mlp.dense_4h_to_h", "mlp_out")]
    assert not any(s.is_fused for s in model_map.sites)


class _Attention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.mix = nn.Linear(d, d)  # the one unnamed attention linear: the output projection


class _Block(nn.Module):
    def __init__(self, d: int, mlp_linears: int = 3) -> None:
        super().__init__()
        self.attn = _Attention(d)
        # w1 (gate), w2 (down), w3 (up), in that module order: the one writing back
        # from the wider width is the MLP output, whatever its position.
        sizes = [(d, 2 * d), (2 * d, d), (d, 2 * d)][:mlp_linears]
        for i, (fan_in, fan_out) in enumerate(sizes, start=1):
            setattr(self, f"w{i}", nn.Linear(fan_in, fan_out))


class _Tiny(nn.Module):
    def __init__(self, n: int = 3, mlp_linears: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList(_Block(8, mlp_linears) for _ in range(n))
        self.norms = nn.ModuleList(nn.LayerNorm(8) for _ in range(5))  # longer, but holds no linear
        self.lm_head = nn.Linear(8, 10)


def test_structural_custom_module():
    model_map = build_model_map(_Tiny())
    assert (model_map.family, model_map.block_prefix, model_map.n_layers) == ("structural", "blocks", 3)
    assert _layer0(model_map) == [("attn.query", "attn_q"), ("attn.key", "attn_k"), ("attn.value", "attn_v"),
                                  ("attn.mix", "attn_out"), ("w1", "mlp_in"), ("w2", "mlp_out"),
                                  ("w3", "mlp_in")]
    assert model_map.head_names == ("lm_head",)


def test_structural_unresolvable_linear_is_refused():
    with pytest.raises(UserError, match=r"could not give a role to blocks\.0\.w1.*method\.targets"):
        build_model_map(_Tiny(mlp_linears=1))


def test_no_blocks_is_refused_listing_the_linears():
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(14)])
    with pytest.raises(UserError) as error:
        build_model_map(model)
    message = str(error.value)
    assert "no block list" in message and "method.targets" in message
    assert "linear modules found (14): 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, ..." in message


def test_not_strict_keeps_unresolved_linears_for_explicit_targets():
    flat = build_model_map(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), strict=False)
    assert [(s.name, s.layer, s.role) for s in flat.sites] == [("0", None, "other"), ("2", None, "other")]
    assert flat.n_layers == 0
    partial = build_model_map(_Tiny(mlp_linears=1), strict=False)
    assert partial.by_name()["blocks.1.w1"] == LinearSite("blocks.1.w1", 1, "other", 8, 16)


# --- several block lists: the language model's, or both stacks of an encoder-decoder ------------------


def tiny_t5_config(**overrides) -> T5Config:
    """Encoder 2 blocks, decoder 3: the longest list is the decoder's, which alone is not the model."""
    return T5Config(**{"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 3,
                       "num_heads": 4, "vocab_size": 100, **overrides})


def test_t5_maps_both_stacks_with_unequal_depth():
    model_map = build_model_map(_on_meta(lambda: T5ForConditionalGeneration(tiny_t5_config())))
    assert model_map.stacks == (("encoder.block", 2), ("decoder.block", 3))
    assert model_map.n_layers == 5 and model_map.block_prefix == ""
    assert [model_map.block_name(i) for i in (0, 1, 2, 4)] == ["encoder.block.0", "encoder.block.1",
                                                               "decoder.block.0", "decoder.block.2"]
    assert model_map.note.endswith("layers 0-1 encoder.block, 2-4 decoder.block")
    assert _layer0(model_map) == [("layer.0.SelfAttention.q", "attn_q"), ("layer.0.SelfAttention.k", "attn_k"),
                                  ("layer.0.SelfAttention.v", "attn_v"), ("layer.0.SelfAttention.o", "attn_out"),
                                  ("layer.1.DenseReluDense.wi", "mlp_in"), ("layer.1.DenseReluDense.wo", "mlp_out")]
    decoder = [s for s in model_map.sites if s.layer == 2]  # self-attention, cross-attention, MLP
    assert {s.name for s in decoder} >= {"decoder.block.0.layer.1.EncDecAttention.q",
                                         "decoder.block.0.layer.2.DenseReluDense.wo"}
    adapted = {t.layer for t in select_targets(model_map, "all_linear")}
    assert adapted == {0, 1, 2, 3, 4}  # the encoder is adapted too
    equal = build_model_map(_on_meta(lambda: T5ForConditionalGeneration(tiny_t5_config(num_decoder_layers=2))))
    assert equal.stacks == (("encoder.block", 2), ("decoder.block", 2))  # once refused as ambiguous


def test_gemma3_adapts_the_language_model_not_the_deeper_vision_tower():
    """The real transformers Gemma3ForConditionalGeneration, tiny, on the meta device."""
    text = {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 300, "sliding_window": 16}
    vision = {"num_hidden_layers": 3, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
              "image_size": 28, "patch_size": 14}
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    model_map = build_model_map(_on_meta(lambda: Gemma3ForConditionalGeneration(config)))
    assert (model_map.block_prefix, model_map.n_layers) == ("model.language_model.layers", 2)
    assert not any("vision_tower" in s.name for s in model_map.sites)
    assert _layer0(model_map) == LLAMA_LAYER0
    assert model_map.head_names == ("lm_head",)


class _TwoTowers(nn.Module):
    """Two block lists, neither beside token embeddings nor an encoder-decoder's: nothing to tell them apart."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.ModuleList(_Block(8) for _ in range(2))
        self.right = nn.ModuleList(_Block(8) for _ in range(3))


def test_several_block_lists_that_cannot_be_told_apart_are_refused_by_name():
    with pytest.raises(UserError) as error:
        build_model_map(_TwoTowers())
    message = str(error.value)
    assert "2 block lists were found and none is recognisably the language model's: left (2 blocks), " \
           "right (3 blocks)" in message
    assert "no block list" not in message and "method.targets" in message
    loose = build_model_map(_TwoTowers(), strict=False)  # explicit targets still work
    assert loose.n_layers == 0 and {s.role for s in loose.sites} == {"other"}


# --- scalar gates and heads no name table lists --------------------------------------------------------


def tiny_qwen2_moe_config() -> Qwen2MoeConfig:
    return Qwen2MoeConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                          shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=100)


def test_qwen2_moe_shared_expert_gate_is_a_scalar_gate_not_an_mlp_projection():
    model_map = build_model_map(_on_meta(lambda: Qwen2MoeForCausalLM(tiny_qwen2_moe_config())))
    assert _layer0(model_map)[4:] == [("mlp.shared_expert.gate_proj", "mlp_in"),
                                      ("mlp.shared_expert.up_proj", "mlp_in"),
                                      ("mlp.shared_expert.down_proj", "mlp_out"),
                                      ("mlp.shared_expert_gate", "scalar_gate")]
    for placement in ("all_linear", "mlp_only"):
        assert not any(t.name.endswith("shared_expert_gate") for t in select_targets(model_map, placement))
    explicit = select_targets(model_map, targets=["shared_expert_gate"])  # still adaptable when named
    assert [t.name for t in explicit] == [f"model.layers.{i}.mlp.shared_expert_gate" for i in (0, 1)]


def test_heads_beside_the_base_model_are_found_without_a_name_table():
    xlnet = build_model_map(_on_meta(lambda: XLNetForSequenceClassification(XLNetConfig(
        d_model=32, n_layer=2, n_head=4, d_inner=64, vocab_size=100, num_labels=3))))
    assert xlnet.head_modules == ("sequence_summary", "logits_proj")
    assert xlnet.head_names == ("sequence_summary.summary", "logits_proj")
    t5 = build_model_map(_on_meta(lambda: T5ForSequenceClassification(tiny_t5_config(num_labels=3))))
    assert t5.head_modules == ("classification_head",)
    assert t5.head_names == ("classification_head.dense", "classification_head.out_proj")
    assert t5.stacks == (("transformer.encoder.block", 2), ("transformer.decoder.block", 3))
    bert = build_model_map(tiny_bert())
    assert bert.head_modules == ("bert.pooler.dense", "classifier")


def test_new_weights_outside_the_base_model_are_head_modules():
    model = _Tiny()
    del model.lm_head
    model.proj = nn.Linear(8, 3)  # no head name, and no base model to stand beside
    assert build_model_map(model).head_modules == ()
    model_map = build_model_map(model, new_weights=("proj.weight", "proj.bias"))
    assert model_map.head_modules == ("proj",) and model_map.head_names == ("proj",)
