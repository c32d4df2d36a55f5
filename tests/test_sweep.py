"""Sweeps: file parsing, grid expansion, stable ids, resume rules, failures, and runs end to end."""

import argparse
import csv
import json
import os
import re
from pathlib import Path

import pytest
import yaml
from summaries import make_summary, params, resources

from peftlab.cli import add_sweep_commands
from peftlab.config import config_to_dict
from peftlab.errors import UserError
from peftlab.run.summary import DataInfo, Divergence, read_summary, write_summary
from peftlab.study import executors
from peftlab.study.report import make_report
from peftlab.study.resume import plan, trial_status
from peftlab.study.sweep import expand as expand_all
from peftlab.study.sweep import load_sweep, parse_sweep, trial_id

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SWEEP_EXAMPLES = ["selective_placement", "adaptive_ranks", "methods_classification", "lora_vs_full"]


def expand(spec, out):
    """The strategy trials (expand_all puts the base-model reference trials first)."""
    return [t for t in expand_all(spec, out) if not t.is_reference]


def _spec(**raw):
    raw.setdefault("base", {"model": "m", "train": {"max_steps": 2}})
    return parse_sweep(raw)


# --- parsing and expansion ---------------------------------------------------------------------


def test_expansion_order_count_and_settings():
    spec = _spec(strategies={"a": {"method.placement": "attention_only"}, "b": {"method": {"placement": "mlp_only"}}},
                 grid={"method.ranks.r": [4, 8], "train.lr": [1e-3]}, seeds=[1, 2])
    trials = expand(spec, "out")
    assert len(trials) == 2 * 2 * 1 * 2
    assert [(t.strategy, t.grid["method.ranks.r"], t.seed) for t in trials[:4]] == [
        ("a", 4, 1), ("a", 4, 2), ("a", 8, 1), ("a", 8, 2)]
    first = trials[0].config
    assert first.method.placement == "attention_only" and first.method.ranks.r == 4 and first.train.seed == 1
    assert trials[-1].config.method.placement == "mlp_only" and first.train.max_steps == 2
    assert len({t.run_id for t in trials}) == len(trials)
    assert all(t.out_dir == Path("out").absolute() / "runs" / t.run_id for t in trials)
    assert spec.baseline == "a"  # default: the first strategy


def test_ids_are_readable_stable_and_follow_content():
    run_id = trial_id("attention_only", {"method.ranks.r": 8}, 42, {"method.placement": "attention_only"})
    assert run_id.startswith("attention_only__r-8__seed42__") and len(run_id.rsplit("__", 1)[1]) == 8
    assert run_id == trial_id("attention_only", {"method.ranks.r": 8}, 42, {"method.placement": "attention_only"})
    # A pinned value: ids must not change between Python processes or releases (resume depends on it).
    assert trial_id("a", {}, 1, {}) == "a__seed1__" + __import__("hashlib").sha256(
        json.dumps({"grid": {}, "overrides": {}, "seed": 1, "strategy": "a"}, sort_keys=True).encode()).hexdigest()[:8]
    changed = trial_id("attention_only", {"method.ranks.r": 8}, 42, {"method.placement": "mlp_only"})
    assert changed != run_id and changed.rsplit("__", 1)[0] == run_id.rsplit("__", 1)[0]


def test_set_overrides_every_run_and_wins():
    spec = _spec(strategies={"a": {"train.lr": 1e-3}, "b": {}}, seeds=[1, 2])
    spec.overrides = ["train.lr=5e-4", "data.eval_size=10"]
    assert {(t.config.train.lr, t.config.data.eval_size) for t in expand(spec, "o")} == {(5e-4, 10)}
    ids = [t.run_id for t in expand(spec, "o")]
    spec.overrides = []
    assert [t.run_id for t in expand(spec, "o")] == ids  # --set is checked on resume, not part of the id


SWEEP_MISTAKES = [
    ({"strategy": {}}, "did you mean strategies"),
    ({"seeds": [1, 1]}, "twice"),
    ({"seeds": "42"}, "seeds"),
    ({"grid": {"train.lr": []}}, "non-empty list"),
    ({"baseline": "nope", "strategies": {"a": {}}}, "baseline 'nope'"),
    ({"strategies": {"a b": {}}}, "strategy name"),
    ({"strategies": {"a": {"method.ranks.r": 4}}, "grid": {"method.ranks.r": [8]}}, "set it in one place"),
    ({"strategies": {"bad": {"method.placment": "mlp_only"}}}, "strategy bad: unknown config key method.placment"),
    ({"strategies": {"bad": {"method.placement": "attn"}}}, "strategy bad: method.placement"),
    ({"name": "../../x"}, "sweep name '../../x'"),  # the default output folder must stay inside runs/
    ({"name": ".."}, "not only dots"),
    ({"strategies": {"..": {}}}, "strategy name '..'"),
    ({"strategies": {"base_model": {}}}, "reserved for the untrained base model"),
]


