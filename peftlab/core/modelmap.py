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

Where a model holds several block lists, the language model's is the one beside the
input token embeddings (not a deeper vision tower), an encoder-decoder's two stacks
are both mapped (layers numbered through the encoder, then the decoder), and anything
else is refused with the lists named. The task head is found by structure too (see
``head_modules``), so a head that no name table lists is still trained.

Only shapes are read, so meta-device models map exactly like real ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab.core.roles import ATTENTION_ROLES, MLP_ROLES, ROLES, Role  # noqa: F401 (re-exported)
from peftlab.errors import UserError


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
    # e.g. "transformer.h" -- blocks are f"{block_prefix}.{i}"; "" when the blocks are in several stacks
    block_prefix: str
    sites: tuple[LinearSite, ...]
    head_names: tuple[str, ...] = ()  # the head's linear modules (role "head": never adapted)
    note: str = ""  # e.g. "roles inferred from module structure"
    # The modules the task head consists of (outermost), trained whole under train_head and saved
    # whole as peft modules_to_save: e.g. ("classifier",), T5's ("classification_head",).
    head_modules: tuple[str, ...] = ()
    # (block list, number of blocks) in layer order; layers number through them, so an
    # encoder-decoder's encoder blocks are layers 0..n_enc-1 and its decoder blocks follow.
    stacks: tuple[tuple[str, int], ...] = ()

    def by_name(self) -> dict[str, LinearSite]:
        return {site.name: site for site in self.sites}

    def block_name(self, layer: int) -> str:
        """The full module name of block ``layer`` ("transformer.h.3", "decoder.block.0")."""
        index = layer
        for prefix, count in self.stacks or ((self.block_prefix, self.n_layers),):
            if 0 <= index < count:
                return f"{prefix}.{index}"
            index -= count
        raise IndexError(f"layer {layer} is not one of this model's {self.n_layers} blocks")

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


def fused_layouts() -> list[str]:
    """The fused projections whose output layout (and so whose slices) peftlab knows: "<family> <name>"."""
    return [f"{family.name} {rel}" for family in _FAMILIES for rel in family.layouts]


# Top-level children that are a task head. The pooler (BERT) feeds the classifier, so it
# is part of the head when the model has one: trained with it under train_head, like
# the classifier of BERT fine-tuning (Devlin et al. 2019), and never given LoRA.
_HEAD_CHILDREN = frozenset({"lm_head", "score", "classifier", "pre_classifier"})
_CLASSIFIER_CHILDREN = frozenset({"score", "classifier"})
_POOLER = "pooler"

_STRUCTURAL_NOTE = "roles inferred from module structure"


# --- the entry point ----------------------------------------------------------------------------


def build_model_map(model: nn.Module, *, strict: bool = True, new_weights: Iterable[str] = ()) -> ModelMap:
    """Resolve every linear module of ``model`` to (layer, role, slices).

    Works on real and meta-device models. With ``strict`` (the default) a
    linear whose role cannot be resolved, or a model without a block list,
    raises UserError listing the linear modules found. ``strict=False`` maps
    such linears with role "other" instead (layer None when no block list is
    found), for callers whose user named ``method.targets`` explicitly.
    ``new_weights``: the parameters loading initialised fresh (``LoadedModel.new_weights``);
    those outside the base model are head weights (see ``head_modules``).
    """
    linears = [(name, module) for name, module in model.named_modules() if _is_linear(module)]
    config = _text_config(model)
    family = _known_family(config)
    prefix = _find_blocks(model, family.blocks) if family else None
    stacks, reason = ((prefix,), "") if prefix else _find_structural_blocks(model)
    family = family if prefix else None
    heads = head_modules(model, stacks, new_weights)
    if not stacks:
        if strict:
            _refuse(linears, reason)
        return _map_without_blocks(linears, heads)
    counts = tuple((stack, len(model.get_submodule(stack))) for stack in stacks)
    blocks = [f"{stack}.{i}" for stack, count in counts for i in range(count)]  # one per layer, in order
    placed = _block_roles(model, blocks, linears, family)
    unresolved = [name for name, (_, _, role) in placed.items() if role is None]
    if unresolved and strict:
        _refuse(linears, "could not give a role to " + ", ".join(unresolved[:6])
                + (f" (and {len(unresolved) - 6} more)" if len(unresolved) > 6 else ""))
    sites = _sites(linears, placed, heads, family, config)
    return ModelMap(family=family.name if family else "structural", n_layers=len(blocks),
                    block_prefix=stacks[0] if len(stacks) == 1 else "", sites=sites,
                    head_names=tuple(s.name for s in sites if s.role == "head"),
                    note=_note(family, counts), head_modules=heads, stacks=counts)


