"""Rank schedules, the alpha policy and the LoRA parameter formula: pure functions.

``allocate_ranks`` returns ``{module name: rank}``; the injector only reads it.
Rounding is half-up everywhere (``_round``), so that a schedule never depends
on Python's round-half-to-even.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from peftlab.config import RankConfig
from peftlab.core.modelmap import ATTENTION_ROLES, MLP_ROLES
from peftlab.core.placement import Target
from peftlab.errors import UserError


def lora_param_count(target: Target, r: int, *, dora: bool = False) -> int:
    """LoRA parameters of one target: A is [r, in_features], B is [adapted_out_features, r];
    with DoRA also one magnitude per adapted output row, whatever the rank.

    Hu et al. 2021 (arXiv:2106.09685), section 4: r * (d_in + d_out) per adapted matrix;
    for a fused slice only the adapted output rows get a B row.
    """
    magnitudes = target.adapted_out_features() if dora else 0
    return r * (target.site.in_features + target.adapted_out_features()) + magnitudes


def rank_limit(target: Target) -> int:
    """The largest meaningful rank: that of the full update matrix."""
    return min(target.site.in_features, target.adapted_out_features())


def allocate_ranks(targets: Sequence[Target], spec: RankConfig, n_layers: int, *, dora: bool = False,
                   fixed_params: int = 0) -> dict[str, int]:
    """``{module name: rank}`` for every target under ``spec.schedule``.

    A custom rank of 0 drops that layer's targets: they are absent from the result.
    Raises UserError for a rank above a module's limit (``rank_limit``). ``dora`` and
    ``fixed_params`` (other trainable parameters, e.g. a trained head) matter to the budget
    schedule only: see ``budget_rank``.
    """
    if spec.schedule in ("uniform", "budget"):  # one rank for all: no layer needed
        r = spec.r if spec.schedule == "uniform" else budget_rank(targets, spec.budget, dora=dora,
                                                                    fixed_params=fixed_params)
        ranks = {t.name: r for t in targets}
    elif spec.schedule == "attention_heavy":
        ranks = {t.name: _attention_heavy(t, spec) for t in targets}
    else:
        per_layer = layer_ranks(spec, n_layers)
        ranks = {t.name: per_layer[_layer_of(t, spec)] for t in targets}
        ranks = {name: r for name, r in ranks.items() if r > 0}
    _check_limits(targets, ranks)
    return ranks


def layer_ranks(spec: RankConfig, n_layers: int) -> list[int]:
    """One rank per layer for the layer-wise schedules (uniform, linear_decay, empirical, custom)."""
    if spec.schedule == "uniform":
        return [spec.r] * n_layers
    if spec.schedule == "linear_decay":
        return linear_decay(spec.start, spec.end, n_layers)
    if spec.schedule == "empirical":
        return empirical(spec.r, spec.multipliers, n_layers)
    if spec.schedule == "custom":
        return custom_ranks(spec, n_layers)
    raise UserError(f"method.ranks.schedule={spec.schedule!r} does not give one rank per layer")


def linear_decay(start: int, end: int, n_layers: int) -> list[int]:
    """Rank of layer i: start + (end - start) * i / (n - 1), rounded half-up.

    The linear-decay schedule of the adaptive-rank study (seed 002: 16 -> 4 over DialoGPT's
    24 layers, rank_i = max(4, 16 - 12 * i / 23)). Interpolation stays between start and end,
    so it is monotone (non-increasing when start >= end) and never passes end.
    """
    if n_layers == 1:
        return [start]
    return [_round(start + (end - start) * i / (n_layers - 1)) for i in range(n_layers)]


def empirical(r: int, multipliers: Sequence[float], n_layers: int) -> list[int]:
    """Early / middle / late thirds get round(multiplier * r), at least 1.

    Seed 002's "empirical" schedule (60% / 120% / 100% of the base rank, from the observation
    that middle layers adapt most). Layer i is in third min(2, 3 * i // n): early when
    3i < n, middle when n <= 3i < 2n, late otherwise; 24 layers -> 0-7, 8-15, 16-23.
    """
    return [max(1, _round(multipliers[min(2, 3 * i // n_layers)] * r)) for i in range(n_layers)]


def custom_ranks(spec: RankConfig, n_layers: int) -> list[int]:
    """spec.layer_ranks, or the "layer_ranks" list of the JSON file spec.file (seed 002's format:
    {"strategy_name": ..., "layer_ranks": [...]}); exactly one rank per layer, 0 = not adapted."""
    ranks = spec.layer_ranks if spec.layer_ranks is not None else _read_rank_file(spec.file)
    if len(ranks) != n_layers:
        source = f"file {spec.file}" if spec.layer_ranks is None else "method.ranks.layer_ranks"
        raise UserError(f"{source} gives {len(ranks)} ranks but the model has {n_layers} layers")
    return list(ranks)


def _read_rank_file(path: str | None) -> list[int]:
    file = Path(path or "")
    if not path or not file.is_file():
        raise UserError(f"method.ranks.file not found: {path}")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"method.ranks.file {path} is not valid JSON: {error}") from None
    ranks = data.get("layer_ranks") if isinstance(data, dict) else None
    if not isinstance(ranks, list) or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0
                                              for r in ranks):
        raise UserError(f"method.ranks.file {path} must hold {{\"layer_ranks\": [whole numbers >= 0, "
                        "one per layer]}")
    return ranks


def _attention_heavy(target: Target, spec: RankConfig) -> int:
    """Seed 002's attention-heavy schedule: attention modules attention_r (16), MLP mlp_r (8)."""
    if target.role in ATTENTION_ROLES:
        return spec.attention_r
    if target.role in MLP_ROLES:
        return spec.mlp_r
    raise UserError(f"the attention_heavy schedule needs each module's role; {target.name} has none")


def budget_rank(targets: Sequence[Target], budget: int | None, *, dora: bool = False,
                fixed_params: int = 0) -> int:
    """The uniform r >= 1 whose total trainable parameters come closest to ``budget`` (ties: smaller r).

    The total is everything the method trains: LoRA's A and B, DoRA's magnitudes (``dora``) and
    ``fixed_params`` (a trained head). It is linear in r, fixed + r * per-rank cost, so the best
    r is floor or ceil of (budget - fixed) / per-rank cost. When even r = 1 exceeds the budget,
    r = 1 is returned and the caller reports the actual count against the budget.
    """
    if budget is None or budget <= 0:
        raise UserError("method.ranks: the budget schedule needs budget: <number of trainable parameters>")
    per_rank = sum(lora_param_count(t, 1) for t in targets)
    if per_rank == 0:
        raise UserError("method.ranks: the budget schedule has no modules to spend it on")
    fixed = fixed_params + sum(lora_param_count(t, 0, dora=dora) for t in targets)  # r = 0: the magnitudes
    low = max(1, math.floor((budget - fixed) / per_rank))
    return min((low, low + 1), key=lambda r: (abs(fixed + r * per_rank - budget), r))


def _layer_of(target: Target, spec: RankConfig) -> int:
    if target.layer is None:
        raise UserError(f"the {spec.schedule} schedule sets ranks per layer, but {target.name} is outside "
                        "the transformer blocks; use the uniform schedule")
    return target.layer


def _check_limits(targets: Sequence[Target], ranks: dict[str, int]) -> None:
    for target in targets:
        r = ranks.get(target.name)
        if r is not None and r > rank_limit(target):
            raise UserError(f"rank {r} is too large for {target.name}: its limit is {rank_limit(target)} "
                            f"(min of {target.site.in_features} inputs and {target.adapted_out_features()} "
                            "adapted outputs)")


def alphas_for(ranks: dict[str, int], alpha: float, policy: str) -> dict[str, float]:
    """LoRA alpha per module: "fixed" (alpha as given, scaling alpha / r; Hu et al. 2021) or
    "two_r" (alpha = 2r, a common heuristic that keeps scaling at 2 whatever the rank)."""
    if policy == "fixed":
        return {name: float(alpha) for name in ranks}
    if policy == "two_r":
        return {name: 2.0 * r for name, r in ranks.items()}
    raise UserError(f"method.alpha_policy={policy!r} is not one of fixed, two_r")


def _round(x: float) -> int:
    """Round half up (2.5 -> 3), unlike Python's round-half-to-even; float noise absorbed."""
    return math.floor(x + 0.5 + 1e-9)  # 0.58 * 25 is 14.499999999999998 in floats
