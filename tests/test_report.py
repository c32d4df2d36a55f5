"""Reports from fixed, hand-made run folders: tables against hand-computed values, warnings, figures, HTML."""

import argparse
import csv
import json
import math
import re

import pytest
from summaries import failed_summary, make_summary, resources
from summaries import params as params_of

from peftlab.cli import add_sweep_commands
from peftlab.errors import UserError
from peftlab.run.summary import (
    Collapse,
    DataInfo,
    Divergence,
    PlacedModule,
    data_warnings,
    small_eval_warning,
    write_summary,
)
from peftlab.study.analysis import load_runs
from peftlab.study.report import make_report

ENV = {"peftlab": "0.1.0", "torch": "2.13.0+cpu", "transformers": "5.23.0", "device": "cpu", "processor": "Test CPU"}


def _placement(rank, roles=("attn_q", "attn_v", "mlp_in")):
    names = {"attn_q": "self_attn.q_proj", "attn_v": "self_attn.v_proj", "mlp_in": "mlp.up_proj"}
    return [PlacedModule(f"model.layers.{layer}.{names[role]}", layer, role, None, rank(layer))
            for layer in range(4) for role in roles]


def _metrics(loss):
    return {"eval_loss": loss, "eval_units": 100, "perplexity": math.exp(loss), "train_loss": loss + 0.1}


def _write_run(root, run_id, strategy, index, seed, *, status="completed", loss=None, params=1000, seconds=10.0,
               eval_examples=500, placement=None, summary=True, grid=None, **fields):
    """A run folder as a sweep leaves it; ``fields`` override the summary's (RunSummary fields)."""
    folder = root / "runs" / run_id
    folder.mkdir(parents=True)
    info = {"run_id": run_id, "strategy": strategy, "strategy_index": index, "grid": grid or {}, "seed": seed}
    (folder / "sweep_run.json").write_text(json.dumps(info))
    curve = [{"step": s, "train_loss": (loss or 3.0) + 1.0 / s, "lr": 1e-4, "tokens_per_s": 100.0}
             for s in (1, 2, 3, 4)]
    curve += [{"step": 4, "eval_loss": loss, "eval_units": 100}] if loss is not None else []
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve) + '{"step": 5, "trai')
    if not summary:
        return folder
    if status == "failed":
        record = failed_summary(run_id, "RuntimeError: out of memory", sweep=info)
    else:
        record = make_summary(status, name=run_id, **{
            "metrics": _metrics(loss) if status == "completed" else {}, "params": params_of(params, 100_000),
            "resources": resources(train_seconds=seconds, peak_memory_mb=500.0 + params / 1000,
                                   adapter_bytes=params * 4),
            "divergence": Divergence(3, "non-finite gradient", ["layers.1.lora_B"]) if status == "diverged" else None,
            "data": DataInfo(1000, eval_examples), "placement": placement or [], "environment": ENV,
            "started": f"2025-01-0{seed}T10:00:00", "wall_seconds": 12.0,
            "config": {"model": "tiny", "data": {"source": "alpaca.jsonl"},
                       "train": {"max_steps": 4, "batch_size": 8, "grad_accum": 1, "lr": 1e-4, "scheduler": "cosine",
                                 "warmup_ratio": 0.1, "weight_decay": 0.01, "seed": seed}},
            "sweep": info, **fields})
    write_summary(folder / "summary.json", record)
    return folder