def _note(family: _Family | None, stacks: tuple[tuple[str, int], ...]) -> str:
    notes = [] if family else [_STRUCTURAL_NOTE]
    if len(stacks) > 1:  # say where each stack's layers are, since one layer index runs through all
        first, parts = 0, []
        for stack, count in stacks:
            parts.append(f"{first}-{first + count - 1} {stack}")
            first += count
        notes.append("layers " + ", ".join(parts))
    return "; ".join(notes)


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
    if len(found) > 1:  # Llava: the language model's "layers" and the vision tower's
        found = _beside_embeddings(model, found)
    return found[0] if len(found) == 1 else None


def _beside_embeddings(model: nn.Module, names: list[str]) -> list[str]:
    """The block lists that sit in the module holding the input token embeddings: the language model's.

    A vision tower (Gemma-3, Llava) is often deeper than the language model, so length says nothing;
    the token embeddings are what the language model, and only it, reads first.
    """
    owner = _embedding_owner(model)
    if owner is None:
        return names
    return [name for name in names if owner == "" or name.startswith(owner + ".")]


def _embedding_owner(model: nn.Module) -> str | None:
    """The dotted name of the module that holds the input embeddings ("" for the model itself)."""
    try:
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    except (NotImplementedError, AttributeError):
        return None
    name = next((name for name, module in model.named_modules() if module is embeddings), None)
    return None if name is None else name.rpartition(".")[0]


def _refuse(linears: list[tuple[str, nn.Module]], reason: str) -> None:
    names = [name for name, _ in linears]
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    raise UserError(f"cannot map this model's layers: {reason}; linear modules found ({len(names)}): {shown}; "
                    "name the modules to adapt explicitly with method.targets (exact names, dotted suffixes "
                    "or re:<regex>)")


# --- roles per block ----------------------------------------------------------------------------


def _block_roles(model: nn.Module, blocks: list[str], linears: list[tuple[str, nn.Module]],
                 family: _Family | None) -> dict[str, tuple[int, str, Role | None]]:
    """Full linear name -> (layer, block-relative name, role or None) for every linear inside a block."""
    placed: dict[str, tuple[int, str, Role | None]] = {}
    for layer, block_name in enumerate(blocks):
        inside = [(name[len(block_name) + 1:], module) for name, module in linears
                  if name.startswith(block_name + ".")]
        if family is not None:
            block_roles = {rel: family.roles.get(rel) for rel, _ in inside}
        else:
            block_roles = _structural_roles(model.get_submodule(block_name), inside)
        placed.update({f"{block_name}.{rel}": (layer, rel, role) for rel, role in block_roles.items()})
    return placed


def _sites(linears: list[tuple[str, nn.Module]], placed: Mapping[str, tuple[int, str, Role | None]],
           heads: tuple[str, ...], family: _Family | None, config: Any) -> tuple[LinearSite, ...]:
    sites = []
    for name, module in linears:
        in_features, out_features = _shape(module)
        if name in placed:
            layer, rel, role = placed[name]
            layout = family.layouts.get(rel) if family else None
            slices = layout(config, out_features) if layout else {}
            sites.append(LinearSite(name, layer, role or "other", in_features, out_features,
                                    isinstance(module, Conv1D), slices))
        elif _inside(name, heads):
            sites.append(LinearSite(name, None, "head", in_features, out_features, isinstance(module, Conv1D)))
    return tuple(sites)


def _inside(name: str, modules: Iterable[str]) -> bool:
    """``name`` is one of ``modules`` or lies inside one of them."""
    return any(name == module or name.startswith(module + ".") for module in modules)


# --- the task head --------------------------------------------------------------------------------


