"""End to end: `peftlab run` on tiny local models, each task, and every user mistake -> exit 2."""

import json
import math

import pytest
import yaml

from peftlab.cli import main
from peftlab.run.summary import DATA, SMALL_EVAL, read_summary


def _alpaca(path, n=24):
    records = [{"instruction": f"what is the capital number {i}", "input": "" if i % 2 else "the quick fox",
                "output": "paris is the capital " * (1 + i % 3)} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def _reviews(path, n=24):
    rows = ["text,label"] + [f"{'a good movie with a great cast' if i % 2 else 'a bad ending rotten'} {i},"
                             f"{'fresh' if i % 2 else 'rotten'}" for i in range(n)]
    path.write_text("\n".join(rows) + "\n")
    return path


def _config(tmp_path, model_dir, data_path, task="instruction", **method):
    config = {
        "model": str(model_dir), "task": task,
        "data": {"source": str(data_path), "eval_size": 6},
        # lora's own fields only for lora: a method refuses fields it would not read
        "method": {**({"name": "lora", "placement": "all_linear", "ranks": {"schedule": "uniform", "r": 4},
                       "alpha": 8} if method.get("name", "lora") == "lora" else {}), **method},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "seed": 0, "num_samples": 1, "max_new_tokens": 4},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_instruction_lora_run_writes_every_output(tmp_path, tiny_llama_dir, capsys):
    config = _config(tmp_path, tiny_llama_dir, _alpaca(tmp_path / "alpaca.jsonl"))
    out = tmp_path / "run"
    code, stdout, _ = _run(["run", str(config), "--out", str(out), "--set", "train.eval_every=2"], capsys)
    assert code == 0
    assert "eval_loss" in stdout and "trainable params" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    metrics = summary["metrics"]
    assert math.isclose(metrics["perplexity"], math.exp(metrics["eval_loss"]), rel_tol=1e-12)
    assert summary["params"]["trainable"] > 0 and summary["resources"]["tokens_per_s"] > 0
    assert summary["resources"]["steps"] == 3
    assert len(summary["placement"]) == 2 * 7 and {p["rank"] for p in summary["placement"]} == {4}
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["eval_every"] == 2
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "train_loss" in r] == [1, 2, 3]
    assert [r["step"] for r in lines if "eval_loss" in r] == [2, 3]
    assert len(summary["samples"]) == 1
    assert not (out / "checkpoint.safetensors").exists()


def test_same_config_twice_gives_identical_eval_loss(tmp_path, tiny_llama_dir, capsys):
    config = _config(tmp_path, tiny_llama_dir, _alpaca(tmp_path / "alpaca.jsonl"), dropout=0.1)
    losses = []
    for name in ("a", "b"):
        assert _run(["run", str(config), "--out", str(tmp_path / name)], capsys)[0] == 0
        losses.append(json.loads((tmp_path / name / "summary.json").read_text())["metrics"]["eval_loss"])
    assert losses[0] == losses[1]


def test_classification_trains_the_head_and_reports_accuracy(tmp_path, tiny_bert_dir, capsys):
    config = _config(tmp_path, tiny_bert_dir, _reviews(tmp_path / "reviews.csv"), task="classification")
    out = tmp_path / "cls"
    assert _run(["run", str(config), "--out", str(out), "--set", "train.train_eval_size=8"], capsys)[0] == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["metrics"]["accuracy"] <= 1.0 and "macro_f1" in summary["metrics"]
    assert 0.0 <= summary["metrics"]["train_accuracy"] <= 1.0 and summary["metrics"]["train_eval_units"] == 8
    assert "perplexity" not in summary["metrics"]


def test_data_warnings_reach_the_log_and_the_summary(tmp_path, tiny_bert_dir, capsys):
    """A label seen only in the eval set is warned about with its count, in train.log and summary.json."""
    path = _reviews(tmp_path / "reviews.csv")
    path.write_text(path.read_text() + "a strange one,meh\n")  # the last row: a third label
    config = _config(tmp_path, tiny_bert_dir, path, task="classification")
    out = tmp_path / "cls"
    args = ["run", str(config), "--out", str(out), "--set", "data.split_mode=contiguous",
            "--set", f"data.train_size={len(path.read_text().splitlines()) - 2 - 5}", "--set", "data.eval_size=6"]
    assert _run(args, capsys)[0] == 0
    warnings = read_summary(out / "summary.json").warnings
    (warning,) = [w for w in warnings if "meh" in w.message]
    assert warning.kind == DATA and warning.message.startswith("1 of 6 eval examples have a label that no training")
    assert warning.message in (out / "train.log").read_text()
    assert [w.kind for w in warnings if w.kind != DATA] == [SMALL_EVAL]  # 6 eval examples: too few to separate


