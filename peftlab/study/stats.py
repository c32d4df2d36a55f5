"""Statistics across seeds: means and intervals, paired comparisons with verdicts, baselines, Pareto fronts.

Long because the numbers behind a verdict (the paired test, Holm, the detectable difference,
the groups and their Pareto front) are read together; the t distribution lives in distribution.py.

Runs of two strategies that share a seed share their data order, their initialisation seed and the
eval set, so strategies are compared as pairs by seed (paired Student t on the per-seed differences,
wins per seed, Holm's adjustment across the pairs of one metric); an unpaired Welch test is used only
where the seeds do not match, and the comparison says so.

The t distribution's quantile and tail come from ``peftlab.study.distribution`` (no scipy).
Only completed runs enter a mean; the caller lists the others with their reasons.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from statistics import median
from typing import Any, Sequence

from peftlab.study.distribution import t_cdf, t_quantile

ALPHA = 0.05  # two-sided level of every interval and test in a report
POWER = 0.80  # power at which the minimum detectable difference is quoted

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


# --- paired comparisons between strategies ------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """a against b on one metric: the difference a - b, its interval, a p-value and a verdict."""

    metric: str
    a: str
    b: str
    test: str  # "paired t" (per-seed differences) | "Welch t" (seeds do not match) | "none" (too few runs)
    n_pairs: int  # seeds both completed (paired); 0 for Welch
    n_a: int
    n_b: int
    mean_diff: float  # mean of a - b
    sd_diff: float | None  # sample std of the per-seed differences (paired), None otherwise
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    p_adjusted: float | None  # Holm over the family (every pair on this metric)
    a_wins: int  # seeds on which a was better (paired only)
    b_wins: int
    ties: int
    verdict: str  # a_better | b_better | indistinguishable
    higher_is_better: bool
    min_detectable: float | None  # smallest |a - b| this design detects at ALPHA with POWER (paired)
    seeds_to_detect: int | None  # about how many seeds would detect the observed difference (paired)

    @property
    def separated(self) -> bool:
        return self.verdict != "indistinguishable"

    def winner(self) -> str | None:
        return {"a_better": self.a, "b_better": self.b}.get(self.verdict)


def two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return min(1.0, 2.0 * (1.0 - t_cdf(abs(t), df)))


def paired_test(differences: Sequence[float]) -> tuple[float, float | None, float | None, float | None, float | None]:
    """(mean, sd, ci_low, ci_high, p) of a paired t test on per-seed differences; None where n < 2."""
    n = len(differences)
    mean = math.fsum(differences) / n
    if n < 2:
        return mean, None, None, None, None
    sd = math.sqrt(math.fsum((d - mean) ** 2 for d in differences) / (n - 1))
    half = t_quantile(1 - ALPHA / 2, n - 1) * sd / math.sqrt(n)
    if sd == 0.0:  # every seed moved by the same amount: a difference of zero, or a certain one
        return mean, sd, mean, mean, 1.0 if mean == 0.0 else 0.0
    return mean, sd, mean - half, mean + half, two_sided_p(mean / (sd / math.sqrt(n)), n - 1)


def welch_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float | None, float | None, float | None]:
    """(mean_a - mean_b, ci_low, ci_high, p) of Welch's unequal-variance t test; None where a side has n < 2."""
    sa, sb = describe(a), describe(b)
    diff = sa.mean - sb.mean
    if sa.std is None or sb.std is None:
        return diff, None, None, None
    va, vb = sa.std ** 2 / sa.n, sb.std ** 2 / sb.n
    if va + vb == 0.0:
        return diff, diff, diff, 1.0 if diff == 0.0 else 0.0
    df = (va + vb) ** 2 / (va ** 2 / (sa.n - 1) + vb ** 2 / (sb.n - 1))
    se = math.sqrt(va + vb)
    half = t_quantile(1 - ALPHA / 2, df) * se
    return diff, diff - half, diff + half, two_sided_p(diff / se, df)


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment (controls the family-wise error rate); None stays None."""
    present = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    adjusted: list[float | None] = [None] * len(p_values)
    running, m = 0.0, len(present)
    for rank, (p, index) in enumerate(present):
        running = max(running, min(1.0, (m - rank) * p))  # monotone: never below an earlier adjusted value
        adjusted[index] = running
    return adjusted


def minimum_detectable(sd: float, n: int) -> float | None:
    """Smallest true mean difference a paired t test on n seeds detects at ALPHA with POWER.

    (t(1 - ALPHA/2, n-1) + t(POWER, n-1)) * sd / sqrt(n): the usual approximation for a t test.
    """
    if n < 2:
        return None
    return (t_quantile(1 - ALPHA / 2, n - 1) + t_quantile(POWER, n - 1)) * sd / math.sqrt(n)


def seeds_to_detect(sd: float, difference: float, limit: int = 1000) -> int | None:
    """About how many seeds a paired design needs to detect ``difference`` (None: none up to ``limit``)."""
    if difference == 0.0:
        return None
    for n in range(2, limit + 1):
        if minimum_detectable(sd, n) <= abs(difference):
            return n
    return None


def compare(metric: str, a: str, b: str, values_a: dict[int, float], values_b: dict[int, float], *,
            higher_is_better: bool) -> Comparison:
    """a against b on ``metric`` from their per-seed values (p_adjusted and verdict set by ``compare_all``)."""
    common = sorted(set(values_a) & set(values_b))
    sign = 1.0 if higher_is_better else -1.0
    if len(common) >= 2 or (common and (len(values_a) < 2 or len(values_b) < 2)):
        diffs = [values_a[s] - values_b[s] for s in common]
        mean, sd, low, high, p = paired_test(diffs)
        wins_a = sum(sign * d > 0 for d in diffs)
        wins_b = sum(sign * d < 0 for d in diffs)
        mdd = minimum_detectable(sd, len(diffs)) if sd is not None else None
        needed = seeds_to_detect(sd, mean) if sd else None
        return Comparison(metric, a, b, "paired t" if p is not None else "none", len(diffs), len(values_a),
                          len(values_b), mean, sd, low, high, p, None, wins_a, wins_b, len(diffs) - wins_a - wins_b,
                          "indistinguishable", higher_is_better, mdd, needed)
    if len(values_a) >= 2 and len(values_b) >= 2:
        mean, low, high, p = welch_test(list(values_a.values()), list(values_b.values()))
        test = "Welch t"
    else:
        mean_a = math.fsum(values_a.values()) / max(1, len(values_a))
        mean = mean_a - math.fsum(values_b.values()) / max(1, len(values_b))
        low = high = p = None
        test = "none"
    return Comparison(metric, a, b, test, 0, len(values_a), len(values_b), mean, None, low, high, p, None, 0, 0, 0,
                      "indistinguishable", higher_is_better, None, None)


def compare_all(groups: Sequence["GroupStats"], metric: str, *, higher_is_better: bool) -> list[Comparison]:
    """Every pair of groups (in their order) on ``metric``; Holm over this family; verdicts.

    A pair is separated when its Holm-adjusted p-value is below ALPHA; the direction follows the sign
    of the mean difference and whether higher is better.
    """
    pairs = [(x, y) for x, y in itertools.combinations(groups, 2) if x.values.get(metric) and y.values.get(metric)]
    raw = [compare(metric, x.label, y.label, x.values[metric], y.values[metric], higher_is_better=higher_is_better)
           for x, y in pairs]
    adjusted = holm([c.p_value for c in raw])
    sign = 1.0 if higher_is_better else -1.0
    results = []
    for comparison, p_adj in zip(raw, adjusted, strict=True):
        verdict = "indistinguishable"
        if p_adj is not None and p_adj < ALPHA and comparison.mean_diff != 0.0:
            verdict = "a_better" if sign * comparison.mean_diff > 0 else "b_better"
        results.append(dataclasses.replace(comparison, p_adjusted=p_adj, verdict=verdict))
    return results


# --- cost summaries ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    """Median and range over seeds: for times and memory, which are skewed and never below zero."""

    n: int
    median: float
    low: float
    high: float


def spread(values: Sequence[float]) -> Spread | None:
    finite = sorted(float(v) for v in values if v is not None and math.isfinite(v))
    return Spread(len(finite), median(finite), finite[0], finite[-1]) if finite else None


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


# --- groups of runs (one strategy at one grid point, over seeds) -------------------------------

COST_METRICS = ("train_seconds", "peak_memory_mb", "tokens_per_s")  # summarised as median and range


@dataclass
class GroupStats:
    label: str  # strategy, plus grid values when there is a grid
    strategy: str
    grid: dict[str, Any]
    n_runs: int  # all runs of the group, whatever their status
    stats: dict[str, Stat] = field(default_factory=dict)  # metric -> over completed runs
    values: dict[str, dict[int, float]] = field(default_factory=dict)  # metric -> {seed: value}, completed runs
    spreads: dict[str, Spread] = field(default_factory=dict)  # cost metric -> median and range
    excluded: list[dict[str, Any]] = field(default_factory=list)  # {run_id, status, reason}
    comparisons: dict[str, float | None] = field(default_factory=dict)  # vs the baseline group
    pareto: dict[str, bool] = field(default_factory=dict)  # "params" / "time" -> on that front

    @property
    def n(self) -> int:
        return max((s.n for s in self.stats.values()), default=0)

    def mean(self, metric: str) -> float | None:
        stat = self.stats.get(metric)
        return None if stat is None else stat.mean

    def median(self, metric: str) -> float | None:
        summary = self.spreads.get(metric)
        return None if summary is None else summary.median


def aggregate(rows: list[dict[str, Any]], metrics: Sequence[str], *, baseline: str, quality: str) -> list[GroupStats]:
    """Group result rows by (strategy, grid values) and summarise each metric over completed seeds.

    Each row needs: run_id, strategy, grid (dict), seed, status, reason, and the metric columns.
    Pareto flags are set afterwards by ``mark_pareto``, from the paired comparisons.
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
            finite = {r.get("seed"): float(r[metric]) for r in done
                      if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])}
            if finite:
                group.stats[metric] = describe(list(finite.values()))
                group.values[metric] = finite
            if metric in COST_METRICS and finite:
                group.spreads[metric] = spread(list(finite.values()))
    ordered = list(groups.values())
    _compare_to_baseline(ordered, baseline, quality)
    return ordered


