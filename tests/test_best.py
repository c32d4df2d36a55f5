"""train.keep_best and train.early_stopping (run/best.py): the best weights are the ones exported and
reported, early stopping ends a run as completed, and both survive a kill and --resume exactly."""

from __future__ import annotations

import json
import signal
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import tiny_bert
from test_run import _alpaca, _config
from test_train import _lora_model, _train, _trainable_state

from peftlab.config import EarlyStoppingConfig, MethodConfig, RankConfig, TrainConfig, load_config
from peftlab.core.methods import prepare
from peftlab.core.modelmap import build_model_map
from peftlab.run.best import BestState, BestTracker, EvalPoint
from peftlab.run.checkpoint import CHECKPOINT_FILE, TrainState, load_checkpoint, save_checkpoint
from peftlab.run.evaluate import EvalResult
from peftlab.run.experiment import run_experiment
from peftlab.run.optimizer import build_optimizer, build_scheduler, trainable_named_parameters
from peftlab.run.summary import read_summary
from peftlab.run.tracking import MetricsLog
from peftlab.run.train import Interrupted, train
from peftlab.study.analysis import RunRecord, result_row
from peftlab.study.report import runs_table
from peftlab.study.tables import result_columns

# lr 0.3 on the random-token data of test_train: the eval loss goes down and up again, so the best
# evaluation is neither the first nor the last (each test checks that it is, rather than trusting it)
BUMPY = dict(max_steps=12, batch_size=4, lr=0.3, seed=1, eval_every=2, save_every=None)


def _evals(history: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]


def _snapshots():
    """on_step that keeps the trainable weights after every step (after that step's evaluation)."""
    taken: dict[int, dict[str, torch.Tensor]] = {}
    holder: dict[str, torch.nn.Module] = {}

    def on_step(step: int) -> None:
        taken[step] = _trainable_state(holder["model"])
    return taken, holder, on_step


def test_keep_best_restores_the_weights_and_metrics_of_the_lowest_eval_loss(tmp_path):
    model = _lora_model()
    taken, holder, on_step = _snapshots()
    holder["model"] = model
    outcome = _train(model, TrainConfig(**BUMPY, keep_best="eval_loss"), tmp_path, on_step=on_step)
    evals = _evals(outcome.history)
    best_step, best_loss = min(evals, key=lambda e: e[1])  # min keeps the first of equal losses, as keep_best does
    assert evals[0][0] < best_step < evals[-1][0], evals  # the scenario: restoring must change the model
    assert outcome.status == "completed" and outcome.best.step == best_step
    assert outcome.final_eval.loss == best_loss  # what the summary reports
    assert outcome.last_eval.step == evals[-1][0] and outcome.last_eval.result.loss == evals[-1][1]
    for name, value in _trainable_state(model).items():
        assert torch.equal(value, taken[best_step][name]), name
    log = (tmp_path / "train.log").read_text()
    assert f"best eval_loss at step {best_step} of {evals[-1][0]}" in log


def test_without_keep_best_the_model_keeps_its_last_weights():
    model = _lora_model()
    outcome = _train(model, TrainConfig(**BUMPY))
    assert outcome.best is None and outcome.final_eval.loss == _evals(outcome.history)[-1][1]


def _classification_examples(n: int, seed: int, random_labels: bool) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        ids = torch.randint(3, 100, (6 + i % 5,), generator=generator).tolist()
        label = int(torch.randint(0, 2, (1,), generator=generator)) if random_labels else int(ids[0] < 50)
        examples.append({"input_ids": ids, "label": label})
    return examples


def test_keep_best_accuracy_keeps_the_highest_accuracy():
    torch.manual_seed(0)
    model = tiny_bert()
    prepare(model, MethodConfig(name="lora", ranks=RankConfig(r=4), alpha=8), build_model_map(model), train_head=True)
    cfg = TrainConfig(max_steps=16, batch_size=4, lr=5e-2, seed=0, eval_every=2, save_every=None,
                      keep_best="accuracy")
    # eval labels unrelated to the inputs: accuracy wanders, so the highest is somewhere in the middle
    outcome = train(model, _classification_examples(32, 0, False), _classification_examples(16, 1, True),
                    "classification", cfg, pad_id=0, device=torch.device("cpu"), log=MetricsLog(None, echo=False))
    accuracies = [(r["step"], r["accuracy"]) for r in outcome.history if "accuracy" in r]
    best_step, best_accuracy = max(accuracies, key=lambda e: e[1])  # max keeps the first of equal ones
    assert best_step < accuracies[-1][0] and best_accuracy > accuracies[-1][1], accuracies
    assert outcome.best.step == best_step and outcome.final_eval.accuracy == best_accuracy