@pytest.mark.parametrize("raw,message", SWEEP_MISTAKES)
def test_invalid_sweeps_are_one_line_user_errors(raw, message):
    with pytest.raises(UserError) as error:
        expand(_spec(**raw), "o")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_set_train_seed_is_refused():
    with pytest.raises(UserError, match="seeds"):
        parse_sweep({"base": {}}, overrides=["train.seed=3"])


def test_base_path_and_relative_files_resolve_beside_the_sweep_file(tmp_path):
    (tmp_path / "ranks.json").write_text(json.dumps({"layer_ranks": [1, 2]}))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"model": "m", "method": {"ranks": {"file": "ranks.json"}}}))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"base": "run.yaml", "strategies": {"c": {
        "method.ranks.schedule": "custom"}}}))
    spec = load_sweep(tmp_path / "s.yaml")
    assert spec.name == "s" and spec.seeds == [42]
    (trial,) = expand(spec, tmp_path / "out")
    assert trial.config.method.ranks.file == str((tmp_path / "ranks.json").resolve())


def test_missing_sweep_file_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_sweep(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("base: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_sweep(tmp_path / "bad.yaml")
    # YAML keeps the last of two equal keys without a word: a strategy given twice is an error instead
    (tmp_path / "twice.yaml").write_text("strategies:\n  a: {train.lr: 0.1}\n  b: {}\n  a: {train.lr: 0.2}\n")
    with pytest.raises(UserError, match=r"'a' is given twice in one mapping .*line 4"):
        load_sweep(tmp_path / "twice.yaml")


@pytest.mark.parametrize("name", SWEEP_EXAMPLES)
def test_example_sweeps_parse_and_expand(name):
    spec = load_sweep(EXAMPLES / f"{name}.yaml")
    trials = expand(spec, "out")
    assert len(trials) == len(spec.strategies) * len(spec.seeds) and len(spec.seeds) >= 3
    assert spec.baseline in spec.strategies
    text = (EXAMPLES / f"{name}.yaml").read_text()
    assert f"peftlab sweep examples/{name}.yaml" in text and "--set model=" in text  # the real-setup command
    for trial in trials:
        if trial.config.method.ranks.schedule == "custom":
            ranks = json.loads(Path(trial.config.method.ranks.file).read_text())["layer_ranks"]
            assert len(ranks) == 30  # SmolLM2-135M has 30 layers


def test_example_expected_settings():
    placement = {t.strategy: t.config for t in expand(load_sweep(EXAMPLES / "selective_placement.yaml"), "o")}
    base = placement["attention_only"]
    assert (base.method.ranks.r, base.method.alpha, base.method.dropout, base.train.lr, base.train.scheduler,
            base.train.warmup_ratio, base.train.weight_decay) == (16, 32, 0.1, 2e-4, "cosine", 0.1, 0.01)
    budgets = {placement[f"{p}_budget"].method.ranks.budget for p in ("all_linear", "attention_only", "mlp_only")}
    assert budgets == {30 * 16 * ((576 + 576) + 2 * (576 + 192) + (576 + 576))}  # attention_only, r=16, SmolLM2
    ranks = {t.strategy: t.config.method.ranks for t in expand(load_sweep(EXAMPLES / "adaptive_ranks.yaml"), "o")}
    assert set(ranks) == {"uniform_r8", "uniform_r16", "linear_decay", "attention_heavy", "empirical", "custom_taper"}
    assert (ranks["linear_decay"].start, ranks["linear_decay"].end) == (16, 4)
    assert (ranks["attention_heavy"].attention_r, ranks["attention_heavy"].mlp_r) == (16, 8)
    assert ranks["empirical"].multipliers == [0.6, 1.2, 1.0] and ranks["empirical"].r == 16
    methods = {t.strategy: t.config.method for t in expand(load_sweep(EXAMPLES / "methods_classification.yaml"), "o")}
    assert {m.name for m in methods.values()} == {"partial", "adapter", "lora", "full"}
    assert methods["houlsby_adapter"].adapter_variant == "houlsby"


# --- resume rules on hand-made run folders -----------------------------------------------------


def _write_run(trial, status=None, checkpoint=False, extra=True):
    trial.out_dir.mkdir(parents=True, exist_ok=True)
    (trial.out_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(trial.config)))
    if extra:
        (trial.out_dir / "metrics.jsonl").write_text('{"step": 1, "train_loss": 1.0}\n')
    if status:
        write_summary(trial.out_dir / "summary.json", make_summary(status, name=trial.run_id))
    if checkpoint:
        (trial.out_dir / "checkpoint.safetensors").write_bytes(b"x")


def test_plan_keeps_finished_resumes_checkpoints_and_restarts_the_rest(tmp_path):
    spec = _spec(strategies={"a": {}}, seeds=[1, 2, 3, 4, 5, 6])
    trials = expand(spec, tmp_path)
    _write_run(trials[0], "completed")
    _write_run(trials[1], "diverged")
    _write_run(trials[2], "failed")
    _write_run(trials[3], checkpoint=True)
    _write_run(trials[4])  # killed before its first checkpoint
    assert [trial_status(t.out_dir) for t in trials] == [
        "completed", "diverged", "failed", "checkpoint", "partial", "new"]
    with pytest.raises(UserError, match="--resume"):
        plan(trials, tmp_path, resume=False)
    todo = plan(trials, tmp_path, resume=True)
    assert [(t.seed, resumed) for t, resumed in todo] == [(3, False), (4, True), (5, False), (6, False)]
    assert not trials[2].out_dir.exists() and not trials[4].out_dir.exists()  # cleared: no mixed metrics
    assert (trials[3].out_dir / "checkpoint.safetensors").exists() and (trials[0].out_dir / "summary.json").exists()


def test_resume_refuses_a_changed_config_and_touches_nothing(tmp_path):
    spec = _spec(strategies={"a": {}}, seeds=[1, 2])
    trials = expand(spec, tmp_path)
    _write_run(trials[0], "completed")
    _write_run(trials[1])
    spec.overrides = ["train.max_steps=7"]
    with pytest.raises(UserError, match="changed: train.max_steps"):
        plan(expand(spec, tmp_path), tmp_path, resume=True)
    assert (trials[1].out_dir / "metrics.jsonl").exists()


# --- sweeps with a stand-in runner: failures, divergence, interruption -------------------------


class FakeRunner:
    """Writes what run_experiment writes; a strategy named fail* raises, diverge* diverges."""

    def __init__(self, interrupt_at=None):
        self.calls, self.interrupt_at, self.references = [], interrupt_at, []

    def __call__(self, config, out_dir, *, resume=False, echo=True, on_step=None, model_cache=None,
                 reference_eval_loss=None):
        out_dir = Path(out_dir)
        self.calls.append(out_dir.name)
        self.references.append(reference_eval_loss)
        if self.interrupt_at == out_dir.name:
            (out_dir / "metrics.jsonl").write_text('{"step": 1, "train_loss": 2.0}\n')
            raise KeyboardInterrupt
        if out_dir.name.startswith("fail"):
            raise RuntimeError("CUDA out of memory (pretend)")
        (out_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config)))
        diverged = out_dir.name.startswith("diverge")
        loss = 1.0 + config.train.seed / 100
        summary = make_summary(
            "diverged" if diverged else "completed", name=out_dir.name, task=config.task,
            metrics={} if diverged else {"eval_loss": loss, "perplexity": 2.718 ** loss, "train_loss": loss},
            divergence=Divergence(2, "non-finite training loss (nan)", ["w"]) if diverged else None)
        return write_summary(out_dir / "summary.json", summary)


