"""The map of a model's adaptable linear modules: where each sits and what it does.

Roles are resolved structurally (which submodule of which block a linear lives
in), never by substring: GPT-2's ``c_proj`` exists both as ``attn.c_proj``
(attention output) and ``mlp.c_proj`` (MLP output), and a suffix match on
"c_proj" would silently hit both.

Two ways to a role:

* Known families (``peftlab.core.families``, by ``config.model_type``): an exact table of block-relative
  names -> role, plus the real output layout of each fused projection.
* Any other architecture: structural inference (see ``structural_roles``),
  marked ``family="structural"`` with a note, because it is a best guess.

Where a model holds several block lists, the language model's is the one beside the
input token embeddings (not a deeper vision tower), an encoder-decoder's two stacks
are both mapped (layers numbered through the encoder, then the decoder), and anything
else is refused with the lists named. The task head is found by structure too (see
``head_modules``), so a head that no name table lists is still trained.

Only shapes are read, so meta-device models map exactly like real ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab.core.families import FAMILIES, Family, Runs, fused_layouts  # noqa: F401 (Runs, fused_layouts re-exported)
from peftlab.core.roles import ATTENTION_ROLES, MLP_ROLES, ROLES, Role  # noqa: F401 (re-exported)
from peftlab.core.structure import beside_embeddings, find_structural_blocks, is_linear, linear_shape, structural_roles
from peftlab.errors import UserError


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
    linears = [(name, module) for name, module in model.named_modules() if is_linear(module)]
    config = _text_config(model)
    family = _known_family(config)
    prefix = _find_blocks(model, family.blocks) if family else None
    stacks, reason = ((prefix,), "") if prefix else find_structural_blocks(model)
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


def _note(family: Family | None, stacks: tuple[tuple[str, int], ...]) -> str:
    notes = [] if family else [_STRUCTURAL_NOTE]
    if len(stacks) > 1:  # say where each stack's layers are, since one layer index runs through all
        first, parts = 0, []
        for stack, count in stacks:
            parts.append(f"{first}-{first + count - 1} {stack}")
            first += count
        notes.append("layers " + ", ".join(parts))
    return "; ".join(notes)


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


def _known_family(config: Any) -> Family | None:
    model_type = getattr(config, "model_type", None)
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def _find_blocks(model: nn.Module, blocks: str) -> str | None:
    """The full name of the family's block list ("bert.encoder.layer" for "encoder.layer")."""
    found = [name for name, module in model.named_modules() if isinstance(module, nn.ModuleList)
             and (name == blocks or name.endswith("." + blocks))]
    if len(found) > 1:  # Llava: the language model's "layers" and the vision tower's
        found = beside_embeddings(model, found)
    return found[0] if len(found) == 1 else None


def _refuse(linears: list[tuple[str, nn.Module]], reason: str) -> None:
    names = [name for name, _ in linears]
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    raise UserError(f"cannot map this model's layers: {reason}; linear modules found ({len(names)}): {shown}; "
                    "name the modules to adapt explicitly with method.targets (exact names, dotted suffixes "
                    "or re:<regex>)")


# --- roles per block ----------------------------------------------------------------------------


def _block_roles(model: nn.Module, blocks: list[str], linears: list[tuple[str, nn.Module]],
                 family: Family | None) -> dict[str, tuple[int, str, Role | None]]:
    """Full linear name -> (layer, block-relative name, role or None) for every linear inside a block."""
    placed: dict[str, tuple[int, str, Role | None]] = {}
    for layer, block_name in enumerate(blocks):
        inside = [(name[len(block_name) + 1:], module) for name, module in linears
                  if name.startswith(block_name + ".")]
        if family is not None:
            block_roles = {rel: family.roles.get(rel) for rel, _ in inside}
        else:
            block_roles = structural_roles(model.get_submodule(block_name), inside)
        placed.update({f"{block_name}.{rel}": (layer, rel, role) for rel, role in block_roles.items()})
    return placed


def _sites(linears: list[tuple[str, nn.Module]], placed: Mapping[str, tuple[int, str, Role | None]],
           heads: tuple[str, ...], family: Family | None, config: Any) -> tuple[LinearSite, ...]:
    sites = []
    for name, module in linears:
        in_features, out_features = linear_shape(module)
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
                  if is_linear(module) and _POOLER in name.split(".")]
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
    sites = tuple(LinearSite(name, None, "head" if _inside(name, heads) else "other", *linear_shape(module),
                             is_conv1d=isinstance(module, Conv1D)) for name, module in linears)
    return ModelMap(family="structural", n_layers=0, block_prefix="", sites=sites,
                    head_names=tuple(s.name for s in sites if s.role == "head"),
                    note="no transformer blocks found: only explicit method.targets can be adapted",
                    head_modules=heads)


