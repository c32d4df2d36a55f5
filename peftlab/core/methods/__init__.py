"""The one method dispatch: freeze everything, then make the chosen method's own parameters trainable.

After ``prepare`` the rule is simple: a parameter trains if and only if ``requires_grad`` is True
(the optimizer is built from exactly those parameters).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from peftlab.config import MethodConfig
from peftlab.core import placement
from peftlab.core import ranks as rank_schedules
from peftlab.core.methods.adapter import apply_adapters
from peftlab.core.methods.lora import apply_lora, check_quantized_base
from peftlab.core.methods.partial import apply_full, apply_partial, set_head_trainable
from peftlab.core.modelmap import ModelMap
from peftlab.core.params import count_params
from peftlab.core.placement import Target
from peftlab.errors import UserError


@dataclass
class Prepared:
    """What ``prepare`` did to the model: the adapted modules and the parameter accounting."""

    method: str
    targets: list[Target]  # adapted modules (lora, adapter); [] for partial/full
    ranks: dict[str, int]  # lora: per-module rank; {} otherwise
    alphas: dict[str, float]  # lora: per-module alpha; {} otherwise
    trainable_params: int
    total_params: int

    @property
    def percent_trainable(self) -> float:
        return 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0


def prepare(model: nn.Module, cfg: MethodConfig, model_map: ModelMap, *, train_head: bool) -> Prepared:
    """Apply method ``cfg.name`` to ``model`` in place.

    The task head trains when ``train_head`` (the caller passes True for classification, whose
    new head must learn) or when ``cfg.train_head`` is set explicitly: on a causal LM the head is
    usually tied to the token embeddings, so training it is opt-in.
    """
    train_head = train_head or bool(cfg.train_head)
    if cfg.quantize_base is not None:  # before anything is touched: QLoRA on an unquantized base is refused
        check_quantized_base(model, cfg.quantize_base)
    model.requires_grad_(False)
    if train_head:  # first, so that a budget schedule counts the head among what the method trains
        set_head_trainable(model, model_map)
    targets: list[Target] = []
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    if cfg.name == "lora":
        targets, ranks, alphas = _prepare_lora(model, cfg, model_map)
    elif cfg.name == "adapter":
        layers = placement.parse_layers(cfg.layers, model_map.n_layers)
        wrapped = apply_adapters(model, model_map, layers, variant=cfg.adapter_variant,
                                 bottleneck=cfg.bottleneck, activation=cfg.activation)
        sites = model_map.by_name()
        targets = [Target(sites[name]) for name in wrapped]
    elif cfg.name == "partial":
        apply_partial(model, model_map, last_n=cfg.last_n, bitfit=cfg.bitfit)
    elif cfg.name == "full":
        apply_full(model)
    else:  # MethodConfig validates the name; reaching here is a bug
        raise ValueError(f"unknown method {cfg.name!r}")
    trainable, total = count_params(model)
    if trainable == 0:
        raise UserError(f"method {cfg.name} trains no parameters on this model "
                        "(partial: set last_n > 0, bitfit: true, or train_head: true)")
    return Prepared(cfg.name, targets, ranks, alphas, trainable, total)


def _prepare_lora(model: nn.Module, cfg: MethodConfig,
                  model_map: ModelMap) -> tuple[list[Target], dict[str, int], dict[str, float]]:
    """Targets from the placement spec, ranks from the schedule, then wrap; rank-0 targets are dropped."""
    selected = placement.select_targets(model_map, cfg.placement, cfg.layers, cfg.targets)
    head = count_params(model)[0]  # what already trains (the head): a budget pays for it too
    ranks = rank_schedules.allocate_ranks(selected, cfg.ranks, model_map.n_layers, dora=cfg.dora,
                                          fixed_params=head)
    alphas = rank_schedules.alphas_for(ranks, cfg.alpha, cfg.alpha_policy)
    apply_lora(model, selected, ranks, alphas, dropout=cfg.dropout, rslora=cfg.rslora, dora=cfg.dora)
    targets = [t for t in selected if t.name in ranks]
    return targets, dict(ranks), {name: float(alphas[name]) for name in ranks}
