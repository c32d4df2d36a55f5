"""Structural inference for architectures no family table lists: which module list holds the blocks and
what each linear in a block does, read from module structure and shapes alone (never from substrings).

Also the shape helpers the model map shares: what counts as a linear, and its (in, out) features.
"""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab.core.roles import Role


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) from shapes only, so meta-device models work."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]  # Conv1D weight is [in, out]
    # The attributes, not weight.shape: quantized Linear subclasses pack their weight.
    return module.in_features, module.out_features


def beside_embeddings(model: nn.Module, names: list[str]) -> list[str]:
    """The block lists that sit in the module holding the input token embeddings: the language model's.

    A vision tower (Gemma-3, Llava) is often deeper than the language model, so length says nothing;
    the token embeddings are what the language model, and only it, reads first.
    """
    owner = embedding_owner(model)
    if owner is None:
        return names
    return [name for name in names if owner == "" or name.startswith(owner + ".")]


def embedding_owner(model: nn.Module) -> str | None:
    """The dotted name of the module that holds the input embeddings ("" for the model itself)."""
    try:
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    except (NotImplementedError, AttributeError):
        return None
    name = next((name for name, module in model.named_modules() if module is embeddings), None)
    return None if name is None else name.rpartition(".")[0]


# --- structural inference (any other architecture) ------------------------------------------------


def find_structural_blocks(model: nn.Module) -> tuple[tuple[str, ...], str]:
    """(the block lists, in layer order; or () and why none).

    A candidate is an outermost ModuleList (or Sequential) of identical modules holding linears:
    outermost, so that a block's own lists (MoE experts, per-head projections) are never taken
    for the blocks. Of several candidates, the language model's is the one beside the input
    embeddings (a deeper vision tower is not it); an encoder-decoder's two stacks are both
    taken. Anything else is ambiguous and refused with the candidates named, never guessed.
    """
    candidates = _block_candidates(model)
    if not candidates:
        return (), "no block list (a ModuleList of identical transformer blocks holding linears) was found"
    language = beside_embeddings(model, list(candidates)) if len(candidates) > 1 else list(candidates)
    if len(language) == 1:
        return (language[0],), ""
    if _encoder_decoder(model, language):
        return tuple(language), ""
    shown = ", ".join(f"{name} ({length} blocks)" for name, length in candidates.items())
    return (), (f"{len(candidates)} block lists were found and none is recognisably the language model's: "
                f"{shown}")


def _block_candidates(model: nn.Module) -> dict[str, int]:
    """{name: number of blocks} of the outermost lists of identical modules holding linears, in module order."""
    candidates: dict[str, int] = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
            continue
        if any(name.startswith(outer + ".") for outer in candidates):
            continue
        kinds = {type(child) for child in module}
        if len(kinds) == 1 and not is_linear(module[0]) and any(is_linear(m) for m in module[0].modules()):
            candidates[name] = len(module)
    return candidates


def _encoder_decoder(model: nn.Module, names: list[str]) -> bool:
    """An encoder-decoder's two stacks (T5, BART): config.is_encoder_decoder, one list under an
    "encoder" module and one under a "decoder" module."""
    if len(names) != 2 or not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return False
    first, second = (name.split(".") for name in names)
    return "encoder" in first and "decoder" in second


# Leaf names of attention projections in common architectures (lower-cased, whole names).
_Q_NAMES = frozenset({"q_proj", "q", "query", "q_lin", "wq", "to_q", "query_proj"})
_K_NAMES = frozenset({"k_proj", "k", "key", "k_lin", "wk", "to_k", "key_proj"})
_V_NAMES = frozenset({"v_proj", "v", "value", "v_lin", "wv", "to_v", "value_proj"})
_QKV_NAMES = frozenset({"qkv_proj", "qkv", "query_key_value", "c_attn", "wqkv", "in_proj", "to_qkv"})
_OUT_NAMES = frozenset({"o_proj", "out_proj", "o", "out_lin", "wo", "to_out", "dense", "c_proj", "proj",
                        "out", "output"})
_LEAF_ROLES: dict[str, Role] = {
    **{n: "attn_q" for n in _Q_NAMES}, **{n: "attn_k" for n in _K_NAMES}, **{n: "attn_v" for n in _V_NAMES},
    **{n: "attn_qkv" for n in _QKV_NAMES}, **{n: "attn_out" for n in _OUT_NAMES},
}


def structural_roles(block: nn.Module, inside: list[tuple[str, nn.Module]]) -> dict[str, Role | None]:
    """Roles of one block's linears (block-relative names), inferred from structure.

    Attention: a linear with an ancestor inside the block whose attribute or class name
    contains "attn" or "attention" (self_attn, SelfAttention, OPTAttention). Its role comes
    from its own leaf name (q_proj/query/q -> attn_q, ..., o_proj/out_proj/dense -> attn_out);
    a fused qkv gets role attn_qkv without slices, because its layout is unknown. If exactly
    one attention linear is left unnamed and no attn_out was found, it is the output
    projection; anything else unnamed stays unresolved.
    MLP: every other linear. The one that writes back to the block width from a different
    width is mlp_out (else the last in module order); the others are mlp_in. A single
    non-attention linear is ambiguous and stays unresolved.
    Scalar gates: a linear with a single output scales a branch (Qwen2-MoE's shared_expert_gate);
    it is neither, and taking it for an MLP projection would give it LoRA of rank at most 1.
    """
    gates = {rel for rel, m in inside if linear_shape(m)[1] == 1}
    attention = [(rel, m) for rel, m in inside if rel not in gates and _under_attention(block, rel)]
    mlp = [(rel, m) for rel, m in inside if rel not in gates and not _under_attention(block, rel)]
    roles: dict[str, Role | None] = {rel: "scalar_gate" for rel in gates}
    roles.update({rel: _LEAF_ROLES.get(rel.rsplit(".", 1)[-1].lower()) for rel, _ in attention})
    unnamed = [rel for rel, role in roles.items() if role is None]
    if len(unnamed) == 1 and "attn_out" not in roles.values():
        roles[unnamed[0]] = "attn_out"
    width = linear_shape(inside[0][1])[0] if inside else 0  # the first linear reads the residual stream
    roles.update(_mlp_roles(mlp, width))
    return {rel: roles[rel] for rel, _ in inside}  # module order


def _under_attention(block: nn.Module, rel: str) -> bool:
    parts = rel.split(".")
    for depth in range(1, len(parts)):  # ancestors strictly inside the block, not the linear itself
        ancestor = block.get_submodule(".".join(parts[:depth]))
        names = (parts[depth - 1].lower(), type(ancestor).__name__.lower())
        if any(word in text for text in names for word in ("attn", "attention")):
            return True
    return False


def _mlp_roles(mlp: list[tuple[str, nn.Module]], width: int) -> dict[str, Role | None]:
    if len(mlp) < 2:
        return {rel: None for rel, _ in mlp}
    writes_back = [rel for rel, m in mlp if linear_shape(m)[1] == width and linear_shape(m)[0] != width]
    out = writes_back[0] if len(writes_back) == 1 else mlp[-1][0]
    return {rel: "mlp_out" if rel == out else "mlp_in" for rel, _ in mlp}
