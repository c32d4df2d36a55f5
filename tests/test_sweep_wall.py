"""bench/sweep_wall.py: a whole sweep through peftlab against the seeds' way (one HF Trainer process per trial).

Nothing here asserts on speed (speed is measured by bench/, never by a test)."""

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, where bench/ lives

from transformers import LlamaForCausalLM  # noqa: E402

from bench import sweep_wall  # noqa: E402
from peftlab.config import MethodConfig, RankConfig, RunConfig  # noqa: E402
from peftlab.core.methods import prepare  # noqa: E402
from peftlab.core.modelmap import build_model_map  # noqa: E402
from peftlab.core.params import count_params  # noqa: E402

peft = pytest.importorskip("peft")


def _sweep(tmp_path, model_dir) -> Path:
    raw = {"name": "tiny_placement",
           "base": {"model": str(model_dir), "task": "instruction",
                    "data": {"source": "chatterbot", "train_size": 8, "eval_size": 4, "max_length": 256},
                    "method": {"name": "lora", "ranks": {"schedule": "uniform", "r": 4}, "alpha": 8, "dropout": 0.1},
                    "train": {"batch_size": 2, "lr": 1e-3, "eval_every": 1, "device": "cpu"},
                    "eval": {"generate": {"metrics": ["exact_match"], "max_new_tokens": 4, "num_examples": 2}}},
           "strategies": {"attention_only": {"method.placement": "attention_only"},
                          "mlp_only": {"method.placement": "mlp_only"},
                          "all_linear": {"method.placement": "all_linear"}},
           "seeds": [42, 43]}
    path = tmp_path / "tiny.yaml"
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize("placement,ranks,alpha_policy", [
    ("attention_only", RankConfig(r=4), "fixed"),
    ("mlp_only", RankConfig(schedule="budget", budget=3000), "two_r"),
    ("all_linear", RankConfig(schedule="attention_heavy", attention_r=8, mlp_r=2), "fixed"),  # ranks that vary
])
def test_peft_gets_the_modules_ranks_and_alphas_peftlab_places(tiny_llama_dir, placement, ranks, alpha_policy):
    method = MethodConfig(name="lora", placement=placement, ranks=ranks, alpha=8, alpha_policy=alpha_policy)
    config = RunConfig(model=str(tiny_llama_dir), method=method)
    arguments = sweep_wall.lora_arguments(config)
    ours = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    expected = prepare(ours, method, build_model_map(ours), train_head=False)
    lora = peft.LoraConfig(**arguments["lora"], task_type="CAUSAL_LM")
    wrapped = peft.get_peft_model(LlamaForCausalLM.from_pretrained(tiny_llama_dir), lora)
    assert count_params(wrapped)[0] == expected.trainable_params == arguments["peftlab_trainable"]
    layers = {name: module for name, module in wrapped.get_base_model().named_modules() if hasattr(module, "lora_A")}
    assert sorted(layers) == sorted(t.name for t in expected.targets)
    for name, layer in layers.items():
        assert layer.r["default"] == expected.ranks[name]
        assert math.isclose(layer.scaling["default"], expected.alphas[name] / expected.ranks[name])


@pytest.mark.slow  # a `peftlab sweep` process, a `peftlab report` process and one process per seeds-way trial
def test_sweep_wall_runs_both_sides_on_every_trial_and_writes_the_table(tiny_llama_dir, tmp_path):
    results = sweep_wall.main([str(_sweep(tmp_path, tiny_llama_dir)), "--strategies", "attention_only,mlp_only",
                               "--seeds", "42", "--max-steps", "2", "--out", str(tmp_path / "runs"),
                               "--results", str(tmp_path / "results")])
    (written,) = (tmp_path / "results").glob("sweep-wall-*.json")
    saved = json.loads(written.read_text())
    assert saved["summary"] == results["summary"] and written.with_suffix(".md").is_file()
    assert [t["strategy"] for t in saved["trials"]] == ["attention_only", "mlp_only"]
    assert {"eval.generate=null", "eval.reference=null", "train.num_samples=0", "train.max_steps=2"} <= set(
        saved["settings"]["overrides"])
    assert saved["parts"].keys() == {"peftlab", "seeds"}
    (rep,) = saved["reps"]
    for trial in saved["trials"]:
        mine, theirs = rep["peftlab"]["trials"][trial["run_id"]], rep["seeds"]["trials"][trial["run_id"]]
        # a random tiny model stays at the uniform loss, ln(vocab): peftlab marks such a run collapsed
        assert mine["status"] in ("completed", "collapsed") and theirs["status"] == "completed"
        assert mine["steps"] == theirs["steps"] == 2
        assert mine["trainable"] == theirs["trainable"] == trial["peftlab_trainable"] > 0
        assert theirs["evaluations"] == 2  # at step 1 (eval_every 1) and the final one, as peftlab does
        assert 0 < mine["eval_loss"] < 20 and 0 < theirs["eval_loss"] < 20
        assert theirs["wall_seconds"] > 0 and mine["wall_seconds"] > 0
    assert rep["peftlab"]["wall_seconds"] > rep["peftlab"]["reference_seconds"] > 0
    assert rep["peftlab"]["same_work_seconds"] == rep["peftlab"]["wall_seconds"] - rep["peftlab"]["report_seconds"]
    assert rep["ratio"] == rep["seeds"]["wall_seconds"] / rep["peftlab"]["wall_seconds"]
    assert not (tmp_path / "runs" / "rep1").exists()  # run folders removed without --keep-runs
    table = written.with_suffix(".md").read_text()
    assert "| median |" in table and "attention_only__seed42__" in table


def test_sweep_wall_refuses_a_used_folder_and_an_unknown_strategy(tiny_llama_dir, tmp_path, capsys):
    sweep = _sweep(tmp_path, tiny_llama_dir)
    assert sweep_wall.main([str(sweep), "--strategies", "nope", "--out", str(tmp_path / "a")]) == 2
    assert "--strategies: nope not in" in capsys.readouterr().err
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("")
    assert sweep_wall.main([str(sweep), "--out", str(tmp_path / "b")]) == 2
    assert "is not empty" in capsys.readouterr().err
