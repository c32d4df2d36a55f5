"""One run over several processes (torchrun, gloo on CPU): the same numbers as one process, and resume."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from peftlab.cli import main
from peftlab.errors import UserError
from peftlab.run.distributed import SINGLE, World, decided_by_main, shard, world_from_env
from peftlab.run.summary import read_summary
from tests.test_run import _alpaca, _config, _reviews

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_each_rank_takes_every_nth_row_and_a_rank_past_the_rows_takes_none():
    batch = {"input_ids": torch.arange(5).unsqueeze(1), "label": torch.arange(5)}
    first, second = shard(batch, World(0, 2)), shard(batch, World(1, 2))
    assert first["input_ids"].flatten().tolist() == [0, 2, 4] and first["label"].tolist() == [0, 2, 4]
    assert second["input_ids"].flatten().tolist() == [1, 3]
    assert shard(batch, World(2, 3)) is not None and shard({"x": torch.zeros(2, 1)}, World(2, 3)) is None
    assert shard(batch, SINGLE) is batch


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "two"}, "must be whole numbers"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2 is not within WORLD_SIZE=2"),
])
def test_a_broken_torchrun_environment_is_one_line(monkeypatch, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UserError, match=message):
        world_from_env()


def test_one_process_has_world_size_one_and_decides_alone(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert world_from_env() == SINGLE
    assert decided_by_main(SINGLE, lambda: 7) == 7


@pytest.mark.parametrize("extra, message", [
    (["--nproc", "0"], "--nproc must be >= 1, got 0"),
    (["--nproc", "-3"], "--nproc must be >= 1, got -3"),
])
def test_bad_nproc_is_one_line_and_exit_2(tmp_path, tiny_llama_dir, capsys, extra, message):
    config = _config(tmp_path, tiny_llama_dir, _alpaca(tmp_path / "alpaca.jsonl"))
    assert main(["run", str(config), "--out", str(tmp_path / "run"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"peftlab: error: {message}"]


def test_nproc_inside_torchrun_is_refused(tmp_path, tiny_llama_dir, capsys, monkeypatch):
    config = _config(tmp_path, tiny_llama_dir, _alpaca(tmp_path / "alpaca.jsonl"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["run", str(config), "--out", str(tmp_path / "run"), "--nproc", "2"]) == 2
    assert "not both" in capsys.readouterr().err


def _peftlab(*args: str) -> list[str]:
    return [sys.executable, "-m", "peftlab", "run", *args]


def _records(out, key):
    return [(r["step"], r[key]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if key in r]


def _same(ones, twos, tolerance=1e-4):
    assert [step for step, _ in ones] == [step for step, _ in twos]
    for (_, one), (_, two) in zip(ones, twos, strict=True):
        assert abs(one - two) <= tolerance * max(1.0, abs(one)), (ones, twos)


@pytest.mark.slow
def test_two_processes_train_exactly_as_one_at_the_same_global_batch(tmp_path, tiny_llama_dir):
    """Batch 5 (ranks get 3 and 2 rows), 2 micro-batches per step, evaluations during training: the
    losses of every step and evaluation match the one-process run to float tolerance."""
    config = _config(tmp_path, tiny_llama_dir, _alpaca(tmp_path / "alpaca.jsonl", n=40))
    settings = ["--set", "train.batch_size=5", "--set", "train.grad_accum=2", "--set", "train.max_steps=4",
                "--set", "train.eval_every=2", "--set", "train.num_samples=1"]
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    if tensorboard:  # rank 0 alone reports to the trackers
        settings += ["--set", "train.report_to=[tensorboard]"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["run", str(config), "--out", str(one), *settings]) == 0
    done = subprocess.run(_peftlab(str(config), "--out", str(two), "--nproc", "2", *settings), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    _same(_records(one, "train_loss"), _records(two, "train_loss"))
    _same(_records(one, "eval_loss"), _records(two, "eval_loss"))
    summary = read_summary(two / "summary.json")
    assert summary.status == "completed" and summary.environment["world_size"] == 2
    assert "largest of 2 processes" in summary.resources.memory_kind
    assert summary.resources.train_tokens == read_summary(one / "summary.json").resources.train_tokens
    assert (two / "adapter" / "adapter_config.json").exists() and len(summary.samples) == 1
    # rank 0 alone wrote: one log line per step, and the table printed once
    assert [step for step, _ in _records(two, "train_loss")] == [1, 2, 3, 4]
    assert done.stdout.count("trainable params") == 1
    if tensorboard:  # one writer: another rank's would be a second events file
        assert len(list((two / "tensorboard").glob("events.out.tfevents.*"))) == 1


@pytest.fixture
def bert_without_dropout(tmp_path, tiny_bert_dir):
    """The tiny BERT with its dropout off: ranks draw dropout masks from their own RNG streams, so only a
    model without dropout can be compared number for number with one process."""
    folder = tmp_path / "bert-no-dropout"
    shutil.copytree(tiny_bert_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.slow
def test_two_processes_classify_with_the_same_accuracy(tmp_path, bert_without_dropout):
    config = _config(tmp_path, bert_without_dropout, _reviews(tmp_path / "reviews.csv", n=30),
                     task="classification")
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["run", str(config), "--out", str(one)]) == 0
    done = subprocess.run(_peftlab(str(config), "--out", str(two), "--nproc", "2"), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = read_summary(one / "summary.json"), read_summary(two / "summary.json")
    assert first.metrics["accuracy"] == second.metrics["accuracy"]
    assert abs(first.metrics["eval_loss"] - second.metrics["eval_loss"]) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [[], ["--set", "train.fsdp=true"]], ids=["ddp", "fsdp"])
def test_a_killed_two_process_run_resumes_to_the_uninterrupted_result(tmp_path, tiny_llama_dir, parallel):
    """kill -9 of the whole torchrun group after a checkpoint; --resume with 2 processes finishes with
    the losses of a run never interrupted (fsdp: the checkpoint holds whole tensors, cut into shards again)."""
    config = _config(tmp_path, tiny_llama_dir, _alpaca(tmp_path / "alpaca.jsonl", n=40))
    settings = ["--set", "train.max_steps=8", "--set", "train.save_every=2", "--set", "train.num_samples=0",
                "--set", "train.batch_size=4"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main(["run", str(config), "--out", str(whole), *settings]) == 0
    # slow each step down, so that the kill lands mid-run: a step every ~0.5 s
    slow = ["--set", "train.max_batch_tokens=8", *parallel]
    runner = subprocess.Popen(_peftlab(str(config), "--out", str(killed), "--nproc", "2", *settings, *slow),
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (killed / "checkpoint.safetensors").exists():
            assert runner.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.05)
    finally:
        os.killpg(runner.pid, signal.SIGKILL)
        runner.wait(30)
    assert not (killed / "summary.json").exists()
    done = subprocess.run(_peftlab(str(config), "--out", str(killed), "--nproc", "2", *settings, *slow,
                                   "--resume"), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    _same(_records(whole, "train_loss"), _records(killed, "train_loss"))
    _same(_records(whole, "eval_loss"), _records(killed, "eval_loss"))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_fsdp_over_two_processes_trains_exactly_as_one(tmp_path, tiny_llama_dir, method):
    """train.fsdp: the blocks sharded over 2 processes. Batch 5 (ranks get 3 and 2 rows) cut into pieces
    of at most 24 tokens (ranks run different numbers of pieces), evaluations, a checkpoint and samples:
    every step's loss and gradient norm and every evaluation match one process, and the export is whole.
    Full fine-tuning mixes sharded block gradients with whole embedding gradients in the clipping."""
    config = _config(tmp_path, tiny_llama_dir, _alpaca(tmp_path / "alpaca.jsonl", n=40), name=method)
    settings = ["--set", "train.batch_size=5", "--set", "train.grad_accum=2", "--set", "train.max_steps=4",
                "--set", "train.eval_every=2", "--set", "train.num_samples=1", "--set", "train.save_every=2",
                "--set", "train.max_batch_tokens=24", "--set", "train.lr=1e-3",
                "--set", "train.keep_best=eval_loss"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["run", str(config), "--out", str(one), *settings]) == 0
    done = subprocess.run(_peftlab(str(config), "--out", str(two), "--nproc", "2", "--set", "train.fsdp=true",
                                   *settings), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "transformer blocks sharded over 2 processes" in (two / "train.log").read_text()
    for key in ("train_loss", "grad_norm", "eval_loss"):
        _same(_records(one, key), _records(two, key))
    first, second = read_summary(one / "summary.json"), read_summary(two / "summary.json")
    assert second.status == "completed" and len(second.samples) == 1
    assert second.samples[0]["generated"] == first.samples[0]["generated"]
    assert second.artifacts.format == first.artifacts.format and second.artifacts.bytes == first.artifacts.bytes
