"""Made-up run summaries for tests that need a run folder without training: RunSummary objects, never raw JSON."""

from __future__ import annotations

from typing import Any

from peftlab.run.summary import Artifact, DataInfo, Params, Resources, RunSummary


def resources(**overrides: Any) -> Resources:
    """A short CPU run's resources; any field can be overridden."""
    values: dict[str, Any] = {"train_seconds": 1.0, "train_tokens": 400, "tokens_per_s": 100.0, "steps": 4,
                              "total_steps": 4, "adapter_bytes": 40, "peak_memory_mb": 5.0, "memory_kind": "peak_rss"}
    return Resources(**{**values, **overrides})


def params(trainable: int = 10, total: int = 100) -> Params:
    return Params(trainable, total, 100 * trainable / total)


def make_summary(status: str = "completed", *, name: str = "run", **fields: Any) -> RunSummary:
    """A summary as a run writes it (instruction task, LoRA, tiny made-up numbers); ``fields`` override any field."""
    values: dict[str, Any] = {
        "model": "tiny", "task": "instruction", "method": "lora", "metrics": {}, "params": params(),
        "resources": resources(), "artifacts": Artifact("none", None, 0, "made up"), "samples": [],
        "data": DataInfo(train_examples=100, eval_examples=6), "started": "2025-01-01T10:00:00", "wall_seconds": 2.0,
    }
    return RunSummary(status=status, name=name, **{**values, **fields})


def failed_summary(name: str, error: str, **fields: Any) -> RunSummary:
    """A failed trial's summary as the executors write it: the error, and no measurement."""
    values: dict[str, Any] = {"model": "tiny", "task": "instruction", "method": "lora", "error": error,
                              "traceback": f"Traceback (most recent call last):\n{error}\n"}
    return RunSummary(status="failed", name=name, **{**values, **fields})
