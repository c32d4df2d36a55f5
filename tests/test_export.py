"""peft interop: forward/gradient parity with peft's LoRA, peft-format export/import, merged export."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama
from torch import nn
from transformers import GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from peftlab.config import MethodConfig, RankConfig
from peftlab.core.export import export_merged, export_peft_adapter, import_peft_adapter
from peftlab.core.methods import prepare
from peftlab.core.methods.lora import LoRALinear, apply_lora, lora_modules
from peftlab.core.modelmap import build_model_map
from peftlab.core.placement import Target, select_targets
from peftlab.errors import UserError

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.utils.other import get_pattern_key  # noqa: E402

# --- helpers --------------------------------------------------------------------------------------


def tiny_llama_12() -> LlamaForCausalLM:
    """12 layers, so a rank_pattern key for layer 1 has a layer 11 to wrongly hit."""
    config = LlamaConfig(num_hidden_layers=12, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=100, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def add_lora(model: nn.Module, placement: str = "all_linear", *, rank: Callable[[Target], int] = lambda t: 4,
             seed: int = 1, **options) -> dict[str, LoRALinear]:
    """peftlab LoRA with alpha = 2r and a random B (a zero B would make every comparison trivial).

    The model is frozen first, as methods.prepare does: whatever else trains is exported whole.
    """
    model.requires_grad_(False)
    targets = select_targets(build_model_map(model), placement, "all", None)
    ranks = {t.name: rank(t) for t in targets}
    wrapped = apply_lora(model, targets, ranks, {name: 2.0 * r for name, r in ranks.items()}, **options)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in wrapped.values():
            module.lora_B.copy_(0.1 * torch.randn(module.lora_B.shape, generator=generator))
            if module.magnitude is not None:  # move DoRA off its init too
                module.magnitude.mul_(1 + 0.2 * torch.rand(module.magnitude.shape, generator=generator))
    return wrapped


def layer_rank(ranks: dict[int, int], default: int) -> Callable[[Target], int]:
    return lambda target: ranks.get(target.layer, default)


def logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def peft_layer(peft_model: PeftModel, name: str) -> nn.Module:
    return peft_model.base_model.model.get_submodule(name)


def copy_into_peft(wrapped: dict[str, LoRALinear], peft_model: PeftModel) -> None:
    with torch.no_grad():
        for name, ours in wrapped.items():
            theirs = peft_layer(peft_model, name)
            theirs.lora_A["default"].weight.copy_(ours.lora_A)
            theirs.lora_B["default"].weight.copy_(ours.lora_B)
            if ours.magnitude is not None:
                theirs.lora_magnitude_vector["default"].weight.copy_(ours.magnitude)


def backward(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=input_ids).logits
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))  # a non-trivial loss
    (out * weights).sum().backward()
    return out.detach()


# --- parity: the same LoRA computed by peftlab and by peft -----------------------------------------


@pytest.mark.parametrize("builder, rslora, dora", [
    (tiny_llama, False, False), (tiny_gpt2, False, False),  # nn.Linear; Conv1D with fan_in_fan_out
    (tiny_llama, True, False), (tiny_gpt2, True, False),
    (tiny_llama, False, True), (tiny_gpt2, False, True),
], ids=["llama", "gpt2", "llama-rslora", "gpt2-rslora", "llama-dora", "gpt2-dora"])
def test_forward_and_gradients_match_peft(builder, rslora, dora, input_ids):
    ours = builder()
    wrapped = add_lora(ours, rslora=rslora, dora=dora)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=sorted(wrapped), use_rslora=rslora, use_dora=dora,
                        fan_in_fan_out=builder is tiny_gpt2, lora_dropout=0.0)
    theirs = get_peft_model(builder(), config)
    copy_into_peft(wrapped, theirs)

    torch.testing.assert_close(backward(ours, input_ids), backward(theirs, input_ids), atol=1e-5, rtol=0)
    for name, module in wrapped.items():
        layer = peft_layer(theirs, name)
        assert layer.scaling["default"] == pytest.approx(module.scaling)
        pairs = [(module.lora_A, layer.lora_A["default"].weight), (module.lora_B, layer.lora_B["default"].weight)]
        if dora:
            pairs.append((module.magnitude, layer.lora_magnitude_vector["default"].weight))
        for mine, peft_param in pairs:
            torch.testing.assert_close(mine.grad, peft_param.grad, atol=1e-5, rtol=1e-4)


# --- export: peftlab -> peft ---------------------------------------------------------------------


@pytest.mark.parametrize("builder, options", [
    (tiny_llama, {}), (tiny_gpt2, {}), (tiny_gpt2, {"rslora": True}), (tiny_llama, {"dora": True}),
    (tiny_gpt2, {"dora": True}),
], ids=["llama", "gpt2", "gpt2-rslora", "llama-dora", "gpt2-dora"])
def test_export_with_per_layer_ranks_loads_in_peft(builder, options, tmp_path, input_ids):
    ours = builder()
    wrapped = add_lora(ours, rank=layer_rank({0: 4, 1: 8}, default=4), **options)  # alpha = 2r
    export_peft_adapter(ours, tmp_path, base_model_name_or_path="tiny/test-model")

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8)
    assert config["target_modules"] == sorted(wrapped)
    assert set(config["rank_pattern"].values()) == {8} and set(config["alpha_pattern"].values()) == {16}
    assert len(config["rank_pattern"]) == sum(1 for m in wrapped if ".1." in m)
    assert config["fan_in_fan_out"] is (builder is tiny_gpt2)
    assert config["use_rslora"] is bool(options.get("rslora")) and config["use_dora"] is bool(options.get("dora"))

    loaded = PeftModel.from_pretrained(builder(), tmp_path)
    for name, module in wrapped.items():
        assert peft_layer(loaded, name).r["default"] == module.r
        assert peft_layer(loaded, name).scaling["default"] == pytest.approx(module.scaling)
    torch.testing.assert_close(logits(loaded, input_ids), logits(ours, input_ids), atol=1e-4, rtol=0)


def test_layer_1_pattern_does_not_hit_layer_11(tmp_path, input_ids):
    ours = tiny_llama_12()
    wrapped = add_lora(ours, rank=layer_rank({1: 8}, default=2))
    export_peft_adapter(ours, tmp_path, base_model_name_or_path="tiny/llama-12")
    config = json.loads((tmp_path / "adapter_config.json").read_text())

    # peft's own lookup: the layer-1 keys match layer-1 modules only
    for name in wrapped:
        key = get_pattern_key(config["rank_pattern"].keys(), name)
        assert (key in config["rank_pattern"]) == name.startswith("model.layers.1."), name
    loaded = PeftModel.from_pretrained(tiny_llama_12(), tmp_path)
    ranks = {name: peft_layer(loaded, name).r["default"] for name in wrapped}
    assert ranks == {name: module.r for name, module in wrapped.items()}
    assert ranks["model.layers.11.self_attn.q_proj"] == 2 and ranks["model.layers.1.self_attn.q_proj"] == 8
    torch.testing.assert_close(logits(loaded, input_ids), logits(ours, input_ids), atol=1e-4, rtol=0)


def test_export_writes_fp32_contiguous_peft_keys(tmp_path):
    from safetensors.torch import load_file

    ours = tiny_gpt2()
    wrapped = add_lora(ours, "attention_only", dora=True)
    export_peft_adapter(ours, tmp_path, base_model_name_or_path="gpt2")
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    expected = {f"base_model.model.{name}.{part}" for name in wrapped
                for part in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")}
    assert set(tensors) == expected
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors.values())
    name = "transformer.h.0.attn.c_attn"
    assert tensors[f"base_model.model.{name}.lora_B.weight"].shape == (96, 4)  # [out, r], Conv1D included


# --- import: peft -> peftlab ---------------------------------------------------------------------


@pytest.mark.parametrize("builder, config", [
    (tiny_llama, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                            rank_pattern={"down_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.v_proj": 3})),
    (tiny_gpt2, LoraConfig(r=2, lora_alpha=5, target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True,
                           use_rslora=True)),
    (tiny_gpt2, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                           use_dora=True)),
], ids=["llama-patterns", "gpt2-rslora", "gpt2-dora"])
def test_import_peft_adapter_gives_peft_logits(builder, config, tmp_path, input_ids):
    theirs = get_peft_model(builder(), config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_B" in name or "lora_magnitude_vector" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    theirs.save_pretrained(tmp_path)

    ours = builder()
    wrapped = import_peft_adapter(ours, tmp_path)
    assert sorted(wrapped) == sorted(theirs.base_model.targeted_module_names)
    for name, module in wrapped.items():
        assert module.r == peft_layer(theirs, name).r["default"]
        assert module.scaling == pytest.approx(peft_layer(theirs, name).scaling["default"])
    torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), atol=1e-5, rtol=0)


def test_import_of_our_export_round_trips(tmp_path, input_ids):
    ours = tiny_llama()
    add_lora(ours, rank=layer_rank({0: 4, 1: 8, 2: 2}, default=4), rslora=True)
    export_peft_adapter(ours, tmp_path, base_model_name_or_path="tiny/llama")
    fresh = tiny_llama()
    imported = import_peft_adapter(fresh, tmp_path)
    assert {n: m.r for n, m in imported.items()} == {n: m.r for n, m in lora_modules(ours).items()}
    torch.testing.assert_close(logits(fresh, input_ids), logits(ours, input_ids), atol=1e-6, rtol=0)


# --- classification: the head travels as modules_to_save ----------------------------------------


def test_bert_classifier_head_round_trips(tmp_path, input_ids):
    ours = tiny_bert()
    add_lora(ours, "attention_only")
    with torch.no_grad():  # stand-in for a trained head: it must travel with the adapter
        for name in ("classifier", "bert.pooler.dense"):
            ours.get_submodule(name).weight.add_(0.5)
    export_peft_adapter(ours, tmp_path, base_model_name_or_path="tiny/bert", task_type="SEQ_CLS")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(config["modules_to_save"]) == ["bert.pooler.dense", "classifier"]

    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    torch.testing.assert_close(logits(loaded, input_ids), logits(ours, input_ids), atol=1e-5, rtol=0)
    fresh = tiny_bert()
    import_peft_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, input_ids), logits(ours, input_ids), atol=1e-6, rtol=0)


@pytest.mark.parametrize("builder, saved", [
    (tiny_gpt2, ["transformer.wte", "lm_head"]),  # lm_head's weight is wte's: both travel, or one stays untrained
    (tiny_llama, ["lm_head"]),
], ids=["gpt2-tied", "llama"])
def test_lora_with_a_trained_causal_head_exports_the_model_that_was_trained(builder, saved, tmp_path, input_ids):
    ours = builder()
    method = MethodConfig(name="lora", placement="attention_only", ranks=RankConfig(r=4), train_head=True)
    prepare(ours, method, build_model_map(ours), train_head=False)  # a causal LM: the head by choice
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # stand-in for training: every trainable parameter moves
        for parameter in ours.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    export_peft_adapter(ours, tmp_path, base_model_name_or_path="tiny/causal")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == saved

    loaded = PeftModel.from_pretrained(builder(), tmp_path)
    torch.testing.assert_close(logits(loaded, input_ids), logits(ours, input_ids), atol=1e-5, rtol=0)
    fresh = builder()
    import_peft_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, input_ids), logits(ours, input_ids), atol=1e-6, rtol=0)


# --- fused-slice LoRA: no peft form, merged export instead ----------------------------------------


def test_fused_slice_lora_refuses_peft_export_and_merges(tmp_path, input_ids):
    ours = tiny_gpt2()
    wrapped = add_lora(ours, "qv_only")
    assert any(module.out_index is not None for module in wrapped.values())
    with pytest.raises(UserError, match="export_merged"):
        export_peft_adapter(ours, tmp_path / "adapter", base_model_name_or_path="gpt2")

    expected = logits(ours, input_ids)
    export_merged(ours, tmp_path / "merged")
    assert lora_modules(ours) and not any(module.merged for module in lora_modules(ours).values())
    plain = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    assert not lora_modules(plain)
    torch.testing.assert_close(logits(plain, input_ids), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(ours, input_ids), expected, atol=0, rtol=0)  # the copy was merged


def test_export_merged_in_place_dora_llama(tmp_path, input_ids):
    ours = tiny_llama()
    add_lora(ours, dora=True)
    expected = logits(ours, input_ids)
    export_merged(ours, tmp_path, in_place=True)
    assert not lora_modules(ours)
    plain = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(plain, input_ids), expected, atol=1e-5, rtol=0)


# --- mistakes --------------------------------------------------------------------------------------


def _edit_config(directory, **changes) -> None:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("changes, field", [
    ({"peft_type": "IA3"}, "peft_type"),
    ({"layer_replication": [[0, 1]]}, "layer_replication"),
    ({"use_qalora": True}, "use_qalora"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    ({"bias": "all"}, "bias"),
    ({"some_future_switch": True}, "some_future_switch"),
    ({"r": 16}, "rank"),
])
def test_import_refuses_what_it_cannot_reproduce(changes, field, tmp_path):
    ours = tiny_llama()
    add_lora(ours, "attention_only")
    export_peft_adapter(ours, tmp_path, base_model_name_or_path="tiny/llama")
    _edit_config(tmp_path, **changes)
    with pytest.raises(UserError, match=field):
        import_peft_adapter(tiny_llama(), tmp_path)


def test_import_needs_both_files_and_a_fresh_model(tmp_path):
    with pytest.raises(UserError, match="adapter_config.json"):
        import_peft_adapter(tiny_llama(), tmp_path)
    ours = tiny_llama()
    add_lora(ours, "attention_only")
    export_peft_adapter(ours, tmp_path, base_model_name_or_path="tiny/llama")
    with pytest.raises(UserError, match="already has LoRA"):
        import_peft_adapter(ours, tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match="adapter_model.safetensors"):
        import_peft_adapter(tiny_llama(), tmp_path)


def test_export_without_lora_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no LoRA"):
        export_peft_adapter(tiny_llama(), tmp_path, base_model_name_or_path="x")


def test_import_into_the_wrong_base_model_leaves_it_untouched(tmp_path):
    ours = tiny_llama()  # hidden 32
    add_lora(ours, "attention_only")
    export_peft_adapter(ours, tmp_path, base_model_name_or_path="tiny/llama")
    other = tiny_llama_12()  # hidden 16, same module names
    with pytest.raises(UserError, match="wrong base model"):
        import_peft_adapter(other, tmp_path)
    assert not lora_modules(other)
