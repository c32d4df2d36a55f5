"""Building a run's RunSummary from what it loaded, trained and measured (the record itself: run/summary.py).

Owns what goes into a summary: the metrics a training run reports, its parameter counts, resources
and placement, the data counts with the majority-class floor, the warnings (the data loader's and
the small-eval one), and the environment with the hashes of what the numbers came from.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from peftlab.config import RunConfig, config_to_dict
from peftlab.core.methods import Prepared
from peftlab.core.params import count_params
from peftlab.inputs.data import TaskData
from peftlab.run.evaluate import EvalResult
from peftlab.run.resources import data_sha256, environment, load_average, model_sha256, peak_memory
from peftlab.run.summary import (
    Artifact,
    Best,
    DataInfo,
    Divergence,
    Params,
    PlacedModule,
    Resources,
    RunSummary,
    RunWarning,
    StoppedEarly,
    data_warnings,
    small_eval_warning,
)
from peftlab.run.train import TrainOutcome


def run_summary(config: RunConfig, out_dir: Path, data: TaskData, prepared: Prepared, outcome: TrainOutcome,
                samples: list[dict], artifact: Artifact, device: torch.device, started: float,
                env: dict[str, Any], *, extra_metrics: dict[str, float] | None = None) -> RunSummary:
    """A training run's summary (collapse is added by the caller, which judged it).

    ``extra_metrics``: what the run measured after training besides its evaluation: forgetting
    (reference_loss_before, reference_loss_after, forgetting; run/forgetting.py) and generation
    scores (gen_examples, gen_<metric>; run/generation.py)."""
    divergence = Divergence.from_json(outcome.divergence) if outcome.divergence else None
    return RunSummary(
        status=outcome.status, name=config.name or out_dir.name, model=config.model, task=config.task,
        method=config.method.name, metrics={**_metrics(outcome), **(extra_metrics or {})},
        params=Params(prepared.trainable_params, prepared.total_params, prepared.percent_trainable),
        resources=_resources(outcome.state.train_seconds, outcome.state.train_tokens, outcome.tokens_per_s,
                             outcome.state.step, outcome.total_steps, artifact.bytes, device, outcome.load_avg_max),
        divergence=divergence,
        placement=[PlacedModule(t.name, t.layer, t.role, list(t.slices) if t.slices else None,
                                prepared.ranks.get(t.name)) for t in prepared.targets],
        artifacts=artifact, samples=samples, best=_best(config, outcome),
        stopped_early=StoppedEarly(outcome.early_stop.step, outcome.early_stop.reason) if outcome.early_stop else None,
        **_common(config, data, env, started))


def _best(config: RunConfig, outcome: TrainOutcome) -> Best | None:
    """keep_best's record: which step the summary's metrics and the exported weights are from, and the last's."""
    metric, best, last = config.train.keep_best, outcome.best, outcome.last_eval
    if metric is None or best is None or last is None:
        return None
    value = best.result.loss if metric == "eval_loss" else best.result.accuracy
    return Best(metric, best.step, value, last.step, last.result.as_metrics())


def reference_summary(config: RunConfig, out_dir: Path, data: TaskData, model: torch.nn.Module, result: EvalResult,
                      divergence: str | None, device: torch.device, started: float,
                      env: dict[str, Any]) -> RunSummary:
    """The untrained base model's summary, shaped as a run's so reports read both the same way."""
    return RunSummary(
        status="diverged" if divergence else "completed", role="reference", name=config.name or out_dir.name,
        model=config.model, task=config.task, method="none", metrics=result.as_metrics(),
        params=Params(0, count_params(model)[1], 0.0),
        resources=_resources(0.0, 0, 0.0, 0, 0, 0, device, load_average()),
        divergence=Divergence(0, divergence, []) if divergence else None, placement=[],
        artifacts=Artifact("none", None, 0, "reference: the untrained base model"), samples=[],
        **_common(config, data, env, started))


def _metrics(outcome: TrainOutcome) -> dict[str, float]:
    """The final evaluation, the same measures on training examples (train_eval_loss, ...), the last train loss."""
    metrics: dict[str, float] = {}
    if outcome.final_eval is not None:
        metrics.update(outcome.final_eval.as_metrics())
    if outcome.train_eval is not None:
        metrics.update({"train_" + k: v for k, v in outcome.train_eval.as_metrics().items()})
    train_losses = [r["train_loss"] for r in outcome.history if "train_loss" in r]
    if train_losses:
        metrics["train_loss"] = train_losses[-1]
    return metrics


def _resources(train_seconds: float, train_tokens: int, tokens_per_s: float, steps: int, total_steps: int,
               adapter_bytes: int, device: torch.device, load_avg_max: float | None) -> Resources:
    """Resources with the peak memory since the reset, the highest load average and the CPU count:
    other work on the machine slows a run, so the report names runs that shared it."""
    memory = peak_memory(device)
    return Resources(train_seconds, train_tokens, tokens_per_s, steps, total_steps, adapter_bytes,
                     memory["peak_memory_mb"], memory["memory_kind"], load_avg_max, os.cpu_count())


def run_warnings(data: TaskData) -> list[RunWarning]:
    """The data loader's warnings, then the small-eval one when the eval set is too small."""
    warnings = data_warnings(list(data.warnings))
    small = small_eval_warning(len(data.eval))
    return warnings + ([small] if small is not None else [])


def _common(config: RunConfig, data: TaskData, env: dict[str, Any], started: float) -> dict[str, Any]:
    """The part of a summary every kind of run shares: data, warnings, environment, timing, config."""
    return {
        "data": DataInfo(len(data.train), len(data.eval), *majority_class(data.eval, data.label_names),
                         template=data.template),
        "warnings": run_warnings(data),
        "environment": env,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "wall_seconds": time.time() - started,
        "config": config_to_dict(config),
    }


def majority_class(examples: list[dict], label_names: list[str] | None) -> tuple[str | None, float | None]:
    """(label, accuracy) of always answering the eval set's most frequent class: the floor a classifier must beat.

    (None, None) for tasks without labels.
    """
    if not examples or "label" not in examples[0]:
        return None, None
    counts = Counter(int(e["label"]) for e in examples)
    label, count = counts.most_common(1)[0]
    name = label_names[label] if label_names and label < len(label_names) else str(label)
    return name, count / len(examples)


def run_environment(device: torch.device, source: str, data: TaskData) -> dict[str, Any]:
    """Device and software, plus hashes of what the numbers came from: model weights and examples."""
    env = environment(device)
    digest = model_sha256(source)
    if digest is not None:
        env["model_sha256"] = digest
    env["data_sha256"] = data_sha256(data.train, data.eval)
    return env