def group_label(strategy: str, grid: dict[str, Any]) -> str:
    if not grid:
        return strategy
    return strategy + " [" + ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in grid.items()) + "]"


def _compare_to_baseline(groups: list[GroupStats], baseline: str, quality: str) -> None:
    """Each group against the baseline strategy at the same grid values."""
    by_grid = {_grid_key(g.grid): g for g in groups if g.strategy == baseline}
    change_metrics = [quality] + [m for m in ("eval_loss", "perplexity") if m != quality]
    for group in groups:
        base = by_grid.get(_grid_key(group.grid))
        for metric in change_metrics:
            group.comparisons[f"{metric}_change_pct"] = relative_change(
                group.mean(metric), base.mean(metric) if base else None)
        for metric in ("train_seconds", "peak_memory_mb"):  # costs: medians, as the report shows them
            group.comparisons[f"{metric}_median_change_pct"] = relative_change(
                group.median(metric), base.median(metric) if base else None)
        params, base_params = group.mean("trainable_params"), base.mean("trainable_params") if base else None
        group.comparisons["param_reduction_pct"] = parameter_reduction(params, base_params)
        group.comparisons["efficiency_ratio"] = efficiency_ratio(
            group.mean("eval_loss"), base.mean("eval_loss") if base else None, params, base_params)


