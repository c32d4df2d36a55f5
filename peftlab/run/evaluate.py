"""Evaluation: token-weighted eval loss, perplexity, accuracy and macro-F1 (generation: run/generation.py).

Perplexity is defined here and only here: exp of the token-weighted mean eval
loss. (Seed 000 reported loss 3.09 with perplexity 4283; exp(3.09) is 22.)
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from peftlab.run.distributed import SINGLE, World, gather_objects, sum_across
from peftlab.run.losses import LossFn, classification_loss_sum, label_units, loss_sum
from peftlab.run.sharding import FILLER


def perplexity(mean_token_loss: float) -> float:
    """exp(token-weighted mean loss); inf when it overflows, never a silent NaN."""
    if not math.isfinite(mean_token_loss):
        raise ValueError(f"perplexity of a non-finite loss ({mean_token_loss}) is undefined")
    return math.exp(mean_token_loss) if mean_token_loss < 700 else math.inf


@dataclass
class EvalResult:
    loss: float  # token-weighted mean (causal tasks) or mean over examples (classification)
    units: int  # label tokens, or examples for classification
    perplexity: float | None = None  # causal tasks only
    accuracy: float | None = None  # classification only
    macro_f1: float | None = None  # classification only
    # What the evaluation cost (batch building included): a measurement, never a metric of the model,
    # so as_metrics leaves them out and a run's logged numbers do not depend on the machine's speed.
    seconds: float = 0.0  # wall
    cpu_seconds: float = 0.0  # this process's CPU time

    def as_metrics(self) -> dict[str, float]:
        metrics = {"eval_loss": self.loss, "eval_units": self.units}
        for key in ("perplexity", "accuracy", "macro_f1"):
            value = getattr(self, key)
            if value is not None and math.isfinite(value):  # exp of a huge loss overflows: absent, not inf
                metrics[key] = value
        return metrics


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], task: str,
             autocast: "torch.autocast | None" = None, *, loss: LossFn = loss_sum, world: World = SINGLE,
             device: torch.device | None = None) -> EvalResult:
    """Evaluate over ``batches`` (already on the model's device), timed.

    ``loss``: the causal tasks' batch loss (classification computes its loss from the logits it
    needs for accuracy). ``world``: with several ranks, ``batches`` are this rank's shares and the
    sums (and classification's predictions) are combined over all ranks (on ``device``), so every
    rank returns the result one process would.
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    result = _evaluate(model, batches, task, autocast, loss, world, device or torch.device("cpu"))
    result.seconds, result.cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return result


def _evaluate(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], task: str,
              autocast: "torch.autocast | None", loss: LossFn, world: World, device: torch.device) -> EvalResult:
    was_training = model.training
    model.eval()
    total, units = 0.0, 0
    predictions: list[torch.Tensor] = []
    gold: list[torch.Tensor] = []
    for batch in batches:
        if FILLER in batch:  # a sharded rank with no rows of this batch: the forward only keeps it in step
            with autocast if autocast is not None else contextlib.nullcontext():
                _forward_only(model, batch, task, loss)
            continue
        with autocast if autocast is not None else contextlib.nullcontext():
            if task == "classification":
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                batch_sum, batch_units = classification_loss_sum(logits, batch["label"]), label_units(batch, task)
                predictions.append(logits.argmax(-1).cpu())
                gold.append(batch["label"].cpu())
            else:
                batch_sum, batch_units = loss(model, batch, task)
        total += float(batch_sum)
        units += batch_units
    model.train(was_training)
    total, units = sum_across([total, units], world, device)
    units = int(units)
    if units == 0:
        raise ValueError("the evaluation set has no label tokens")
    mean = total / units
    if task == "classification":
        predicted = torch.tensor(gather_objects(torch.cat(predictions).tolist() if predictions else [], world))
        expected = torch.tensor(gather_objects(torch.cat(gold).tolist() if gold else [], world))
        return EvalResult(mean, units, accuracy=float((predicted == expected).float().mean()),
                          macro_f1=macro_f1(predicted, expected))
    return EvalResult(mean, units, perplexity=perplexity(mean) if math.isfinite(mean) else None)


def _forward_only(model: nn.Module, batch: dict[str, torch.Tensor], task: str, loss: LossFn) -> None:
    """Run the model on ``batch`` and drop the result (run/sharding.py: every rank gathers each block)."""
    if task == "classification":
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    else:
        loss(model, batch, task)


def macro_f1(predicted: torch.Tensor, expected: torch.Tensor) -> float:
    """Unweighted mean of per-class F1 over the classes present in either tensor."""
    scores = []
    for label in torch.unique(torch.cat([predicted, expected])).tolist():
        true_pos = int(((predicted == label) & (expected == label)).sum())
        false_pos = int(((predicted == label) & (expected != label)).sum())
        false_neg = int(((predicted != label) & (expected == label)).sum())
        denominator = 2 * true_pos + false_pos + false_neg
        scores.append(2 * true_pos / denominator if denominator else 0.0)
    return sum(scores) / len(scores)
