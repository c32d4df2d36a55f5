"""The printed placement map: one row per layer, one column per role, each cell the module's rank.

What ``peftlab inspect`` prints and every run writes to train.log before training, so a user sees
exactly where adapters went (and with which rank) before spending compute.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from peftlab.core.modelmap import ModelMap
from peftlab.core.placement import Target

_COLUMNS = (("attn_q", "q"), ("attn_k", "k"), ("attn_v", "v"), ("attn_qkv", "qkv"), ("attn_out", "out"),
            ("mlp_in", "mlp_in"), ("mlp_out", "mlp_out"), ("scalar_gate", "gate"), ("other", "other"))
NOT_ADAPTED = "·"
ADAPTED = "✓"  # adapted, no rank applies (adapters)


def format_placement_map(model_map: ModelMap, targets: Sequence[Target], ranks: dict[str, int] | None, *,
                         trainable_params: int | None = None, total_params: int | None = None) -> str:
    """A text table: one row per layer (consecutive identical rows merged as "0-11"),
    one column per role present; a cell is the rank ("q,v r=8" for slices), "✓" when
    ``ranks`` is None, "·" when not adapted; "2×8" when a role has two modules there
    (Llama gate and up), "8/·" when only some of them are adapted.
    """
    columns = [(role, label) for role, label in _COLUMNS if any(s.role == role for s in model_map.sites)]
    chosen = {t.name: t for t in targets}
    rows = [_row(model_map, layer, columns, chosen, ranks) for layer in _row_layers(model_map)]
    table = [["layers"] + [label for _, label in columns]] + _merge_rows(rows)
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in table]
    lines.append(f"cell: {'LoRA rank' if ranks is not None else ADAPTED + ' adapted'}, {NOT_ADAPTED} not adapted")
    if trainable_params is not None:
        lines.append(_params_line(trainable_params, total_params))
    if model_map.note:
        lines.append(f"note: {model_map.note}")
    return "\n".join(lines)


def _row_layers(model_map: ModelMap) -> list[int | None]:
    outside = any(s.layer is None and s.role != "head" for s in model_map.sites)
    return list(range(model_map.n_layers)) + ([None] if outside else [])


def _row(model_map: ModelMap, layer: int | None, columns: list[tuple[str, str]], chosen: dict[str, Target],
         ranks: dict[str, int] | None) -> tuple[str, list[str]]:
    label = "-" if layer is None else str(layer)
    cells = []
    for role, _ in columns:
        sites = [s for s in model_map.sites if s.layer == layer and s.role == role]
        cells.append(_cell([_module_cell(chosen.get(s.name), ranks) for s in sites]))
    return label, cells


def _module_cell(target: Target | None, ranks: dict[str, int] | None) -> str:
    if target is None or (ranks is not None and target.name not in ranks):
        return NOT_ADAPTED  # not selected, or dropped by a rank of 0
    mark = ADAPTED if ranks is None else str(ranks[target.name])
    if target.slices is None:
        return mark
    return f"{','.join(target.slices)} {mark if ranks is None else 'r=' + mark}"


def _cell(parts: list[str]) -> str:
    if not parts:
        return ""  # this layer has no module of that role
    if len(parts) > 1 and len(set(parts)) == 1 and parts[0] != NOT_ADAPTED:
        return f"{len(parts)}×{parts[0]}"
    return "/".join(parts) if len(set(parts)) > 1 else parts[0]


def _merge_rows(rows: list[tuple[str, list[str]]]) -> list[list[str]]:
    """Merge runs of consecutive layers with identical cells into one "a-b" row."""
    merged: list[list[Any]] = []  # [first label, last label, cells]
    for label, cells in rows:
        if merged and merged[-1][2] == cells and label != "-" and merged[-1][1] != "-":
            merged[-1][1] = label
        else:
            merged.append([label, label, cells])
    return [[first if first == last else f"{first}-{last}", *cells] for first, last, cells in merged]


def _params_line(trainable: int, total: int | None) -> str:
    if not total:
        return f"trainable params: {trainable:,}"
    return f"trainable params: {trainable:,} / {total:,} ({100 * trainable / total:.3f}%)"