def test_early_stopping_ends_the_run_as_completed_after_patience_evaluations(tmp_path):
    stopping = EarlyStoppingConfig(patience=2, min_delta=0.0)
    outcome = _train(_lora_model(), TrainConfig(**BUMPY, early_stopping=stopping), tmp_path)
    evals = _evals(outcome.history)
    # the rule, replayed on the logged evaluations: the first run of `patience` non-improvements
    best, stale, expected = None, 0, None
    for step, loss in evals:
        if best is None or loss < best:
            best, stale = loss, 0
        else:
            stale += 1
            if stale == stopping.patience:
                expected = step
                break
    assert expected is not None and expected < BUMPY["max_steps"], evals
    assert outcome.status == "completed" and outcome.early_stop.step == expected == outcome.state.step
    assert evals[-1][0] == expected  # no further training, and no second evaluation of the same weights
    assert outcome.final_eval.loss == evals[-1][1]
    assert "stopped early after step" in (tmp_path / "train.log").read_text()


def test_min_delta_counts_small_improvements_as_none():
    cfg = TrainConfig(eval_every=1, early_stopping=EarlyStoppingConfig(patience=2, min_delta=0.1))
    tracker = BestTracker(cfg, [])
    for step, loss in enumerate([3.0, 2.95, 2.91], start=1):  # each better than the last, by less than 0.1
        tracker.observe(step, EvalResult(loss, 10), periodic=True)
    assert tracker.stopped is not None and tracker.stopped.step == 3
    tracker = BestTracker(cfg, [])
    for step, loss in enumerate([3.0, 2.95, 2.89], start=1):  # 0.11 below the best after two evaluations
        tracker.observe(step, EvalResult(loss, 10), periodic=True)
    assert tracker.stopped is None


def test_the_final_evaluation_is_a_candidate_but_never_counts_towards_stopping():
    weight = torch.nn.Parameter(torch.zeros(2))
    cfg = TrainConfig(eval_every=1, keep_best="eval_loss", early_stopping=EarlyStoppingConfig(patience=1))
    tracker = BestTracker(cfg, [("w", weight)])
    tracker.observe(1, EvalResult(2.0, 10), periodic=True)
    with torch.no_grad():
        weight.fill_(1.0)
    tracker.observe(2, EvalResult(1.0, 10), periodic=False)
    assert tracker.stopped is None and tracker.restore().step == 2 and torch.equal(weight, torch.ones(2))
    with torch.no_grad():
        weight.fill_(5.0)  # restore() copies only when the last evaluation is not the best
    tracker.observe(3, EvalResult(3.0, 10), periodic=False)
    assert tracker.restore().step == 2 and torch.equal(weight, torch.ones(2))


class _Killed(Exception):
    pass


def _kill_at(at: int):
    def on_step(step: int) -> None:
        if step == at:
            raise _Killed
    return on_step


@pytest.mark.parametrize("kill_at", [5, 8])  # before the best evaluation, and after it (then it is in the checkpoint)
def test_keep_best_after_a_kill_and_resume_is_the_uninterrupted_runs(tmp_path, kill_at):
    cfg = TrainConfig(**{**BUMPY, "save_every": 2}, keep_best="eval_loss",
                      early_stopping=EarlyStoppingConfig(patience=3))
    straight_model = _lora_model()
    straight = _train(straight_model, cfg, tmp_path / "straight")
    assert straight.best.step < straight.last_eval.step  # restoring matters in this scenario
    with pytest.raises(_Killed):
        _train(_lora_model(), cfg, tmp_path / "killed", on_step=_kill_at(kill_at))
    resumed_model = _lora_model()
    resumed = _train(resumed_model, cfg, tmp_path / "killed", resume=True)
    assert resumed.best.step == straight.best.step and resumed.final_eval.loss == straight.final_eval.loss
    for name, value in _trainable_state(straight_model).items():
        assert torch.equal(value, _trainable_state(resumed_model)[name]), name


def test_ctrl_c_keeps_the_best_weights_for_the_resumed_run(tmp_path):
    cfg = TrainConfig(**BUMPY, keep_best="eval_loss")
    straight_model = _lora_model()
    straight = _train(straight_model, cfg, tmp_path / "straight")

    def press_ctrl_c(step: int) -> None:
        if step == straight.best.step + 2:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(Interrupted):
        _train(_lora_model(), cfg, tmp_path / "stopped", on_step=press_ctrl_c)
    resumed_model = _lora_model()
    resumed = _train(resumed_model, cfg, tmp_path / "stopped", resume=True)
    assert resumed.best.step == straight.best.step
    for name, value in _trainable_state(straight_model).items():
        assert torch.equal(value, _trainable_state(resumed_model)[name]), name