def fake_reference(config, out_dir, *, echo=True, model_cache=None):
    """Writes what evaluate_reference writes: the untrained model's eval, method none."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = make_summary(name=out_dir.name, task=config.task, method="none", role="reference",
                           metrics={"eval_loss": 3.0}, params=params(0, 100),
                           resources=resources(steps=0, total_steps=0), data=DataInfo(100, 6))
    return write_summary(out_dir / "summary.json", summary)


@pytest.fixture(autouse=True)
def _fake_reference_unless_real(request, monkeypatch):
    """Tests that fake the runner fake the base-model evaluation too; end-to-end tests run both for real."""
    if "tiny_llama_dir" not in request.fixturenames:
        monkeypatch.setattr(executors, "_run_reference", lambda: fake_reference)


def test_failed_and_diverged_runs_are_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    runner = FakeRunner()
    monkeypatch.setattr(executors, "_run_experiment", lambda: runner)
    spec = _spec(strategies={"fail": {"train.lr": 1e-3}, "diverge": {"train.lr": 2e-3}, "ok": {}}, seeds=[1])
    summaries = executors.run_sweep(spec, tmp_path, progress=lambda _: None)
    assert [s.status for s in summaries] == ["failed", "diverged", "completed"]
    assert runner.references == [3.0, 3.0, 3.0]  # every run gets the base model's eval loss for its collapse check
    failed = read_summary(next((tmp_path / "runs").glob("fail*/summary.json")))
    assert failed == summaries[0] and failed.params is None and failed.artifacts is None
    assert failed.error == "RuntimeError: CUDA out of memory (pretend)" and failed.sweep["strategy"] == "fail"
    assert "Traceback" in failed.traceback
    # resume: the failed run is retried, the diverged and completed ones are not
    runner.calls.clear()
    executors.run_sweep(spec, tmp_path, resume=True, progress=lambda _: None)
    assert [c.split("__")[0] for c in runner.calls] == ["fail"]


def test_a_sweep_holds_its_folder_for_its_whole_life(tmp_path, monkeypatch):
    """Every run of a sweep trains while the sweep holds DIR/.lock: a second sweep (or run) into DIR is refused."""
    from peftlab.locking import folder_lock

    runner, refusals = FakeRunner(), []

    def runner_that_tries_the_lock(config, out_dir, **kwargs):
        with pytest.raises(UserError, match=rf"in use by another peftlab process \(pid {os.getpid()}, a sweep\)"):
            with folder_lock(tmp_path, "sweep"):
                pass
        refusals.append(out_dir.name)
        return runner(config, out_dir, **kwargs)

    monkeypatch.setattr(executors, "_run_experiment", lambda: runner_that_tries_the_lock)
    executors.run_sweep(_spec(strategies={"a": {}}, seeds=[1, 2]), tmp_path, progress=lambda _: None)
    assert len(refusals) == 2
    with folder_lock(tmp_path, "sweep"):  # released when the sweep ends
        pass


def test_identical_configs_are_trained_once_and_reported_under_each_name(tmp_path, monkeypatch):
    """Seed 000's attention_only and attention_only_budget resolve to the same config: train it once."""
    runner = FakeRunner()
    monkeypatch.setattr(executors, "_run_experiment", lambda: runner)
    spec = _spec(strategies={"attn": {"method.placement": "attention_only"},
                             "attn_again": {"method": {"placement": "attention_only"}},
                             "mlp": {"method.placement": "mlp_only"}},
                 seeds=[1, 2])
    trials = expand(spec, tmp_path)
    assert [t.alias_of for t in trials[2:4]] == [t.run_id for t in trials[:2]] and trials[4].alias_of is None
    messages = []
    summaries = executors.run_sweep(spec, tmp_path, progress=messages.append)
    assert len(runner.calls) == 4 and len(summaries) == 6 and summaries[2] == summaries[0]
    assert "identical configs trained once and reported under each name: attn_again = attn" in messages[0]
    listed = json.loads((tmp_path / "sweep.json").read_text())["trials"]
    assert [t["alias_of"] for t in listed if t["strategy"] == "attn_again"] == [t.run_id for t in trials[:2]]
    make_report(tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "attn_again = attn" in text and "attn and attn_again" not in text  # never compared with itself
    summary = {r["group"]: r for r in csv.DictReader((tmp_path / "summary.csv").open())}
    assert summary["attn_again"]["eval_loss_mean"] == summary["attn"]["eval_loss_mean"]
    assert summary["attn_again"]["pareto_quality_vs_params"] == summary["attn"]["pareto_quality_vs_params"]


def test_editing_the_sweep_file_gives_new_ids_and_the_report_never_mixes_old_runs(tmp_path, monkeypatch):
    """The seeds' trap: a strategy edited between runs ended with n=4 of 3 seeds, mixing r=4 and r=5."""
    runner = FakeRunner()
    monkeypatch.setattr(executors, "_run_experiment", lambda: runner)
    old = _spec(strategies={"a": {"method.ranks.r": 4}, "b": {}}, seeds=[1, 2, 3])
    executors.run_sweep(old, tmp_path, progress=lambda _: None)
    edited = _spec(strategies={"a": {"method.ranks.r": 5}, "b": {}}, seeds=[1, 2, 3])
    runner.calls.clear()
    executors.run_sweep(edited, tmp_path, resume=True, progress=lambda _: None)
    assert [c.split("__")[0] for c in runner.calls] == ["a", "a", "a"]  # b kept, a rerun under new ids
    make_report(tmp_path)
    summary = {r["group"]: r for r in csv.DictReader((tmp_path / "summary.csv").open())}
    assert summary["a"]["n_runs"] == "3" and summary["b"]["n_runs"] == "3"
    results = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert len(results) == 6 and all(r["run_id"] not in {t.run_id for t in expand(old, tmp_path)[:3]} for r in results)
    assert "3 folder(s) under runs/ are not part of this sweep file" in (tmp_path / "report.md").read_text()
    edited_base = _spec(strategies={"a": {"method.ranks.r": 5}, "b": {}}, seeds=[1, 2, 3],
                        base={"model": "m", "train": {"max_steps": 3}})
    assert not {t.run_id for t in expand(edited_base, tmp_path)} & {t.run_id for t in expand(edited, tmp_path)}


def test_editing_the_first_strategy_keeps_the_base_model_evaluation(tmp_path, monkeypatch):
    """The reference's config holds only what its evaluation depends on, so a strategy edit leaves it alone."""
    runner, references = FakeRunner(), []

    def counting_reference(config, out_dir, **kwargs):
        references.append(Path(out_dir).name)
        (Path(out_dir)).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config)))
        return fake_reference(config, out_dir, **kwargs)

    monkeypatch.setattr(executors, "_run_experiment", lambda: runner)
    monkeypatch.setattr(executors, "_run_reference", lambda: counting_reference)
    executors.run_sweep(_spec(strategies={"a": {"method.ranks.r": 4}}, seeds=[1]), tmp_path, progress=lambda _: None)
    executors.run_sweep(_spec(strategies={"a": {"method.ranks.r": 5}}, seeds=[1]), tmp_path, resume=True,
                        progress=lambda _: None)
    assert len(references) == 1  # kept: a different r does not change what the base model scores
    reference = next((tmp_path / "runs").glob("base_model__*"))
    (reference / "config.yaml").write_text(yaml.safe_dump({"model": "m", "method": {"ranks": {"r": 4}}}))
    executors.run_sweep(_spec(strategies={"a": {"method.ranks.r": 5}}, seeds=[1]), tmp_path, resume=True,
                        progress=lambda _: None)
    assert len(references) == 2  # made by an older peftlab with another config: evaluated again, never refused


