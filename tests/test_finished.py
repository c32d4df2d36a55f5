"""Finished runs are usable: the saved model is rebuilt exactly for every method, and generate / merge / eval /
push work on it (tiny random Llama, GPT-2 and BERT; runs of three steps written once for the module)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_tiny_tokenizer
from safetensors.torch import load_file, save_file
from test_run import _alpaca, _config, _reviews
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
)

from peftlab.cli import main
from peftlab.config import load_config
from peftlab.errors import UserError
from peftlab.inputs.data import format_prompt
from peftlab.run import push
from peftlab.run.experiment import run_experiment
from peftlab.run.finished import load_finished
from peftlab.run.reuse import evaluate_run, merge_run, read_prompts
from peftlab.run.summary import read_summary

LORA = {"name": "lora", "placement": "all_linear", "ranks": {"schedule": "uniform", "r": 4}, "alpha": 8}
# A random tiny GPT-2 starts at uniform prediction (ln V): these settings get it clear of it, or the run is "collapsed".
GPT2_TRAIN = ["train.lr=3e-2", "train.max_steps=8"]
# run name -> (model, task, method[, --set overrides]); every method, fused-slice LoRA on GPT-2's c_attn, and
# classification heads
RUNS = {
    "lora": ("llama", "instruction", LORA),
    "lora_fused": ("gpt2", "instruction", {**LORA, "placement": "qv_only"}, GPT2_TRAIN),
    "adapter": ("llama", "instruction", {"name": "adapter"}),
    "adapter_pfeiffer": ("gpt2", "instruction", {"name": "adapter", "adapter_variant": "pfeiffer"}, GPT2_TRAIN[:1]),
    "partial": ("llama", "instruction", {"name": "partial", "last_n": 1}),
    "full": ("llama", "instruction", {"name": "full"}),
    "lora_cls": ("bert", "classification", LORA),
    "partial_cls": ("bert", "classification", {"name": "partial", "last_n": 1}),
}
CAUSAL_RUNS = [name for name, (_, task, *_) in RUNS.items() if task == "instruction"]


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory):
    tokenizer = build_tiny_tokenizer()
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=256, vocab_size=len(tokenizer),
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama_dir, tiny_gpt2_dir, tiny_bert_dir):
    """name -> the folder of a completed three-step run."""
    root = tmp_path_factory.mktemp("finished")
    models = {"llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir, "bert": tiny_bert_dir}
    data = {"instruction": _alpaca(root / "alpaca.jsonl"), "classification": _reviews(root / "reviews.csv")}
    folders = {}
    for name, (model, task, method, *overrides) in RUNS.items():
        work = root / f"{name}-config"
        work.mkdir()
        config = load_config(_config(work, models[model], data[task], task=task, **method), *overrides)
        summary = run_experiment(config, root / name, echo=False)
        assert summary.status == "completed", (name, summary.status)
        folders[name] = root / name
    folders["data"] = data
    return folders


def _logits(model, tokenizer, texts=("paris is the capital", "a good movie with a great cast")):
    batch = tokenizer(list(texts), return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _auto(task):
    return AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM


def _dir_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@pytest.mark.parametrize("name", sorted(RUNS))
def test_the_rebuilt_model_reproduces_the_runs_own_evaluation(name, runs, tmp_path, capsys):
    """`peftlab eval` on the run's own data and eval split gives the run's numbers: the rebuilt model is the trained
    one."""
    run, task = runs[name], RUNS[name][1]
    out = tmp_path / "eval.json"
    code = main(["eval", str(run), "--data", str(runs["data"][task]), "--split", "eval", "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    saved = read_summary(run / "summary.json").metrics
    assert result["metrics"]["eval_loss"] == pytest.approx(saved["eval_loss"], abs=1e-6)
    assert result["metrics"]["eval_units"] == saved["eval_units"] and result["examples"] == 6
    for key in ("perplexity", "accuracy", "macro_f1"):
        assert (key in result["metrics"]) == (key in saved)
        if key in saved:
            assert result["metrics"][key] == pytest.approx(saved[key], rel=1e-6)
    assert f"eval_loss  {saved['eval_loss']:.4f}" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["partial", "full", "partial_cls"])
def test_full_and_partial_runs_save_a_model_transformers_loads(name, runs):
    run, task = runs[name], RUNS[name][1]
    artifact = read_summary(run / "summary.json").artifacts
    assert artifact.model_path == "model" and artifact.model_bytes == _dir_bytes(run / "model")
    if name == "full":  # the model folder is the artifact itself: no second copy of the weights
        assert (artifact.format, artifact.path, artifact.bytes) == ("transformers", "model", _dir_bytes(run / "model"))
        assert not (run / "trainable.safetensors").exists()
    else:
        assert (artifact.format, artifact.path) == ("safetensors", "trainable.safetensors")
        assert artifact.bytes == (run / "trainable.safetensors").stat().st_size
    plain = _auto(task).from_pretrained(run / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    rebuilt = load_finished(run, device="cpu")  # partial: from trainable.safetensors on the base, not from model/
    assert torch.allclose(_logits(plain, tokenizer), _logits(rebuilt.model, tokenizer), atol=1e-5)


@pytest.mark.parametrize("name", ["lora", "lora_fused", "adapter"])
def test_other_methods_save_no_whole_model(name, runs):
    artifact = read_summary(runs[name] / "summary.json").artifacts
    assert artifact.model_path is None and not (runs[name] / "model").exists()
    assert artifact.bytes == _dir_bytes(runs[name] / artifact.path) if artifact.format == "peft" else \
        artifact.bytes == (runs[name] / artifact.path).stat().st_size
    assert artifact.format == {"lora": "peft", "lora_fused": "safetensors", "adapter": "safetensors"}[name]


@pytest.mark.parametrize("name", ["lora", "lora_fused", "partial", "full", "lora_cls"])
def test_merge_writes_a_standalone_model_with_the_trained_logits(name, runs, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", str(runs[name]), "--out", str(out)]) == 0, capsys.readouterr().err
    merged = _auto(RUNS[name][1]).from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    trained = load_finished(runs[name], device="cpu")
    assert not any("lora" in key for key in merged.state_dict())
    assert torch.allclose(_logits(merged, tokenizer), _logits(trained.model, trained.tokenizer), atol=1e-5)


def test_merge_refuses_bottleneck_adapters_and_writes_nothing(runs, tmp_path):
    with pytest.raises(UserError, match="cannot be saved as a plain transformers model"):
        merge_run(runs["adapter"], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def _record_of(prompt: str, data: Path) -> dict:
    """The data record whose Alpaca prompt is ``prompt`` (a run's sample keeps the formatted prompt only)."""
    records = [json.loads(line) for line in data.read_text().splitlines()]
    return next(r for r in records if format_prompt(r) == prompt)


@pytest.mark.parametrize("name", CAUSAL_RUNS)
def test_generate_reproduces_the_runs_own_sample(name, runs, tmp_path, capsys):
    """The run's sample was made by generate_samples on the trained model; the CLI, from the saved model, says the
    same."""
    sample = read_summary(runs[name] / "summary.json").samples[0]
    record = _record_of(sample["prompt"], runs["data"]["instruction"])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({k: record[k] for k in ("instruction", "input")}) + "\n")
    code = main(["generate", str(runs[name]), "--file", str(prompts), "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"### completion 1\n{sample['generated']}\n" in out and sample["prompt"] in out


def test_generate_takes_repeated_prompts_and_a_text_file_in_order(runs, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("what is the capital number 5\n\nsay hello\n")
    code = main(["generate", str(runs["lora"]), "--prompt", "first one", "--prompt", "second one",
                 "--file", str(tmp_path / "prompts.txt"), "--max-new-tokens", "2"])
    out = capsys.readouterr().out
    assert code == 0 and out.count("### completion") == 4
    order = [out.index(f"### Instruction:\n{text}\n") for text in
             ("first one", "second one", "what is the capital number 5", "say hello")]
    assert order == sorted(order)


def test_read_prompts_follows_the_task():
    assert read_prompts(["go on"], None, "causal_lm") == [{"text": "go on"}]
    assert read_prompts(["do it"], None, "instruction") == [{"instruction": "do it"}]
    with pytest.raises(UserError, match="this run's task is classification: use peftlab eval"):
        read_prompts(["x"], None, "classification")


def test_eval_on_all_of_other_data(runs, tmp_path):
    """Other data of the same task: every record is evaluated, labels mapped as the run's head knows them."""
    other = tmp_path / "other.csv"
    other.write_text("text,label\n" + "".join(f"a great cast {i},fresh\na bad ending {i},rotten\n" for i in range(3)))
    result = evaluate_run(runs["lora_cls"], str(other))
    assert result.examples == 6 and result.metrics["eval_units"] == 6 and 0 <= result.metrics["accuracy"] <= 1
    # evaluated on every record, each once: the summed loss over the two parts equals the whole
    alpaca = runs["data"]["instruction"]
    whole = evaluate_run(runs["lora"], str(alpaca))
    part = evaluate_run(runs["lora"], str(alpaca), split="eval")
    assert whole.examples == 24 and part.examples == 6 and whole.metrics["eval_units"] > part.metrics["eval_units"]


def test_eval_keeps_the_runs_label_names(runs, tmp_path):
    """Labels map to the ids the run's head was trained on; a label the run never had is refused, not renumbered."""
    assert load_finished(runs["lora_cls"], device="cpu").label_names == ["fresh", "rotten"]
    other = tmp_path / "other.csv"
    other.write_text("text,label\n" + "".join(f"a great cast {i},{label}\n" for i, label in
                                              enumerate(["fresh", "rotten", "meh"] * 2)))
    with pytest.raises(UserError, match=r"label 'meh' is not in data.labels \(fresh, rotten\)"):
        evaluate_run(runs["lora_cls"], str(other))


def test_strict_loading_names_missing_and_misshapen_tensors(runs, tmp_path):
    import shutil

    copy = tmp_path / "adapter-run"
    shutil.copytree(runs["adapter"], copy)
    tensors = load_file(str(copy / "trainable.safetensors"))
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, str(copy / "trainable.safetensors"))
    with pytest.raises(UserError, match=f"missing: {dropped}"):
        load_finished(copy, device="cpu")
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["method"]["bottleneck"] = 8  # the rebuilt adapters no longer have the saved shapes
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(UserError, match="does not fit the model the run's config.yaml .*shape saved vs rebuilt"):
        load_finished(copy, device="cpu")


# --- push ------------------------------------------------------------------------------------------


def test_push_dry_run_lists_the_files_and_sends_nothing(runs, monkeypatch, capsys):
    monkeypatch.setattr(push, "HfApi", lambda: pytest.fail("a dry run must not reach the hub"))
    assert main(["push", str(runs["lora"]), "--repo", "me/tiny-lora", "--dry-run"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert listed == sorted(["README.md", "adapter_config.json", "adapter_model.safetensors", "config.yaml",
                             "summary.json"])
    assert main(["push", str(runs["full"]), "--repo", "me/tiny-full", "--dry-run"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]}
    assert {"model.safetensors", "config.json", "tokenizer.json", "config.yaml", "summary.json", "README.md"} <= listed
    assert "trainable.safetensors" not in listed


class _FakeApi:
    calls: list = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        self.calls.append(("upload_folder", repo_id, files))


@pytest.mark.parametrize("name, weights", [("lora", "adapter_model.safetensors"), ("partial", "model.safetensors"),
                                           ("adapter", "trainable.safetensors")])
def test_push_uploads_the_model_config_summary_and_card_in_one_commit(name, weights, runs, monkeypatch, capsys):
    _FakeApi.calls = []
    monkeypatch.setattr(push, "HfApi", _FakeApi)
    assert main(["push", str(runs[name]), "--repo", "me/tiny", "--private"]) == 0
    (create, repo, options), (upload, upload_repo, files) = _FakeApi.calls
    assert (create, repo, options) == ("create_repo", "me/tiny", {"private": True, "exist_ok": True})
    assert (upload, upload_repo) == ("upload_folder", "me/tiny")
    run = runs[name]
    source = {"lora": run / "adapter", "partial": run / "model", "adapter": run}[name]
    assert files[weights] == (source / weights).read_bytes()
    assert files["config.yaml"] == (run / "config.yaml").read_bytes()
    assert files["summary.json"] == (run / "summary.json").read_bytes()
    card = files["README.md"].decode()
    assert {"lora": "PeftModel.from_pretrained", "partial": "AutoModelForCausalLM.from_pretrained",
            "adapter": "load_finished"}[name] in card
    assert "eval_loss" in card and "uploaded to me/tiny (private)" in capsys.readouterr().out
