"""Best checkpoint and early stopping: what a run's evaluations decide (train.keep_best, train.early_stopping).

``BestTracker`` watches each evaluation of the training loop. With ``keep_best`` it keeps a CPU copy
of the trainable parameters (requires_grad, run/optimizer.py's rule) whenever the metric improves
(lower eval_loss, higher accuracy; ties keep the earlier step), and ``restore`` copies them back into
the model after the final evaluation, which is a candidate too. With ``early_stopping`` it counts the
periodic evaluations in a row that did not beat the best value seen so far by more than ``min_delta``
(the final evaluation is never counted: no training follows it) and says stop at the ``patience``-th.

What it decided is a ``BestState``, saved in every checkpoint (run/checkpoint.py), so a run killed
and resumed keeps the same best weights and the same count as one that ran straight through.

Under torchrun every rank keeps its own tracker: the evaluation result it sees is already reduced
over all ranks (run/evaluate.py sums losses and gathers predictions), so every rank takes the same
keep, restore and stop decisions and no rank trains a step the others skip. Keep it that way: a
decision read from a rank-local number would hang the others in their next collective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftlab.config import TrainConfig
from peftlab.run.evaluate import EvalResult
from peftlab.run.sharding import full, shard_like

HIGHER_IS_BETTER = {"eval_loss": False, "accuracy": True}  # the metrics keep_best may watch


@dataclass
class EvalPoint:
    """One evaluation: the step it was taken after and its result (the metrics a summary reports)."""

    step: int
    result: EvalResult

    def to_json(self) -> dict[str, Any]:
        r = self.result
        return {"step": self.step, "loss": r.loss, "units": r.units, "perplexity": _finite(r.perplexity),
                "accuracy": _finite(r.accuracy), "macro_f1": _finite(r.macro_f1)}

    @classmethod
    def from_json(cls, raw: Any) -> EvalPoint:
        """Strict: a checkpoint is data from disk; anything but the shape to_json writes raises ValueError."""
        if not isinstance(raw, dict) or set(raw) != {"step", "loss", "units", "perplexity", "accuracy", "macro_f1"}:
            raise ValueError("an evaluation record is malformed")
        if not (_is_int(raw["step"]) and _is_int(raw["units"]) and _is_number(raw["loss"])
                and all(raw[k] is None or _is_number(raw[k]) for k in ("perplexity", "accuracy", "macro_f1"))):
            raise ValueError("an evaluation record is malformed")
        return cls(raw["step"], EvalResult(float(raw["loss"]), raw["units"], perplexity=raw["perplexity"],
                                           accuracy=raw["accuracy"], macro_f1=raw["macro_f1"]))


@dataclass
class EarlyStop:
    step: int  # the periodic evaluation after which training stopped
    reason: str  # one line, for train.log and summary.json


@dataclass
class BestState:
    """What the evaluations have decided so far; everything a checkpoint needs to decide the same after resume."""

    best: EvalPoint | None = None  # keep_best: the best evaluation so far (None without keep_best)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # its trainable parameters, CPU clones
    last: EvalPoint | None = None  # the latest evaluation
    reference: float | None = None  # early stopping: the monitored metric's best value
    stale: int = 0  # early stopping: periodic evaluations in a row that did not beat ``reference`` by min_delta
    stopped: EarlyStop | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON part (the weights are the checkpoint's tensors)."""
        return {"best": self.best.to_json() if self.best else None, "last": self.last.to_json() if self.last else None,
                "reference": self.reference, "stale": self.stale,
                "stopped": {"step": self.stopped.step, "reason": self.stopped.reason} if self.stopped else None}

    @classmethod
    def from_json(cls, raw: Any, weights: dict[str, torch.Tensor]) -> BestState:
        """Strict; ValueError when ``raw`` is not what to_json writes, or the weights do not go with it."""
        if not isinstance(raw, dict) or set(raw) != {"best", "last", "reference", "stale", "stopped"}:
            raise ValueError("its best-checkpoint record is malformed")
        stopped = raw["stopped"]
        if not (_is_int(raw["stale"]) and (raw["reference"] is None or _is_number(raw["reference"]))
                and (stopped is None or (isinstance(stopped, dict) and set(stopped) == {"step", "reason"}
                                         and _is_int(stopped["step"]) and isinstance(stopped["reason"], str)))):
            raise ValueError("its best-checkpoint record is malformed")
        best = EvalPoint.from_json(raw["best"]) if raw["best"] is not None else None
        if (best is None) != (not weights):
            raise ValueError("its best weights and best step do not go together")
        return cls(best, weights, EvalPoint.from_json(raw["last"]) if raw["last"] is not None else None,
                   raw["reference"], raw["stale"], EarlyStop(**stopped) if stopped else None)


class BestTracker:
    """Keeps the best weights (train.keep_best) and decides early stopping (train.early_stopping)."""

    def __init__(self, cfg: TrainConfig, parameters: list[tuple[str, nn.Parameter]],
                 state: BestState | None = None) -> None:
        self.keep = cfg.keep_best  # None: no weights are kept
        self.stopping = cfg.early_stopping
        # early stopping watches keep_best's metric, or eval_loss without it
        self.monitor = cfg.keep_best or "eval_loss"
        self.parameters = parameters
        self.state = state or BestState()

    @property
    def stopped(self) -> EarlyStop | None:
        return self.state.stopped

    def observe(self, step: int, result: EvalResult, *, periodic: bool) -> None:
        """Take an evaluation; ``periodic``: one of every eval_every steps (the final one is not)."""
        state = self.state
        state.last = EvalPoint(step, result)
        if self.keep is not None:
            previous = _value(state.best.result, self.keep) if state.best else None
            if _improves(_value(result, self.keep), previous, HIGHER_IS_BETTER[self.keep], 0.0):
                state.best = EvalPoint(step, result)
                # only what trains: the frozen base is the same at every step (a LoRA copy is megabytes)
                # whole tensors (train.fsdp gathers each shard: every rank takes the same decision here)
                state.weights = {name: full(p).detach().to("cpu", copy=True) for name, p in self.parameters}
        if self.stopping is None or not periodic:
            return
        value = _value(result, self.monitor)
        if _improves(value, state.reference, HIGHER_IS_BETTER[self.monitor], self.stopping.min_delta):
            state.reference, state.stale = value, 0
            return
        state.stale += 1
        if state.stale >= self.stopping.patience:
            evaluations = f"{state.stale} evaluation{'s' if state.stale > 1 else ''}"
            state.stopped = EarlyStop(step, f"{self.monitor} did not improve by more than {self.stopping.min_delta:g} "
                                            f"in {evaluations} in a row (best {state.reference:.6g})")

    def restore(self) -> EvalPoint | None:
        """Copy the best weights back into the model; the evaluation the run reports (the best, else the last)."""
        best, last = self.state.best, self.state.last
        if best is None:
            return last
        if last is None or best.step != last.step:  # the model already holds the last evaluation's weights
            with torch.no_grad():
                for name, parameter in self.parameters:
                    parameter.copy_(shard_like(self.state.weights[name], parameter))
        return best


def _improves(value: float, reference: float | None, higher: bool, margin: float) -> bool:
    if reference is None:
        return True
    return value > reference + margin if higher else value < reference - margin


def _value(result: EvalResult, metric: str) -> float:
    value = result.loss if metric == "eval_loss" else result.accuracy
    if value is None:  # the config refuses keep_best: accuracy outside classification
        raise ValueError(f"the evaluation has no {metric}")
    return value


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None  # strict JSON: inf is left out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
