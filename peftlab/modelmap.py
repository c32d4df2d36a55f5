"""The map of a model's adaptable linear modules: where each sits and what it does.

Roles are resolved structurally (which submodule of which block a linear lives
in), never by substring: GPT-2's ``c_proj`` exists both as ``attn.c_proj``
(attention output) and ``mlp.c_proj`` (MLP output), and a suffix match on
"c_proj" would silently hit both.

Two ways to a role:

* Known families (by ``config.model_type``): an exact table of block-relative
  names -> role, plus the real output layout of each fused projection.
* Any other architecture: structural inference (see ``_structural_roles``),
  marked ``family="structural"`` with a note, because it is a best guess.

Only shapes are read, so meta-device models map exactly like real ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import UserError

# "other": a block linear whose role could not be inferred; produced only by
# build_model_map(strict=False), so that explicit method.targets still work on
# such models. No named placement selects it.
Role = Literal["attn_q", "attn_k", "attn_v", "attn_qkv", "attn_out", "mlp_in", "mlp_out", "head", "other"]
ROLES: tuple[Role, ...] = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_out", "mlp_in", "mlp_out", "head",
                           "other")
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
    """Every adaptable linear module of a model, in module order.

    Listed: the linears inside transformer blocks, and the task head (role
    "head", layer None). Other linears outside the blocks (e.g. a bare
    BertModel's pooler, OPT's project_in) are not adaptable and not listed.
    """

    family: str  # "gpt2" | "llama" | "bert" | "distilbert" | "gpt_neox" | "phi3" | "structural"
    n_layers: int
    block_prefix: str  # e.g. "transformer.h" -- blocks are f"{block_prefix}.{i}"
    sites: tuple[LinearSite, ...]
    head_names: tuple[str, ...] = ()  # task head modules (classifier / score / lm_head)
    note: str = ""  # e.g. "roles inferred from module structure"

    def by_name(self) -> dict[str, LinearSite]:
        return {site.name: site for site in self.sites}

    def block_sites(self) -> tuple[LinearSite, ...]:
        return tuple(s for s in self.sites if s.layer is not None)


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
class _Family:
    name: str
    model_types: frozenset[str]  # config.model_type values that share this layout
    blocks: str  # the block ModuleList's dotted name, relative to any base-model prefix
    roles: Mapping[str, Role]  # block-relative linear name -> role
    layouts: Mapping[str, SliceLayout] = field(default_factory=dict)  # fused linears only


_LLAMA_ROLES: dict[str, Role] = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_out", "mlp.gate_proj": "mlp_in", "mlp.up_proj": "mlp_in",
    "mlp.down_proj": "mlp_out",
}

_FAMILIES: tuple[_Family, ...] = (
    _Family("gpt2", frozenset({"gpt2"}), "h",
            {"attn.c_attn": "attn_qkv", "attn.c_proj": "attn_out", "mlp.c_fc": "mlp_in", "mlp.c_proj": "mlp_out"},
            {"attn.c_attn": _gpt2_qkv}),
    _Family("llama", frozenset({"llama", "mistral", "qwen2"}), "layers", _LLAMA_ROLES),
    _Family("bert", frozenset({"bert"}), "encoder.layer",
            {"attention.self.query": "attn_q", "attention.self.key": "attn_k", "attention.self.value": "attn_v",
             "attention.output.dense": "attn_out", "intermediate.dense": "mlp_in", "output.dense": "mlp_out"}),
    _Family("distilbert", frozenset({"distilbert"}), "transformer.layer",
            {"attention.q_lin": "attn_q", "attention.k_lin": "attn_k", "attention.v_lin": "attn_v",
             "attention.out_lin": "attn_out", "ffn.lin1": "mlp_in", "ffn.lin2": "mlp_out"}),
    _Family("gpt_neox", frozenset({"gpt_neox"}), "layers",
            {"attention.query_key_value": "attn_qkv", "attention.dense": "attn_out",
             "mlp.dense_h_to_4h": "mlp_in", "mlp.dense_4h_to_h": "mlp_out"},
            {"attention.query_key_value": _neox_qkv}),
    _Family("phi3", frozenset({"phi3"}), "layers",
            {"self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_out", "mlp.gate_up_proj": "mlp_in",
             "mlp.down_proj": "mlp_out"},
            {"self_attn.qkv_proj": _phi3_qkv, "mlp.gate_up_proj": _phi3_gate_up}),
)

# Top-level children that are a task head. The pooler (BERT) feeds the classifier, so it
# is part of the head when the model has one: trained with it under train_head, like
# the classifier of BERT fine-tuning (Devlin et al. 2019), and never given LoRA.
_HEAD_CHILDREN = frozenset({"lm_head", "score", "classifier", "pre_classifier"})
_CLASSIFIER_CHILDREN = frozenset({"score", "classifier"})
_POOLER = "pooler"

_STRUCTURAL_NOTE = "roles inferred from module structure"


# --- the entry point ----------------------------------------------------------------------------


def build_model_map(model: nn.Module, *, strict: bool = True) -> ModelMap:
    """Resolve every linear module of ``model`` to (layer, role, slices).

    Works on real and meta-device models. With ``strict`` (the default) a
    linear whose role cannot be resolved, or a model without a block list,
    raises UserError listing the linear modules found. ``strict=False`` maps
    such linears with role "other" instead (layer None when no block list is
    found), for callers whose user named ``method.targets`` explicitly.
    """
    linears = [(name, module) for name, module in model.named_modules() if _is_linear(module)]
    config = _text_config(model)
    family = _known_family(config)
    prefix = _find_blocks(model, family.blocks) if family else None
    if prefix is None:
        family, prefix = None, _find_structural_blocks(model)
    if prefix is None:
        if strict:
            _refuse(linears, "no block list (a ModuleList of identical transformer blocks) was found")
        return _map_without_blocks(model, linears)
    blocks = model.get_submodule(prefix)  # a ModuleList (or Sequential) of blocks
    roles = _block_roles(blocks, prefix, linears, family)
    unresolved = [name for name, role in roles.items() if role is None]
    if unresolved and strict:
        _refuse(linears, "could not give a role to " + ", ".join(unresolved[:6])
                + (f" (and {len(unresolved) - 6} more)" if len(unresolved) > 6 else ""))
    sites = _sites(model, linears, prefix, roles, family, config)
    return ModelMap(family=family.name if family else "structural", n_layers=len(blocks), block_prefix=prefix,
                    sites=sites, head_names=tuple(s.name for s in sites if s.role == "head"),
                    note="" if family else _STRUCTURAL_NOTE)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def _shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) from shapes only, so meta-device models work."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]  # Conv1D weight is [in, out]
    # The attributes, not weight.shape: quantized Linear subclasses pack their weight.
    return module.in_features, module.out_features


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


def _known_family(config: Any) -> _Family | None:
    model_type = getattr(config, "model_type", None)
    return next((f for f in _FAMILIES if model_type in f.model_types), None)


def _find_blocks(model: nn.Module, blocks: str) -> str | None:
    """The full name of the family's block list ("bert.encoder.layer" for "encoder.layer")."""
    found = [name for name, module in model.named_modules() if isinstance(module, nn.ModuleList)
             and (name == blocks or name.endswith("." + blocks))]
    return found[0] if len(found) == 1 else None


