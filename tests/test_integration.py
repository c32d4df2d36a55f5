"""The embedded defaults end to end, a handful of steps each: what a new user's first runs do."""

import json
import math

import pytest

from peftlab.cli import main

pytestmark = pytest.mark.integration


@pytest.mark.slow  # SmolLM2-135M on the CPU (~20 s), and the GGUF conversion on a fresh cache
def test_lora_on_embedded_smollm2_and_chatterbot(tmp_path, capsys):
    out = tmp_path / "smollm2"
    code = main(["run", "examples/quickstart.yaml", "--out", str(out), "--set", "train.max_steps=2",
                 "--set", "train.batch_size=2", "--set", "data.eval_size=8", "--set", "data.max_length=64",
                 "--set", "train.eval_every=null", "--set", "train.num_samples=1", "--set", "train.max_new_tokens=4"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert math.isclose(summary["metrics"]["perplexity"], math.exp(summary["metrics"]["eval_loss"]))
    # r=16 on q,k,v,o (576->576, 576->192 twice, 576->576), gate, up (576->1536), down (1536->576), 30 layers
    per_layer = 16 * ((576 + 576) * 2 + (576 + 192) * 2 + (576 + 1536) * 3)
    assert summary["params"]["trainable"] == 30 * per_layer
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_adapter_classification_on_embedded_minilm_and_rotten_tomatoes(tmp_path, capsys):
    config = tmp_path / "cls.yaml"
    config.write_text("model: minilm-l6\ntask: classification\n"
                      "data: {source: rotten_tomatoes, train_size: 32, eval_size: 16, max_length: 48}\n"
                      "method: {name: adapter, bottleneck: 16}\n"
                      "train: {max_steps: 2, batch_size: 8, lr: 1.0e-3}\n")
    out = tmp_path / "minilm"
    assert main(["run", str(config), "--out", str(out)]) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and 0.0 <= summary["metrics"]["accuracy"] <= 1.0


@pytest.mark.slow  # SmolLM2-135M on the CPU: a few steps, 4 generated answers, 4 chunks of Hamlet twice
def test_generation_metrics_and_forgetting_on_embedded_smollm2(tmp_path, capsys):
    import torch

    from peftlab.config import load_config
    from peftlab.inputs.data import load_task_data
    from peftlab.inputs.models import load_model, load_tokenizer
    from peftlab.run.generation import generate

    out = tmp_path / "smollm2"
    settings = ["train.max_steps=2", "train.batch_size=4", "data.eval_size=8", "data.max_length=64",
                "train.eval_every=null", "train.num_samples=2", "train.max_new_tokens=8", "data.chunk_length=64",
                "eval.generate={num_examples: 4, max_new_tokens: 8}", "eval.reference=hamlet", "eval.reference_size=4"]
    code = main(["run", "examples/quickstart.yaml", "--out", str(out), *[a for s in settings for a in ("--set", s)]])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    metrics = summary["metrics"]
    assert metrics["gen_examples"] == 4
    assert all(0.0 <= metrics[f"gen_{m}"] <= 1.0 for m in ("exact_match", "rougeL", "contains"))
    assert math.isclose(metrics["forgetting"], metrics["reference_loss_after"] - metrics["reference_loss_before"])
    assert 0.0 < metrics["reference_loss_before"] < 10.0  # the instruct model knows English text
    assert len(summary["samples"]) == 2 and all(s["generated"] for s in summary["samples"])
    # on the real model too, a left-padded batch decodes what each prompt decodes alone
    config = load_config("examples/quickstart.yaml", settings)
    tokenizer = load_tokenizer(config.model)
    prompts = load_task_data(config.data, config.task, tokenizer).eval_prompts[:4]
    model = load_model(config.model, config.task, tokenizer=tokenizer).model
    cpu = torch.device("cpu")
    batched = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=4, device=cpu)
    alone = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=1, device=cpu)
    assert [g.generated for g in batched] == [g.generated for g in alone]
