"""Placement: the user's spec (named placement, layer selection, explicit targets) -> concrete targets.

The map printed from its result is core/placement_map.py.

A pure function of the model map: no module is touched here. Explicit target
entries match whole dotted components (``attn.c_proj`` matches
``transformer.h.0.attn.c_proj``, never ``xattn.c_proj``), and an entry that
matches nothing is an error (peft issues #3658, #1024: silent misses and
substring over-matches).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from peftlab.core.modelmap import ATTENTION_ROLES, MLP_ROLES, ROLES, LinearSite, ModelMap, Runs, fused_layouts
from peftlab.errors import UserError


@dataclass(frozen=True)
class Target:
    """One module to adapt; for a fused projection, optionally only some of its slices."""

    site: LinearSite
    slices: tuple[str, ...] | None = None  # fused sites only, e.g. ("q", "v"); None = the whole output

    @property
    def name(self) -> str:
        return self.site.name

    @property
    def layer(self) -> int | None:
        return self.site.layer

    @property
    def role(self) -> str:
        return self.site.role

    def out_runs(self) -> Runs:
        """Output rows the update touches, as (start, length) runs."""
        if self.slices is None:
            return ((0, self.site.out_features),)
        return tuple(run for name in self.slices for run in self.site.slices[name])

    def adapted_out_features(self) -> int:
        return sum(length for _, length in self.out_runs())


# --- layer selections -------------------------------------------------------------------------

LAYER_FORMS = ('"all"', "a list such as [0, 3]", '"0-11" (inclusive)', '"0-3,8"', '"first_half"', '"last_half"',
               '"every_other"', '"last_N" (e.g. "last_4")')
_RANGE_ITEM = re.compile(r"(\d+)(?:-(\d+))?")
_LAST_N = re.compile(r"last_(\d+)")


def parse_layers(layers: Any, n_layers: int) -> list[int]:
    """Layer indices (sorted, unique) selected by ``layers``, for a model of ``n_layers`` blocks.

    first_half / last_half split like Python slicing: layers[: n // 2] and layers[n // 2 :],
    so with an odd count the middle layer belongs to the last half. A bare int selects that
    one layer, like "8".
    """
    if isinstance(layers, bool):
        _bad_layers(layers, n_layers)
    if isinstance(layers, int):
        layers = str(layers)
    if isinstance(layers, (list, tuple)):
        selected = [_layer_index(item, layers, n_layers) for item in layers]
    elif isinstance(layers, str):
        selected = _parse_layer_text("".join(layers.split()), n_layers)  # "0 - 3, 8" reads as "0-3,8"
    else:
        _bad_layers(layers, n_layers)
    if not selected:
        raise UserError(f"method.layers={layers!r} selects no layers of this {n_layers}-layer model")
    return sorted(set(selected))


def _parse_layer_text(text: str, n: int) -> list[int]:
    named = {"all": range(n), "first_half": range(n // 2), "last_half": range(n // 2, n),
             "every_other": range(0, n, 2)}
    if text in named:
        return list(named[text])
    last = _LAST_N.fullmatch(text)
    if last:
        count = int(last.group(1))
        if not 1 <= count <= n:
            raise UserError(f"method.layers={text!r}: the model has {n} layers, so N must be 1..{n}")
        return list(range(n - count, n))
    selected = []
    for item in text.split(","):
        match = _RANGE_ITEM.fullmatch(item)
        if not match:
            _bad_layers(text, n)
        start, end = int(match.group(1)), int(match.group(2) or match.group(1))
        if start > end:
            raise UserError(f"method.layers={text!r}: range {item!r} runs backwards")
        _layer_index(end, text, n)  # start <= end, so the whole range is then in bounds
        selected += range(start, end + 1)
    return selected


def _layer_index(item: Any, spec: Any, n: int) -> int:
    if isinstance(item, bool) or not isinstance(item, int):
        _bad_layers(spec, n)
    if not 0 <= item < n:
        raise UserError(f"method.layers={spec!r}: layer {item} is out of range; this model has layers 0..{n - 1}")
    return item


def _bad_layers(spec: Any, n: int) -> NoReturn:
    raise UserError(f"method.layers={spec!r} is not a layer selection; use one of: {', '.join(LAYER_FORMS)} "
                    f"(this model has layers 0..{n - 1})")


# --- named placements -------------------------------------------------------------------------

QV_SLICES = ("q", "v")


def _named_placement(model_map: ModelMap, placement: str) -> list[Target]:
    """Targets of a named placement over every block (the head is never selected)."""
    sites = model_map.block_sites()
    if placement == "all_linear":
        return [Target(s) for s in sites if s.role in ATTENTION_ROLES | MLP_ROLES]
    if placement == "attention_only":
        return [Target(s) for s in sites if s.role in ATTENTION_ROLES]
    if placement == "mlp_only":
        return [Target(s) for s in sites if s.role in MLP_ROLES]
    if placement == "qv_only":
        whole = [Target(s) for s in sites if s.role in ("attn_q", "attn_v")]
        fused = [Target(s, QV_SLICES) for s in sites if s.role == "attn_qkv" and set(QV_SLICES) <= set(s.slices)]
        return sorted(whole + fused, key=_module_order(model_map))
    raise UserError(f"method.placement={placement!r} is not one of all_linear, attention_only, mlp_only, qv_only")


def _module_order(model_map: ModelMap):
    order = {site.name: index for index, site in enumerate(model_map.sites)}
    return lambda target: order[target.name]


# --- explicit targets -------------------------------------------------------------------------

_SLICE_LIST = re.compile(r"\w+(,\w+)*")
_ROLE_NAMES = frozenset(ROLES) - {"head"}


@dataclass(frozen=True)
class _Entry:
    text: str  # as the user wrote it
    pattern: str  # the name part: exact name, dotted suffix, role name, or regex
    is_regex: bool
    slices: tuple[str, ...] | None


def _parse_entry(text: str) -> _Entry:
    """Split "re:<regex>" and a trailing ":q,v" slice list off an entry."""
    body, is_regex = (text[3:], True) if text.startswith("re:") else (text, False)
    slices = None
    if ":" in body:
        name, _, tail = body.rpartition(":")
        if _SLICE_LIST.fullmatch(tail.replace(" ", "")) and name:
            body, slices = name, tuple(tail.replace(" ", "").split(","))
    if not body:
        raise UserError(f"method.targets entry {text!r} names no module")
    return _Entry(text, body, is_regex, slices)


def _entry_sites(model_map: ModelMap, entry: _Entry) -> list[LinearSite]:
    """Non-head sites the entry's name part matches, in module order."""
    sites = [s for s in model_map.sites if s.role != "head"]
    if entry.is_regex:
        try:
            regex = re.compile(entry.pattern)
        except re.error as error:
            raise UserError(f"method.targets entry {entry.text!r} is not a valid regex: {error}") from None
        return [s for s in sites if regex.fullmatch(s.name)]
    if entry.pattern in _ROLE_NAMES:
        return [s for s in sites if s.role == entry.pattern]
    return [s for s in sites if _suffix_match(s.name, entry.pattern)]


def _suffix_match(name: str, pattern: str) -> bool:
    """Exact name, or a suffix made of whole dotted components."""
    return name == pattern or name.endswith("." + pattern)


def _entry_targets(model_map: ModelMap, entry: _Entry) -> list[Target]:
    sites = _entry_sites(model_map, entry)
    if not sites:
        _no_match(model_map, entry)
    roles = sorted({s.role for s in sites}, key=ROLES.index)
    if len(roles) > 1 and not entry.is_regex and entry.pattern not in _ROLE_NAMES:
        _ambiguous(model_map, entry, sites, roles)
    if entry.slices is None:
        return [Target(s) for s in sites]
    for site in sites:
        unknown = [name for name in entry.slices if name not in site.slices]
        if unknown:
            raise UserError(f"method.targets entry {entry.text!r}: {site.name} has no slice "
                            f"{', '.join(map(repr, unknown))} ({_no_slices_why(site)})")
    return [Target(s, _in_site_order(s, entry.slices)) for s in sites]


def _no_slices_why(site: LinearSite) -> str:
    """Why a site lacks a slice: other slices, a fused layout peftlab does not know, or no fusion."""
    if site.slices:
        return f"its slices: {', '.join(site.slices)}"
    if site.role == "attn_qkv":  # fused (Falcon, Bloom query_key_value), but how its rows interleave is unknown
        return (f"its output layout is not known to peftlab, so it cannot be sliced; layouts known: "
                f"{', '.join(fused_layouts())}; adapt the whole module instead")
    return "it is not a fused projection, so it has no slices"


def _in_site_order(site: LinearSite, slices: Iterable[str]) -> tuple[str, ...] | None:
    """Slices in the site's own order; all of them is the whole output (None)."""
    chosen = set(slices)
    if chosen == set(site.slices):
        return None
    return tuple(name for name in site.slices if name in chosen)


def _no_match(model_map: ModelMap, entry: _Entry) -> NoReturn:
    sites = [s for s in model_map.sites if s.role != "head"]
    names = list(dict.fromkeys(_relative_name(model_map, s) for s in sites))  # once per block, not per layer
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    heads = [h for h in model_map.head_names if entry.is_regex or _suffix_match(h, entry.pattern)]
    why = (f" ({', '.join(heads)} is the task head, trained with train_head, never adapted)" if heads else "")
    raise UserError(f"method.targets entry {entry.text!r} matches no linear module{why}; available "
                    f"({len(sites)} modules): {shown}; or a role name: "
                    f"{', '.join(r for r in ROLES if r in _ROLE_NAMES and r != 'other')}")


def _relative_name(model_map: ModelMap, site: LinearSite) -> str:
    """A block linear's name inside its block ("attn.c_proj"); other modules' full names."""
    if site.layer is None:
        return site.name
    return site.name[len(model_map.block_name(site.layer)) + 1:]


def _ambiguous(model_map: ModelMap, entry: _Entry, sites: Sequence[LinearSite],
               roles: Sequence[str]) -> NoReturn:
    options = []
    for role in roles:
        suffix = _distinct_suffix(model_map, sites, role)
        options.append(f"{suffix!r} ({role})" if suffix else f"the role name {role!r}")
    raise UserError(f"method.targets entry {entry.text!r} matches modules of {len(roles)} roles; name one: "
                    + ", ".join(options))


def _distinct_suffix(model_map: ModelMap, sites: Sequence[LinearSite], role: str) -> str | None:
    """The shortest block-relative dotted suffix that matches only modules of ``role``."""
    site = next(s for s in sites if s.role == role)
    # Never reach into the block index: "0.output.dense" would silently mean layer 0 only.
    relative = _relative_name(model_map, site).split(".")
    others = [s.name for s in model_map.sites if s.role != role and s.role != "head"]
    for size in range(1, len(relative) + 1):
        suffix = ".".join(relative[-size:])
        if not any(_suffix_match(name, suffix) for name in others):
            return suffix
    return None


def _explicit_targets(model_map: ModelMap, entries: Sequence[str], layers: set[int] | None) -> list[Target]:
    """Union over entries (slices merged per module), restricted to the selected layers."""
    merged: dict[str, Target] = {}
    for text in entries:
        entry = _parse_entry(text)
        found = [t for t in _entry_targets(model_map, entry) if _in_layers(t, layers)]
        if not found:
            raise UserError(f"method.targets entry {text!r} matches modules only outside the selected "
                            f"layers {sorted(layers or ())}")
        for target in found:
            merged[target.name] = _merge(merged.get(target.name), target)
    return sorted(merged.values(), key=_module_order(model_map))


def _merge(old: Target | None, new: Target) -> Target:
    if old is None:
        return new
    if old.slices is None or new.slices is None:
        return Target(new.site)
    return Target(new.site, _in_site_order(new.site, old.slices + new.slices))


def _in_layers(target: Target, layers: set[int] | None) -> bool:
    """layers None = all; a module outside any block (layer None) is kept only then."""
    return layers is None or target.layer in layers


# --- the entry points -------------------------------------------------------------------------


def select_targets(model_map: ModelMap, placement: str = "all_linear", layers: Any = "all",
                   targets: Sequence[str] | None = None) -> list[Target]:
    """The modules to adapt, in module order.

    ``targets`` (explicit entries) overrides ``placement``; ``layers`` applies to both.
    Raises UserError for an entry that matches nothing, an ambiguous bare name, an
    unknown slice, or an empty result.
    """
    chosen = _layer_set(model_map, layers)
    if targets:
        return _explicit_targets(model_map, targets, chosen)
    selected = [t for t in _named_placement(model_map, placement) if _in_layers(t, chosen)]
    if not selected:
        raise UserError(_empty_message(model_map, placement, layers))
    return selected


def _layer_set(model_map: ModelMap, layers: Any) -> set[int] | None:
    """None when every layer is selected (so modules outside blocks stay eligible)."""
    if layers == "all" or layers is None:
        return None
    return set(parse_layers(layers, model_map.n_layers))


def _empty_message(model_map: ModelMap, placement: str, layers: Any) -> str:
    hint = ""
    if placement == "qv_only" and any(s.role == "attn_qkv" and not s.is_fused for s in model_map.sites):
        hint = " (the fused qkv projection's layout is unknown for this architecture)"
    return (f"method.placement={placement!r} with layers={layers!r} selects no module of this "
            f"{model_map.family} model{hint}; name the modules explicitly with method.targets")


def describe_matches(model_map: ModelMap, targets: Sequence[str], layers: Any = "all") -> dict[str, int]:
    """How many modules each explicit entry matches within the selected layers (0 = a miss).

    Never raises for a miss, so that inspect output can show every entry's count.
    """
    chosen = _layer_set(model_map, layers)
    counts: dict[str, int] = {}
    for text in targets:
        entry = _parse_entry(text)
        sites = _entry_sites(model_map, entry)
        counts[text] = sum(1 for s in sites if chosen is None or s.layer in chosen)
    return counts
