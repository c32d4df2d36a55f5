"""Tiny randomly initialised models shared by the unit tests (CPU, fixed seeds, seconds)."""

from __future__ import annotations

import os

# No test may reach the network: the hub libraries read these once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
)


def _seeded(build):
    torch.manual_seed(0)
    model = build()
    model.eval()
    return model


def tiny_gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=100)
    return _seeded(lambda: GPT2LMHeadModel(config))


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    return _seeded(lambda: LlamaForCausalLM(config))


def tiny_bert(num_labels: int = 2) -> BertForSequenceClassification:
    config = BertConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                        vocab_size=100, max_position_embeddings=64, num_labels=num_labels)
    return _seeded(lambda: BertForSequenceClassification(config))


def tiny_neox() -> GPTNeoXForCausalLM:
    config = GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                           vocab_size=100, max_position_embeddings=64)
    return _seeded(lambda: GPTNeoXForCausalLM(config))


def tiny_phi3() -> Phi3ForCausalLM:
    config = Phi3Config(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=100, max_position_embeddings=64,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return _seeded(lambda: Phi3ForCausalLM(config))


TINY_BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "bert": tiny_bert, "neox": tiny_neox, "phi3": tiny_phi3}


@pytest.fixture(params=sorted(TINY_BUILDERS))
def any_tiny_model(request):
    return TINY_BUILDERS[request.param]()


@pytest.fixture
def input_ids() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(3, 100, (2, 10), generator=generator)


# --- tiny model directories on disk, as a user's local model would be ------------------------

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "below is an instruction that describes a task write a response that appropriately completes the request",
    "instruction input response what is the capital of france paris is the capital",
    "a good movie with a great cast and a bad ending fresh rotten",
    "to be or not to be that is the question whether tis nobler in the mind",
] * 20


def build_tiny_tokenizer():
    """A small byte-level BPE tokenizer trained offline in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<pad>")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A local dir with a tiny random Llama causal LM and its tokenizer."""
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    directory = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A local dir with a tiny random BERT encoder and a tokenizer."""
    from transformers import BertModel

    tokenizer = build_tiny_tokenizer()
    config = BertConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                        vocab_size=len(tokenizer), max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = BertModel(config)
    directory = tmp_path_factory.mktemp("tiny-bert")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
