"""`peftlab inspect`: the placement map of a method on a model, without training or weights.

The model is built on the meta device from its config, so the placement of a
70B model can be inspected from a directory holding only config.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from peftlab.config import MethodConfig
from peftlab.core.methods import Prepared, prepare
from peftlab.core.modelmap import ModelMap, build_model_map
from peftlab.core.placement_map import format_placement_map
from peftlab.inputs.models import load_model_skeleton


@dataclass
class PlacementReport:
    model_map: ModelMap
    prepared: Prepared
    target_params: dict[str, int]  # module name -> trainable parameters it added

    def as_json(self) -> dict[str, Any]:
        return {
            "targets": [{"module": t.name, "layer": t.layer, "role": t.role,
                         "slices": list(t.slices) if t.slices else None,
                         "rank": self.prepared.ranks.get(t.name), "params": self.target_params[t.name]}
                        for t in self.prepared.targets],
            "trainable_params": self.prepared.trainable_params,
            "total_params": self.prepared.total_params,
        }

    def as_text(self) -> str:
        if not self.prepared.targets:
            return (f"{self.prepared.method}: {self.prepared.trainable_params:,} trainable of "
                    f"{self.prepared.total_params:,} parameters ({self.prepared.percent_trainable:.3f}%)")
        return format_placement_map(self.model_map, self.prepared.targets, self.prepared.ranks or None,
                                    trainable_params=self.prepared.trainable_params,
                                    total_params=self.prepared.total_params)


def inspect_placement(model_name: str, method: MethodConfig, *, task: str = "instruction") -> PlacementReport:
    model, _ = load_model_skeleton(model_name, task=task)
    model_map = build_model_map(model, strict=method.targets is None)
    prepared = prepare(model, method, model_map, train_head=task == "classification")
    return PlacementReport(model_map, prepared, _params_per_target(model, prepared))


def _params_per_target(model: nn.Module, prepared: Prepared) -> dict[str, int]:
    """Trainable parameters under each adapted module (its LoRA or adapter weights)."""
    counts = {t.name: 0 for t in prepared.targets}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        for target in counts:
            if name.startswith(target + "."):
                counts[target] += parameter.numel()
    return counts
