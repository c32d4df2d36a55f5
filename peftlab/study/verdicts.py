"""Verdicts: a sweep's paired comparisons in plain words (the top of the report) and as comparisons.csv.

The numbers come from peftlab.study.stats.compare_all; this module only words them. A sentence never says
more than its row: a separated pair names the direction, the interval, the seeds won and the adjusted
p-value; an indistinguishable pair says how large a difference this design could have detected and
about how many seeds would detect the one observed.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from peftlab.study.render import Block
from peftlab.study.stats import ALPHA, POWER, Comparison, GroupStats

if TYPE_CHECKING:
    from peftlab.study.analysis import Analysis, RunRecord

COLUMNS = ["metric", "a", "b", "test", "n_pairs", "n_a", "n_b", "mean_diff", "ci_low", "ci_high", "p_value",
           "p_adjusted", "a_wins", "b_wins", "ties", "verdict", "sd_diff", "min_detectable_diff", "seeds_to_detect"]
METRIC_NAMES = {"eval_loss": "eval loss", "accuracy": "accuracy", "macro_f1": "macro-F1", "perplexity": "perplexity",
                "gen_exact_match": "exact match (generated answers)", "gen_rougeL": "ROUGE-L (generated answers)",
                "gen_contains": "contains-the-reference rate (generated answers)",
                "forgetting": "forgetting (loss on reference text, after minus before training)"}


def comparison_rows(comparisons: list[Comparison]) -> list[dict[str, Any]]:
    """One row per (metric, a, b): mean_diff is a minus b; wins count seeds; verdict from p_adjusted < ALPHA."""
    return [{"metric": c.metric, "a": c.a, "b": c.b, "test": c.test, "n_pairs": c.n_pairs, "n_a": c.n_a, "n_b": c.n_b,
             "mean_diff": c.mean_diff, "ci_low": c.ci_low, "ci_high": c.ci_high, "p_value": c.p_value,
             "p_adjusted": c.p_adjusted, "a_wins": c.a_wins, "b_wins": c.b_wins, "ties": c.ties, "verdict": c.verdict,
             "sd_diff": c.sd_diff, "min_detectable_diff": c.min_detectable, "seeds_to_detect": c.seeds_to_detect}
            for c in comparisons]


def verdict_blocks(a: "Analysis") -> list[Block]:
    """The report's opening section: what the data separates, what it cannot, and what training bought."""
    blocks: list[Block] = [("h2", "Verdicts"), ("p", _method_line(a))]
    lines = reference_lines(a)
    metrics = list(dict.fromkeys(c.metric for c in a.comparisons))
    for metric in metrics:
        rows = [c for c in a.comparisons if c.metric == metric]
        lines += [sentence(c) for c in rows if c.separated]
        lines += best_line(a.groups, metric, rows)
        if metric == a.quality:
            lines += [sentence(c) for c in rows if not c.separated]
        elif any(not c.separated for c in rows):
            lines.append(f"{sum(not c.separated for c in rows)} other pairs are indistinguishable on "
                         f"{METRIC_NAMES.get(metric, metric)} (comparisons.csv lists them).")
    if a.aliases:
        lines.append("Identical configs, trained once and reported under each name: "
                     + "; ".join(f"{alias} = {original}" for alias, original in a.aliases.items()) + ".")
    blocks.append(("ul", lines or ["No pair of strategies has completed runs to compare."]))
    return blocks


def _method_line(a: "Analysis") -> str:
    seeds = sorted({r.seed for r in a.runs if r.seed is not None})
    families = Counter(c.metric for c in a.comparisons)
    family = ", ".join(f"{n} on {METRIC_NAMES.get(m, m)}" for m, n in families.items()) or "none"
    return (f"Runs of two strategies with the same seed share their data order, initialisation seed and eval set, so "
            f"they are compared as pairs ({len(seeds)} seeds: {', '.join(map(str, seeds))}): the mean of the per-seed "
            f"differences with its {100 * (1 - ALPHA):.0f}% Student-t interval, the seeds each side won, "
            f"and a paired t "
            f"test whose p-value is Holm-adjusted over the pairs of its metric ({family}). A pair is called separated "
            f"when the adjusted p-value is below {ALPHA}; otherwise it is indistinguishable at this number of seeds.")


def _diff(value: float) -> str:
    return f"{abs(value):.3g}"


