"""End to end: `peftlab run` on tiny local models, each task, and every user mistake -> exit 2."""

import json
import math

import pytest
import yaml

from peftlab.cli import main


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
        "method": {"name": "lora", "placement": "all_linear", "ranks": {"schedule": "uniform", "r": 4},
                   "alpha": 8, **method},
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
    assert not (out / "checkpoint.pt").exists()


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
    from peftlab.model_cache import BaseModelCache
    from peftlab.run import run_experiment

    config = load_config(_config(tmp_path, tiny_bert_dir, _reviews(tmp_path / "reviews.csv"), task="classification"))
    direct = run_experiment(config, tmp_path / "direct", echo=False)
    cache = BaseModelCache()
    first = run_experiment(config, tmp_path / "cached1", echo=False, model_cache=cache)
    second = run_experiment(config, tmp_path / "cached2", echo=False, model_cache=cache)
    assert direct["metrics"]["eval_loss"] == first["metrics"]["eval_loss"] == second["metrics"]["eval_loss"]