def _refuse(linears: list[tuple[str, nn.Module]], reason: str) -> None:
    names = [name for name, _ in linears]
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    raise UserError(f"cannot map this model's layers: {reason}; linear modules found ({len(names)}): {shown}; "
                    "name the modules to adapt explicitly with method.targets (exact names, dotted suffixes "
                    "or re:<regex>)")


# --- roles per block ----------------------------------------------------------------------------


def _block_roles(blocks: nn.Module, prefix: str, linears: list[tuple[str, nn.Module]],
                 family: _Family | None) -> dict[str, Role | None]:
    """Full linear name -> role (None = unresolved) for every linear inside a block, in module order."""
    roles: dict[str, Role | None] = {}
    for index, block in enumerate(blocks):
        block_name = f"{prefix}.{index}"
        inside = [(name[len(block_name) + 1:], module) for name, module in linears
                  if name.startswith(block_name + ".")]
        if family is not None:
            block_roles = {rel: family.roles.get(rel) for rel, _ in inside}
        else:
            block_roles = _structural_roles(block, inside)
        roles.update({f"{block_name}.{rel}": role for rel, role in block_roles.items()})
    return roles


def _sites(model: nn.Module, linears: list[tuple[str, nn.Module]], prefix: str,
           roles: Mapping[str, Role | None], family: _Family | None, config: Any) -> tuple[LinearSite, ...]:
    heads = _head_names(model, linears)
    sites = []
    for name, module in linears:
        in_features, out_features = _shape(module)
        if name in roles:
            layer_text, rel = name[len(prefix) + 1:].split(".", 1)
            layout = family.layouts.get(rel) if family else None
            slices = layout(config, out_features) if layout else {}
            sites.append(LinearSite(name, int(layer_text), roles[name] or "other", in_features, out_features,
                                    isinstance(module, Conv1D), slices))
        elif name in heads:
            sites.append(LinearSite(name, None, "head", in_features, out_features, isinstance(module, Conv1D)))
    return tuple(sites)


