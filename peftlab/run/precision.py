"""Numeric precision and activation memory of a run: the base dtype, the autocast, fp32 trained parameters,
gradient checkpointing.

It exists because these decisions depend on each other and must be taken once, the same way by
training, evaluation and generation: a bf16 base needs bf16 autocast (its activations meet fp32 LoRA,
adapter and head weights), and a base loaded in half precision must not pull its trained parameters
down with it (AdamW updates on bf16 weights round away small steps). The rules:

- ``resolve_base_dtype``: the dtype the frozen base weights load in (``train.base_dtype``).
- ``autocast_for``: the one autocast rule (``train.precision``), following a half-precision base.
- ``keep_trainable_fp32``: after ``prepare``, every parameter that trains is fp32.
- ``enable_gradient_checkpointing``: recompute block activations in backward (``train.gradient_checkpointing``).

fp16 has no loss scaling here (no GradScaler): a step whose loss or gradient overflows to inf stops the
run as diverged (run/train.py), so bf16 is the half precision to prefer wherever the hardware has it.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from peftlab.config import TrainConfig
from peftlab.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# Methods that leave every base weight frozen: only for these does auto load the base in bf16. Full and
# partial fine-tuning train base weights, which are fp32 anyway (keep_trainable_fp32): loading them in
# bf16 first would only round the starting point.
FROZEN_BASE_METHODS = ("lora", "adapter")


def resolve_base_dtype(train_cfg: TrainConfig, device: torch.device, method: str = "lora") -> torch.dtype:
    """The dtype the base model loads in.

    auto: bf16 on a CUDA GPU that supports it when ``method`` keeps the base frozen; fp32 on every
    other device (as before base dtypes existed), for full and partial fine-tuning, and whenever
    ``precision`` is fp32 (fp32 compute needs an fp32 base).
    """
    if train_cfg.base_dtype != "auto":
        return DTYPES[train_cfg.base_dtype]
    if method not in FROZEN_BASE_METHODS:
        return torch.float32
    if device.type == "cuda" and train_cfg.precision != "fp32" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def autocast_dtype(device: torch.device, train_cfg: TrainConfig) -> torch.dtype | None:
    """The autocast dtype of a run on ``device``, or None for no autocast (the rule ``autocast_for`` applies).

    precision fp32: none (the config refuses it with a half base); bf16: bf16; auto: the base dtype
    when it is set to bf16/fp16 (fp32 trained layers meet half activations only through autocast), else
    bf16 on CUDA and none elsewhere, as before base dtypes existed. (A base_dtype of auto loads bf16 only
    on CUDA, where the autocast is bf16 anyway, so the method does not matter here.)
    """
    if train_cfg.precision == "fp32":
        return None
    if train_cfg.precision == "bf16":
        return torch.bfloat16
    if train_cfg.base_dtype in ("bf16", "fp16"):
        return DTYPES[train_cfg.base_dtype]
    return torch.bfloat16 if device.type == "cuda" else None


def autocast_for(device: torch.device, train_cfg: TrainConfig) -> contextlib.AbstractContextManager:
    """The autocast every forward of a run runs under (training, evaluation, generation); see ``autocast_dtype``.

    With fp16 there is no loss scaling: an overflow shows as a non-finite loss or gradient and stops the
    run as diverged, so prefer bf16.
    """
    dtype = autocast_dtype(device, train_cfg)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def keep_trainable_fp32(model: nn.Module) -> int:
    """Cast every parameter that requires grad to fp32, in place; returns how many were cast.

    Call it after ``prepare``: LoRA and adapter weights are created fp32, but a classification head,
    trained embeddings, partial/full-trained blocks or DoRA on a half base arrive in the base dtype.
    ``.data`` is replaced, so a parameter tied between modules (GPT-2's lm_head and wte) stays one parameter.
    """
    cast = 0
    for parameter in model.parameters():  # each Parameter once, tied ones included
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.to(torch.float32)
            cast += 1
    return cast


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block's activations during backward instead of storing them.

    Non-reentrant checkpointing (``use_reentrant=False``): gradients reach the trained parameters inside
    a block even when its inputs do not require grad (a frozen base under LoRA), and the RNG state is
    restored for the recomputation, so dropout draws the same masks and the gradients are unchanged.
    The KV cache is switched off: it is useless in training and HF models refuse it with checkpointing.
    Checkpointing acts in train mode only, as HF models apply it.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(f"train.gradient_checkpointing: model type {model_type} does not support gradient "
                        "checkpointing; set train.gradient_checkpointing: false")
    kwargs = {"use_reentrant": False}
    # transformers >= 5.x renamed it (the old name warns); older versions have only the old name.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False