@pytest.fixture
def sweep_dir(tmp_path):
    """full (3 seeds), attention (3 seeds + 1 diverged), mlp (1 seed + 1 failed), one unfinished run."""
    root = tmp_path / "sweep"
    (root / "runs").mkdir(parents=True)
    (root / "sweep.json").write_text(json.dumps({
        "name": "placement", "baseline": "full", "grid": {}, "seeds": [1, 2, 3, 4],
        "strategies": {"full": {"method.placement": "all_linear"}, "attention": {"method.placement": "attention_only"},
                       "mlp": {"method.placement": "mlp_only"}}}))
    for seed, loss in zip((1, 2, 3), (3.0, 3.2, 3.4), strict=True):
        _write_run(root, f"full__seed{seed}", "full", 0, seed, loss=loss, params=6000,
                   placement=_placement(lambda layer: 8))
    for seed, loss in zip((1, 2, 3), (3.5, 3.7, 3.6), strict=True):
        _write_run(root, f"attention__seed{seed}", "attention", 1, seed, loss=loss, params=2000, seconds=6.0,
                   placement=_placement(lambda layer: 16 - 4 * layer, roles=("attn_q", "attn_v")))
    _write_run(root, "attention__seed4", "attention", 1, 4, status="diverged")
    _write_run(root, "mlp__seed1", "mlp", 2, 1, loss=4.0, params=4000, seconds=5.0)
    _write_run(root, "mlp__seed2", "mlp", 2, 2, status="failed")
    _write_run(root, "mlp__seed3", "mlp", 2, 3, summary=False)
    return root


def _csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_results_csv_has_a_row_per_run_with_every_metric(sweep_dir):
    make_report(sweep_dir)
    rows = {r["run_id"]: r for r in _csv(sweep_dir / "results.csv")}
    assert len(rows) == 10
    full = rows["full__seed2"]
    assert (full["strategy"], full["seed"], full["status"]) == ("full", "2", "completed")
    assert float(full["eval_loss"]) == 3.2 and float(full["perplexity"]) == math.exp(3.2)
    assert float(full["train_loss"]) == pytest.approx(3.3) and full["trainable_params"] == "6000"
    assert full["eval_units"] == "100" and full["memory_kind"] == "peak_rss"
    diverged = rows["attention__seed4"]
    assert diverged["status"] == "diverged" and "non-finite gradient" in diverged["reason"]
    assert rows["mlp__seed2"]["reason"] == "RuntimeError: out of memory"
    assert rows["mlp__seed3"]["status"] == "unfinished" and "--resume" in rows["mlp__seed3"]["reason"]


def test_summary_csv_against_hand_computed_values(sweep_dir):
    make_report(sweep_dir)
    rows = {r["group"]: r for r in _csv(sweep_dir / "summary.csv")}
    assert list(rows) == ["full", "attention", "mlp"]  # the sweep file's order
    full, attention, mlp = rows["full"], rows["attention"], rows["mlp"]
    half = 4.302652729749752 * 0.2 / math.sqrt(3)  # t(0.975, 2) * s / sqrt(n), s = 0.2
    assert float(full["eval_loss_mean"]) == pytest.approx(3.2) and float(full["eval_loss_std"]) == pytest.approx(0.2)
    assert float(full["eval_loss_ci95_low"]) == pytest.approx(3.2 - half)
    assert float(full["eval_loss_ci95_high"]) == pytest.approx(3.2 + half)
    # attention: mean 3.6 over its 3 completed seeds; the diverged 4th is excluded, not averaged in
    assert (attention["n_runs"], attention["n_completed"]) == ("4", "3")
    assert attention["excluded_runs"] == "attention__seed4 (diverged)"
    assert float(attention["eval_loss_mean"]) == pytest.approx(3.6)
    assert float(attention["eval_loss_change_pct"]) == pytest.approx(100 * 0.4 / 3.2)
    assert float(attention["param_reduction_pct"]) == pytest.approx(100 * 4000 / 6000)
    assert float(attention["efficiency_ratio"]) == pytest.approx(0.4 / (4000 / 1e6))  # loss up per M params saved
    assert float(attention["train_seconds_median_change_pct"]) == pytest.approx(-40.0)
    assert mlp["n_completed"] == "1" and mlp["eval_loss_std"] == "" and mlp["eval_loss_ci95_low"] == ""
    assert float(mlp["efficiency_ratio"]) == pytest.approx(0.8 / (2000 / 1e6))
    assert full["efficiency_ratio"] == ""  # no parameters saved against itself: undefined
    # Pareto respects uncertainty: mlp (4000, 4.0) has one seed, so no comparison separates it from attention
    # (2000, 3.6), and full vs attention (paired p 0.057 before Holm) is not separated either: all stay.
    assert [rows[g]["pareto_quality_vs_params"] for g in rows] == ["True", "True", "True"]
    assert [rows[g]["pareto_quality_vs_time"] for g in rows] == ["True", "True", "True"]


