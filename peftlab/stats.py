"""Statistics across seeds: mean, std, Student-t 95% intervals, changes against a baseline, Pareto fronts.

scipy is not a dependency: the t quantile is computed here from the regularized incomplete beta
function (continued fraction, Numerical Recipes 6.4) and checked against published table values.
Only completed runs enter a mean; the caller lists the others with their reasons.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, Sequence

# --- the Student t distribution ----------------------------------------------------------------


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Lentz's method for the continued fraction of I_x(a, b) (Numerical Recipes, betacf)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for numerator in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                          -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), the CDF of a Beta(a, b) variable at x."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast on this side; use symmetry otherwise
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * regularized_beta(df / (df + t * t), df / 2.0, 0.5)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t (df may be math.inf: the normal quantile)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"df must be > 0, got {df}")
    if math.isinf(df):
        return NormalDist().inv_cdf(p)
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:  # bracket, then bisect: the CDF is monotone
        low, high = high, high * 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
        if high - low < 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


# --- one metric over seeds ---------------------------------------------------------------------


@dataclass(frozen=True)
class Stat:
    n: int
    mean: float
    std: float | None  # sample standard deviation (n - 1); None for one value
    ci_low: float | None  # mean -/+ t(0.975, n-1) * std / sqrt(n); None for one value
    ci_high: float | None

    @property
    def half_width(self) -> float | None:
        return None if self.ci_high is None else self.ci_high - self.mean


def describe(values: Sequence[float], confidence: float = 0.95) -> Stat | None:
    """Mean, sample std and a two-sided Student-t interval of the finite ``values``; None if there are none."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(finite)
    if n == 0:
        return None
    mean = math.fsum(finite) / n
    if n == 1:
        return Stat(1, mean, None, None, None)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in finite) / (n - 1))
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
    return Stat(n, mean, std, mean - half, mean + half)


def intervals_overlap(a: Stat, b: Stat) -> bool:
    """True when the two confidence intervals share a point (or either has none)."""
    if a.ci_low is None or b.ci_low is None:
        return True
    return a.ci_low <= b.ci_high and b.ci_low <= a.ci_high


# --- comparisons against a baseline ------------------------------------------------------------


def relative_change(value: float | None, baseline: float | None) -> float | None:
    """Percent change of ``value`` against ``baseline``: 100 * (value - baseline) / |baseline|."""
    if value is None or baseline is None or baseline == 0:
        return None
    return 100.0 * (value - baseline) / abs(baseline)


def parameter_reduction(params: float | None, baseline_params: float | None) -> float | None:
    """Percent fewer trainable parameters than the baseline (negative: more)."""
    if params is None or not baseline_params:
        return None
    return 100.0 * (1.0 - params / baseline_params)


def efficiency_ratio(loss: float | None, baseline_loss: float | None, params: float | None,
                     baseline_params: float | None) -> float | None:
    """Seed 003's efficiency ratio: eval-loss increase per million trainable parameters saved.

    (loss - baseline_loss) / ((baseline_params - params) / 1e6). Lower is better; negative means the
    cheaper strategy also lost less. Undefined (None) when no parameters are saved.
    """
    if None in (loss, baseline_loss, params, baseline_params):
        return None
    saved_millions = (baseline_params - params) / 1e6
    if saved_millions <= 0:
        return None
    return (loss - baseline_loss) / saved_millions


def pareto_front(costs: Sequence[float], qualities: Sequence[float], *, higher_is_better: bool) -> list[bool]:
    """For each point, whether no other point is at least as cheap and as good, and strictly better in one."""
    sign = 1.0 if higher_is_better else -1.0
    scores = [sign * q for q in qualities]
    front = []
    for i, (cost, score) in enumerate(zip(costs, scores)):
        dominated = any(costs[j] <= cost and scores[j] >= score and (costs[j] < cost or scores[j] > score)
                        for j in range(len(costs)) if j != i)
        front.append(not dominated)
    return front


# --- groups of runs (one strategy at one grid point, over seeds) -------------------------------


@dataclass
class GroupStats:
    label: str  # strategy, plus grid values when there is a grid
    strategy: str
    grid: dict[str, Any]
    n_runs: int  # all runs of the group, whatever their status
    stats: dict[str, Stat] = field(default_factory=dict)  # metric -> over completed runs
    excluded: list[dict[str, Any]] = field(default_factory=list)  # {run_id, status, reason}
    comparisons: dict[str, float | None] = field(default_factory=dict)  # vs the baseline group
    pareto: dict[str, bool] = field(default_factory=dict)  # "params" / "time" -> on that front

    @property
    def n(self) -> int:
        return max((s.n for s in self.stats.values()), default=0)

    def mean(self, metric: str) -> float | None:
        stat = self.stats.get(metric)
        return None if stat is None else stat.mean


