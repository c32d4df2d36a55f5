"""Statistics against published table values and hand-computed numbers."""

import math

import pytest

from peftlab.study.distribution import regularized_beta, t_cdf, t_quantile
from peftlab.study.stats import (
    Stat,
    aggregate,
    compare,
    compare_all,
    describe,
    efficiency_ratio,
    holm,
    mark_pareto,
    minimum_detectable,
    one_seed_warnings,
    paired_test,
    parameter_reduction,
    relative_change,
    seeds_to_detect,
    spread,
    welch_test,
)

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


def _row(strategy, seed, loss, params, status="completed", seconds=10.0):
    return {"run_id": f"{strategy}-{seed}", "strategy": strategy, "grid": {}, "seed": seed, "status": status,
            "reason": "", "eval_loss": loss, "trainable_params": params, "train_seconds": seconds}


def test_aggregate_excludes_unfinished_runs_and_compares_to_baseline():
    rows = [_row("full", 1, 3.0, 6e6), _row("full", 2, 3.2, 6e6), _row("full", 3, 3.4, 6e6),
            _row("attn", 1, 3.5, 2e6, seconds=4.0), _row("attn", 2, 3.7, 2e6, seconds=6.0),
            _row("attn", 3, float("nan"), 2e6, status="diverged"),
            _row("mlp", 1, 4.0, 4e6, seconds=5.0)]
    groups = {g.label: g for g in aggregate(rows, ["eval_loss", "trainable_params", "train_seconds"],
                                            baseline="full", quality="eval_loss")}
    attn = groups["attn"]
    assert attn.n == 2 and attn.n_runs == 3 and attn.stats["eval_loss"].mean == pytest.approx(3.6)
    assert attn.values["eval_loss"] == {1: 3.5, 2: 3.7}  # per seed, completed runs only
    assert [e["run_id"] for e in attn.excluded] == ["attn-3"]
    assert attn.comparisons["eval_loss_change_pct"] == pytest.approx(100 * 0.4 / 3.2)
    assert attn.comparisons["param_reduction_pct"] == pytest.approx(100 * 2 / 3)
    assert attn.comparisons["efficiency_ratio"] == pytest.approx(0.4 / 4.0)
    assert attn.spreads["train_seconds"].median == 5.0 and attn.spreads["train_seconds"].low == 4.0
    assert attn.comparisons["train_seconds_median_change_pct"] == pytest.approx(-50.0)
    assert groups["full"].comparisons["eval_loss_change_pct"] == 0.0
    warnings = one_seed_warnings(list(groups.values()), "eval_loss")
    assert len(warnings) == 1 and "mlp has one completed seed" in warnings[0]


# --- paired comparisons: checked against scipy.stats (ttest_rel / ttest_ind(equal_var=False)), run once by hand --


def test_paired_test_matches_scipy_ttest_rel():
    a, b = [2.50, 2.71, 2.62], [2.59, 2.81, 2.74]
    mean, sd, low, high, p = paired_test([x - y for x, y in zip(a, b, strict=True)])
    assert mean == pytest.approx(-0.10333333, rel=1e-6)
    assert p == pytest.approx(0.0072054464084598735, rel=1e-6)
    assert (low, high) == (pytest.approx(-0.1412791636693012, rel=1e-6), pytest.approx(-0.06538750299736548, rel=1e-6))
    assert paired_test([-0.5, -0.1, 1.0])[4] == pytest.approx(0.7942622000505442, rel=1e-6)
    assert paired_test([0.2, 0.2, 0.2])[4] == 0.0 and paired_test([0.0, 0.0])[4] == 1.0  # no spread
    assert paired_test([0.3])[1:] == (None, None, None, None)


def test_welch_matches_scipy():
    diff, low, high, p = welch_test([1.0, 2.0, 4.0], [1.5, 2.1, 3.0, 2.2])
    assert p == pytest.approx(0.8972374229856264, rel=1e-6)
    assert (low, high) == (pytest.approx(-3.2123339756549534, rel=1e-6), pytest.approx(3.47900064232162, rel=1e-6))


def test_holm_step_down_and_monotone():
    # sorted p 0.01, 0.02, 0.04 -> 3*0.01, max(0.03, 2*0.02), max(0.04, 1*0.04); None stays
    assert holm([0.04, 0.01, None, 0.02]) == [pytest.approx(0.04), pytest.approx(0.03), None, pytest.approx(0.04)]
    assert holm([0.5, 0.9]) == [1.0, 1.0]


def test_minimum_detectable_difference_and_seeds_needed():
    # (t(0.975, 2) + t(0.8, 2)) * sd / sqrt(3) = (4.3027 + 1.0607) * 0.1 / 1.7321
    assert minimum_detectable(0.1, 3) == pytest.approx((4.302652729749752 + 1.0606601717798212) * 0.1 / math.sqrt(3))
    assert minimum_detectable(0.1, 1) is None
    n = seeds_to_detect(0.1, 0.05)
    assert minimum_detectable(0.1, n) <= 0.05 < minimum_detectable(0.1, n - 1)
    assert seeds_to_detect(0.1, 0.0) is None


