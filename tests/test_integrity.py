"""Run integrity: no NaN is ever a result, collapsed runs are named, each run records what it came from."""

import hashlib
import importlib.metadata
import json
import math

import pytest
import torch
from test_run import _alpaca, _config, _reviews

import peftlab.run.experiment as run_module
from peftlab.config import load_config
from peftlab.core.params import count_params
from peftlab.inputs.data import load_task_data
from peftlab.inputs.models import load_model, load_tokenizer
from peftlab.run.collapse import COLLAPSE_MARGIN, check_collapse
from peftlab.run.evaluate import EvalResult, evaluate
from peftlab.run.experiment import evaluate_reference, run_experiment
from peftlab.run.resources import data_sha256
from peftlab.run.summary import RunSummary
from peftlab.run.tracking import MetricsLog, finite_only
from peftlab.run.train import eval_batches

STEPS = 3  # test_run's _config trains 3 steps


def _strict(text: str):
    """json.loads that refuses NaN and Infinity, as strict JSON readers do."""
    def refuse(constant):
        raise ValueError(f"non-finite constant {constant} in JSON")
    return json.loads(text, parse_constant=refuse)


def _strict_files(out):
    summary = _strict((out / "summary.json").read_text())
    records = [_strict(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, records


def _llama_config(tmp_path, tiny_llama_dir, *overrides):
    path = _config(tmp_path, tiny_llama_dir, _alpaca(tmp_path / "alpaca.jsonl"))
    return load_config(path, ["train.num_samples=0", "train.save_every=1", *overrides])


@pytest.fixture
def trained_model(monkeypatch):
    """The model run_experiment trains, caught on its way into train(), for on_step hooks to reach."""
    caught = {}
    real_train = run_module.train

    def spy(model, *args, **kwargs):
        caught["model"] = model
        return real_train(model, *args, **kwargs)

    monkeypatch.setattr(run_module, "train", spy)
    return caught


def _assert_nothing_exported(out, summary):
    assert summary["artifacts"] == {"format": "none", "path": None, "bytes": 0,
                                    "note": f"not exported: {summary['status']}"}
    assert not (out / "adapter").exists() and not (out / "trainable.safetensors").exists()


# --- diverged: a non-finite evaluation ---------------------------------------------------------


def test_nan_after_the_last_step_ends_diverged_not_completed(tmp_path, tiny_llama_dir, trained_model):
    def poison_after_last_step(step):
        if step == STEPS:  # after the last optimizer step: no training loss will ever see it
            parameter = next(p for n, p in trained_model["model"].named_parameters() if n.endswith("lora_A"))
            with torch.no_grad():
                parameter.fill_(float("nan"))

    out = tmp_path / "run"
    returned = run_experiment(_llama_config(tmp_path, tiny_llama_dir), out, echo=False, on_step=poison_after_last_step)
    summary, records = _strict_files(out)
    assert RunSummary.from_json(summary) == returned
    assert summary["status"] == "diverged"
    assert summary["divergence"] == {"step": STEPS, "reason": "non-finite eval loss (nan)", "parameters": []}
    assert "eval_loss" not in summary["metrics"] and "perplexity" not in summary["metrics"]
    assert all("eval_loss" not in r for r in records)  # the NaN evaluation is never logged as a result
    _assert_nothing_exported(out, summary)


def test_nan_final_evaluation_is_a_divergence(tmp_path, tiny_llama_dir, monkeypatch):
    import peftlab.run.train as train_module

    monkeypatch.setattr(train_module, "evaluate", lambda *args, **kwargs: EvalResult(float("nan"), 10))
    out = tmp_path / "run"
    run_experiment(_llama_config(tmp_path, tiny_llama_dir), out, echo=False)
    summary, _ = _strict_files(out)
    assert summary["status"] == "diverged" and summary["divergence"]["step"] == STEPS
    _assert_nothing_exported(out, summary)


# --- collapsed ---------------------------------------------------------------------------------


def test_uniform_predictions_end_collapsed_and_export_nothing(tmp_path, tiny_llama_dir, trained_model):
    def uniform_logits(step):
        if step == STEPS:  # a zero lm head gives every token logit 0: eval loss = ln(V) exactly
            with torch.no_grad():
                trained_model["model"].get_output_embeddings().weight.zero_()

    out = tmp_path / "run"
    run_experiment(_llama_config(tmp_path, tiny_llama_dir), out, echo=False, on_step=uniform_logits)
    summary, _ = _strict_files(out)
    vocab = trained_model["model"].config.vocab_size
    assert summary["status"] == "collapsed"
    assert summary["collapse"]["threshold"] == pytest.approx(math.log(vocab))
    assert summary["collapse"]["eval_loss"] == pytest.approx(math.log(vocab), abs=1e-4)
    assert "uniform" in summary["collapse"]["reason"]
    assert summary["metrics"]["eval_loss"] == summary["collapse"]["eval_loss"]  # metrics kept, to look at
    _assert_nothing_exported(out, summary)
    assert not (out / "checkpoint.safetensors").exists()  # training ran to its end
    again = run_experiment(_llama_config(tmp_path, tiny_llama_dir), out, echo=False, resume=True)
    assert again.to_json() == summary  # a finished run is returned on --resume, not retrained


def test_a_run_far_worse_than_the_reference_is_collapsed(tmp_path, tiny_llama_dir):
    config = _llama_config(tmp_path, tiny_llama_dir)
    healthy = run_experiment(config, tmp_path / "healthy", echo=False)
    loss = healthy.metrics["eval_loss"]
    worse = run_experiment(config, tmp_path / "worse", echo=False, reference_eval_loss=loss - 1.5)
    assert worse.status == "collapsed"
    assert worse.collapse.threshold == pytest.approx(loss - 1.5 + COLLAPSE_MARGIN)
    assert worse.metrics["eval_loss"] == loss
    _assert_nothing_exported(tmp_path / "worse", _strict((tmp_path / "worse" / "summary.json").read_text()))
    within = run_experiment(config, tmp_path / "within", echo=False, reference_eval_loss=loss - 0.5)
    assert within.status == "completed" and within.collapse is None


def test_collapse_rule():
    assert check_collapse("instruction", math.log(100), 100).threshold == pytest.approx(math.log(100))
    assert check_collapse("causal_lm", 9.0, 100) is not None
    assert check_collapse("instruction", 3.0, 100) is None
    assert check_collapse("instruction", 3.0, 100, reference_eval_loss=1.9) is not None
    assert check_collapse("instruction", 3.0, 100, reference_eval_loss=2.0) is None  # exactly the margin: not beyond
    assert check_collapse("classification", 50.0, 2, reference_eval_loss=0.1) is None  # judged by the majority floor


def test_healthy_run_completes_with_strict_json_and_its_adapter(tmp_path, tiny_llama_dir):
    out = tmp_path / "run"
    run_experiment(_llama_config(tmp_path, tiny_llama_dir), out, echo=False)
    summary, records = _strict_files(out)
    assert summary["status"] == "completed" and summary["divergence"] is None and "collapse" not in summary
    assert math.isfinite(summary["metrics"]["eval_loss"])
    assert (out / "adapter" / "adapter_config.json").is_file() and summary["artifacts"]["bytes"] > 0
    assert [r["step"] for r in records if "eval_loss" in r] == [STEPS]


def test_non_finite_values_are_left_out_of_what_is_written(tmp_path):
    assert "perplexity" not in EvalResult(800.0, 10, perplexity=math.inf).as_metrics()
    assert finite_only({"a": 1.0, "b": math.nan, "c": {"d": -math.inf, "e": [1.0, math.inf]}}) == \
        {"a": 1.0, "c": {"e": [1.0, None]}}
    MetricsLog(tmp_path, echo=False).write({"step": 1, "train_loss": math.nan, "lr": 0.1})
    assert _strict((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "lr": 0.1}


# --- what a run came from ----------------------------------------------------------------------


def test_environment_records_commit_versions_and_hashes(tmp_path, tiny_llama_dir):
    first = run_experiment(_llama_config(tmp_path, tiny_llama_dir), tmp_path / "a", echo=False).environment
    second = run_experiment(_llama_config(tmp_path, tiny_llama_dir), tmp_path / "b", echo=False).environment
    other_split = run_experiment(_llama_config(tmp_path, tiny_llama_dir, "data.seed=7"), tmp_path / "c",
                                 echo=False).environment
    assert len(first["model_sha256"]) == 64 and len(first["data_sha256"]) == 64
    assert first["model_sha256"] == second["model_sha256"] == other_split["model_sha256"]
    assert first["data_sha256"] == second["data_sha256"] != other_split["data_sha256"]
    assert len(first["git_commit"]) == 40 and isinstance(first["git_dirty"], bool)  # this repo is a checkout
    for package in ("peft", "datasets"):
        try:
            assert first[package] == importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            assert package not in first


def test_data_hash_is_the_canonical_json_of_the_examples():
    train = [{"input_ids": [5, 6], "labels": [-100, 6]}, {"labels": [1], "input_ids": [1]}]
    evaluation = [{"input_ids": [7], "label": 1}]
    canonical = json.dumps({"train": train, "eval": evaluation}, sort_keys=True, separators=(",", ":"))
    assert data_sha256(train, evaluation) == hashlib.sha256(canonical.encode()).hexdigest()
    assert data_sha256([], []) == hashlib.sha256(b'{"eval":[],"train":[]}').hexdigest()


def test_load_average_and_cpu_count_are_recorded(tmp_path, tiny_llama_dir, monkeypatch):
    import os

    summary = run_experiment(_llama_config(tmp_path, tiny_llama_dir), tmp_path / "a", echo=False)
    assert summary.resources.load_avg_max >= 0.0 and summary.resources.cpu_count == os.cpu_count()
    monkeypatch.delattr(os, "getloadavg")  # as on Windows
    summary = run_experiment(_llama_config(tmp_path, tiny_llama_dir), tmp_path / "b", echo=False)
    assert summary.resources.load_avg_max is None and summary.resources.cpu_count == os.cpu_count()
    assert "load_avg_max" not in json.loads((tmp_path / "b" / "summary.json").read_text())["resources"]


# --- the reference: the untrained base model ---------------------------------------------------


def test_reference_is_the_untrained_model_evaluated(tmp_path, tiny_llama_dir):
    config = _llama_config(tmp_path, tiny_llama_dir)
    out = tmp_path / "reference"
    returned = evaluate_reference(config, out, echo=False)
    summary, records = _strict_files(out)
    assert RunSummary.from_json(summary) == returned
    assert summary["status"] == "completed" and summary["role"] == "reference" and summary["method"] == "none"
    tokenizer = load_tokenizer(config.model)
    data = load_task_data(config.data, config.task, tokenizer)
    model = load_model(config.model, config.task).model
    expected = evaluate(model, eval_batches(data.eval, config.train, tokenizer.pad_token_id, torch.device("cpu")),
                        config.task)
    assert summary["metrics"]["eval_loss"] == expected.loss
    assert summary["metrics"]["perplexity"] == pytest.approx(math.exp(expected.loss))
    assert summary["params"] == {"trainable": 0, "total": count_params(model)[1], "percent": 0.0}
    assert summary["resources"]["steps"] == 0 and summary["resources"]["train_seconds"] == 0
    assert summary["artifacts"]["format"] == "none" and "model_sha256" in summary["environment"]
    assert records == [{"step": 0, "eval_loss": expected.loss, "eval_units": expected.units,
                        "perplexity": pytest.approx(math.exp(expected.loss))}]
    assert (out / "config.yaml").is_file() and (out / "train.log").is_file()
    assert evaluate_reference(config, out, echo=False) == returned  # done once; a resumed sweep reuses it


def test_a_reference_that_stops_on_a_mistake_writes_nothing_and_holds_its_folder(tmp_path, tiny_llama_dir,
                                                                                 monkeypatch):
    from peftlab.errors import UserError
    from peftlab.locking import folder_lock

    out = tmp_path / "reference"
    with pytest.raises(UserError, match="data.eval_size=1000"):  # found once the data is loaded
        evaluate_reference(_llama_config(tmp_path, tiny_llama_dir, "data.eval_size=1000"), out, echo=False)
    assert not out.exists()
    real_evaluate = run_module.evaluate_on

    def evaluate_while_locked(*args, **kwargs):
        with pytest.raises(UserError, match=r"in use by another peftlab process \(pid \d+, a reference evaluation\)"):
            with folder_lock(out):
                pass
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(run_module, "evaluate_on", evaluate_while_locked)
    assert evaluate_reference(_llama_config(tmp_path, tiny_llama_dir), out, echo=False).status == "completed"


@pytest.mark.parametrize("task", ["instruction", "classification"])
def test_a_lora_run_at_step_zero_matches_the_reference(tmp_path, tiny_llama_dir, tiny_bert_dir, monkeypatch, task):
    """Zero-initialised B: the prepared model starts exactly where the base model is (same head too)."""
    if task == "classification":
        config = load_config(_config(tmp_path, tiny_bert_dir, _reviews(tmp_path / "r.csv"), task=task))
    else:
        config = _llama_config(tmp_path, tiny_llama_dir)
    reference = evaluate_reference(config, tmp_path / "reference", echo=False)
    at_step_zero = {}
    real_train = run_module.train

    def evaluate_first(model, train_examples, eval_examples, task, cfg, *, pad_id, device, **kwargs):
        at_step_zero["loss"] = evaluate(model, eval_batches(eval_examples, cfg, pad_id, device), task).loss
        return real_train(model, train_examples, eval_examples, task, cfg, pad_id=pad_id, device=device, **kwargs)

    monkeypatch.setattr(run_module, "train", evaluate_first)
    run_experiment(config, tmp_path / "lora", echo=False)
    assert at_step_zero["loss"] == pytest.approx(reference.metrics["eval_loss"], rel=1e-6)