@pytest.mark.parametrize("method", [{"name": "adapter", "bottleneck": 8}, {"name": "partial", "last_n": 1},
                                    {"name": "full"}])
def test_other_methods_run(tmp_path, tiny_llama_dir, capsys, method):
    config = _config(tmp_path, tiny_llama_dir, _alpaca(tmp_path / "alpaca.jsonl"), **method)
    out = tmp_path / method["name"]
    assert _run(["run", str(config), "--out", str(out), "--set", "train.num_samples=0"], capsys)[0] == 0
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


def test_causal_lm_on_plain_text(tmp_path, tiny_llama_dir, capsys):
    text = tmp_path / "text.jsonl"
    text.write_text("\n".join(json.dumps({"text": "to be or not to be that is the question " * 8}) for _ in range(12)))
    config = _config(tmp_path, tiny_llama_dir, text, task="causal_lm")
    out = tmp_path / "lm"
    code, _, err = _run(["run", str(config), "--out", str(out), "--set", "data.chunk_length=16",
                         "--set", "data.eval_size=4"], capsys)
    assert code == 0, err
    assert "perplexity" in json.loads((out / "summary.json").read_text())["metrics"]


MISTAKES = [
    (["--set", "train.max_step=5"], "did you mean train.max_steps"),
    (["--set", "train.batch_size=eight"], "train.batch_size must be int"),
    (["--set", "method.ranks.r=0"], "method.ranks.r must be >= 1"),
    (["--set", "method.ranks.r=4096"], "rank"),
    (["--set", "data.source=/nonexistent/data.jsonl"], "/nonexistent/data.jsonl"),
    (["--set", "model=/nonexistent/model"], "/nonexistent/model"),
    (["--set", "method.placement=attn_only"], "method.placement"),
    (["--set", "method.targets=[no_such_module]"], "no_such_module"),
]