def _groups(values, params=None):
    rows = [_row(name, seed, v, (params or {}).get(name, 1000)) for name, per_seed in values.items()
            for seed, v in per_seed.items()]
    return aggregate(rows, ["eval_loss", "trainable_params", "train_seconds"], baseline=next(iter(values)),
                     quality="eval_loss")


def test_worse_on_every_seed_by_a_small_constant_is_separated_though_seeds_spread_widely():
    """The seeds' trap: unpaired intervals overlap, yet b is worse than a by 0.01 on every seed."""
    a = {1: 2.1, 2: 2.6, 3: 3.2, 4: 2.9}
    b = {s: v + 0.01 + 0.0005 * s for s, v in a.items()}
    groups = _groups({"a": a, "b": b})
    sa, sb = groups[0].stats["eval_loss"], groups[1].stats["eval_loss"]
    assert sa.ci_low <= sb.ci_high and sb.ci_low <= sa.ci_high  # unpaired: the intervals overlap widely
    (c,) = compare_all(groups, "eval_loss", higher_is_better=False)
    assert c.test == "paired t" and c.n_pairs == 4 and c.verdict == "a_better" and c.winner() == "a"
    assert c.a_wins == 4 and c.b_wins == 0 and c.mean_diff == pytest.approx(-0.01125)
    assert c.ci_high < 0 and c.p_adjusted < 0.05


def test_direction_follows_higher_is_better_and_noise_is_indistinguishable():
    a = {1: 0.80, 2: 0.82, 3: 0.81}
    (c,) = compare_all(_groups({"a": a, "b": {s: v - 0.05 for s, v in a.items()}}), "eval_loss", higher_is_better=True)
    assert c.verdict == "a_better"  # higher is better, a is higher on every seed
    noisy = _groups({"a": {1: 1.0, 2: 2.0, 3: 3.0}, "b": {1: 1.4, 2: 1.5, 3: 3.3}})
    (c,) = compare_all(noisy, "eval_loss", higher_is_better=False)
    assert c.verdict == "indistinguishable" and c.a_wins == 2 and c.b_wins == 1
    assert c.min_detectable is not None and c.seeds_to_detect is not None


def test_holm_adjusts_across_the_family():
    base = {1: 2.0, 2: 2.5, 3: 3.0}
    groups = _groups({"a": base, "b": {s: v + 0.1 + 0.02 * s for s, v in base.items()},
                      "c": {s: v + 0.3 - 0.01 * s for s, v in base.items()}})
    rows = compare_all(groups, "eval_loss", higher_is_better=False)
    assert [(r.a, r.b) for r in rows] == [("a", "b"), ("a", "c"), ("b", "c")]
    assert [r.p_adjusted for r in rows] == holm([r.p_value for r in rows])


def test_identical_results_are_said_to_be_the_same():
    from peftlab.study.verdicts import sentence

    c = compare("eval_loss", "a", "b", {1: 2.0, 2: 2.5}, {1: 2.0, 2: 2.5}, higher_is_better=False)
    assert sentence(c) == "a and b: the same eval loss on each of 2 seeds."


def test_unmatched_seeds_fall_back_to_welch_and_say_so():
    c = compare("eval_loss", "a", "b", {1: 1.0, 2: 2.0, 3: 4.0}, {7: 1.5, 8: 2.1, 9: 3.0, 10: 2.2},
                higher_is_better=False)
    assert c.test == "Welch t" and c.n_pairs == 0 and c.p_value == pytest.approx(0.8972374229856264, rel=1e-6)
    one = compare("eval_loss", "a", "b", {1: 1.0}, {2: 2.0}, higher_is_better=False)
    assert one.test == "none" and one.p_value is None


def test_pareto_only_drops_a_strategy_that_a_cheaper_one_beats_by_a_separated_comparison():
    base = {1: 2.0, 2: 2.6, 3: 3.1}
    groups = _groups({"big": base, "small_same": {s: v + (0.05 if s == 2 else -0.04) for s, v in base.items()},
                      "small_worse": {s: v + 0.5 + 0.01 * s for s, v in base.items()},
                      "bigger_worse": {s: v + 0.3 + 0.01 * s for s, v in base.items()}},
                     params={"big": 1000, "small_same": 100, "small_worse": 100, "bigger_worse": 5000})
    comparisons = compare_all(groups, "eval_loss", higher_is_better=False)
    mark_pareto(groups, "eval_loss", comparisons)
    front = {g.label: g.pareto["params"] for g in groups}
    # big stays: small_same is cheaper but not separated from it; bigger_worse is beaten by the cheaper big,
    # small_worse by small_same at the same cost
    assert front == {"big": True, "small_same": True, "small_worse": False, "bigger_worse": False}
    assert spread([3.0, 1.0, 2.0, None]).median == 2.0