def test_report_states_what_the_data_cannot_separate(sweep_dir):
    make_report(sweep_dir)
    text = (sweep_dir / "report.md").read_text()
    assert ("attention__seed4 is diverged and is excluded from every mean: diverged at step 3: "
            "non-finite gradient") in text
    assert "mlp__seed2 is failed and is excluded from every mean: RuntimeError: out of memory" in text
    assert "mlp__seed3 is unfinished" in text
    assert "mlp has one completed seed: no confidence interval and no paired test" in text
    # paired: full - attention = -0.5, -0.5, -0.2 (sd 0.173, t -4.0, df 2, p 0.057): not separated after Holm
    assert "full and attention: indistinguishable on eval loss (a - b = -0.4, 95% CI" in text
    assert "full better on 3 of 3 seeds, attention on 0" in text and "this design detects a true difference" in text
    assert "evaluated on only" not in text  # 500 eval examples: no small-eval warning


def test_small_eval_set_is_flagged(tmp_path):
    root = tmp_path / "s"
    for seed in (1, 2):
        _write_run(root, f"a__seed{seed}", "a", 0, seed, loss=3.0 + seed / 10, eval_examples=20)
    make_report(root)
    text = (root / "report.md").read_text()
    assert "evaluated on only 20 examples" in text and "within evaluation noise" in text


def test_runner_warnings_are_listed_by_kind_and_the_small_eval_one_is_worded_once(tmp_path):
    root = tmp_path / "s"
    label_gap = "1 of 20 eval examples have a label that no training example has (meh): it can never be predicted"
    for seed in (1, 2):
        _write_run(root, f"a__seed{seed}", "a", 0, seed, loss=3.0 + seed / 10, eval_examples=20,
                   warnings=[*data_warnings([label_gap]), small_eval_warning(20)])
    make_report(root)
    text = (root / "report.md").read_text()
    assert f"runner: {label_gap}" in text  # a data warning, although it mentions eval examples
    assert "runner: only 20 eval examples" not in text and text.count("evaluated on only 20 examples") == 1


