"""Experiment trackers (train.report_to): what each backend holds equals metrics.jsonl, sweeps group their
runs, a missing client is one line before anything is written, and every way a run ends closes them.

TensorBoard is read back with its own EventAccumulator, W&B runs offline (its .wandb log read back with
a small reader of its record format), MLflow writes a local file store read back with its client. A
backend whose package is absent makes its tests skip (pip install 'peftlab[trackers]' installs all three).
"""

import json
import math
import struct
import sys
from pathlib import Path

import pytest
import yaml

from peftlab.cli import main
from peftlab.config import load_config
from peftlab.errors import UserError
from peftlab.run.tracking import read_records
from tests.test_run import _alpaca, _config


class _Killed(BaseException):
    """A kill at a chosen step: nothing catches it (as test_run's)."""


def _run_config(tmp_path, model_dir, *overrides):
    path = _config(tmp_path, model_dir, _alpaca(tmp_path / "alpaca.jsonl"))
    return load_config(path, ["train.num_samples=0", "train.eval_every=1", *overrides])


def _jsonl(out: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl as {metric: {step: value}}."""
    values: dict[str, dict[int, float]] = {}
    for record in read_records(out / "metrics.jsonl"):
        for key, value in record.items():
            if key != "step":
                values.setdefault(key, {})[record["step"]] = float(value)
    return values


def _assert_same(tracked: dict[str, dict[int, float]], logged: dict[str, dict[int, float]]) -> None:
    for key, by_step in logged.items():
        assert set(tracked[key]) == set(by_step), key
        for step, value in by_step.items():
            assert tracked[key][step] == pytest.approx(value, rel=1e-6), (key, step)


# --- TensorBoard ---------------------------------------------------------------------------------


def _tensorboard(directory: Path):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = accumulator.EventAccumulator(str(directory), size_guidance={accumulator.SCALARS: 0})
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    for tag, by_step in scalars.items():  # each step once: a resume's repeated steps are purged
        assert len(events.Scalars(tag)) == len(by_step), tag
    return events, scalars


def _hparams(events) -> dict:
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {key: getattr(value, value.WhichOneof("kind")) for key, value in info.hparams.items()}


def test_tensorboard_holds_every_metric_line_the_config_and_the_final_metrics(tmp_path, tiny_llama_dir):
    pytest.importorskip("tensorboard")
    from peftlab.run.experiment import run_experiment

    out = tmp_path / "run"
    summary = run_experiment(_run_config(tmp_path, tiny_llama_dir, "train.report_to=[tensorboard]"), out, echo=False)
    events, scalars = _tensorboard(out / "tensorboard")
    logged = _jsonl(out)
    assert {"train_loss", "lr", "grad_norm", "eval_loss"} <= set(logged)
    _assert_same(scalars, logged)
    assert scalars["final/eval_loss"][3] == pytest.approx(summary.metrics["eval_loss"], rel=1e-6)
    assert scalars["final/trainable_params"][3] == summary.params.trainable
    hparams = _hparams(events)
    assert hparams["train.lr"] == 0.01 and hparams["method.ranks.r"] == 4 and hparams["status"] == "completed"
    assert json.loads((out / "trackers.json").read_text()) == {}  # TensorBoard has no run id to keep


def test_tensorboard_after_a_resume_holds_each_step_once_with_the_resumed_values(tmp_path, tiny_llama_dir):
    pytest.importorskip("tensorboard")
    from peftlab.run.experiment import run_experiment

    config = _run_config(tmp_path, tiny_llama_dir, "train.report_to=[tensorboard]", "train.max_steps=4",
                         "train.save_every=2")

    def kill_after_step_3(step):
        if step == 3:
            raise _Killed

    out = tmp_path / "run"
    with pytest.raises(_Killed):
        run_experiment(config, out, echo=False, on_step=kill_after_step_3)
    run_experiment(config, out, echo=False, resume=True)  # from the checkpoint at step 2: step 3 again
    events, scalars = _tensorboard(out / "tensorboard")
    assert sorted(scalars["train_loss"]) == [1, 2, 3, 4]
    _assert_same(scalars, _jsonl(out))  # tokens_per_s of step 3 is the second attempt's, as in metrics.jsonl


# --- W&B (offline) -------------------------------------------------------------------------------


def _wandb_records(path: Path):
    """The records of a .wandb file: LevelDB-log framing (32 KiB blocks, 7-byte chunk headers) of protobufs."""
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    position, block, chunks = 7, 32768, b""
    while position + 7 <= len(raw):
        left = block - position % block
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[position:position + 7])
        if kind == 0:
            break
        data = raw[position + 7:position + 7 + length]
        position += 7 + length
        chunks = data if kind in (1, 2) else chunks + data  # full/first start a record, middle/last extend it
        if kind in (1, 4):
            yield wandb_internal_pb2.Record.FromString(chunks)


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)  # "final/eval_loss" arrives as nested ["final", "eval_loss"]


def _wandb_run(root: Path, name: str) -> dict:
    """An offline run's group, config, history by step, and final summary."""
    for path in sorted(root.glob("wandb/offline-run-*/run-*.wandb")):
        run: dict = {"history": {}, "summary": {}}
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.update(name=record.run.display_name, group=record.run.run_group,
                           config={_key(i): json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "history":
                items = {_key(i): json.loads(i.value_json) for i in record.history.item}
                step = items.get("_step", record.history.step.num)
                for key, value in items.items():
                    if not key.startswith("_"):
                        run["history"].setdefault(key, {})[step] = value
            elif kind == "summary":
                run["summary"].update({_key(i): json.loads(i.value_json) for i in record.summary.update})
        if run.get("name") == name:
            return run
    raise AssertionError(f"no offline W&B run named {name} under {root}")


def test_wandb_without_an_api_key_runs_offline_with_every_metric_line(tmp_path, tiny_llama_dir, monkeypatch):
    pytest.importorskip("wandb")
    from peftlab.run.experiment import run_experiment

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no key, so offline
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    out = tmp_path / "run"
    config = _run_config(tmp_path, tiny_llama_dir, "train.report_to=[wandb]", "name=lora-tiny")
    summary = run_experiment(config, out, echo=False)
    run = _wandb_run(out, "lora-tiny")
    _assert_same(run["history"], _jsonl(out))
    assert run["config"]["train"]["lr"] == 0.01 and run["config"]["method"]["ranks"]["r"] == 4
    assert run["summary"]["final/eval_loss"] == pytest.approx(summary.metrics["eval_loss"])
    assert run["summary"]["status"] == "completed"
    assert json.loads((out / "trackers.json").read_text())["wandb"]


# --- MLflow (local file store) -------------------------------------------------------------------


def _mlflow_client(store: Path):
    tracking = pytest.importorskip("mlflow.tracking")
    return tracking.MlflowClient(tracking_uri=store.resolve().as_uri())


def _mlflow_metrics(client, run_id: str) -> dict[str, dict[int, float]]:
    run = client.get_run(run_id)
    return {key: {m.step: m.value for m in client.get_metric_history(run_id, key)} for key in run.data.metrics}


def test_mlflow_file_store_in_the_run_folder_holds_params_metric_lines_and_status(tmp_path, tiny_llama_dir,
                                                                                monkeypatch):
    pytest.importorskip("mlflow")
    from peftlab.run.experiment import run_experiment

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    out = tmp_path / "run"
    summary = run_experiment(_run_config(tmp_path, tiny_llama_dir, "train.report_to=[mlflow]"), out, echo=False)
    client = _mlflow_client(out / "mlruns")
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == "peftlab"
    assert run.info.status == "FINISHED" and run.data.tags["peftlab.status"] == "completed"
    assert run.data.params["train.lr"] == "0.01" and run.data.params["method.name"] == "lora"
    metrics = _mlflow_metrics(client, run_id)
    _assert_same({k: v for k, v in metrics.items() if not k.startswith("final/")}, _jsonl(out))
    assert metrics["final/eval_loss"][3] == pytest.approx(summary.metrics["eval_loss"])


@pytest.mark.parametrize("stop, status, mlflow_status", [
    ("diverge", "diverged", "FAILED"), ("ctrl-c", "interrupted", "KILLED"), ("error", "failed", "FAILED")])
def test_every_way_a_run_ends_closes_the_trackers_with_its_status(tmp_path, tiny_llama_dir, monkeypatch, stop,
                                                                   status, mlflow_status):
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    import torch

    import peftlab.run.experiment as run_module
    from peftlab.run.train import Interrupted

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    caught, real_train = {}, run_module.train

    def spy(model, *args, **kwargs):
        caught["model"] = model
        return real_train(model, *args, **kwargs)

    def at_step_1(step):
        if stop == "diverge":  # the next step's loss is NaN
            with torch.no_grad():
                next(p for n, p in caught["model"].named_parameters() if n.endswith("lora_A")).fill_(float("nan"))
        elif stop == "ctrl-c":
            raise Interrupted(step)
        else:
            raise RuntimeError("CUDA out of memory (pretend)")

    monkeypatch.setattr(run_module, "train", spy)
    out = tmp_path / "run"
    config = _run_config(tmp_path, tiny_llama_dir, "train.report_to=[tensorboard, mlflow]")
    if stop == "diverge":
        assert run_module.run_experiment(config, out, echo=False, on_step=at_step_1).status == "diverged"
    else:
        with pytest.raises((Interrupted, RuntimeError)):
            run_module.run_experiment(config, out, echo=False, on_step=at_step_1)
    client = _mlflow_client(out / "mlruns")
    run = client.get_run(json.loads((out / "trackers.json").read_text())["mlflow"])
    assert run.info.status == mlflow_status and run.data.tags["peftlab.status"] == status
    events, scalars = _tensorboard(out / "tensorboard")
    assert _hparams(events)["status"] == status  # written at close: the writer was closed too
    assert sorted(scalars["train_loss"]) == [1]


def test_a_resumed_run_continues_its_mlflow_run(tmp_path, tiny_llama_dir, monkeypatch):
    pytest.importorskip("mlflow")
    from peftlab.run.experiment import run_experiment

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = _run_config(tmp_path, tiny_llama_dir, "train.report_to=[mlflow]", "train.save_every=1")

    def kill_after_step_2(step):
        if step == 2:
            raise _Killed

    out = tmp_path / "run"
    with pytest.raises(_Killed):
        run_experiment(config, out, echo=False, on_step=kill_after_step_2)
    first = json.loads((out / "trackers.json").read_text())["mlflow"]
    run_experiment(config, out, echo=False, resume=True)
    client = _mlflow_client(out / "mlruns")
    assert json.loads((out / "trackers.json").read_text())["mlflow"] == first
    assert len(client.search_runs([client.get_run(first).info.experiment_id])) == 1
    assert client.get_run(first).info.status == "FINISHED"
    assert sorted(_mlflow_metrics(client, first)["train_loss"]) == [1, 2, 3]


def test_adding_a_tracker_on_resume_is_not_a_changed_config(tmp_path, tiny_llama_dir, capsys):
    pytest.importorskip("tensorboard")
    path = _config(tmp_path, tiny_llama_dir, _alpaca(tmp_path / "alpaca.jsonl"))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--set", "train.num_samples=0"]) == 0
    assert main(["run", str(path), "--out", str(out), "--set", "train.num_samples=0", "--resume",
                 "--set", "train.report_to=[tensorboard]"]) == 0, capsys.readouterr().err


# --- sweeps: one group per sweep --------------------------------------------------------------------


def test_a_sweep_groups_its_runs_in_every_tracker(tmp_path, tiny_llama_dir, monkeypatch):
    for package in ("tensorboard", "wandb", "mlflow"):
        pytest.importorskip(package)
    from tests.test_sweep import _cli, _tiny_sweep

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    out = tmp_path / "sweep"
    sweep = _tiny_sweep(tmp_path, tiny_llama_dir)
    assert _cli(["sweep", str(sweep), "--out", str(out), "--set", "train.report_to=[tensorboard, wandb, mlflow]",
                 "--set", "train.eval_every=1"]) == 0
    run_ids = sorted(p.name for p in (out / "runs").iterdir())  # the base model's evaluation, two runs
    assert len(run_ids) == 3 and sorted(p.name for p in (out / "tensorboard").iterdir()) == run_ids
    for run_id in run_ids:
        events, scalars = _tensorboard(out / "tensorboard" / run_id)
        _assert_same(scalars, _jsonl(out / "runs" / run_id))
        assert "eval_loss" in scalars
        wandb_run = _wandb_run(out, run_id)
        assert wandb_run["group"] == "tiny"
        _assert_same(wandb_run["history"], _jsonl(out / "runs" / run_id))
    attention = next(r for r in run_ids if r.startswith("attention_only"))
    assert _hparams(_tensorboard(out / "tensorboard" / attention)[0])["sweep.strategy"] == "attention_only"
    client = _mlflow_client(out / "mlruns")
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == run_ids
    assert {r.data.tags["sweep.strategy"] for r in runs} == {"base_model", "attention_only", "mlp_only"}


# --- a missing client: one line, exit 2, nothing written -------------------------------------------


@pytest.mark.parametrize("backend", ["tensorboard", "wandb", "mlflow"])
def test_a_missing_tracker_client_stops_before_the_run_folder_is_written(tmp_path, tiny_llama_dir, capsys,
                                                                          monkeypatch, backend):
    monkeypatch.setitem(sys.modules, backend, None)  # what an uninstalled package looks like to find_spec
    path = _config(tmp_path, tiny_llama_dir, _alpaca(tmp_path / "alpaca.jsonl"))
    out = tmp_path / "run"
    code = main(["run", str(path), "--out", str(out), "--set", f"train.report_to=[{backend}]"])
    err = capsys.readouterr().err
    assert code == 2 and f"pip install 'peftlab[{backend}]'" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_sweep_with_a_missing_tracker_client_writes_nothing(tmp_path, tiny_llama_dir, monkeypatch):
    from peftlab.study.executors import run_sweep
    from peftlab.study.sweep import load_sweep
    from tests.test_sweep import _tiny_sweep

    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, "mlflow", None)
    spec = load_sweep(_tiny_sweep(tmp_path, tiny_llama_dir), ["train.report_to=[mlflow, wandb]"])
    with pytest.raises(UserError, match=r"mlflow, wandb are not installed; pip install 'peftlab\[mlflow,wandb\]'"):
        run_sweep(spec, tmp_path / "sweep", progress=lambda _: None)
    assert not (tmp_path / "sweep").exists()


def test_report_to_is_checked_and_defaults_to_none():
    from peftlab.config import TrainConfig, from_dict

    assert TrainConfig().report_to == []
    assert from_dict(TrainConfig, {"report_to": ["wandb", "tensorboard"]}).report_to == ["wandb", "tensorboard"]
    with pytest.raises(UserError, match="did you mean 'mlflow'"):
        TrainConfig(report_to=["mlflw"])
    with pytest.raises(UserError, match="twice"):
        TrainConfig(report_to=["wandb", "wandb"])


def test_a_saved_config_without_report_to_resumes_unchanged(tmp_path):
    """config.yaml of runs made before train.report_to existed reads back with none."""
    from peftlab.config import RunConfig, config_to_dict, from_dict

    saved = config_to_dict(RunConfig())
    del saved["train"]["report_to"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert from_dict(RunConfig, yaml.safe_load((tmp_path / "config.yaml").read_text())) == RunConfig()


def test_only_finite_numbers_reach_the_trackers():
    from peftlab.run.trackers import Trackers

    seen = []

    class Recorder:
        def log(self, record, step):
            seen.append((step, record))

    Trackers([Recorder()]).log({"step": 4, "train_loss": 1.5, "grad_norm": math.inf, "note": "x", "flag": True})
    assert seen == [(4, {"train_loss": 1.5})]


def test_a_resume_whose_mlflow_store_lacks_the_saved_run_starts_a_new_one(tmp_path, monkeypatch):
    """E.g. MLFLOW_TRACKING_URI changed between the attempts: the saved id is not there to continue."""
    pytest.importorskip("mlflow")
    from peftlab.config import RunConfig
    from peftlab.run.trackers import MlflowTracker, Scope

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = MlflowTracker(RunConfig(), Scope("run", tmp_path, tmp_path), "0" * 32, True)
    tracker.log({"train_loss": 2.5}, 1)
    tracker.finish("completed", {})
    run = _mlflow_client(tmp_path / "mlruns").get_run(tracker.run_id)
    assert tracker.run_id != "0" * 32 and run.data.metrics == {"train_loss": 2.5} and run.info.status == "FINISHED"