def _grid_key(grid: dict[str, Any]) -> str:
    return repr(sorted(grid.items(), key=lambda item: item[0]))


def mark_pareto(groups: list[GroupStats], quality: str, comparisons: Sequence[Comparison]) -> None:
    """On the front unless another group costs no more and is better by a separated paired comparison.

    Differences the data cannot separate never push a strategy off the front. Costs: trainable
    parameters (exact) and the median training time.
    """
    beaten = {(c.winner(), c.b if c.winner() == c.a else c.a) for c in comparisons
              if c.metric == quality and c.separated}
    for cost_metric, name, cost in (("trainable_params", "params", GroupStats.mean),
                                    ("train_seconds", "time", GroupStats.median)):
        eligible = [g for g in groups if g.mean(quality) is not None and cost(g, cost_metric) is not None]
        for group in groups:
            group.pareto[name] = group in eligible and not any(
                (other.label, group.label) in beaten and cost(other, cost_metric) <= cost(group, cost_metric)
                for other in eligible if other is not group)


def one_seed_warnings(groups: list[GroupStats], metric: str) -> list[str]:
    """Groups with one completed seed have no interval and no paired test."""
    return [f"{group.label} has one completed seed: no confidence interval and no paired test, so the data cannot "
            f"separate it from any other strategy on {metric}."
            for group in groups if (stat := group.stats.get(metric)) is not None and stat.n == 1]
