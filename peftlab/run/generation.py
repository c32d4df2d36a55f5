"""Generation: greedy completions of eval prompts, batched, and their scores against the reference outputs.

The one home for generation in a run: the recorded samples (train.num_samples) and the generation
metrics (eval.generate) both come from ``generate``. Each prompt's ids are the ones training gave it
(``EvalPrompt.prompt_ids``: the same template; chat with the generation prompt), so the model continues
where it learned to answer. A batch is LEFT-padded, so that every prompt ends in the last column where
decoding continues, with an attention mask that hides the padding (transformers derives the position
ids from it); decoding is greedy and uses the KV cache. A left-padded batch decodes the same tokens as
one prompt at a time (tests/test_generation.py checks it on tiny models), up to float rounding.

Metrics, each a mean over the scored examples (higher is better):
  exact_match  the output equals the reference, both stripped of surrounding whitespace
  contains     the stripped reference appears in the output
  rougeL       ROUGE-L F-measure (rouge-score; its tokenizer lowercases and keeps ASCII letters and digits)
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from peftlab.config import RunConfig
from peftlab.inputs.data import EvalPrompt


@dataclass
class Generation:
    prompt: str
    reference: str
    generated: str  # the completion, decoded without special tokens, stripped

    def as_sample(self) -> dict[str, str]:
        return {"prompt": self.prompt, "reference": self.reference, "generated": self.generated}


@dataclass
class GenerationScores:
    examples: int  # how many eval examples were generated and scored
    means: dict[str, float]  # metric name -> mean over the examples

    def as_metrics(self) -> dict[str, float]:
        """summary.json's gen_<metric> keys (and gen_examples, the count they are means over)."""
        return {"gen_examples": self.examples, **{f"gen_{name}": value for name, value in self.means.items()}}


def _exact_match(generated: str, reference: str) -> float:
    return float(generated.strip() == reference.strip())


def _contains(generated: str, reference: str) -> float:
    return float(reference.strip() in generated)


@functools.lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer  # imported here: only runs that score generations need it

    return rouge_scorer.RougeScorer(["rougeL"])


def _rouge_l(generated: str, reference: str) -> float:
    return _rouge_scorer().score(reference, generated)["rougeL"].fmeasure


SCORERS: dict[str, Callable[[str, str], float]] = {
    "exact_match": _exact_match, "contains": _contains, "rougeL": _rouge_l}


def score(generations: list[Generation], metrics: list[str]) -> GenerationScores:
    """The mean of each metric over ``generations`` (at least one)."""
    if not generations:
        raise ValueError("no generations to score")
    means = {name: sum(SCORERS[name](g.generated, g.reference) for g in generations) / len(generations)
             for name in metrics}
    return GenerationScores(len(generations), means)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask, [len(rows), longest], padding on the left."""
    longest = max(len(row) for row in rows)
    ids = torch.tensor([[pad_id] * (longest - len(row)) + row for row in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (longest - len(row)) + [1] * len(row) for row in rows], dtype=torch.long)
    return ids, mask


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompts: list[EvalPrompt], *, max_new_tokens: int,
             batch_size: int, device: torch.device) -> list[Generation]:
    """Greedy completions of ``prompts``, in their order, ``batch_size`` at a time."""
    was_training = model.training
    model.eval()
    encoded = [list(prompt.prompt_ids) for prompt in prompts]
    # Prompts of similar length share a batch (less padding); the results go back to the given order.
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    texts: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        input_ids, attention_mask = left_pad([encoded[i] for i in chunk], tokenizer.pad_token_id)
        output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                pad_token_id=tokenizer.pad_token_id)
        for row, index in enumerate(chunk):  # a row that ended early is padded after its EOS: both are special
            texts[index] = tokenizer.decode(output[row, input_ids.shape[1]:], skip_special_tokens=True).strip()
    model.train(was_training)
    return [Generation(prompt.prompt, prompt.reference, texts[i]) for i, prompt in enumerate(prompts)]


def generate_for_run(model: nn.Module, tokenizer: Any, eval_prompts: list[EvalPrompt], config: RunConfig,
                     device: torch.device, autocast: Any = None) -> tuple[list[dict], GenerationScores | None]:
    """A finished instruction run's samples (the first train.num_samples eval prompts, train.max_new_tokens)
    and generation scores (the first eval.generate.num_examples, eval.generate.max_new_tokens).

    Both start at the first eval prompt, so where the token limits agree the samples are the first of the
    scored generations, generated once.
    """
    wanted = {"samples": (config.train.num_samples, config.train.max_new_tokens)}
    if config.eval.generation_on:
        wanted["scores"] = (config.eval.generate.num_examples, config.eval.generate.max_new_tokens)
    made: dict[int, list[Generation]] = {}  # max_new_tokens -> generations of the first prompts
    for count, tokens in sorted(wanted.values(), reverse=True):  # the longer list first: the shorter reuses it
        count = min(count, len(eval_prompts))
        if count and len(made.get(tokens, [])) < count:
            with autocast if autocast is not None else contextlib.nullcontext():
                made[tokens] = generate(model, tokenizer, eval_prompts[:count], max_new_tokens=tokens,
                                        batch_size=config.train.batch_size, device=device)
    first = {key: made.get(tokens, [])[:count] for key, (count, tokens) in wanted.items()}
    scored = first.get("scores")
    return [g.as_sample() for g in first["samples"]], score(scored, config.eval.generate.metrics) if scored else None