def _interval(c: Comparison) -> str:
    """The interval of the winner's margin (or of a - b when there is none), e.g. '95% CI 0.078 to 0.124'."""
    if c.ci_low is None:
        return "no interval"
    flip = c.separated and c.mean_diff < 0
    low, high = (-c.ci_high, -c.ci_low) if flip else (c.ci_low, c.ci_high)
    return f"{100 * (1 - ALPHA):.0f}% CI {low:.3g} to {high:.3g}"


def _p(value: float | None) -> str:
    return "-" if value is None else f"{value:.2g}"


def sentence(c: Comparison) -> str:
    """One comparison in words."""
    name = METRIC_NAMES.get(c.metric, c.metric)
    winner = c.winner()
    if winner is not None:
        loser = c.b if winner == c.a else c.a
        wins = c.a_wins if winner == c.a else c.b_wins
        direction = "higher" if c.higher_is_better else "lower"
        return (f"{winner} has {direction} {name} than {loser} by {_diff(c.mean_diff)} ({_interval(c)}; "
                f"better on {wins} of {c.n_pairs} seeds; p_adj {_p(c.p_adjusted)}).")
    if c.test == "none":
        return (f"{c.a} and {c.b}: too few completed runs to compare on {name} (a: {c.n_a}, b: {c.n_b}); "
                f"difference of means {c.mean_diff:+.3g}.")
    if c.test == "Welch t":
        return (f"{c.a} and {c.b}: indistinguishable on {name}; their seeds do not match, so this is an unpaired "
                f"Welch test (a - b = {c.mean_diff:+.3g}, {_interval(c)}, p_adj {_p(c.p_adjusted)}).")
    if c.mean_diff == 0.0 and c.sd_diff == 0.0:
        return f"{c.a} and {c.b}: the same {name} on each of {c.n_pairs} seeds."
    text = (f"{c.a} and {c.b}: indistinguishable on {name} (a - b = {c.mean_diff:+.3g}, {_interval(c)}; "
            f"{c.a} better on {c.a_wins} of {c.n_pairs} seeds, {c.b} on {c.b_wins}; p_adj {_p(c.p_adjusted)}).")
    if c.min_detectable is not None:
        text += (f" With {c.n_pairs} seeds this design detects a true difference of about {c.min_detectable:.2g} "
                 f"({100 * POWER:.0f}% power, unadjusted)")
        text += (f"; about {c.seeds_to_detect} seeds would detect the observed {_diff(c.mean_diff)}."
                 if c.seeds_to_detect else "; the observed difference is too small to detect with any practical "
                                            "number of seeds.")
    return text


def best_line(groups: list[GroupStats], metric: str, rows: list[Comparison]) -> list[str]:
    """The best mean on ``metric`` and the strategies the data cannot separate from it."""
    ranked = [g for g in groups if g.mean(metric) is not None]
    if len(ranked) < 2 or not rows:
        return []
    higher = rows[0].higher_is_better
    best = max(ranked, key=lambda g: g.mean(metric) if higher else -g.mean(metric))
    tied = [c.b if c.a == best.label else c.a for c in rows if best.label in (c.a, c.b) and not c.separated]
    word = "Highest" if higher else "Lowest"
    name = METRIC_NAMES.get(metric, metric)
    if not tied:
        return [f"{word} mean {name}: {best.label}, separated from every other strategy."]
    return [f"{word} mean {name}: {best.label}; the data cannot separate it from {', '.join(tied)}."]


def reference_lines(a: "Analysis") -> list[str]:
    """What fine-tuning bought over the untrained base model (evaluated once, on the same eval set)."""
    reference: RunRecord | None = a.reference
    if reference is None:
        return []
    base = reference.summary.metrics.get(a.quality) if reference.summary else None
    if not isinstance(base, (int, float)):
        return []
    higher = a.higher_is_better
    name = METRIC_NAMES.get(a.quality, a.quality)
    parts = []
    for group in a.groups:
        values = list((group.values.get(a.quality) or {}).values())
        if not values:
            continue
        gains = [(v - base) if higher else (base - v) for v in values]
        better = sum(g > 0 for g in gains)
        parts.append(f"{group.label} {sum(gains) / len(gains):+.3g} (better than the base model on {better} of "
                     f"{len(gains)} seeds)")
    if not parts:
        return []
    return [f"Against the untrained base model ({name} {base:.4g}, evaluated once at step 0 on the same eval set), "
            f"mean improvement in {name} ({'higher' if higher else 'lower'} is better): " + "; ".join(parts) + "."]