def test_user_error_in_a_run_stops_the_sweep_with_its_id(tmp_path, monkeypatch):
    def runner(config, out_dir, **_):
        raise UserError("method.ranks.r=999 exceeds the rank limit of x")

    monkeypatch.setattr(executors, "_run_experiment", lambda: runner)
    with pytest.raises(UserError, match=r"run a__seed1__\w+: method.ranks.r=999"):
        executors.run_sweep(_spec(strategies={"a": {}}, seeds=[1]), tmp_path, progress=lambda _: None)


def test_interrupted_sweep_resumes_without_redoing_finished_runs(tmp_path, monkeypatch):
    spec = _spec(strategies={"a": {}}, seeds=[1, 2, 3])
    ids = [t.run_id for t in expand(spec, tmp_path)]
    runner = FakeRunner(interrupt_at=ids[1])
    monkeypatch.setattr(executors, "_run_experiment", lambda: runner)
    with pytest.raises(KeyboardInterrupt):
        executors.run_sweep(spec, tmp_path, progress=lambda _: None)
    first = tmp_path / "runs" / ids[0] / "summary.json"
    before = (first.stat().st_mtime_ns, first.read_text())
    runner.calls.clear()
    runner.interrupt_at = None
    summaries = executors.run_sweep(spec, tmp_path, resume=True, progress=lambda _: None)
    assert runner.calls == ids[1:] and [s.status for s in summaries] == ["completed"] * 3
    assert (first.stat().st_mtime_ns, first.read_text()) == before
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temp files


