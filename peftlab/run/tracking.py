"""Run logs: metrics.jsonl (one JSON object per logged step or evaluation) and train.log.

Every metric line also goes to the run's experiment trackers (run/trackers.py), so they hold what
metrics.jsonl holds.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from peftlab.diskio import append_line, write_atomic
from peftlab.messages import to_stderr
from peftlab.run.trackers import Trackers


class MetricsLog:
    """Appends metric records to ``metrics.jsonl`` (and its ``trackers``) and messages to ``train.log`` (and stderr)."""

    def __init__(self, directory: Path | None, echo: bool = True, trackers: Trackers | None = None):
        self.directory, self.echo = directory, echo
        self.trackers = trackers if trackers is not None else Trackers()
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        """A metric line: into metrics.jsonl, then to every tracker."""
        record = finite_only(record)
        if self.directory is not None:
            append_line(self.directory / "metrics.jsonl", json.dumps(record, allow_nan=False))
        self.trackers.log(record)

    def message(self, text: str) -> None:
        """A line in train.log, and on stderr when the run echoes."""
        self.to_file(text)
        if self.echo:
            to_stderr(text)

    def to_file(self, text: str) -> None:
        """A line in train.log only: for messages already echoed on their way here (peftlab.messages)."""
        if self.directory is not None:
            append_line(self.directory / "train.log", f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}")

    def truncate_after(self, step: int, history: list[dict] | None = None) -> None:
        """On resume: keep what the log held when the checkpoint at ``step`` was written, each record once.

        Records after ``step`` are dropped. ``history`` (the checkpoint's) decides the evaluations:
        one is kept only at a step where the checkpoint has one, so the final evaluation, which
        comes after the last checkpoint, is not logged twice when a run killed before its summary
        is resumed. Without a checkpoint (step 0, no history) the log is emptied. A torn line (a
        kill or a full disk mid-write) and a repeated record are dropped. The trackers are told to
        take the steps after ``step`` again.
        """
        self.trackers.rewind(step)
        if self.directory is None or not (self.directory / "metrics.jsonl").exists():
            return
        path = self.directory / "metrics.jsonl"
        evals = None if history is None else {r.get("step") for r in history if _is_eval(r)}
        kept, seen = [], set()
        for record in read_records(path):
            at, is_eval = record.get("step", 0), _is_eval(record)
            if not isinstance(at, int) or at > step or (is_eval and evals is not None and at not in evals):
                continue
            if (at, is_eval) not in seen:
                seen.add((at, is_eval))
                kept.append(json.dumps(finite_only(record), allow_nan=False))
        write_atomic(path, "".join(line + "\n" for line in kept))


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON object lines of a metrics.jsonl; a torn or garbled line (a kill mid-write) is skipped."""
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _is_eval(record: dict[str, Any]) -> bool:
    return "eval_loss" in record


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
