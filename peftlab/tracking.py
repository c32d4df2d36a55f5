"""Run logs: metrics.jsonl (one JSON object per logged step or evaluation) and train.log."""

from __future__ import annotations

import json
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
                handle.write(json.dumps(record) + "\n")

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
