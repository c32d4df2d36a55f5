"""The optimizer and the learning-rate schedule of a run, and how many steps it takes.

AdamW over the parameters that require grad (weight decay on dim >= 2 only, as nanoGPT's
configure_optimizers), an optional LoRA+ learning rate for B, and linear warmup followed by cosine,
linear or constant, shaped as transformers' schedules so runs compare with HF Trainer's.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from peftlab.config import TrainConfig
from peftlab.inputs.data import num_batches


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The one trainable-parameter rule: requires_grad, as set by the method's prepare step."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; decay only matrices (dim >= 2); LoRA+ (Hayou et al. 2024, arXiv:2402.12354) scales B's lr."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, parameter in trainable_named_parameters(model):
        is_lora_b = cfg.lora_plus_ratio is not None and name.endswith("lora_B")
        groups.setdefault((parameter.dim() >= 2, is_lora_b), []).append(parameter)
    if not groups:
        raise ValueError("the prepared model has no trainable parameters")
    param_groups = [
        {"params": params, "weight_decay": cfg.weight_decay if decay else 0.0,
         "lr": cfg.lr * (cfg.lora_plus_ratio if is_lora_b else 1.0)}
        for (decay, is_lora_b), params in groups.items()
    ]
    return torch.optim.AdamW(param_groups, lr=cfg.lr)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ceil(warmup_ratio * total) steps, then cosine / linear decay to 0, or constant.

    Same shape as transformers' get_cosine_schedule_with_warmup, so runs compare with HF Trainer's.
    """
    warmup = math.ceil(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if cfg.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def total_steps_for(cfg: TrainConfig, n_train: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * num_batches(n_train, cfg.batch_size) / cfg.grad_accum))
