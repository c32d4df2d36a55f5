"""Generation (peftlab.run.generation): batched greedy decoding and the generation metrics."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_tokenizer
from rouge_score import rouge_scorer
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from peftlab.config import EvalConfig, GenerateConfig, RunConfig, TrainConfig
from peftlab.inputs.data import IGNORE_INDEX, EvalPrompt, encode_prompt, load_task_data
from peftlab.run import generation
from peftlab.run.generation import Generation, generate, generate_for_run, left_pad, score

PAIRS = [("the quick brown fox", "a"), ("to be", "b"), ("below is an instruction that describes a task write", "c"),
         ("what is the capital of france", "d"), ("a good movie", "e")]
# as a run's eval prompts: the ids the training examples' prompts have
PROMPTS = [EvalPrompt(p, r, encode_prompt(build_tiny_tokenizer(), p)) for p, r in PAIRS]


def _model(kind: str, tokenizer):
    torch.manual_seed(0)
    special = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    if kind == "gpt2":  # learned absolute positions: wrong position ids after left padding would show
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=128,
                                          vocab_size=len(tokenizer), **special)).eval()
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                                        max_position_embeddings=128, **special)).eval()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_left_padded_batch_decodes_what_each_prompt_decodes_alone(kind):
    tokenizer = build_tiny_tokenizer()
    model = _model(kind, tokenizer)
    device = torch.device("cpu")
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=5, device=device)
    alone = generate(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=1, device=device)
    assert [g.generated for g in batched] == [g.generated for g in alone]
    assert [(g.prompt, g.reference) for g in batched] == PAIRS  # back in the given order
    assert all(g.generated for g in alone)  # something was generated to compare
    # batch_size=1 is plain greedy decoding of the unpadded prompt
    ids = torch.tensor([tokenizer(PAIRS[2][0], add_special_tokens=False)["input_ids"]])
    direct = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)
    assert alone[2].generated == tokenizer.decode(direct[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_left_pad_puts_padding_before_each_row_and_masks_it():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_generation_prompts_are_the_training_prompts(tiny_llama_dir, tmp_path):
    """The ids fed to generate are exactly a training example's prompt part (labels IGNORE_INDEX)."""
    from test_run import _alpaca
    from transformers import AutoTokenizer

    from peftlab.config import DataConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    data = load_task_data(DataConfig(source=str(_alpaca(tmp_path / "a.jsonl")), eval_size=4), "instruction", tokenizer)
    seen = []

    class Recorder(torch.nn.Module):
        def generate(self, input_ids, attention_mask, **kwargs):
            seen.extend(row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask, strict=True))
            return torch.cat([input_ids, input_ids[:, :1]], dim=1)

    generate(Recorder(), tokenizer, data.eval_prompts, max_new_tokens=1, batch_size=3, device=torch.device("cpu"))
    expected = [[i for i, label in zip(e["input_ids"], e["labels"], strict=True) if label == IGNORE_INDEX]
                for e in data.eval]
    assert sorted(seen) == sorted(expected) and len(seen) == 4


def test_metrics_exact_match_contains_and_rouge_l():
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    generations = [Generation("p", "Paris", "  Paris \n"), Generation("p", "the cat sat", "the cat sat on the mat"),
                   Generation("p", "blue", "red")]
    result = score(generations, ["exact_match", "contains", "rougeL"])
    assert result.examples == 3
    assert result.means["exact_match"] == pytest.approx(1 / 3)  # whitespace around the answer does not count
    assert result.means["contains"] == pytest.approx(2 / 3)
    # LCS 3 of 6 generated and 3 of 3 reference tokens: F = 2 * 0.5 * 1 / 1.5
    assert result.means["rougeL"] == pytest.approx((1 + 2 * 0.5 / 1.5 + 0) / 3)
    assert result.means["rougeL"] == pytest.approx(
        sum(scorer.score(g.reference, g.generated)["rougeL"].fmeasure for g in generations) / 3)
    assert result.as_metrics() == {"gen_examples": 3, "gen_exact_match": result.means["exact_match"],
                                   "gen_contains": result.means["contains"], "gen_rougeL": result.means["rougeL"]}
    assert set(score(generations, ["contains"]).means) == {"contains"}  # only the metrics asked for


def _run_config(samples: int, sample_tokens: int, examples: int, tokens: int) -> RunConfig:
    generate_cfg = GenerateConfig(max_new_tokens=tokens, num_examples=examples) if examples else None
    return RunConfig(train=TrainConfig(num_samples=samples, max_new_tokens=sample_tokens, batch_size=2),
                     eval=EvalConfig(generate=generate_cfg))


@pytest.mark.parametrize(("config", "calls"), [
    (_run_config(2, 8, 4, 8), [(4, 8)]),  # same token limit: the samples are the first scored generations
    (_run_config(2, 8, 4, 5), [(4, 5), (2, 8)]),
    (_run_config(6, 8, 3, 8), [(5, 8)]),  # capped at the 5 eval prompts; the scores reuse the samples' run
    (_run_config(2, 8, 0, 8), [(2, 8)]),  # generation metrics off
    (_run_config(0, 8, 0, 8), []),
])
def test_samples_and_scores_share_one_generation_where_they_can(config, calls, monkeypatch):
    made = []

    def fake(model, tokenizer, prompts, *, max_new_tokens, batch_size, device):
        made.append((len(prompts), max_new_tokens))
        return [Generation(p.prompt, p.reference, p.reference if i % 2 == 0 else "x") for i, p in enumerate(prompts)]

    monkeypatch.setattr(generation, "generate", fake)
    samples, scores = generate_for_run(None, None, PROMPTS, config, torch.device("cpu"))
    assert made == calls
    assert len(samples) == min(config.train.num_samples, len(PROMPTS))
    assert [s["prompt"] for s in samples] == [p for p, _ in PAIRS[:len(samples)]]
    if config.eval.generation_on:
        count = min(config.eval.generate.num_examples, len(PROMPTS))
        assert scores.examples == count
        assert scores.means["exact_match"] == pytest.approx(sum(i % 2 == 0 for i in range(count)) / count)
    else:
        assert scores is None
