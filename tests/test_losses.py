import math

import torch
from conftest import tiny_gpt2, tiny_llama

from peftlab.run.evaluate import evaluate, macro_f1, perplexity
from peftlab.run.losses import full_logits_loss_sum, loss_sum


def _batch():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 100, (2, 12), generator=generator)
    labels = input_ids.clone()
    labels[0, :5] = -100  # a prompt: no loss on these
    labels[1, 9:] = -100  # padding
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def test_labelled_position_head_equals_full_logits_loss():
    # The speed path (head only at labelled positions) must give the plain path's loss.
    for model in (tiny_llama(), tiny_gpt2()):
        batch = _batch()
        fast, fast_units = loss_sum(model, batch, "instruction")
        slow, slow_units = full_logits_loss_sum(model, batch)
        assert fast_units == slow_units == int((batch["labels"][:, 1:] != -100).sum())
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_eval_loss_is_token_weighted_and_perplexity_is_its_exp():
    model = tiny_llama()
    first, second = _batch(), _batch()
    second["labels"][0, :10] = -100  # far fewer label tokens in this batch
    result = evaluate(model, [first, second], "instruction")
    sums = [loss_sum(model, b, "instruction") for b in (first, second)]
    expected = sum(float(s.detach()) for s, _ in sums) / sum(n for _, n in sums)
    assert math.isclose(result.loss, expected, rel_tol=1e-6)
    assert math.isclose(result.perplexity, math.exp(result.loss), rel_tol=1e-12)
    assert result.units == sum(n for _, n in sums)


def test_perplexity_overflow_and_non_finite():
    assert perplexity(0.0) == 1.0
    assert perplexity(1e6) == math.inf
    try:
        perplexity(float("nan"))
    except ValueError:
        pass
    else:
        raise AssertionError("perplexity of NaN must raise")


def test_macro_f1_by_hand():
    predicted = torch.tensor([0, 0, 1, 1, 1])
    expected = torch.tensor([0, 1, 1, 1, 0])
    # class 0: tp=1 fp=1 fn=1 -> F1 = 0.5; class 1: tp=2 fp=1 fn=1 -> F1 = 2/3
    assert math.isclose(macro_f1(predicted, expected), (0.5 + 2 / 3) / 2)
