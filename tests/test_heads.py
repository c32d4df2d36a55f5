"""Classification heads no name table lists (XLNet, T5) are found, trained by every method, and learn.

Each model is a base checkpoint (no head) saved to disk and loaded for classification, so its head
is genuinely new: transformers reports it in missing_keys, exactly as with a real pretrained base.
"""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_tokenizer
from transformers import T5Config, T5ForConditionalGeneration, XLNetConfig, XLNetModel

from peftlab.config import MethodConfig, RankConfig
from peftlab.core.methods import prepare
from peftlab.core.modelmap import build_model_map
from peftlab.inputs.models import load_model

EOS = 1  # build_tiny_tokenizer: <pad> 0, <eos> 1 (T5's own pad and eos ids)


def _save_base(directory, model) -> str:
    model.save_pretrained(directory)
    build_tiny_tokenizer().save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    vocab = len(build_tiny_tokenizer())
    torch.manual_seed(0)
    xlnet = XLNetModel(XLNetConfig(d_model=32, n_layer=2, n_head=4, d_inner=64, vocab_size=vocab))
    t5 = T5ForConditionalGeneration(T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                             num_heads=4, vocab_size=vocab, pad_token_id=0, eos_token_id=EOS,
                                             decoder_start_token_id=0))
    return {"xlnet": _save_base(tmp_path_factory.mktemp("xlnet"), xlnet),
            "t5": _save_base(tmp_path_factory.mktemp("t5"), t5)}


METHODS = {
    "lora": {"name": "lora", "placement": "all_linear", "ranks": RankConfig(r=2)},
    "adapter": {"name": "adapter", "bottleneck": 4},
    "partial": {"name": "partial", "last_n": 0},
    "full": {"name": "full"},
}
HEADS = {"xlnet": ("sequence_summary.summary.bias", "sequence_summary.summary.weight", "logits_proj.bias",
                   "logits_proj.weight"),
         "t5": ("classification_head.dense.bias", "classification_head.dense.weight",
                "classification_head.out_proj.bias", "classification_head.out_proj.weight")}
METHOD_OWN = ("lora_A", "lora_B", "magnitude", ".adapter.")


def _batch() -> dict[str, torch.Tensor]:
    """Each row ends in exactly one eos: T5's classifier pools there (and insists on one per row)."""
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.cat([torch.randint(2, 100, (4, 7), generator=generator), torch.full((4, 1), EOS)], dim=1)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": torch.tensor([0, 1, 2, 1])}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("arch", sorted(HEADS))
def test_new_head_trains_with_every_method(base_dirs, arch, method):
    loaded = load_model(base_dirs[arch], "classification", num_labels=3)
    assert sorted(loaded.new_weights) == sorted(HEADS[arch])
    model = loaded.model
    model_map = build_model_map(model, new_weights=loaded.new_weights)
    prepare(model, MethodConfig(**METHODS[method]), model_map, train_head=True)

    parameters = dict(model.named_parameters())
    trainable = {name for name, p in parameters.items() if p.requires_grad}
    if method == "full":
        assert trainable == set(parameters)
    else:  # exactly the new head trains, besides the method's own parameters
        assert {name for name in trainable if not any(own in name for own in METHOD_OWN)} == set(HEADS[arch])

    before = {name: parameters[name].detach().clone() for name in HEADS[arch]}
    model.train()
    model(**_batch()).loss.backward()
    for name in HEADS[arch]:
        assert parameters[name].grad is not None and parameters[name].grad.abs().sum() > 0, name
    torch.optim.SGD([p for p in parameters.values() if p.requires_grad], lr=0.1).step()
    assert all(not torch.equal(parameters[name], before[name]) for name in HEADS[arch])


def test_the_head_is_found_without_the_load_report_too(base_dirs):
    """The run maps the model as loaded; the head beside the base model is found by structure alone."""
    for arch, heads in HEADS.items():
        model = load_model(base_dirs[arch], "classification", num_labels=3).model
        modules = build_model_map(model).head_modules
        assert {name.rpartition(".")[0] for name in heads} <= {
            name for name, _ in model.named_modules() if any(name == m or name.startswith(m + ".") for m in modules)}
