"""train.max_batch_tokens: auto resolves per device in one place, and is execution only: a run folder or
a committed study made with another value (the studies under docs/results: null) resumes as the same config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from peftlab.config import (
    EXECUTION_ONLY_KEYS,
    RunConfig,
    TrainConfig,
    changed_keys,
    config_to_dict,
    from_dict,
    load_yaml,
)
from peftlab.errors import UserError
from peftlab.run.folder import check_out_dir
from peftlab.run.resources import AUTO_MAX_BATCH_TOKENS, max_batch_tokens_for, resolved_split
from peftlab.study.resume import plan
from peftlab.study.sweep import expand, load_sweep

REPO = Path(__file__).resolve().parent.parent
STUDIES = sorted(p.name for p in (REPO / "docs" / "results").iterdir() if (p / "sweep.json").is_file())


def test_the_default_is_auto_and_auto_resolves_per_device():
    assert TrainConfig().max_batch_tokens == "auto"
    assert max_batch_tokens_for("auto", torch.device("cpu")) == 256 == AUTO_MAX_BATCH_TOKENS["cpu"]
    assert max_batch_tokens_for("auto", torch.device("cuda")) is None
    assert max_batch_tokens_for("auto", torch.device("mps")) is None
    for setting in (64, None):  # a set value is used as set, on every device
        assert max_batch_tokens_for(setting, torch.device("cpu")) == setting
        assert max_batch_tokens_for(setting, torch.device("cuda")) == setting


@pytest.mark.parametrize("value, expected", [("auto", "auto"), (None, None), (0, None), (8, 8), (4096, 4096)])
def test_accepted_values(value, expected):
    assert from_dict(RunConfig, {"train": {"max_batch_tokens": value}}).train.max_batch_tokens == expected


@pytest.mark.parametrize("value", [4, -1, "big", "Auto"])
def test_other_values_are_one_clear_line(value):
    with pytest.raises(UserError, match=r"train.max_batch_tokens must be auto, null or 0 \(no split\), or an "
                                        r"integer >= 8"):
        from_dict(RunConfig, {"train": {"max_batch_tokens": value}})


def test_resolved_split_logs_the_value_a_step_uses():
    lines = []

    class Log:
        def message(self, text):
            lines.append(text)

    cfg = resolved_split(TrainConfig(), torch.device("cpu"), Log())
    assert cfg.max_batch_tokens == 256 and "train.max_batch_tokens: 256 (auto on cpu)" in lines[0]
    assert resolved_split(TrainConfig(max_batch_tokens=None), torch.device("cpu"), Log()).max_batch_tokens is None
    assert "off" in lines[1]


def test_execution_only_keys_are_not_a_changed_config_and_other_keys_still_are():
    old = config_to_dict(from_dict(RunConfig, {"train": {"max_batch_tokens": None}}))
    new = config_to_dict(RunConfig())
    assert old != new and changed_keys(old, new) == []
    assert EXECUTION_ONLY_KEYS == {"train.max_batch_tokens", "train.report_to"}
    changed_lr = config_to_dict(from_dict(RunConfig, {"train": {"lr": 1e-3, "max_batch_tokens": 64}}))
    assert changed_keys(old, changed_lr) == ["train.lr"]


def _planned(study: str, out: Path, max_batch_tokens: object) -> list[tuple[str, bool]]:
    """What ``--resume`` of a copy of a committed study would run, with the trials' max_batch_tokens set so."""
    shutil.copytree(REPO / "docs" / "results" / study, out)
    trials = expand(load_sweep(REPO / "examples" / f"{study}.yaml"), out)
    for trial in trials:
        trial.config.train.max_batch_tokens = max_batch_tokens
    return [(trial.run_id, resumes) for trial, resumes in plan(trials, out, resume=True)]


# selective_placement's example has since turned its eval section on (issue 14): its trials have new ids
@pytest.mark.parametrize("study", [study for study in STUDIES if study != "selective_placement"])
def test_a_committed_study_made_with_max_batch_tokens_null_resumes_as_it_did_before_auto(study, tmp_path):
    source = REPO / "docs" / "results" / study
    saved = [load_yaml(p)["train"]["max_batch_tokens"] for p in (source / "runs").glob("*/config.yaml")]
    assert saved and set(saved) == {None}  # made before the default became auto
    trials = expand(load_sweep(REPO / "examples" / f"{study}.yaml"), tmp_path / "ids")
    assert {t.config.train.max_batch_tokens for t in trials} == {"auto"}  # the sweep file leaves it at the default
    committed = json.loads((source / "sweep.json").read_text())["trials"]
    assert {t.run_id for t in trials} <= {t["run_id"] for t in committed}  # the same trials as committed
    with_auto = _planned(study, tmp_path / "auto", "auto")
    # no training run is refused or redone; only what the null config itself would redo (methods_classification's
    # base-model evaluation was saved by an older peftlab with its trials' train settings: a cheap redo)
    assert with_auto == _planned(study, tmp_path / "null", None)
    assert all(run_id.startswith("base_model__") for run_id, _ in with_auto)


def test_a_run_folder_made_with_null_resumes_and_a_real_change_is_still_refused(tmp_path):
    run = next((REPO / "docs" / "results" / "lora_vs_full" / "runs").glob("lora__seed42__*"))
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    saved = load_yaml(folder / "config.yaml")
    now = {**saved, "train": {**saved["train"], "max_batch_tokens": "auto"}}
    summary = check_out_dir(from_dict(RunConfig, now), folder, resume=True)
    assert summary is not None and summary.status == "completed"  # the finished run is returned, not refused
    edited = {**saved, "train": {**saved["train"], "lr": 0.1}}
    with pytest.raises(UserError, match=r"changed: train.lr\)"):
        check_out_dir(from_dict(RunConfig, edited), folder, resume=True)


def test_a_run_records_the_resolved_value_in_its_config_summary_and_log(tmp_path, tiny_llama_dir):
    from peftlab.run.experiment import run_experiment

    data = tmp_path / "alpaca.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"say {i}", "input": "", "output": "ok " * (1 + i % 4)})
                              for i in range(12)) + "\n")
    config = from_dict(RunConfig, {"model": str(tiny_llama_dir), "task": "instruction",
                                   "data": {"source": str(data), "eval_size": 4},
                                   "method": {"name": "lora", "ranks": {"r": 2}, "alpha": 4},
                                   "train": {"max_steps": 1, "batch_size": 4, "num_samples": 0, "device": "cpu"}})
    assert config.train.max_batch_tokens == "auto"
    summary = run_experiment(config, tmp_path / "run", echo=False)
    assert summary.config["train"]["max_batch_tokens"] == 256
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["max_batch_tokens"] == 256
    assert "train.max_batch_tokens: 256" in (tmp_path / "run" / "train.log").read_text()
    # resumed with auto: the same config, the finished summary comes back
    assert run_experiment(config, tmp_path / "run", resume=True, echo=False).status == "completed"
