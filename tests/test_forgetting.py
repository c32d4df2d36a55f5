"""Forgetting (peftlab.run.forgetting): the loss on reference text before and after training, in a real run."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from test_run import _alpaca, _config
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftlab.cli import main
from peftlab.config import DataConfig, EvalConfig, RunConfig, TrainConfig
from peftlab.errors import UserError
from peftlab.inputs.data import causal_chunks
from peftlab.run.forgetting import Forgetting, load_reference, reference_loss

TEXT = "to be or not to be that is the question whether tis nobler in the mind to suffer " * 60


def _reference_config(path, size=4, chunk_length=16) -> RunConfig:
    return RunConfig(data=DataConfig(chunk_length=chunk_length), train=TrainConfig(batch_size=2),
                     eval=EvalConfig(reference=str(path), reference_size=size))


def test_reference_chunks_are_the_first_reference_size_chunks_of_the_text(tiny_llama_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    (tmp_path / "ref.txt").write_text(TEXT)
    chunks = load_reference(_reference_config(tmp_path / "ref.txt"), tokenizer)
    assert chunks == causal_chunks([TEXT], tokenizer, 16)[:4]
    assert len(chunks) == 4 and all(len(c["input_ids"]) == 16 for c in chunks)
    assert load_reference(RunConfig(), tokenizer) is None  # off by default


def test_a_reference_without_a_text_column_is_read_as_its_text_fields(tiny_llama_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    chunks = load_reference(_reference_config(_alpaca(tmp_path / "a.jsonl"), size=3), tokenizer)
    decoded = tokenizer.decode([i for c in chunks for i in c["input_ids"]])
    assert len(chunks) == 3 and "what is the capital number 0" in decoded and "paris" in decoded


@pytest.mark.parametrize(("source", "message"), [
    ("hamlett", "eval.reference='hamlett' is not an embedded data set (chatterbot, rotten_tomatoes, hamlet) nor a "
                "local file (did you mean 'hamlet'?)"),
    ("./missing.txt", "eval.reference: data file not found: ./missing.txt"),
])
def test_a_bad_reference_source_is_one_line(source, message, tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    with pytest.raises(UserError, match="^" + re.escape(message)):
        load_reference(_reference_config(source), tokenizer)


def test_a_reference_shorter_than_one_chunk_is_refused(tiny_llama_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    (tmp_path / "short.txt").write_text("to be")
    with pytest.raises(UserError, match="fewer tokens than data.chunk_length=16"):
        load_reference(_reference_config(tmp_path / "short.txt"), tokenizer)


def test_forgetting_is_after_minus_before():
    forgetting = Forgetting("hamlet", 64, before=3.0, after=3.25)
    assert forgetting.as_metrics() == {"reference_loss_before": 3.0, "reference_loss_after": 3.25, "forgetting": 0.25}
    assert "+0.2500 nats" in forgetting.line()


@pytest.mark.parametrize("method", [{"name": "lora"}, {"name": "adapter", "bottleneck": 4}, {"name": "full"}])
def test_a_run_measures_the_base_model_before_and_the_trained_model_after(method, tiny_llama_dir, tmp_path, capsys):
    (tmp_path / "ref.txt").write_text(TEXT)
    config = _config(tmp_path, tiny_llama_dir, _alpaca(tmp_path / "alpaca.jsonl"), **method)
    raw = yaml.safe_load(config.read_text())
    raw["data"]["chunk_length"] = 16
    raw["eval"] = {"reference": str(tmp_path / "ref.txt"), "reference_size": 4}
    config.write_text(yaml.safe_dump(raw))
    assert main(["run", str(config), "--out", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    metrics = json.loads((tmp_path / "out" / "summary.json").read_text())["metrics"]
    # "before" is the untouched base model's loss on the same chunks, whatever the method added
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    run_config = _reference_config(tmp_path / "ref.txt")
    chunks = load_reference(run_config, tokenizer)
    expected = reference_loss(base, chunks, run_config, tokenizer.pad_token_id, torch.device("cpu"))
    assert metrics["reference_loss_before"] == pytest.approx(expected, abs=1e-5)
    assert metrics["reference_loss_after"] != pytest.approx(metrics["reference_loss_before"], abs=1e-6)  # it trained
    assert metrics["forgetting"] == pytest.approx(metrics["reference_loss_after"] - metrics["reference_loss_before"])
    assert "forgetting on" in (tmp_path / "out" / "train.log").read_text()


def test_a_run_without_an_eval_section_reports_what_it_always_did(tiny_llama_dir, tmp_path, capsys):
    config = _config(tmp_path, tiny_llama_dir, _alpaca(tmp_path / "alpaca.jsonl"))
    assert main(["run", str(config), "--out", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert not [k for k in summary["metrics"] if k.startswith("gen_") or "reference_loss" in k or k == "forgetting"]
    assert len(summary["samples"]) == 1  # train.num_samples, as before


def test_a_sweep_of_tiny_runs_reports_generation_and_forgetting(tiny_llama_dir, tmp_path, capsys):
    """End to end: tiny trained runs with the eval section, then the report's new columns and comparisons."""
    import csv

    from test_sweep import _tiny_sweep

    (tmp_path / "ref.txt").write_text(TEXT)
    path = _tiny_sweep(tmp_path, tiny_llama_dir, strategies={"lora": {}, "full": {"method.name": "full",
                                                                                  "method.ranks.r": 8,
                                                                                  "method.alpha": 16}},
                       seeds=(0, 1))
    raw = yaml.safe_load(path.read_text())
    raw["base"]["data"]["chunk_length"] = 16
    raw["base"]["train"].update({"num_samples": 2, "max_new_tokens": 4})
    raw["base"]["eval"] = {"generate": {"num_examples": 3, "max_new_tokens": 4}, "reference": str(tmp_path / "ref.txt"),
                           "reference_size": 4}
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "sweep"
    assert main(["sweep", str(path), "--out", str(out)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    results = list(csv.DictReader((out / "results.csv").open()))
    assert len(results) == 4 and all(r["status"] == "completed" for r in results)
    for row in results:
        assert row["gen_examples"] == "3" and 0 <= float(row["gen_rougeL"]) <= 1
        assert float(row["forgetting"]) == pytest.approx(float(row["reference_loss_after"])
                                                         - float(row["reference_loss_before"]))
    # both strategies start from the same base model: the same "before" on every run
    assert len({row["reference_loss_before"] for row in results}) == 1
    metrics = {r["metric"] for r in csv.DictReader((out / "comparisons.csv").open())}
    assert metrics == {"eval_loss", "gen_exact_match", "gen_rougeL", "gen_contains", "forgetting"}
    report = (out / "report.md").read_text()
    assert "| prompt | reference | full | lora |" in report and "gen_rougeL" in report and "forgetting" in report
