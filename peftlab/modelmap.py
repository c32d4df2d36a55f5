"""The map of a model's adaptable linear modules: where each sits and what it does.

Roles are resolved structurally (which submodule of which block a linear lives
in), never by substring: GPT-2's ``c_proj`` exists both as ``attn.c_proj``
(attention output) and ``mlp.c_proj`` (MLP output), and a suffix match on
"c_proj" would silently hit both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import nn

Role = Literal["attn_q", "attn_k", "attn_v", "attn_qkv", "attn_out", "mlp_in", "mlp_out", "head"]
ROLES: tuple[Role, ...] = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_out", "mlp_in", "mlp_out", "head")
ATTENTION_ROLES = frozenset({"attn_q", "attn_k", "attn_v", "attn_qkv", "attn_out"})
MLP_ROLES = frozenset({"mlp_in", "mlp_out"})

# A slice of a fused projection's *output* features, as (start, length) runs.
# GPT-2 c_attn "q" is one run ((0, n_embd),); GPT-NeoX interleaves per head,
# so its "q" is one run per head.
Runs = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class LinearSite:
    """One linear module of the model (nn.Linear or GPT-2 Conv1D)."""

    name: str  # full dotted module name, e.g. "transformer.h.3.attn.c_attn"
    layer: int | None  # transformer block index; None for the head
    role: Role
    in_features: int
    out_features: int
    is_conv1d: bool = False  # GPT-2 Conv1D stores weight as [in, out]
    # Fused projections only: slice name ("q", "k", "v", "gate", "up") -> output rows.
    slices: dict[str, Runs] = field(default_factory=dict)

    @property
    def is_fused(self) -> bool:
        return bool(self.slices)


@dataclass(frozen=True)
class ModelMap:
    """Every adaptable linear module of a model, in module order."""

    family: str  # "gpt2" | "llama" | "bert" | "gpt_neox" | "phi3" | "structural"
    n_layers: int
    block_prefix: str  # e.g. "transformer.h" -- blocks are f"{block_prefix}.{i}"
    sites: tuple[LinearSite, ...]
    head_names: tuple[str, ...] = ()  # task head modules (classifier / score / lm_head)
    note: str = ""  # e.g. "roles inferred from module structure"

    def by_name(self) -> dict[str, LinearSite]:
        return {site.name: site for site in self.sites}

    def block_sites(self) -> tuple[LinearSite, ...]:
        return tuple(s for s in self.sites if s.layer is not None)


def build_model_map(model: nn.Module) -> ModelMap:
    """Resolve every linear module of ``model`` to (layer, role, slices).

    Works on real and meta-device models. Raises UserError where roles cannot
    be resolved, listing the linear modules found.
    """
    raise NotImplementedError
