"""The hub code path, exercised offline: a model id resolved from a Hugging Face cache laid out on disk.

Real users pass hub ids (microsoft/DialoGPT-medium, tatsu-lab/alpaca); tests cannot reach the hub, so
they build the cache layout huggingface_hub reads (models--org--name/refs/main + snapshots/<commit>/)
and let transformers resolve the id from it exactly as it would after a download.
"""

import shutil

import huggingface_hub.constants
import pytest

from peftlab.inputs.models import load_model, load_tokenizer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_llama_dir):
    repo = tmp_path / "hub" / "models--peftlab-test--tiny-llama"
    shutil.copytree(tiny_llama_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


def test_hub_id_loads_through_the_hub_code_path(hub_cache):
    loaded = load_model("peftlab-test/tiny-llama", "instruction")
    assert loaded.source == "peftlab-test/tiny-llama"  # written as the adapter's base model id
    assert loaded.model.config.num_hidden_layers == 2
    assert load_tokenizer("peftlab-test/tiny-llama").pad_token is not None


def test_hub_dataset_id_loads_through_the_hub_code_path(tmp_path, monkeypatch):
    # datasets will not serve a hub id offline without its own processed cache, so the id is pointed
    # at a local folder laid out as a hub dataset repo; the call and its arguments are the real ones.
    import json

    import datasets

    from peftlab.config import DataConfig
    from peftlab.inputs.data import load_rows

    repo = tmp_path / "alpaca-mini"
    repo.mkdir()
    records = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(10)]
    (repo / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    real_load, calls = datasets.load_dataset, []

    def load_from_local_repo(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return real_load(str(repo) if path == "peftlab-test/alpaca-mini" else path, name, split=split, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_from_local_repo)
    rows, _ = load_rows(DataConfig(source="peftlab-test/alpaca-mini", split="train"))
    assert calls == [("peftlab-test/alpaca-mini", None, "train")]
    assert [r["output"] for r in rows] == [r["output"] for r in records]