def aggregate(rows: list[dict[str, Any]], metrics: Sequence[str], *, baseline: str, quality: str,
              higher_is_better: bool) -> list[GroupStats]:
    """Group result rows by (strategy, grid values) and summarise each metric over completed seeds.

    Each row needs: run_id, strategy, grid (dict), status, reason, and the metric columns.
    """
    groups: dict[str, GroupStats] = {}
    members: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        label = group_label(row["strategy"], row["grid"])
        groups.setdefault(label, GroupStats(label, row["strategy"], dict(row["grid"]), 0))
        members.setdefault(label, []).append(row)
    for label, group in groups.items():
        group.n_runs = len(members[label])
        done = [r for r in members[label] if r["status"] == "completed"]
        group.excluded = [{"run_id": r["run_id"], "status": r["status"], "reason": r.get("reason") or ""}
                          for r in members[label] if r["status"] != "completed"]
        for metric in metrics:
            stat = describe([r.get(metric) for r in done])
            if stat is not None:
                group.stats[metric] = stat
    ordered = list(groups.values())
    _compare_to_baseline(ordered, baseline, quality)
    _mark_pareto(ordered, quality, higher_is_better)
    return ordered


def group_label(strategy: str, grid: dict[str, Any]) -> str:
    if not grid:
        return strategy
    return strategy + " [" + ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in grid.items()) + "]"


def _compare_to_baseline(groups: list[GroupStats], baseline: str, quality: str) -> None:
    """Each group against the baseline strategy at the same grid values."""
    by_grid = {_grid_key(g.grid): g for g in groups if g.strategy == baseline}
    change_metrics = [quality] + [m for m in ("eval_loss", "perplexity", "train_seconds", "peak_memory_mb")
                                  if m != quality]
    for group in groups:
        base = by_grid.get(_grid_key(group.grid))
        for metric in change_metrics:
            group.comparisons[f"{metric}_change_pct"] = relative_change(
                group.mean(metric), base.mean(metric) if base else None)
        params, base_params = group.mean("trainable_params"), base.mean("trainable_params") if base else None
        group.comparisons["param_reduction_pct"] = parameter_reduction(params, base_params)
        group.comparisons["efficiency_ratio"] = efficiency_ratio(
            group.mean("eval_loss"), base.mean("eval_loss") if base else None, params, base_params)


def _grid_key(grid: dict[str, Any]) -> str:
    return repr(sorted(grid.items(), key=lambda item: item[0]))


def _mark_pareto(groups: list[GroupStats], quality: str, higher_is_better: bool) -> None:
    for cost_metric, name in (("trainable_params", "params"), ("train_seconds", "time")):
        eligible = [g for g in groups if g.mean(quality) is not None and g.mean(cost_metric) is not None]
        front = pareto_front([g.mean(cost_metric) for g in eligible], [g.mean(quality) for g in eligible],
                             higher_is_better=higher_is_better)
        for group in groups:
            group.pareto[name] = False
        for group, on_front in zip(eligible, front):
            group.pareto[name] = on_front


def separation_warnings(groups: list[GroupStats], metric: str) -> list[str]:
    """Plain statements of what this data cannot tell apart on ``metric``."""
    warnings = []
    for group in groups:
        stat = group.stats.get(metric)
        if stat is not None and stat.n == 1:
            warnings.append(f"{group.label} has one completed seed: no confidence interval, so the data cannot "
                            f"separate it from any other strategy on {metric}.")
    for a, b in itertools.combinations(groups, 2):
        sa, sb = a.stats.get(metric), b.stats.get(metric)
        if sa is None or sb is None or sa.n == 1 or sb.n == 1:
            continue
        if intervals_overlap(sa, sb):
            warnings.append(f"{a.label} and {b.label}: the 95% confidence intervals of {metric} overlap "
                            f"([{sa.ci_low:.4g}, {sa.ci_high:.4g}] and [{sb.ci_low:.4g}, {sb.ci_high:.4g}]), "
                            f"so the data cannot separate these two strategies.")
    return warnings
