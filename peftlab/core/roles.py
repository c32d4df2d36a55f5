"""The roles a linear layer plays in a transformer block: the vocabulary placement, ranks and figures share.

Kept apart from the model map (which needs torch and transformers) so that the report and its
figures can order and name roles without loading either.
"""

from __future__ import annotations

from typing import Literal

# "other": a block linear whose role could not be inferred; produced only by
# build_model_map(strict=False), so that explicit method.targets still work on
# such models. No named placement selects it.
# "scalar_gate": a linear with one output (Qwen2-MoE's shared_expert_gate), a gate that scales
# a branch, not a projection: no named placement selects it (its rank limit is 1), explicit
# method.targets may. Not called "gate", which is a module name (Mixtral's router) in targets.
Role = Literal["attn_q", "attn_k", "attn_v", "attn_qkv", "attn_out", "mlp_in", "mlp_out", "scalar_gate", "head",
               "other"]
ROLES: tuple[Role, ...] = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_out", "mlp_in", "mlp_out", "scalar_gate",
                           "head", "other")
ATTENTION_ROLES = frozenset({"attn_q", "attn_k", "attn_v", "attn_qkv", "attn_out"})
MLP_ROLES = frozenset({"mlp_in", "mlp_out"})