def test_resuming_an_early_stopped_run_trains_no_further(tmp_path):
    cfg = TrainConfig(**BUMPY, keep_best="eval_loss", early_stopping=EarlyStoppingConfig(patience=2))
    first_model = _lora_model()
    first = _train(first_model, cfg, tmp_path)
    assert first.early_stop is not None and (tmp_path / CHECKPOINT_FILE).exists()  # as if killed before the summary
    again_model = _lora_model()
    again = _train(again_model, cfg, tmp_path, resume=True)
    assert again.state.step == first.state.step and again.padded_tokens == 0 and again.eval_seconds == 0
    assert again.early_stop == first.early_stop and again.best.step == first.best.step
    assert again.final_eval.loss == first.final_eval.loss
    for name, value in _trainable_state(first_model).items():
        assert torch.equal(value, _trainable_state(again_model)[name]), name


# --- the checkpoint carries the best weights, as data only ------------------------------------


def _checkpointed(tmp_path, best: BestState):
    model = _lora_model()
    optimizer = build_optimizer(model, TrainConfig())
    scheduler = build_scheduler(optimizer, TrainConfig(), 10)
    save_checkpoint(tmp_path, model, optimizer, scheduler, TrainState(step=4), [], best)
    return model, optimizer, scheduler


def test_the_checkpoint_round_trips_the_best_state(tmp_path):
    model = _lora_model()
    weights = {name: torch.randn_like(p) for name, p in trainable_named_parameters(model)}
    point = EvalPoint(2, EvalResult(1.5, 7, perplexity=float("inf")))
    state = BestState(point, weights, EvalPoint(4, EvalResult(1.75, 7, perplexity=5.75)), 1.5, 1, None)
    _checkpointed(tmp_path, state)
    fresh = _lora_model()
    optimizer = build_optimizer(fresh, TrainConfig())
    restored = load_checkpoint(tmp_path, fresh, optimizer, build_scheduler(optimizer, TrainConfig(), 10)).best
    assert restored.best.step == 2 and restored.best.result.perplexity is None  # inf is not JSON: left out
    assert restored.last == state.last and (restored.reference, restored.stale) == (1.5, 1)
    assert set(restored.weights) == set(weights)
    assert all(torch.equal(restored.weights[n], weights[n]) for n in weights)


