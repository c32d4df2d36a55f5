"""run/precision.py: the base dtype, the autocast rule, fp32 trained parameters and gradient checkpointing.

All on CPU with tiny random models: a bf16 (and fp16) base under CPU autocast trains every method with
fp32 trained parameters, and checkpointing leaves the loss and every gradient as they were.
"""

from __future__ import annotations

import contextlib
import copy
import functools

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from peftlab.config import MethodConfig, RankConfig, TrainConfig
from peftlab.core.methods import prepare
from peftlab.core.modelmap import build_model_map
from peftlab.errors import UserError
from peftlab.inputs.data import IGNORE_INDEX, batches
from peftlab.run.losses import loss_sum
from peftlab.run.precision import (
    autocast_dtype,
    autocast_for,
    enable_gradient_checkpointing,
    keep_trainable_fp32,
    resolve_base_dtype,
)

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "bert": tiny_bert}
METHODS = {
    "lora": MethodConfig(name="lora", ranks=RankConfig(r=4), alpha=8.0),
    "dora": MethodConfig(name="lora", ranks=RankConfig(r=4), alpha=8.0, dora=True),
    "lora_dropout": MethodConfig(name="lora", ranks=RankConfig(r=4), alpha=8.0, dropout=0.1),
    "adapter": MethodConfig(name="adapter", bottleneck=8),
    "partial": MethodConfig(name="partial", last_n=1),
    "full": MethodConfig(name="full"),
}


def _task(family: str) -> str:
    return "classification" if family == "bert" else "instruction"


def _batch(task: str) -> dict[str, torch.Tensor]:
    """Four examples of different lengths in one right-padded batch (padding and masked labels included)."""
    generator = torch.Generator().manual_seed(2)
    examples = []
    for i in range(4):
        ids = torch.randint(3, 100, (5 + 3 * i,), generator=generator).tolist()
        examples.append({"input_ids": ids, "label": i % 2} if task == "classification"
                        else {"input_ids": ids, "labels": [IGNORE_INDEX] * 2 + ids[2:]})
    return next(iter(batches(examples, 4, pad_id=0, seed=0, epoch=0, shuffle=False)))


def _prepared(family: str, method: str, dtype: torch.dtype = FP32) -> nn.Module:
    """A tiny model with its base in ``dtype``, prepared for ``method``, trained parameters fp32 and nudged
    off their initial values (LoRA's B and an adapter's up-projection start at zero, which would leave
    other gradients zero too)."""
    model = BUILDERS[family]().to(dtype)
    prepare(model, METHODS[method], build_model_map(model), train_head=family == "bert")
    keep_trainable_fp32(model)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