def head_modules(model: nn.Module, stacks: Iterable[str] = (), new_weights: Iterable[str] = ()) -> tuple[str, ...]:
    """The modules of the task head, outermost, in module order; () when the model has none.

    The head is what sits on top of the base model, found three ways:
    * a top-level child named as a head (lm_head, score, classifier, pre_classifier), and the
      base model's pooler when a classifier reads it (BERT);
    * any other top-level child beside the base model (``base_model_prefix``) that holds
      parameters and no block list: XLNet's sequence_summary and logits_proj, T5's
      classification_head, which no name table lists;
    * the modules of ``new_weights`` that lie outside the base model: the ones loading initialised
      fresh because the checkpoint had no such head (``split_new_weights``).
    """
    children = dict(model.named_children())
    found = [name for name in children if name in _HEAD_CHILDREN]
    base = _base_model_name(model)
    if base is not None:
        found += [name for name, child in children.items() if name != base and _holds_head(child, name, stacks)]
    if children.keys() & _CLASSIFIER_CHILDREN:  # the pooler feeds the classifier: trained with it
        found += [name for name, module in model.named_modules()
                  if _is_linear(module) and _POOLER in name.split(".")]
    head, _ = split_new_weights(model, new_weights)
    found += [owner for owner, _, _ in (weight.rpartition(".") for weight in head) if owner]
    return _outermost(model, found)


def split_new_weights(model: nn.Module, new_weights: Iterable[str]) -> tuple[list[str], list[str]]:
    """(head weights, body weights) among freshly initialised ``new_weights``, each sorted.

    Head weights lie outside the base model: a new classification head, to be trained. Body
    weights lie inside it: weights the checkpoint should have had, not a head.
    """
    base = _base_model_name(model)
    inside = [w for w in new_weights if base is not None and w.startswith(base + ".")]
    return sorted(set(new_weights) - set(inside)), sorted(inside)


def _base_model_name(model: nn.Module) -> str | None:
    """The child that is the base model (``base_model_prefix``); None when the model is its own base."""
    prefix = getattr(model, "base_model_prefix", "")
    return prefix if prefix and isinstance(getattr(model, prefix, None), nn.Module) else None


def _holds_head(child: nn.Module, name: str, stacks: Iterable[str]) -> bool:
    has_parameters = next(child.parameters(), None) is not None
    return has_parameters and not any(_inside(stack, (name,)) for stack in stacks)


def _outermost(model: nn.Module, names: Iterable[str]) -> tuple[str, ...]:
    """The distinct modules among ``names`` not inside another of them, in module order."""
    chosen = set(names)
    order = [name for name, _ in model.named_modules() if name in chosen]
    return tuple(name for name in order if not any(_inside(name, (other,)) for other in chosen - {name}))


def _map_without_blocks(linears: list[tuple[str, nn.Module]], heads: tuple[str, ...]) -> ModelMap:
    """strict=False and no block list: every non-head linear is an "other" site with no layer."""
    sites = tuple(LinearSite(name, None, "head" if _inside(name, heads) else "other", *_shape(module),
                             is_conv1d=isinstance(module, Conv1D)) for name, module in linears)
    return ModelMap(family="structural", n_layers=0, block_prefix="", sites=sites,
                    head_names=tuple(s.name for s in sites if s.role == "head"),
                    note="no transformer blocks found: only explicit method.targets can be adapted",
                    head_modules=heads)


# --- structural inference (any other architecture) ------------------------------------------------


def _find_structural_blocks(model: nn.Module) -> tuple[tuple[str, ...], str]:
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
    language = _beside_embeddings(model, list(candidates)) if len(candidates) > 1 else list(candidates)
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
        if len(kinds) == 1 and not _is_linear(module[0]) and any(_is_linear(m) for m in module[0].modules()):
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
    Scalar gates: a linear with a single output scales a branch (Qwen2-MoE's shared_expert_gate);
    it is neither, and taking it for an MLP projection would give it LoRA of rank at most 1.
    """
    gates = {rel for rel, m in inside if _shape(m)[1] == 1}
    attention = [(rel, m) for rel, m in inside if rel not in gates and _under_attention(block, rel)]
    mlp = [(rel, m) for rel, m in inside if rel not in gates and not _under_attention(block, rel)]
    roles: dict[str, Role | None] = {rel: "scalar_gate" for rel in gates}
    roles.update({rel: _LEAF_ROLES.get(rel.rsplit(".", 1)[-1].lower()) for rel, _ in attention})
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