@pytest.mark.parametrize("spoil, fragment", [
    (lambda document, tensors: document["best"].update(stale="3"), "best-checkpoint record is malformed"),
    (lambda document, tensors: document["best"].update(best=None), "best weights and best step do not go together"),
    (lambda document, tensors: tensors.update({"best/nonexistent": torch.zeros(1)}), "has no parameter 'nonexistent'"),
])
def test_a_damaged_best_record_is_refused_and_changes_nothing(tmp_path, spoil, fragment):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from peftlab.errors import UserError

    model = _lora_model()
    weights = {name: torch.randn_like(p) for name, p in trainable_named_parameters(model)}
    _checkpointed(tmp_path, BestState(EvalPoint(2, EvalResult(1.5, 7)), weights))
    path = tmp_path / CHECKPOINT_FILE
    with safe_open(str(path), framework="pt") as handle:
        document = json.loads(handle.metadata()["peftlab"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    spoil(document, tensors)
    save_file(tensors, str(path), metadata={"peftlab": json.dumps(document)})
    fresh = _lora_model()
    before = _trainable_state(fresh)
    optimizer = build_optimizer(fresh, TrainConfig())
    with pytest.raises(UserError, match=fragment):
        load_checkpoint(tmp_path, fresh, optimizer, build_scheduler(optimizer, TrainConfig(), 10))
    assert all(torch.equal(p, before[n]) for n, p in _trainable_state(fresh).items())


# --- end to end: the exported artifact and summary.json --------------------------------------


def _run_config(tmp_path, tiny_llama_dir, *overrides):
    path = _config(tmp_path, tiny_llama_dir, _alpaca(tmp_path / "alpaca.jsonl"))
    return load_config(path, ["train.num_samples=0", "train.max_steps=8", "train.lr=0.3", "train.eval_every=2",
                              "train.save_every=2", "train.keep_best=eval_loss", *overrides])


def _artifact(out):
    from safetensors.torch import load_file
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_the_exported_adapter_and_summary_are_the_best_evaluations_and_survive_a_resume(tmp_path, tiny_llama_dir):
    config = _run_config(tmp_path, tiny_llama_dir, "train.early_stopping={patience: 2}")
    straight = run_experiment(config, tmp_path / "straight", echo=False)
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    best_step, best_loss = min(evals, key=lambda e: e[1])
    assert straight.status == "completed"
    assert straight.best.step == best_step and straight.metrics["eval_loss"] == best_loss
    assert straight.best.last_step == evals[-1][0] and straight.best.last_metrics["eval_loss"] == evals[-1][1]
    assert (straight.stopped_early is None) == (evals[-1][0] == 8)
    saved = read_summary(tmp_path / "straight" / "summary.json")
    assert saved.best == straight.best and saved.stopped_early == straight.stopped_early

    with pytest.raises(_Killed):
        run_experiment(config, tmp_path / "killed", echo=False, on_step=_kill_at(evals[-1][0] - 1))
    resumed = run_experiment(config, tmp_path / "killed", echo=False, resume=True)
    assert resumed.best == straight.best and resumed.metrics == straight.metrics
    straight_weights, resumed_weights = _artifact(tmp_path / "straight"), _artifact(tmp_path / "killed")
    assert set(straight_weights) == set(resumed_weights)
    assert all(torch.equal(straight_weights[k], resumed_weights[k]) for k in straight_weights)


def test_an_early_stop_is_in_the_summary_the_log_and_results_csv(tmp_path, tiny_llama_dir):
    config = _run_config(tmp_path, tiny_llama_dir, "train.early_stopping={patience: 1, min_delta: 10.0}")
    out = tmp_path / "run"
    summary = run_experiment(config, out, echo=False)
    # nothing improves by 10 nats: the second evaluation stops it
    assert summary.status == "completed" and summary.stopped_early.step == 4
    assert summary.resources.steps == 4 and summary.resources.total_steps == 8
    assert "eval_loss did not improve by more than 10" in summary.stopped_early.reason
    assert "stopped early after step 4" in (out / "train.log").read_text()
    assert run_experiment(config, out, echo=False, resume=True).resources.steps == 4  # resume: no more training
    row = result_row(RunRecord("r1", "lora", 0, {}, 0, "completed", "", summary, out))
    assert row["best_step"] == summary.best.step and row["stopped_early_step"] == 4
    columns = result_columns([row], [])
    assert "best_step" in columns and "stopped_early_step" in columns
    plain = {**row, "best_step": None, "stopped_early_step": None}
    assert "best_step" not in result_columns([plain], [])  # only in sweeps that use it
    _, _, (report_row,) = runs_table(SimpleNamespace(quality="eval_loss", rows=[row]))
    assert report_row[-1] == f"best at step {summary.best.step}; stopped early at step 4"


def test_the_saved_config_of_an_older_run_reads_with_both_off(tmp_path, tiny_llama_dir):
    config = yaml.safe_load(_config(tmp_path, tiny_llama_dir, _alpaca(tmp_path / "a.jsonl")).read_text())
    assert "keep_best" not in config["train"]  # as written before these keys existed
    train = load_config(tmp_path / "config.yaml").train
    assert train.keep_best is None and train.early_stopping is None


@pytest.mark.slow
def test_two_processes_keep_and_stop_as_one(tmp_path, tiny_llama_dir):
    """Every rank's tracker sees the same reduced evaluation, so all keep the same step and stop after the
    same one: a rank that trained on alone would hang the others in its next collective (timeout)."""
    import subprocess

    from test_distributed import REPO, _peftlab

    from peftlab.cli import main

    config = _config(tmp_path, tiny_llama_dir, _alpaca(tmp_path / "alpaca.jsonl", n=40))
    settings = [item for pair in (("--set", s) for s in (
        "train.max_steps=8", "train.eval_every=2", "train.lr=0.3", "train.num_samples=0",
        "train.keep_best=eval_loss", "train.early_stopping={patience: 1, min_delta: 0.01}")) for item in pair]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["run", str(config), "--out", str(one), *settings]) == 0
    done = subprocess.run(_peftlab(str(config), "--out", str(two), "--nproc", "2", *settings), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = read_summary(one / "summary.json"), read_summary(two / "summary.json")
    assert first.stopped_early is not None and first.best.step < first.best.last_step  # the scenario: both act
    assert second.status == "completed" and second.environment["world_size"] == 2
    assert second.best.step == first.best.step and second.resources.steps == first.resources.steps
    assert second.stopped_early is not None and second.stopped_early.step == first.stopped_early.step
