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