def _no_dropout(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def _under(base_dtype: str):
    """A factory of the CPU autocast a run with this base dtype uses (a context manager is entered once)."""
    return functools.partial(autocast_for, CPU, TrainConfig(base_dtype=base_dtype))


def _step(model: nn.Module, batch: dict[str, torch.Tensor], task: str,
          context=contextlib.nullcontext) -> tuple[float, dict[str, torch.Tensor]]:
    """The mean loss of ``batch`` and the gradient of every parameter that trains, from one seeded backward."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout draws for every model compared
    with context():
        total, units = loss_sum(model, batch, task)
    (total / units).backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return float(total.detach()) / units, grads


# --- the base dtype and the autocast rule --------------------------------------------------------


@pytest.mark.parametrize("base_dtype, precision, device, bf16_supported, expected", [
    ("fp32", "auto", CUDA, True, FP32),
    ("bf16", "auto", CPU, False, BF16),
    ("fp16", "auto", CPU, False, FP16),
    ("auto", "auto", CPU, True, FP32),  # CPU: fp32, as before base dtypes existed
    ("auto", "auto", MPS, True, FP32),
    ("auto", "auto", CUDA, True, BF16),
    ("auto", "bf16", CUDA, True, BF16),
    ("auto", "auto", CUDA, False, FP32),  # a GPU without bf16
    ("auto", "fp32", CUDA, True, FP32),  # fp32 compute needs an fp32 base
])
def test_resolve_base_dtype(base_dtype, precision, device, bf16_supported, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_supported)
    assert resolve_base_dtype(TrainConfig(base_dtype=base_dtype, precision=precision), device) == expected


@pytest.mark.parametrize("method, expected", [("lora", BF16), ("adapter", BF16), ("full", torch.float32),
                                              ("partial", torch.float32)])
def test_auto_keeps_an_fp32_base_for_methods_that_train_it(method, expected, monkeypatch):
    """Full and partial runs train base weights in fp32: a bf16 load would only round their start."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert resolve_base_dtype(TrainConfig(), CUDA, method) == expected
    assert resolve_base_dtype(TrainConfig(base_dtype="bf16"), CUDA, method) == BF16  # asked for: given


@pytest.mark.parametrize("base_dtype, precision, device, bf16_supported, expected", [
    ("auto", "auto", CPU, True, None),  # as before: no autocast on CPU ...
    ("fp32", "auto", CUDA, True, BF16),  # ... and bf16 autocast on CUDA
    ("auto", "auto", CUDA, False, BF16),
    ("auto", "auto", CUDA, True, BF16),
    ("bf16", "auto", CPU, False, BF16),  # a half base: autocast in its dtype, on any device
    ("fp16", "auto", CPU, False, FP16),
    ("fp16", "auto", CUDA, True, FP16),
    ("bf16", "bf16", CPU, False, BF16),
    ("fp32", "bf16", CPU, False, BF16),
    ("fp32", "fp32", CUDA, True, None),
    ("auto", "fp32", CUDA, True, None),
])
def test_autocast_follows_the_base_dtype(base_dtype, precision, device, bf16_supported, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_supported)
    assert autocast_dtype(device, TrainConfig(base_dtype=base_dtype, precision=precision)) == expected


@pytest.mark.parametrize("base_dtype, expected", [("bf16", BF16), ("fp16", FP16), ("fp32", None)])
def test_autocast_for_enters_cpu_autocast_in_that_dtype(base_dtype, expected):
    with autocast_for(CPU, TrainConfig(base_dtype=base_dtype)):
        assert torch.is_autocast_enabled("cpu") == (expected is not None)
        if expected is not None:
            assert torch.get_autocast_dtype("cpu") == expected
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == expected


# --- trained parameters stay fp32 ----------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(BUILDERS))
@pytest.mark.parametrize("method", ["lora", "dora", "adapter", "partial", "full"])
def test_keep_trainable_fp32_casts_exactly_what_trains(family, method):
    model = BUILDERS[family]().to(BF16)
    prepare(model, METHODS[method], build_model_map(model), train_head=family == "bert")
    half_trained = sum(1 for p in model.parameters() if p.requires_grad and p.dtype != FP32)
    assert keep_trainable_fp32(model) == half_trained
    assert keep_trainable_fp32(model) == 0  # nothing left to cast
    for name, parameter in model.named_parameters():
        assert parameter.dtype == (FP32 if parameter.requires_grad else BF16), name
    if method == "lora" and family != "bert":
        assert half_trained == 0  # LoRA's A and B are created fp32
    if method == "full":
        assert half_trained == len(list(model.parameters()))


def test_a_tied_head_stays_tied_when_cast():
    model = tiny_gpt2().to(BF16)
    prepare(model, MethodConfig(name="lora", train_head=True), build_model_map(model), train_head=False)
    assert keep_trainable_fp32(model) == 1  # wte and lm_head: one parameter
    assert model.lm_head.weight is model.transformer.wte.weight and model.lm_head.weight.dtype == FP32


# --- a half base under autocast trains every method -------------------------------------------------


@pytest.mark.parametrize("family", sorted(BUILDERS))
@pytest.mark.parametrize("method", ["lora", "dora", "adapter", "partial", "full"])
def test_bf16_base_under_cpu_autocast_trains_with_fp32_gradients(family, method):
    task, batch = _task(family), _batch(_task(family))
    reference = _no_dropout(_prepared(family, method)).train()
    model = _no_dropout(_prepared(family, method, BF16)).train()
    loss, grads = _step(model, batch, task, _under("bf16"))
    reference_loss, reference_grads = _step(reference, batch, task)
    assert loss == pytest.approx(reference_loss, abs=0.05)  # bf16 rounding of a ~4.6-nat loss
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert set(grads) == trained == set(reference_grads)
    for name, grad in grads.items():
        assert grad.dtype == FP32 and bool(torch.isfinite(grad).all()), name


@pytest.mark.parametrize("family", sorted(BUILDERS))
@pytest.mark.parametrize("base_dtype", ["bf16", "fp16"])
def test_lora_adds_its_fp32_branch_into_a_half_result(family, base_dtype):
    """LoRA's output has the base output's dtype under autocast, and without autocast on a half base too."""
    dtype = {"bf16": BF16, "fp16": FP16}[base_dtype]
    model = _prepared(family, "lora", dtype)
    wrapper = next(m for m in model.modules() if type(m).__name__ == "LoRALinear")
    x = torch.randn(2, 3, wrapper.in_features, dtype=dtype)
    with autocast_for(CPU, TrainConfig(base_dtype=base_dtype)):
        assert wrapper(x).dtype == wrapper.base(x).dtype
    assert wrapper(x).dtype == dtype
    _, grads = _step(model.train(), _batch(_task(family)), _task(family), _under(base_dtype))
    assert grads and all(bool(torch.isfinite(g).all()) and g.dtype == FP32 for g in grads.values())


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_fp32_base_without_autocast_is_the_plain_computation(method):
    """The default on CPU: no autocast at all, so the loss is bit for bit the one computed outside any context."""
    model = _no_dropout(_prepared("llama", method)).train()
    batch = _batch("instruction")
    assert isinstance(autocast_for(CPU, TrainConfig()), contextlib.nullcontext)
    plain, plain_grads = _step(model, batch, "instruction")
    ruled, ruled_grads = _step(model, batch, "instruction", _under("auto"))
    assert plain == ruled and all(torch.equal(plain_grads[n], ruled_grads[n]) for n in plain_grads)


# --- gradient checkpointing --------------------------------------------------------------------------


def _inside_first_block(model: nn.Module) -> nn.Module:
    """The first leaf module inside block 0 (transformer.h.0, model.layers.0, bert.encoder.layer.0: the first
    module named "*.0"). A leaf, not the block: transformers checkpoints the block's forward, inside its hooks."""
    block = next(module for name, module in model.named_modules() if name.endswith(".0"))
    return next(module for module in block.modules() if module is not block and not list(module.children()))


def _block_calls(model: nn.Module, run) -> tuple[int, object]:
    """How many times block 0 runs forward while ``run()`` runs, and what ``run`` returned."""
    calls = []
    handle = _inside_first_block(model).register_forward_hook(lambda *args: calls.append(1))
    try:
        result = run()
    finally:
        handle.remove()
    return len(calls), result


def _assert_same_step(family: str, method: str, dtype: torch.dtype = FP32, dropout: bool = False) -> None:
    task, batch = _task(family), _batch(_task(family))
    plain = _prepared(family, method, dtype)
    if not dropout:
        _no_dropout(plain)
    checkpointed = copy.deepcopy(plain)
    enable_gradient_checkpointing(checkpointed)
    plain.train()
    checkpointed.train()
    context = _under({FP32: "fp32", BF16: "bf16"}[dtype])
    plain_calls, (loss, grads) = _block_calls(plain, lambda: _step(plain, batch, task, context))
    calls, (checkpointed_loss, checkpointed_grads) = _block_calls(
        checkpointed, lambda: _step(checkpointed, batch, task, context))
    assert (plain_calls, calls) == (1, 2)  # the block ran again in backward: checkpointing is on
    assert checkpointed_loss == pytest.approx(loss, rel=1e-6)
    assert set(checkpointed_grads) == set(grads) == {n for n, p in plain.named_parameters() if p.requires_grad}
    for name, grad in grads.items():
        assert torch.allclose(checkpointed_grads[name], grad, rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("family, method", [
    ("gpt2", "lora"), ("gpt2", "adapter"), ("gpt2", "full"), ("gpt2", "partial"),
    ("llama", "lora"), ("llama", "adapter"), ("llama", "full"), ("llama", "dora"),
    ("bert", "lora"),
])
def test_checkpointing_gives_the_same_loss_and_gradients(family, method):
    _assert_same_step(family, method)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_checkpointing_with_dropout_draws_the_same_masks(family):
    """LoRA dropout 0.1 (and GPT-2's own dropout): non-reentrant checkpointing restores the RNG state for the
    recomputation, so the masks, the loss and the gradients are those of the run without it."""
    _assert_same_step(family, "lora_dropout", dropout=True)


def test_checkpointing_on_a_bf16_base_under_autocast():
    _assert_same_step("llama", "lora", BF16)


def test_checkpointing_turns_the_kv_cache_off():
    model = tiny_llama()
    enable_gradient_checkpointing(model)
    assert model.config.use_cache is False and all(layer.gradient_checkpointing for layer in model.model.layers)


class _ToyConfig(PretrainedConfig):
    model_type = "toy-without-checkpointing"


class _ToyModel(PreTrainedModel):
    config_class = _ToyConfig
    supports_gradient_checkpointing = False

    def __init__(self, config: _ToyConfig) -> None:
        super().__init__(config)
        self.linear = nn.Linear(4, 4)
        self.post_init()


@pytest.mark.parametrize("model, name", [(_ToyModel(_ToyConfig()), "toy-without-checkpointing"),
                                         (nn.Linear(4, 4), "Linear")])
def test_a_model_without_checkpointing_is_one_line_naming_its_type(model, name):
    with pytest.raises(UserError) as error:
        enable_gradient_checkpointing(model)
    message = str(error.value)
    assert f"model type {name} does not support gradient checkpointing" in message and "\n" not in message