def _head_names(model: nn.Module, linears: list[tuple[str, nn.Module]]) -> set[str]:
    top = {name for name, _ in model.named_children()}
    has_classifier = bool(top & _CLASSIFIER_CHILDREN)
    heads = set()
    for name, _ in linears:
        parts = name.split(".")
        if parts[0] in _HEAD_CHILDREN or (has_classifier and _POOLER in parts):
            heads.add(name)
    return heads


def _map_without_blocks(model: nn.Module, linears: list[tuple[str, nn.Module]]) -> ModelMap:
    """strict=False and no block list: every non-head linear is an "other" site with no layer."""
    heads = _head_names(model, linears)
    sites = tuple(LinearSite(name, None, "head" if name in heads else "other", *_shape(module),
                             is_conv1d=isinstance(module, Conv1D)) for name, module in linears)
    return ModelMap(family="structural", n_layers=0, block_prefix="", sites=sites,
                    head_names=tuple(name for name, _ in linears if name in heads),
                    note="no transformer blocks found: only explicit method.targets can be adapted")


# --- structural inference (any other architecture) ------------------------------------------------


def _find_structural_blocks(model: nn.Module) -> str | None:
    """The block list: the longest outermost ModuleList (or Sequential) of identical modules holding linears.

    Outermost, so that a block's own lists (MoE experts, per-head projections) are never taken
    for the blocks. Two different lists of the same greatest length (encoder and decoder) are
    ambiguous: None.
    """
    candidates: list[tuple[str, int]] = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
            continue
        if any(name.startswith(outer + ".") for outer, _ in candidates):
            continue
        kinds = {type(child) for child in module}
        if len(kinds) == 1 and not _is_linear(module[0]) and any(_is_linear(m) for m in module[0].modules()):
            candidates.append((name, len(module)))
    if not candidates:
        return None
    longest = max(length for _, length in candidates)
    winners = [name for name, length in candidates if length == longest]
    return winners[0] if len(winners) == 1 else None


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


def _structural_roles(block: nn.Module, inside: list[tuple[str, nn.Module]]) -> dict[str, Role | None]:
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
    """
    attention = [(rel, m) for rel, m in inside if _under_attention(block, rel)]
    mlp = [(rel, m) for rel, m in inside if not _under_attention(block, rel)]
    roles = {rel: _LEAF_ROLES.get(rel.rsplit(".", 1)[-1].lower()) for rel, _ in attention}
    unnamed = [rel for rel, role in roles.items() if role is None]
    if len(unnamed) == 1 and "attn_out" not in roles.values():
        roles[unnamed[0]] = "attn_out"
    width = _shape(inside[0][1])[0] if inside else 0  # the first linear reads the residual stream
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
    writes_back = [rel for rel, m in mlp if _shape(m)[1] == width and _shape(m)[0] != width]
    out = writes_back[0] if len(writes_back) == 1 else mlp[-1][0]
    return {rel: "mlp_out" if rel == out else "mlp_in" for rel, _ in mlp}
