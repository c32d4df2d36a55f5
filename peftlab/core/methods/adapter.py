"""Bottleneck adapters (Houlsby et al. 2019, arXiv:1902.00751; Pfeiffer et al. 2020, arXiv:2005.00247).

An adapter is ``h + up(act(down(h)))`` with ``down: d -> bottleneck`` and ``up: bottleneck -> d``.
The up-projection starts at zero, so a fresh adapter is exactly the identity and the adapted model
starts equal to the base model (the near-identity init of Houlsby section 2.1, made exact as in
adapter-hub's ``mam_adapter`` init).

Placement: ``AdaptedOutput`` wraps a block's output projection (the ModelMap's ``attn_out`` and
``mlp_out`` sites) and applies the adapter to its output, so the adapter sits after the projection
and before the block's residual add / layer norm, as in Houlsby figure 2.
``houlsby`` adapts both sites of each selected block; ``pfeiffer`` only the MLP output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from peftlab.core.methods.lora import replace_module, weight_as_out_in
from peftlab.core.modelmap import ModelMap
from peftlab.errors import UserError

VARIANT_ROLES = {"houlsby": ("attn_out", "mlp_out"), "pfeiffer": ("mlp_out",)}
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


class BottleneckAdapter(nn.Module):
    """``h + up(act(down(h)))``; ``up`` is zero-initialised, so the adapter starts as the identity.

    Parameters: ``2 * d * bottleneck + bottleneck + d`` (Houlsby section 2.1). Unlike Houlsby, the
    layer norms stay frozen: only adapter parameters train, so the method is exactly "adapters". They are fp32; the
    hidden state is cast to fp32 for the bottleneck and the result cast back to its own dtype.
    """

    def __init__(self, d: int, bottleneck: int, activation: str = "gelu", *,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise UserError(f"adapter activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")
        factory = {"device": device, "dtype": torch.float32}
        self.down = nn.Linear(d, bottleneck, **factory)  # [bottleneck, d]
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, d, **factory)  # [d, bottleneck]
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: Tensor) -> Tensor:
        update = self.up(self.act(self.down(h.to(self.down.weight.dtype))))  # [..., d]
        return h + update.to(h.dtype)


class AdaptedOutput(nn.Module):
    """A block's output projection followed by a bottleneck adapter: ``adapter(base(x))``."""

    def __init__(self, base: nn.Module, adapter: BottleneckAdapter) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter

    @property
    def weight(self) -> Tensor:
        """The wrapped projection's weight: model code reads it (T5's MLP checks ``wo.weight.dtype``)."""
        return self.base.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.adapter(self.base(x))


def apply_adapters(model: nn.Module, model_map: ModelMap, layers: Sequence[int], *, variant: str,
                   bottleneck: int, activation: str) -> dict[str, AdaptedOutput]:
    """Wrap the ``attn_out`` / ``mlp_out`` sites of ``layers`` in AdaptedOutput; {module name: wrapper}.

    Does not touch requires_grad of the base model (``methods.prepare`` freezes it first); the new
    adapter parameters are trainable.
    """
    if variant not in VARIANT_ROLES:
        raise UserError(f"adapter variant {variant!r} is not one of {', '.join(VARIANT_ROLES)}")
    roles = VARIANT_ROLES[variant]
    chosen = set(layers)
    sites = [s for s in model_map.block_sites() if s.layer in chosen and s.role in roles]
    if not sites:
        raise UserError(f"no {' or '.join(roles)} modules in layers {sorted(chosen)} of this "
                        f"{model_map.family} model: nowhere to place {variant} adapters")
    wrapped: dict[str, AdaptedOutput] = {}
    for site in sites:
        base = model.get_submodule(site.name)
        device = weight_as_out_in(base).device
        adapter = BottleneckAdapter(site.out_features, bottleneck, activation, device=device)
        wrapper = AdaptedOutput(base, adapter)
        replace_module(model, site.name, wrapper)
        wrapped[site.name] = wrapper
    return wrapped