def test_ray_missing_is_a_user_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(UserError, match=r"pip install 'peftlab\[ray\]'"):
        executors.execute([], "ray")


# --- end to end on a tiny local model ----------------------------------------------------------


def _alpaca(path, n=24):
    records = [{"instruction": f"what is the capital number {i}", "input": "",
                "output": "paris is the capital " * (1 + i % 3)} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def _tiny_sweep(tmp_path, model_dir, strategies=None, seeds=(0,)):
    sweep = {
        "name": "tiny",
        "base": {"model": str(model_dir), "task": "instruction",
                 "data": {"source": str(_alpaca(tmp_path / "alpaca.jsonl")), "eval_size": 6},
                 "method": {"name": "lora", "ranks": {"r": 2}, "alpha": 4},
                 "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "num_samples": 0, "save_every": 1,
                           "device": "cpu"}},
        "strategies": strategies or {"attention_only": {"method.placement": "attention_only"},
                                     "mlp_only": {"method.placement": "mlp_only"}},
        "seeds": list(seeds),
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def _cli(argv):
    """The sweep/report commands as cli.main runs them (until cli.py registers them)."""
    parser = argparse.ArgumentParser(prog="peftlab")
    add_sweep_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except UserError as error:
        print(f"peftlab: error: {error}")
        return 2


def _metric_columns(directory):
    with open(directory / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    keep = ("run_id", "status", "eval_loss", "perplexity", "train_loss", "eval_units", "trainable_params",
            "total_params", "percent_trainable", "steps", "train_tokens")
    return [{k: row[k] for k in keep} for row in rows]


@pytest.mark.slow
def test_two_run_sweep_end_to_end_local(tmp_path, tiny_llama_dir):
    sweep = _tiny_sweep(tmp_path, tiny_llama_dir)
    out = tmp_path / "local"
    assert _cli(["sweep", str(sweep), "--out", str(out)]) == 0
    rows = _metric_columns(out)
    assert [r["status"] for r in rows] == ["completed", "completed"]
    assert rows[0]["trainable_params"] != rows[1]["trainable_params"]
    for name in ("results.csv", "summary.csv", "report.md", "report.html", "sweep.json"):
        assert (out / name).is_file()
    assert _cli(["sweep", str(sweep), "--out", str(out)]) == 2  # no silent overwrite
    assert _cli(["sweep", str(sweep), "--out", str(out), "--resume"]) == 0  # nothing left: report only


@pytest.mark.slow
def test_local_and_ray_executors_give_the_same_results(tmp_path, tiny_llama_dir):
    pytest.importorskip("ray")
    sweep = _tiny_sweep(tmp_path, tiny_llama_dir)
    assert _cli(["sweep", str(sweep), "--out", str(tmp_path / "local")]) == 0
    assert _cli(["sweep", str(sweep), "--out", str(tmp_path / "ray"), "--executor", "ray"]) == 0
    assert _metric_columns(tmp_path / "ray") == _metric_columns(tmp_path / "local")


def test_kill_and_resume_end_to_end(tmp_path, tiny_llama_dir, monkeypatch):
    """Ctrl-C in the second run after step 2; --resume keeps run 1 and continues run 2 from its checkpoint."""
    from peftlab.run.experiment import run_experiment

    sweep = _tiny_sweep(tmp_path, tiny_llama_dir, strategies={"a": {"method.placement": "attention_only"}},
                        seeds=(0, 1))
    out = tmp_path / "out"
    calls = []

    def interrupt(step):
        if step == 2:
            raise KeyboardInterrupt

    def runner(config, out_dir, **kwargs):
        calls.append(Path(out_dir).name)
        if len(calls) == 2:
            kwargs["on_step"] = interrupt
        return run_experiment(config, out_dir, **kwargs)

    monkeypatch.setattr(executors, "_run_experiment", lambda: runner)
    with pytest.raises(KeyboardInterrupt):
        _cli(["sweep", str(sweep), "--out", str(out)])
    first, second = (out / "runs" / name for name in calls)
    stamp = os.stat(first / "summary.json").st_mtime_ns
    assert (second / "checkpoint.safetensors").is_file() and not (second / "summary.json").exists()
    calls.clear()
    assert _cli(["sweep", str(sweep), "--out", str(out), "--resume"]) == 0
    assert calls == [second.name] and os.stat(first / "summary.json").st_mtime_ns == stamp
    assert "resumed from step 2" in (second / "train.log").read_text()
    steps = [json.loads(line)["step"] for line in (second / "metrics.jsonl").read_text().splitlines()
             if "train_loss" in json.loads(line)]
    assert steps == [1, 2, 3]


def test_diverged_run_is_reported_and_excluded_end_to_end(tmp_path, tiny_llama_dir):
    sweep = _tiny_sweep(tmp_path, tiny_llama_dir, strategies={
        "stable": {"method.placement": "all_linear"},
        "explodes": {"method.placement": "all_linear", "train.lr": 1.0e30, "train.max_grad_norm": None}})
    out = tmp_path / "out"
    assert _cli(["sweep", str(sweep), "--out", str(out)]) == 0
    statuses = {r["strategy"]: r["status"] for r in csv.DictReader(open(out / "results.csv"))}
    assert statuses == {"stable": "completed", "explodes": "diverged"}
    summary = {r["group"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    assert summary["explodes"]["n_completed"] == "0" and summary["explodes"]["eval_loss_mean"] == ""
    report = (out / "report.md").read_text()
    assert "is diverged and is excluded from every mean" in report and "non-finite" in report


@pytest.mark.slow
def test_sigkill_mid_sweep_then_resume(tmp_path, tiny_llama_dir):
    """A real kill -9 of `peftlab sweep` while run 2 trains: --resume keeps run 1, continues run 2."""
    import signal
    import subprocess
    import sys
    import time

    sweep = _tiny_sweep(tmp_path, tiny_llama_dir, strategies={
        "short": {"method.placement": "attention_only"},
        "long": {"method.placement": "attention_only", "train.max_steps": 400}})
    out = tmp_path / "out"
    command = [sys.executable, "-m", "peftlab.cli", "sweep", str(sweep), "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            short = list(out.glob("runs/short*/summary.json"))
            if short and list(out.glob("runs/long*/checkpoint.safetensors")):
                break
            assert process.poll() is None, "the sweep ended before it could be killed"
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
    (short,) = short
    before = short.read_text()
    long_dir = next(out.glob("runs/long*"))
    assert not (long_dir / "summary.json").exists()
    assert _cli(["sweep", str(sweep), "--out", str(out), "--resume"]) == 0
    assert short.read_text() == before
    assert "resumed from step" in (long_dir / "train.log").read_text()
    steps = [json.loads(line)["step"] for line in (long_dir / "metrics.jsonl").read_text().splitlines()
             if "train_loss" in json.loads(line)]
    assert steps == list(range(1, 401))  # no step lost, none logged twice


def test_signal_between_training_loops_stops_the_sweep_before_the_next_run(tmp_path, monkeypatch):
    """A SIGTERM that lands while a run loads or evaluates (no training loop active) is not lost."""
    import signal

    spec = _spec(strategies={"a": {}}, seeds=[1, 2, 3])
    ids = [t.run_id for t in expand(spec, tmp_path)]
    runner = FakeRunner()

    def runner_that_gets_killed(config, out_dir, **kwargs):
        summary = runner(config, out_dir, **kwargs)
        if out_dir.name == ids[0]:
            # The process survives: the first signal only asks to stop.
            signal.raise_signal(signal.SIGTERM)
        return summary

    monkeypatch.setattr(executors, "_run_experiment", lambda: runner_that_gets_killed)
    messages, before = [], signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        executors.run_sweep(spec, tmp_path, progress=messages.append)
    assert runner.calls == ids[:1] and "rerun with --resume" in messages[-1]
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored after the sweep
    runner.calls.clear()
    executors.run_sweep(spec, tmp_path, resume=True, progress=lambda _: None)
    assert runner.calls == ids[1:]


def _custom_sweep(folder, ranks):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ranks.json").write_text(json.dumps({"layer_ranks": ranks}))
    (folder / "s.yaml").write_text(yaml.safe_dump({"base": {"model": "m", "train": {"max_steps": 2}},
                                                   "strategies": {"c": {"method.ranks.schedule": "custom",
                                                                        "method.ranks.file": "ranks.json"}}}))
    return load_sweep(folder / "s.yaml")


@pytest.mark.parametrize("status", ["completed", "checkpoint"])
def test_a_sweep_moved_to_another_checkout_resumes(tmp_path, status):
    """The committed adaptive_ranks study names its rank file by the absolute path of the checkout that
    ran it: resuming a copy elsewhere must not call that a changed config (it once did)."""
    old_spec = _custom_sweep(tmp_path / "old", [1, 2])
    (old_trial,) = expand(old_spec, tmp_path / "old" / "out")
    _write_run(old_trial, status if status != "checkpoint" else None, checkpoint=status == "checkpoint")
    new_spec = _custom_sweep(tmp_path / "new", [1, 2])
    os.rename(tmp_path / "old" / "out", tmp_path / "new" / "out")
    if status == "checkpoint":  # the old checkout is gone, as /work/studytree was
        (tmp_path / "old" / "ranks.json").unlink()
    (new_trial,) = expand(new_spec, tmp_path / "new" / "out")
    assert new_trial.config.method.ranks.file != old_trial.config.method.ranks.file
    todo = plan([new_trial], tmp_path / "new" / "out", resume=True)
    assert [resumed for _, resumed in todo] == ([True] if status == "checkpoint" else [])
    saved = yaml.safe_load((new_trial.out_dir / "config.yaml").read_text())["method"]["ranks"]["file"]
    # a resumed run takes the new path (run_experiment checks it again); a finished one is left as it was
    expected = new_trial.config.method.ranks.file if status == "checkpoint" else old_trial.config.method.ranks.file
    assert saved == expected


def test_a_moved_sweep_whose_rank_file_was_edited_is_refused(tmp_path):
    old_spec = _custom_sweep(tmp_path / "old", [1, 2])
    (old_trial,) = expand(old_spec, tmp_path / "old" / "out")
    _write_run(old_trial, "completed")
    new_spec = _custom_sweep(tmp_path / "new", [2, 2])
    os.rename(tmp_path / "old" / "out", tmp_path / "new" / "out")
    with pytest.raises(UserError, match="changed: method.ranks.file"):
        plan(expand(new_spec, tmp_path / "new" / "out"), tmp_path / "new" / "out", resume=True)


@pytest.mark.parametrize("seconds, left, expected", [
    ([], 5, ""),  # nothing finished yet: no guess
    ([600.0], 0, ""),  # nothing left
    ([10.0], 3, "under a minute left"),
    ([400.0, 440.0], 6, "about 42 min left"),
    ([420.0], 12, "about 1 h 24 min left"),
])
def test_time_left_is_the_mean_run_times_the_runs_left(seconds, left, expected):
    assert executors.time_left(seconds, left) == expected


def test_each_finished_training_run_says_about_how_long_the_sweep_has_left(tmp_path, monkeypatch):
    clock = iter(range(0, 10_000, 300))  # every run takes 300 s on this clock
    monkeypatch.setattr(executors.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(executors, "_run_experiment", lambda: FakeRunner())
    messages = []
    spec = _spec(strategies={"a": {"method.ranks.r": 4}, "b": {"method.ranks.r": 16}}, seeds=[1, 2])
    executors.run_sweep(spec, tmp_path, progress=messages.append)
    finished = [m for m in messages if ": completed" in m]
    assert len(finished) == 5  # the base-model evaluation, then 4 training runs
    assert "left" not in finished[0]  # the quick reference evaluation is not a run to average
    assert [m.rsplit("; ", 1)[-1] for m in finished[1:4]] == [
        "about 15 min left", "about 10 min left", "about 5 min left"]
    assert "left" not in finished[4]  # the last run: nothing left to estimate


@pytest.mark.parametrize("study", ["adaptive_ranks", "lora_vs_full", "methods_classification", "selective_placement"])
def test_the_committed_studies_keep_their_base_model_folders(study):
    """The base-model reference's id hashes the data config: a data key added later (data.format,
    data.template) must not rename it, or resuming a committed study evaluates the base model again
    into a new folder and leaves the old one orphaned."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = os.path.join(root, "docs", "results", study)
    trials = expand_all(load_sweep(os.path.join(root, "examples", f"{study}.yaml")), out)
    references = [t for t in trials if t.is_reference]
    assert references and all(t.out_dir.is_dir() for t in references), [str(t.out_dir) for t in references]


def _same_within(first, second, keys=("eval_loss", "train_loss", "perplexity"), tolerance=1e-4):
    """Two results tables alike: the same runs and counts, losses equal to float tolerance."""
    assert [{k: v for k, v in row.items() if k not in keys} for row in first] == \
        [{k: v for k, v in row.items() if k not in keys} for row in second]
    for one, two in zip(first, second, strict=True):
        for key in keys:
            assert abs(float(one[key]) - float(two[key])) <= tolerance * max(1.0, abs(float(one[key])))


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_a_sweep_with_two_processes_per_run_gives_the_one_process_results(tmp_path, tiny_llama_dir, executor):
    """--nproc 2: every training run is a torchrun job of 2 (gloo) processes; with Ray each trial asks for
    2 CPUs. The results are the one-process sweep's, and each run's summary says it ran on 2 processes."""
    if executor == "ray":
        pytest.importorskip("ray")
    sweep = _tiny_sweep(tmp_path, tiny_llama_dir)
    assert _cli(["sweep", str(sweep), "--out", str(tmp_path / "one")]) == 0
    assert _cli(["sweep", str(sweep), "--out", str(tmp_path / "two"), "--nproc", "2", "--executor", executor,
                 "--set", "train.report_to=[tensorboard]"]) == 0
    _same_within(_metric_columns(tmp_path / "one"), _metric_columns(tmp_path / "two"))
    for summary_path in (tmp_path / "two" / "runs").glob("*/summary.json"):
        summary = read_summary(summary_path)
        if summary.method != "none":  # the base-model evaluation runs in one process
            assert summary.environment["world_size"] == 2 and summary.sweep is not None
            # the run's trackers report grouped with the sweep's, as an in-process run's do
            assert any((tmp_path / "two" / "tensorboard" / summary_path.parent.name).glob("events.out.*"))


class _FakeRay:
    """ray.nodes() and ray.remote() as a cluster of the given nodes reports them."""

    def __init__(self, *nodes):
        self._nodes, self.asked = [{"Alive": True, "Resources": node} for node in nodes], None

    def nodes(self):
        return self._nodes

    def remote(self, **resources):
        self.asked = resources
        return lambda function: function


@pytest.mark.parametrize("nodes, nproc, asked", [
    (({"CPU": 8, "GPU": 4}, {"CPU": 8, "GPU": 2}), 4, {"num_cpus": 1, "num_gpus": 4, "max_retries": 0}),
    (({"CPU": 8, "GPU": 1},), 1, {"num_cpus": 1, "num_gpus": 1, "max_retries": 0}),
    (({"CPU": 4},), 2, {"num_cpus": 2, "num_gpus": 0, "max_retries": 0}),
])
def test_a_ray_trial_asks_for_its_processes_gpus(nodes, nproc, asked):
    ray = _FakeRay(*nodes)
    executors._ray_task(ray, nproc)
    assert ray.asked == asked


@pytest.mark.parametrize("nodes, nproc, message", [
    (({"CPU": 8, "GPU": 4}, {"CPU": 8, "GPU": 4}), 8, "each trial needs 8 GPUs on one node, and no node of the Ray "
                                                      "cluster has more than 4"),
    (({"CPU": 2},), 4, "each trial needs 4 CPUs on one node (the cluster has no GPUs)"),
])
def test_a_ray_trial_no_node_can_hold_is_refused(nodes, nproc, message):
    with pytest.raises(UserError, match=re.escape(message)):
        executors._ray_task(_FakeRay(*nodes), nproc)


class _Terminal:
    """A stderr that says it is a terminal, so tqdm draws its bar (it stays off where stderr is a file)."""

    def __init__(self):
        self.text = []

    def write(self, text):
        self.text.append(text)

    def flush(self):
        pass

    def isatty(self):
        return True


def test_a_terminal_gets_a_progress_bar_over_the_runs_below_the_unchanged_run_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(executors, "_run_experiment", lambda: FakeRunner())
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    spec = _spec(strategies={"a": {"method.ranks.r": 4}, "b": {"method.ranks.r": 16}}, seeds=[1])
    executors.run_sweep(spec, tmp_path)  # the default progress: lines on stderr
    shown = "".join(terminal.text)
    assert "sweep: 100%" in shown and "| 2/2 [" in shown  # runs done / total, with tqdm's times
    lines = [line for line in shown.replace("\r", "\n").splitlines() if line.startswith("peftlab sweep: [")]
    assert any(line.startswith("peftlab sweep: [2/2] b__") and ": completed eval_loss=" in line for line in lines)


def test_without_a_terminal_only_the_run_lines_are_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(executors, "_run_experiment", lambda: FakeRunner())
    spec = _spec(strategies={"a": {"method.ranks.r": 4}}, seeds=[1])
    executors.run_sweep(spec, tmp_path)
    err = capsys.readouterr().err
    assert "%|" not in err and all(line.startswith("peftlab sweep: ") for line in err.splitlines())
