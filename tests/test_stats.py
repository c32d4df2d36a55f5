"""Statistics against published table values and hand-computed numbers."""

import math

import pytest

from peftlab.stats import (Stat, aggregate, describe, efficiency_ratio, intervals_overlap, parameter_reduction,
                           pareto_front, regularized_beta, relative_change, separation_warnings, t_cdf, t_quantile)

# Two-sided 95% critical values t(0.975, df) from standard tables (e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         15: 2.131, 20: 2.086, 25: 2.060, 29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 100: 1.984}


@pytest.mark.parametrize("df,expected", sorted(T_975.items()))
def test_t_quantile_matches_the_table(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=6e-4)


def test_t_quantile_more_digits_other_levels_and_symmetry():
    assert t_quantile(0.975, 1) == pytest.approx(12.7062047362, rel=1e-9)
    assert t_quantile(0.975, 2) == pytest.approx(4.30265272975, rel=1e-9)
    assert t_quantile(0.95, 4) == pytest.approx(2.13184678633, rel=1e-9)
    assert t_quantile(0.995, 7) == pytest.approx(3.49948329735, rel=1e-9)
    assert t_quantile(0.025, 3) == pytest.approx(-t_quantile(0.975, 3))
    assert t_quantile(0.5, 5) == 0.0
    assert t_quantile(0.975, math.inf) == pytest.approx(1.959963985, rel=1e-9)
    assert t_quantile(0.975, 10_000) == pytest.approx(1.96, abs=1e-3)  # approaches the normal


def test_t_cdf_and_incomplete_beta_known_values():
    assert t_cdf(0.0, 3) == pytest.approx(0.5)
    assert t_cdf(1.0, 1) == pytest.approx(0.75)  # Cauchy: 1/2 + atan(1)/pi
    assert t_cdf(2.0, 2) == pytest.approx(0.5 + 2 / (2 * math.sqrt(2 + 4)), rel=1e-12)  # df=2 closed form
    assert regularized_beta(0.3, 1, 1) == pytest.approx(0.3)  # uniform
    assert regularized_beta(0.5, 2, 2) == pytest.approx(0.5)
    assert regularized_beta(0.2, 2, 3) == pytest.approx(0.1808, rel=1e-9)  # 1 - 0.8^4 - 4*0.2*0.8^3


def test_t_quantile_rejects_bad_arguments():
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError):
        t_quantile(0.9, 0)


def test_describe_hand_computed():
    stat = describe([3.0, 3.2, 3.4])
    assert stat.n == 3 and stat.mean == pytest.approx(3.2)
    assert stat.std == pytest.approx(0.2)  # sample std, n - 1
    half = 4.302652729749752 * 0.2 / math.sqrt(3)  # = 0.49683
    assert stat.half_width == pytest.approx(half) and stat.ci_low == pytest.approx(3.2 - half)
    assert stat.ci_high == pytest.approx(3.2 + half)


def test_describe_one_value_has_no_interval_and_ignores_missing():
    assert describe([2.5]) == Stat(1, 2.5, None, None, None)
    assert describe([]) is None
    assert describe([None, float("nan"), 1.0, 3.0]).mean == 2.0


def test_relative_change_reduction_and_seed_003_efficiency_ratio():
    assert relative_change(3.481, 3.089) == pytest.approx(100 * 0.392 / 3.089)
    assert relative_change(0.8, 0.0) is None and relative_change(None, 1.0) is None
    assert parameter_reduction(1.97e6, 6.29e6) == pytest.approx(68.68, abs=0.01)  # seed 002's "68.8%": FF-only
    # seed 003's numbers: FF-only (4.252, 1.97M) against full LoRA (3.089, 6.29M): 1.163 / 4.32 = 0.2692
    assert efficiency_ratio(4.252, 3.089, 1.97e6, 6.29e6) == pytest.approx(1.163 / 4.32)
    assert efficiency_ratio(3.0, 3.089, 6.29e6, 6.29e6) is None  # no parameters saved: undefined
    assert efficiency_ratio(3.0, 3.089, 7e6, 6.29e6) is None


def test_pareto_front():
    costs = [1, 2, 3, 4, 2]
    losses = [5.0, 4.0, 4.5, 3.0, 4.0]
    assert pareto_front(costs, losses, higher_is_better=False) == [True, True, False, True, True]  # ties both kept
    accuracy = [0.5, 0.7, 0.6, 0.9, 0.6]
    assert pareto_front(costs, accuracy, higher_is_better=True) == [True, True, False, True, False]


def test_intervals_overlap():
    a, b, c = Stat(3, 1.0, 0.1, 0.9, 1.1), Stat(3, 1.15, 0.1, 1.05, 1.25), Stat(3, 2.0, 0.1, 1.9, 2.1)
    assert intervals_overlap(a, b) and not intervals_overlap(a, c)
    assert intervals_overlap(a, Stat(1, 5.0, None, None, None))


def _row(strategy, seed, loss, params, status="completed", seconds=10.0):
    return {"run_id": f"{strategy}-{seed}", "strategy": strategy, "grid": {}, "status": status, "reason": "",
            "eval_loss": loss, "trainable_params": params, "train_seconds": seconds}


def test_aggregate_excludes_unfinished_runs_and_compares_to_baseline():
    rows = [_row("full", 1, 3.0, 6e6), _row("full", 2, 3.2, 6e6), _row("full", 3, 3.4, 6e6),
            _row("attn", 1, 3.5, 2e6), _row("attn", 2, 3.7, 2e6),
            _row("attn", 3, float("nan"), 2e6, status="diverged"),
            _row("mlp", 1, 4.0, 4e6, seconds=5.0)]
    groups = {g.label: g for g in aggregate(rows, ["eval_loss", "trainable_params", "train_seconds"],
                                            baseline="full", quality="eval_loss", higher_is_better=False)}
    attn = groups["attn"]
    assert attn.n == 2 and attn.n_runs == 3 and attn.stats["eval_loss"].mean == pytest.approx(3.6)
    assert [e["run_id"] for e in attn.excluded] == ["attn-3"]
    assert attn.comparisons["eval_loss_change_pct"] == pytest.approx(100 * 0.4 / 3.2)
    assert attn.comparisons["param_reduction_pct"] == pytest.approx(100 * 2 / 3)
    assert attn.comparisons["efficiency_ratio"] == pytest.approx(0.4 / 4.0)
    assert groups["full"].comparisons["eval_loss_change_pct"] == 0.0
    assert groups["full"].pareto["params"] and attn.pareto["params"] and not groups["mlp"].pareto["params"]
    assert groups["mlp"].pareto["time"]  # cheapest in time
    warnings = separation_warnings(list(groups.values()), "eval_loss")
    assert any("mlp has one completed seed" in w for w in warnings)
    assert any("full and attn" in w and "cannot separate" in w for w in warnings)  # [2.70, 3.70] vs wide attn CI


def test_separation_warnings_silent_when_intervals_are_apart():
    rows = [_row("a", s, 1.0 + 0.001 * s, 1) for s in range(3)] + [_row("b", s, 2.0 + 0.001 * s, 1) for s in range(3)]
    groups = aggregate(rows, ["eval_loss"], baseline="a", quality="eval_loss", higher_is_better=False)
    assert separation_warnings(groups, "eval_loss") == []
