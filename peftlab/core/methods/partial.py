"""Partial fine-tuning: the last N transformer blocks, the task head, BitFit; and full fine-tuning.

These only switch ``requires_grad`` on; ``methods.prepare`` has frozen every parameter first.
"""

from __future__ import annotations

from torch import nn

from peftlab.core.modelmap import ModelMap
from peftlab.errors import UserError


def apply_partial(model: nn.Module, model_map: ModelMap, *, last_n: int, bitfit: bool) -> None:
    """Make trainable: every parameter of the last ``last_n`` blocks; every bias when ``bitfit``
    (BitFit, Ben Zaken et al. 2021, arXiv:2106.10199: all bias terms, layer-norm biases included).
    The head is ``set_head_trainable``'s job, done by ``prepare`` for every method alike.
    """
    n_layers = model_map.n_layers
    if not 0 <= last_n <= n_layers:
        raise UserError(f"method.last_n={last_n}, but this model has {n_layers} blocks")
    for layer in range(n_layers - last_n, n_layers):
        model.get_submodule(model_map.block_name(layer)).requires_grad_(True)
    if bitfit:
        biases = [p for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] == "bias"]
        if not biases:
            raise UserError(f"method.bitfit: this {model_map.family} model has no bias parameters to train")
        for parameter in biases:
            parameter.requires_grad_(True)


def set_head_trainable(model: nn.Module, model_map: ModelMap) -> None:
    """Every parameter of the task head's modules trains, like peft's modules_to_save.

    Refused when the model map found no head: a classifier whose new head stayed frozen at its
    random initialisation would train (and report) a model that cannot learn the task.
    """
    if not model_map.head_modules:
        raise UserError("training the task head was asked for (classification, or method.train_head), but no "
                        "head was found in this model: no lm_head / score / classifier module, no module beside "
                        "the base model, and no weights that loading initialised fresh")
    for name in model_map.head_modules:
        model.get_submodule(name).requires_grad_(True)


def apply_full(model: nn.Module) -> None:
    """Full fine-tuning: every parameter trainable."""
    model.requires_grad_(True)