@pytest.mark.parametrize("extra,message", MISTAKES)
def test_user_mistakes_give_one_line_and_exit_2(tmp_path, tiny_llama_dir, capsys, extra, message):
    config = _config(tmp_path, tiny_llama_dir, _alpaca(tmp_path / "alpaca.jsonl"))
    code, _, err = _run(["run", str(config), "--out", str(tmp_path / "out"), *extra], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("peftlab: error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def test_data_without_needed_fields_and_empty_data(tmp_path, tiny_llama_dir, capsys):
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    config = _config(tmp_path, tiny_llama_dir, wrong)
    code, _, err = _run(["run", str(config), "--out", str(tmp_path / "o1")], capsys)
    assert code == 2 and "instruction" in err and "Traceback" not in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    config = _config(tmp_path, tiny_llama_dir, empty)
    code, _, err = _run(["run", str(config), "--out", str(tmp_path / "o2")], capsys)
    assert code == 2 and "Traceback" not in err


def test_existing_run_is_not_overwritten_and_resume_returns_it(tmp_path, tiny_llama_dir, capsys):
    config = _config(tmp_path, tiny_llama_dir, _alpaca(tmp_path / "alpaca.jsonl"))
    out = tmp_path / "run"
    assert _run(["run", str(config), "--out", str(out), "--set", "train.num_samples=0"], capsys)[0] == 0
    code, _, err = _run(["run", str(config), "--out", str(out), "--set", "train.num_samples=0"], capsys)
    assert code == 2 and "--resume" in err
    assert _run(["run", str(config), "--out", str(out), "--set", "train.num_samples=0", "--resume"], capsys)[0] == 0
    code, _, err = _run(["run", str(config), "--out", str(out), "--resume", "--set", "train.lr=0.5",
                         "--set", "train.num_samples=0"], capsys)
    assert code == 2 and "train.lr" in err


def test_cached_base_model_gives_the_same_result_as_loading_from_disk(tmp_path, tiny_bert_dir):
    from peftlab.config import load_config
    from peftlab.inputs.model_cache import BaseModelCache
    from peftlab.run.experiment import run_experiment

    config = load_config(_config(tmp_path, tiny_bert_dir, _reviews(tmp_path / "reviews.csv"), task="classification"))
    direct = run_experiment(config, tmp_path / "direct", echo=False)
    cache = BaseModelCache()
    first = run_experiment(config, tmp_path / "cached1", echo=False, model_cache=cache)
    second = run_experiment(config, tmp_path / "cached2", echo=False, model_cache=cache)
    assert direct.metrics["eval_loss"] == first.metrics["eval_loss"] == second.metrics["eval_loss"]


# --- a mistake never costs the folder; a resumed log holds each step once; one process per folder ---


def _steps(out, kind):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if kind in r]


def test_a_mistake_found_after_loading_writes_nothing_and_the_corrected_command_runs(tmp_path, tiny_llama_dir,
                                                                                   capsys):
    config = _config(tmp_path, tiny_llama_dir, _alpaca(tmp_path / "alpaca.jsonl"))
    too_big = ["--set", "data.eval_size=1000", "--set", "train.num_samples=0"]
    fresh, existing = tmp_path / "fresh", tmp_path / "existing"
    existing.mkdir()
    for out in (fresh, existing):
        code, _, err = _run(["run", str(config), "--out", str(out), *too_big], capsys)
        assert code == 2 and "data.eval_size=1000" in err  # found only once the data is loaded
    assert not fresh.exists()  # the folder it made for its lock is gone again
    assert [p.name for p in existing.iterdir()] == [".lock"]  # nothing but the (released) lock
    assert _run(["run", str(config), "--out", str(fresh), "--set", "train.num_samples=0"], capsys)[0] == 0
    assert _run(["run", str(config), "--out", str(existing), "--set", "train.num_samples=0", "--resume"],
                capsys)[0] == 0


def test_a_folder_that_holds_no_trained_step_is_reused_with_or_without_resume(tmp_path, tiny_llama_dir, capsys):
    """What an attempt that stopped before its first step left (an older peftlab wrote config.yaml first)."""
    config = _config(tmp_path, tiny_llama_dir, _alpaca(tmp_path / "alpaca.jsonl"))
    for name, extra in (("plain", []), ("resumed", ["--resume"])):
        out = tmp_path / name
        out.mkdir()
        (out / "config.yaml").write_text(yaml.safe_dump({"model": "other", "data": {"eval_size": 1000}}))
        (out / "train.log").write_text("lora on other: ...\n")
        (out / "metrics.jsonl").write_text("")
        code, _, err = _run(["run", str(config), "--out", str(out), "--set", "train.num_samples=0", *extra], capsys)
        assert code == 0, err
        assert yaml.safe_load((out / "config.yaml").read_text())["model"] == str(tiny_llama_dir)
        assert "lora on other" not in (out / "train.log").read_text()
        assert _steps(out, "train_loss") == [1, 2, 3]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, _, err = _run(["run", str(config), "--out", str(other)], capsys)
    assert code == 2 and "notes.txt" in err  # a folder of someone else's files is still refused


class _Killed(BaseException):
    """A kill -9 at a chosen point: nothing after it runs, nothing catches it."""


def test_resume_after_a_kill_before_the_first_checkpoint_logs_each_step_once(tmp_path, tiny_llama_dir):
    from peftlab.config import load_config
    from peftlab.run.experiment import run_experiment

    config = load_config(_config(tmp_path, tiny_llama_dir, _alpaca(tmp_path / "alpaca.jsonl")),
                         ["train.num_samples=0", "train.eval_every=1"])

    def kill_after_step_2(step):
        if step == 2:
            raise _Killed

    out = tmp_path / "run"
    with pytest.raises(_Killed):
        run_experiment(config, out, echo=False, on_step=kill_after_step_2)
    assert _steps(out, "train_loss") == [1, 2] and not (out / "checkpoint.safetensors").exists()
    run_experiment(config, out, echo=False, resume=True)
    assert _steps(out, "train_loss") == [1, 2, 3]  # restarted from step 0 on an emptied log
    assert _steps(out, "eval_loss") == [1, 2, 3]


def test_resume_after_a_divergence_without_checkpoint_logs_each_step_once(tmp_path, tiny_llama_dir, monkeypatch):
    import torch

    import peftlab.run.experiment as run_module
    from peftlab.config import load_config
    from peftlab.run.experiment import run_experiment

    config = load_config(_config(tmp_path, tiny_llama_dir, _alpaca(tmp_path / "alpaca.jsonl")),
                         ["train.num_samples=0"])
    caught, real_train = {}, run_module.train

    def spy(model, *args, **kwargs):
        caught["model"] = model
        return real_train(model, *args, **kwargs)

    def poison(step):
        if step == 1:
            with torch.no_grad():
                next(p for n, p in caught["model"].named_parameters() if n.endswith("lora_A")).fill_(float("nan"))

    monkeypatch.setattr(run_module, "train", spy)
    out = tmp_path / "run"
    assert run_experiment(config, out, echo=False, on_step=poison).status == "diverged"
    assert _steps(out, "train_loss") == [1]
    assert run_experiment(config, out, echo=False, resume=True).status == "completed"
    assert _steps(out, "train_loss") == [1, 2, 3] and _steps(out, "eval_loss") == [3]


def test_a_kill_between_the_final_eval_and_the_summary_does_not_log_that_eval_twice(tmp_path, tiny_llama_dir,
                                                                                     monkeypatch):
    import peftlab.run.experiment as run_module
    from peftlab.config import load_config
    from peftlab.run.experiment import run_experiment

    config = load_config(_config(tmp_path, tiny_llama_dir, _alpaca(tmp_path / "alpaca.jsonl")),
                         ["train.num_samples=0", "train.save_every=1", "train.eval_every=2"])
    real_write = run_module.write_summary

    def killed_at_summary(path, summary):
        if path.name == "summary.json":
            raise _Killed
        return real_write(path, summary)

    monkeypatch.setattr(run_module, "write_summary", killed_at_summary)
    out = tmp_path / "run"
    with pytest.raises(_Killed):
        run_experiment(config, out, echo=False)
    assert _steps(out, "eval_loss") == [2, 3] and (out / "checkpoint.safetensors").exists()
    monkeypatch.setattr(run_module, "write_summary", real_write)
    summary = run_experiment(config, out, echo=False, resume=True)
    assert summary.status == "completed"
    assert _steps(out, "train_loss") == [1, 2, 3] and _steps(out, "eval_loss") == [2, 3]


@pytest.mark.slow
def test_two_processes_cannot_train_into_one_folder(tmp_path, tiny_llama_dir):
    """A real second `peftlab run` into the folder of one that is training is refused, naming its pid;
    once that one is killed (kill -9), the kernel has released its lock."""
    import signal
    import subprocess
    import sys
    import time

    from peftlab.locking import folder_lock

    config = _config(tmp_path, tiny_llama_dir, _alpaca(tmp_path / "alpaca.jsonl"))
    out = tmp_path / "run"
    long = ["--set", "train.max_steps=100000", "--set", "train.num_samples=0"]
    command = [sys.executable, "-m", "peftlab.cli", "run", str(config), "--out", str(out), *long]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists():
            assert first.poll() is None and time.time() < deadline, "the first run ended before it trained"
            time.sleep(0.1)
        second = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"in use by another peftlab process (pid {first.pid}, a run)" in second.stderr
        assert "Traceback" not in second.stderr and len(second.stderr.strip().splitlines()) == 1
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    with folder_lock(out):  # released by the kill; the folder stays the killed run's, for --resume
        pass
    assert (out / "metrics.jsonl").exists()


def test_what_loading_says_lands_in_the_run_log_and_echo_false_silences_it(tmp_path, tiny_bert_dir, capsys):
    """The new classification head is announced while the model loads, before the run's log opens."""
    from peftlab import load_config, run_experiment

    config = load_config(_config(tmp_path, tiny_bert_dir, _reviews(tmp_path / "reviews.csv"), task="classification"))
    capsys.readouterr()
    run_experiment(config, tmp_path / "quiet", echo=False)
    # peftlab says nothing (the progress bars of datasets and transformers are theirs, not this channel)
    assert not [line for line in capsys.readouterr().err.splitlines() if "peftlab" in line]
    assert "new classification head" in (tmp_path / "quiet" / "train.log").read_text()
    assert main(["run", str(tmp_path / "config.yaml"), "--out", str(tmp_path / "loud")]) == 0
    err = capsys.readouterr().err
    assert err.count("new classification head") == 1  # echoed once, by the run's route, not again by the CLI
    assert "new classification head" in (tmp_path / "loud" / "train.log").read_text()
