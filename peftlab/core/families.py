"""Known model families: block-relative linear names -> role, and the output layout of fused projections.

An exact table per family (by ``config.model_type``); the model map uses it before falling back to
structural inference (``peftlab.core.structure``). Add a family here: its block list, its roles and,
for a fused projection (GPT-2 ``c_attn``), a function giving each slice's output rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from peftlab.core.roles import Role
from peftlab.errors import UserError

# A slice of a fused projection's *output* features, as (start, length) runs.
# GPT-2 c_attn "q" is one run ((0, n_embd),); GPT-NeoX interleaves per head,
# so its "q" is one run per head.
Runs = tuple[tuple[int, int], ...]


# --- fused-projection layouts --------------------------------------------------------------------

SliceLayout = Callable[[Any, int], dict[str, Runs]]  # (model config, out_features) -> slices


def _contiguous(sizes: Mapping[str, int], out_features: int, where: str) -> dict[str, Runs]:
    """Slices laid end to end, [a | b | c], each one run."""
    if sum(sizes.values()) != out_features:
        raise UserError(f"{where}: expected {sum(sizes.values())} output features from the config, found "
                        f"{out_features}; name targets explicitly with method.targets")
    slices, start = {}, 0
    for name, size in sizes.items():
        slices[name] = ((start, size),)
        start += size
    return slices


def _gpt2_qkv(config: Any, out_features: int) -> dict[str, Runs]:
    # GPT2Attention: query, key, value = c_attn(x).split(n_embd, dim=2)
    n = config.n_embd
    return _contiguous({"q": n, "k": n, "v": n}, out_features, "GPT-2 c_attn")


def _neox_qkv(config: Any, out_features: int) -> dict[str, Runs]:
    # GPTNeoXAttention views the output as [num_heads, 3 * head_size] and chunks the last dim
    # into q, k, v: head h's q rows are h*3*hd ... +hd, its k rows follow, then its v rows.
    heads = config.num_attention_heads
    hd = config.hidden_size // heads
    if 3 * heads * hd != out_features:
        raise UserError(f"GPT-NeoX query_key_value: expected {3 * heads * hd} output features, found "
                        f"{out_features}; name targets explicitly with method.targets")
    return {name: tuple((h * 3 * hd + j * hd, hd) for h in range(heads)) for j, name in enumerate("qkv")}


def _phi3_qkv(config: Any, out_features: int) -> dict[str, Runs]:
    # Phi3Attention: [q | k | v] contiguous, k and v sized by the key/value heads (grouped-query).
    heads = config.num_attention_heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * hd
    return _contiguous({"q": heads * hd, "k": kv, "v": kv}, out_features, "Phi-3 qkv_proj")


def _phi3_gate_up(config: Any, out_features: int) -> dict[str, Runs]:
    # Phi3MLP: gate, up = gate_up_proj(x).chunk(2, dim=-1)
    n = config.intermediate_size
    return _contiguous({"gate": n, "up": n}, out_features, "Phi-3 gate_up_proj")


# --- known families ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    name: str
    model_types: frozenset[str]  # config.model_type values that share this layout
    blocks: str  # the block ModuleList's dotted name, relative to any base-model prefix
    roles: Mapping[str, Role]  # block-relative linear name -> role
    layouts: Mapping[str, SliceLayout] = field(default_factory=dict)  # fused linears only


LLAMA_ROLES: dict[str, Role] = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_out", "mlp.gate_proj": "mlp_in", "mlp.up_proj": "mlp_in",
    "mlp.down_proj": "mlp_out",
}

FAMILIES: tuple[Family, ...] = (
    Family("gpt2", frozenset({"gpt2"}), "h",
            {"attn.c_attn": "attn_qkv", "attn.c_proj": "attn_out", "mlp.c_fc": "mlp_in", "mlp.c_proj": "mlp_out"},
            {"attn.c_attn": _gpt2_qkv}),
    Family("llama", frozenset({"llama", "mistral", "qwen2"}), "layers", LLAMA_ROLES),
    Family("bert", frozenset({"bert"}), "encoder.layer",
            {"attention.self.query": "attn_q", "attention.self.key": "attn_k", "attention.self.value": "attn_v",
             "attention.output.dense": "attn_out", "intermediate.dense": "mlp_in", "output.dense": "mlp_out"}),
    Family("distilbert", frozenset({"distilbert"}), "transformer.layer",
            {"attention.q_lin": "attn_q", "attention.k_lin": "attn_k", "attention.v_lin": "attn_v",
             "attention.out_lin": "attn_out", "ffn.lin1": "mlp_in", "ffn.lin2": "mlp_out"}),
    Family("gpt_neox", frozenset({"gpt_neox"}), "layers",
            {"attention.query_key_value": "attn_qkv", "attention.dense": "attn_out",
             "mlp.dense_h_to_4h": "mlp_in", "mlp.dense_4h_to_h": "mlp_out"},
            {"attention.query_key_value": _neox_qkv}),
    Family("phi3", frozenset({"phi3"}), "layers",
            {"self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_out", "mlp.gate_up_proj": "mlp_in",
             "mlp.down_proj": "mlp_out"},
            {"self_attn.qkv_proj": _phi3_qkv, "mlp.gate_up_proj": _phi3_gate_up}),
)


def fused_layouts() -> list[str]:
    """The fused projections whose output layout (and so whose slices) peftlab knows: "<family> <name>"."""
    return [f"{family.name} {rel}" for family in FAMILIES for rel in family.layouts]