def test_report_embeds_figures_and_environment(sweep_dir):
    make_report(sweep_dir)
    markdown = (sweep_dir / "report.md").read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert sorted(linked) == ["figures/loss_curves.png", "figures/quality_vs_params.png", "figures/rank_heatmap.png",
                              "figures/time_memory.png"]
    for link in linked:
        assert (sweep_dir / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (sweep_dir / "report.html").read_text()
    assert html.count("src='data:image/png;base64,") == 4
    assert not re.search(r"src=['\"](?!data:)", html) and "<link" not in html  # self-contained
    for needle in ("torch: 2.13.0+cpu", "transformers: 5.23.0", "device: cpu", "2025-01-01T10:00:00"):
        assert needle in markdown
    assert "method.placement=attention_only" in markdown  # what each strategy is, for a reader without the config


def test_report_is_rebuilt_from_run_dirs_alone_and_is_stable(sweep_dir):
    make_report(sweep_dir)
    first = (sweep_dir / "summary.csv").read_text(), (sweep_dir / "results.csv").read_text()
    (sweep_dir / "sweep.json").unlink()  # without it: order from the runs, baseline = the first strategy
    make_report(sweep_dir)
    assert ((sweep_dir / "summary.csv").read_text(), (sweep_dir / "results.csv").read_text()) == first
    make_report(sweep_dir, baseline="attention")
    rows = {r["group"]: r for r in _csv(sweep_dir / "summary.csv")}
    assert float(rows["full"]["eval_loss_change_pct"]) == pytest.approx(-100 * 0.4 / 3.6)
    assert not list(sweep_dir.rglob("*.tmp"))


def test_load_runs_falls_back_to_sweep_run_json(sweep_dir):
    runs = {r.run_id: r for r in load_runs(sweep_dir)}
    assert runs["mlp__seed3"].strategy == "mlp" and runs["mlp__seed3"].summary is None


def test_report_command_and_its_errors(sweep_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_sweep_commands(parser.add_subparsers())
    args = parser.parse_args(["report", str(sweep_dir)])
    assert args.handler(args) == 0 and "report.md" in capsys.readouterr().out
    with pytest.raises(UserError, match="not found"):
        args = parser.parse_args(["report", str(tmp_path / "nothing")])
        args.handler(args)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no runs"):
        make_report(tmp_path / "empty")
    with pytest.raises(UserError, match="baseline 'nope'"):
        make_report(sweep_dir, baseline="nope")


def test_grid_groups_compare_to_the_baseline_at_the_same_grid_point(tmp_path):
    root = tmp_path / "g"
    for r, (base_loss, other_loss) in {4: (3.0, 3.3), 8: (2.0, 2.5)}.items():
        for seed in (1, 2):
            grid = {"method.ranks.r": r}
            _write_run(root, f"base__r{r}__s{seed}", "base", 0, seed, loss=base_loss + seed / 100, grid=grid)
            _write_run(root, f"other__r{r}__s{seed}", "other", 1, seed, loss=other_loss + seed / 100, grid=grid)
    make_report(root)
    rows = {r["group"]: r for r in _csv(root / "summary.csv")}
    assert set(rows) == {"base [r=4]", "base [r=8]", "other [r=4]", "other [r=8]"}
    assert rows["other [r=8]"]["method.ranks.r"] == "8"
    assert float(rows["other [r=8]"]["eval_loss_change_pct"]) == pytest.approx(100 * 0.5 / 2.015)
    assert float(rows["other [r=4]"]["eval_loss_change_pct"]) == pytest.approx(100 * 0.3 / 3.015)


def test_classification_report_names_the_majority_class_floor_and_shows_f1(tmp_path):
    """Seed 001's trap: 64% accuracy on an eval set that is 64% one class is no learning at all."""
    root = tmp_path / "cls"
    accuracies = {"stuck": (0.64, 0.64, 0.64), "learns": (0.80, 0.82, 0.81)}
    for index, (strategy, values) in enumerate(accuracies.items()):
        for seed, accuracy in zip((1, 2, 3), values, strict=True):
            metrics = {**_metrics(0.6), "accuracy": accuracy, "macro_f1": 0.39 if strategy == "stuck" else 0.8,
                       "train_accuracy": accuracy}
            _write_run(root, f"{strategy}__seed{seed}", strategy, index, seed, loss=0.6, task="classification",
                       metrics=metrics, data=DataInfo(1000, 500, "fresh", 0.64))
    make_report(root)
    text = (root / "report.md").read_text()
    assert "Always answering the eval set's most frequent class ('fresh') scores accuracy 0.64" in text
    floor_line = next(line for line in text.splitlines() if "most frequent class" in line)
    assert "stuck: accuracy not above it" in floor_line and "learns" not in floor_line
    header = next(line for line in text.splitlines() if line.startswith("| strategy | n | accuracy"))
    assert "macro_f1" in header and "train_accuracy" in header
    rows = list(csv.DictReader((root / "results.csv").open()))
    assert {r["eval_majority_accuracy"] for r in rows} == {"0.64"}


# --- verdicts: paired comparisons, the base-model row, integrity ------------------------------------


def _paired_sweep(root, *, extra_runs=()):
    """a and b over seeds 1-3 whose losses spread widely, b worse than a by ~0.02 on every seed; a base model."""
    a = {1: 2.0, 2: 2.6, 3: 3.3}
    b = {seed: loss + 0.02 + 0.001 * seed for seed, loss in a.items()}
    trials = [{"run_id": "base_model__x", "strategy": "base_model", "strategy_index": -1, "grid": {}, "seed": 1}]
    for index, (strategy, losses) in enumerate((("a", a), ("b", b))):
        for seed, loss in losses.items():
            run_id = f"{strategy}__seed{seed}"
            _write_run(root, run_id, strategy, index, seed, loss=loss, params=1000 * (index + 1))
            trials.append({"run_id": run_id, "strategy": strategy, "strategy_index": index, "grid": {}, "seed": seed,
                           "reference": "base_model__x"})
    base = _write_run(root, "base_model__x", "base_model", -1, 1, loss=4.0, params=0)
    for run_id, strategy, index, seed, kwargs in extra_runs:
        _write_run(root, run_id, strategy, index, seed, **kwargs)
        trials.append({"run_id": run_id, "strategy": strategy, "strategy_index": index, "grid": {}, "seed": seed})
    (root / "sweep.json").write_text(json.dumps({"name": "paired", "baseline": "a", "grid": {}, "seeds": [1, 2, 3],
                                                 "strategies": {"a": {}, "b": {"train.lr": 1}}, "trials": trials}))
    return base


def test_a_constant_paired_difference_is_a_verdict_at_the_top_of_the_report(tmp_path):
    root = tmp_path / "p"
    _paired_sweep(root)
    make_report(root)
    (row,) = _csv(root / "comparisons.csv")
    assert list(row)[:14] == ["metric", "a", "b", "test", "n_pairs", "n_a", "n_b", "mean_diff", "ci_low", "ci_high",
                              "p_value", "p_adjusted", "a_wins", "b_wins"]
    assert (row["metric"], row["a"], row["b"], row["test"], row["n_pairs"]) == ("eval_loss", "a", "b", "paired t", "3")
    assert float(row["mean_diff"]) == pytest.approx(-0.022) and float(row["ci_high"]) < 0
    assert (row["a_wins"], row["b_wins"], row["verdict"]) == ("3", "0", "a_better") and float(row["p_adjusted"]) < 0.05
    text = (root / "report.md").read_text()
    verdicts = text.index("## Verdicts")
    assert verdicts < text.index("## Setup") < text.index("## Summary")
    assert "a has lower eval loss than b by 0.022 (95% CI" in text and "better on 3 of 3 seeds; p_adj" in text
    assert "overlap" not in text  # no list of overlapping unpaired intervals
    # the untrained base model: a row in the summary, a line in the verdicts, a point at step 0
    assert "| base_model (untrained, step 0) | 1/1 | 4 |" in text
    assert "Against the untrained base model (eval loss 4, evaluated once at step 0" in text
    assert "a +1.37 (better than the base model on 3 of 3 seeds)" in text
    summary = {r["group"]: r for r in _csv(root / "summary.csv")}
    assert summary["base_model"]["eval_loss_mean"] == "4.0"
    assert "base_model__x" not in (root / "results.csv").read_text()


def test_collapsed_and_stray_runs_are_listed_and_never_averaged_and_no_nan_is_written(tmp_path):
    root = tmp_path / "p"
    collapse = Collapse("eval loss 10.8 >= ln(vocabulary size) 10.8: uniform predictions", 10.8, 10.8)
    base = _paired_sweep(root, extra_runs=[("b__seed4", "b", 1, 4, {"status": "collapsed", "loss": 10.8,
                                                                    "collapse": collapse,
                                                                    "metrics": {"eval_loss": 10.8}})])
    # a folder of an older version of the sweep file, and a NaN that must never reach a table
    _write_run(root, "b__seed1__old", "b", 1, 1, loss=9.0)
    # write_summary never writes a NaN: this file is one a non-strict writer left (Python's json writes NaN)
    nan_run = json.loads((root / "runs" / "a__seed1" / "summary.json").read_text())
    nan_run["metrics"]["train_loss"] = float("nan")
    (root / "runs" / "a__seed1" / "summary.json").write_text(json.dumps(nan_run))
    assert base.exists()
    make_report(root)
    rows = {r["group"]: r for r in _csv(root / "summary.csv")}
    assert rows["b"]["n_runs"] == "4" and rows["b"]["n_completed"] == "3" and "b__seed4 (collapsed)" in rows["b"][
        "excluded_runs"]
    text = (root / "report.md").read_text()
    assert "b__seed4 is collapsed and is excluded from every mean: collapsed: eval loss 10.8" in text
    assert "1 folder(s) under runs/ are not part of this sweep file" in text and "b__seed1__old" in text
    for name in ("results.csv", "summary.csv", "comparisons.csv", "report.md"):
        content = (root / name).read_text().lower()
        assert not re.search(r"\bnan\b|\binf(inity)?\b", content), name


def test_point_labels_in_quality_vs_params_do_not_overlap(tmp_path, monkeypatch):
    """adaptive_ranks' old figure printed custom_taper over uniform_r8: close points get separate label lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from peftlab.study import figures
    from peftlab.study.stats import aggregate

    rows = [{"run_id": f"{s}-{seed}", "strategy": s, "grid": {}, "seed": seed, "status": "completed", "reason": "",
             "eval_loss": 2.5 + 0.0001 * i + 0.001 * seed if s != "far" else 2.0 + 0.001 * seed,
             "trainable_params": 1000 + i if s != "far" else 1e6}
            for i, s in enumerate(("uniform_r8", "custom_taper", "linear_decay", "far")) for seed in (1, 2, 3)]
    groups = aggregate(rows, ["eval_loss", "trainable_params"], baseline="uniform_r8", quality="eval_loss")
    captured = {}
    real_separate = figures._separate_labels

    def spy(fig, labels):
        real_separate(fig, labels)
        captured["boxes"] = [t.get_window_extent(FigureCanvasAgg(fig).get_renderer()) for t in labels]

    monkeypatch.setattr(figures, "_separate_labels", spy)
    assert figures.quality_vs_params(groups, "eval_loss", "eval loss", False, tmp_path / "q.png") is not None
    boxes = captured["boxes"]
    assert len(boxes) == 4
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


# --- generation metrics and forgetting (the config's eval section) ----------------------------------


PROMPTS = ["### Instruction:\nname a colour\n\n### Response:\n", "### Instruction:\nsay hi\n\n### Response:\n"]


def _eval_run(root, strategy, index, seed, loss, exact, forgetting):
    """A run that measured generation scores and forgetting, with two samples on the shared prompts."""
    metrics = {**_metrics(loss), "gen_examples": 8, "gen_exact_match": exact, "gen_rougeL": exact + 0.1,
               "gen_contains": exact + 0.2, "reference_loss_before": 3.0, "reference_loss_after": 3.0 + forgetting,
               "forgetting": forgetting}
    samples = [{"prompt": p, "reference": ref, "generated": f"{strategy} answer {i}\nline two"}
               for i, (p, ref) in enumerate(zip(PROMPTS, ("red", "hi"), strict=True))]
    config = {"model": "tiny", "data": {"source": "alpaca.jsonl"}, "train": {"max_steps": 4, "seed": seed},
              "eval": {"generate": {"metrics": ["exact_match", "rougeL", "contains"], "max_new_tokens": 16,
                                    "num_examples": 8}, "reference": "hamlet", "reference_size": 64}}
    _write_run(root, f"{strategy}__seed{seed}", strategy, index, seed, loss=loss, metrics=metrics, samples=samples,
               config=config)


@pytest.fixture
def eval_sweep(tmp_path):
    """lora beats full on every generation metric and forgets less, on each of 4 seeds."""
    root = tmp_path / "sweep"
    (root / "runs").mkdir(parents=True)
    (root / "sweep.json").write_text(json.dumps({
        "name": "eval", "baseline": "full", "grid": {}, "seeds": [1, 2, 3, 4],
        "strategies": {"full": {"method.name": "full"}, "lora": {}}}))
    for seed in (1, 2, 3, 4):
        _eval_run(root, "full", 0, seed, 3.0 + 0.01 * seed, 0.2 + 0.01 * seed, 0.5 + 0.02 * seed)
        _eval_run(root, "lora", 1, seed, 3.1 + 0.01 * seed, 0.5 + 0.013 * seed, 0.1 + 0.01 * seed)
    return root


def test_generation_and_forgetting_reach_every_table_and_the_verdicts(eval_sweep):
    make_report(eval_sweep)
    results = {r["run_id"]: r for r in _csv(eval_sweep / "results.csv")}
    lora = results["lora__seed2"]
    assert float(lora["gen_exact_match"]) == pytest.approx(0.526) and float(lora["forgetting"]) == pytest.approx(0.12)
    assert float(lora["reference_loss_after"]) == pytest.approx(3.12) and lora["gen_examples"] == "8"
    summary = {r["group"]: r for r in _csv(eval_sweep / "summary.csv")}
    assert float(summary["full"]["forgetting_mean"]) == pytest.approx(0.55)
    assert float(summary["lora"]["gen_rougeL_mean"]) == pytest.approx(0.6 + 0.013 * 2.5)
    comparisons = {r["metric"]: r for r in _csv(eval_sweep / "comparisons.csv")}
    assert set(comparisons) == {"eval_loss", "gen_exact_match", "gen_rougeL", "gen_contains", "forgetting"}
    exact, forgetting = comparisons["gen_exact_match"], comparisons["forgetting"]
    # a = full, b = lora, paired by seed: lora wins each seed on exact match (higher) and forgetting (lower)
    assert exact["test"] == "paired t" and exact["n_pairs"] == "4" and exact["b_wins"] == "4"
    assert float(exact["mean_diff"]) == pytest.approx(-0.3 - 0.003 * 2.5)
    assert forgetting["b_wins"] == "4" and float(forgetting["mean_diff"]) == pytest.approx(0.4 + 0.01 * 2.5)
    report = (eval_sweep / "report.md").read_text()
    assert "lora has higher exact match (generated answers) than full by" in report
    assert "lora has lower forgetting (loss on reference text, after minus before training) than full by" in report
    header = next(line for line in report.splitlines() if line.startswith("| strategy | n |"))
    assert all(name in header for name in ("gen_exact_match", "gen_rougeL", "gen_contains", "forgetting"))
    assert "greedy answers to the first 8 eval prompts (max_new_tokens 16)" in report
    assert "the loss on 64 chunks of hamlet after training minus before" in report
    assert "Generation metrics are means over only 8 generated answers" in report


def test_samples_appear_side_by_side_on_the_same_prompts(eval_sweep):
    make_report(eval_sweep)
    report = (eval_sweep / "report.md").read_text()
    section = report.split("## Samples", 1)[1].split("\n## ", 1)[0]
    assert "runs of seed 1" in section
    assert "| prompt | reference | full | lora |" in section
    # one row per prompt, each strategy's answer in its column; a newline inside a cell is a <br>
    assert ("| ### Instruction:<br>say hi<br><br>### Response: | hi | full answer 1<br>line two | "
            "lora answer 1<br>line two |") in section
    html = (eval_sweep / "report.html").read_text()
    assert "<td>lora answer 0<br>line two</td>" in html


def test_a_report_without_eval_metrics_has_no_samples_or_eval_columns(sweep_dir):
    make_report(sweep_dir)
    report = (sweep_dir / "report.md").read_text()
    assert "## Samples" not in report and "gen_exact_match" not in report and "forgetting" not in report
    assert {r["metric"] for r in _csv(sweep_dir / "comparisons.csv")} == {"eval_loss"}
