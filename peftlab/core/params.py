"""Parameter accounting: one function, used by prepare, inspect and the run summary."""

from __future__ import annotations

from torch import nn


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of ``model``.

    ``model.parameters()`` yields each Parameter object once, so weights tied between modules
    (GPT-2's lm_head and wte) count once. Only shapes are read, so a meta-device model works.
    """
    trainable = total = 0
    for parameter in model.parameters():
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return trainable, total
