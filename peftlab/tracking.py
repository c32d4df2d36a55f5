"""Run logs: metrics.jsonl (one JSON object per logged step or evaluation) and train.log."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends metric records to ``metrics.jsonl`` and messages to ``train.log`` (and stderr)."""

    def __init__(self, directory: Path | None, echo: bool = True):
        self.directory, self.echo = directory, echo
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if self.directory is not None:
            with open(self.directory / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(finite_only(record), allow_nan=False) + "\n")

    def message(self, text: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}"
        if self.directory is not None:
            with open(self.directory / "train.log", "a") as handle:
                handle.write(line + "\n")
        if self.echo:
            print(f"peftlab: {text}", file=sys.stderr)

    def truncate_after(self, step: int) -> None:
        """On resume: drop records a killed run logged after its last checkpoint."""
        if self.directory is None or not (self.directory / "metrics.jsonl").exists():
            return
        path = self.directory / "metrics.jsonl"
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in kept))


def finite_only(value: Any) -> Any:
    """A copy of ``value`` without NaN or +-inf: such dict entries are left out, list items become None.

    Python's json writes them as NaN / Infinity, which strict JSON readers (and pandas, jq) reject;
    a value that is not a number is absent, and the run's divergence record says what it was.
    """
    if isinstance(value, dict):
        return {key: finite_only(item) for key, item in value.items() if not _non_finite(item)}
    if isinstance(value, (list, tuple)):
        return [None if _non_finite(item) else finite_only(item) for item in value]
    return value


def _non_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)
