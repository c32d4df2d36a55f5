"""Collapse: a run that finished but learned nothing, or lost what the base model knew.

Such runs must not be averaged in as results: ``check_collapse`` says why a finished causal-task run
counts as collapsed, and ``mark_collapse`` marks its outcome so.
"""

from __future__ import annotations

import math

import torch

from peftlab.config import CAUSAL_TASKS
from peftlab.run.summary import Collapse
from peftlab.run.tracking import MetricsLog
from peftlab.run.train import TrainOutcome

COLLAPSE_MARGIN = 1.0  # nats worse than the untrained base model on the same eval set: collapsed
UNIFORM_SLACK = 1e-3  # nats: float32 sums of a uniform model's losses land a hair off ln(V)


def check_collapse(task: str, eval_loss: float, vocab_size: int | None,
                   reference_eval_loss: float | None = None) -> Collapse | None:
    """Why a finished causal-task run counts as collapsed, or None.

    A model that predicts every token with probability 1/V scores ln(V): a final eval loss at or
    above that has learned nothing a uniform guess does not know, whatever training reported, and
    a run that ends COLLAPSE_MARGIN nats worse than the untrained base model (the sweep's reference)
    has destroyed what the base model knew. Such runs must not be averaged in as results.
    Classification is not judged here: a classifier stuck at the majority class shows against
    the report's majority-class floor instead.
    """
    if task not in CAUSAL_TASKS:
        return None
    if vocab_size:
        uniform = math.log(vocab_size)
        if eval_loss >= uniform - UNIFORM_SLACK:
            return Collapse(f"eval loss {eval_loss:.4f} is at or above uniform prediction, ln({vocab_size}) = "
                            f"{uniform:.4f}", eval_loss, uniform)
    if reference_eval_loss is not None and eval_loss > reference_eval_loss + COLLAPSE_MARGIN:
        return Collapse(f"eval loss {eval_loss:.4f} is more than {COLLAPSE_MARGIN:g} nats above the untrained "
                        f"base model's {reference_eval_loss:.4f}", eval_loss, reference_eval_loss + COLLAPSE_MARGIN)
    return None


def mark_collapse(outcome: TrainOutcome, task: str, model: torch.nn.Module, reference_eval_loss: float | None,
                  log: MetricsLog) -> Collapse | None:
    """Mark a completed outcome collapsed when ``check_collapse`` says so; return its collapse record."""
    if outcome.status != "completed":
        return None
    collapse = check_collapse(task, outcome.final_eval.loss, output_vocab_size(model), reference_eval_loss)
    if collapse is not None:
        outcome.status = "collapsed"
        log.message(f"collapsed: {collapse.reason}")
    return collapse


def output_vocab_size(model: torch.nn.Module) -> int | None:
    """How many tokens the model chooses between: its lm head's outputs (config.vocab_size otherwise)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(getattr(head, "out_features", None), int):
        return head.out_features
    return getattr(getattr(model, "config", None), "vocab_size", None)
