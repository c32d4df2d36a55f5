"""peftlab: controlled, reproducible comparisons of parameter-efficient fine-tuning strategies.

The Python API the README shows, importable from here::

    from peftlab import load_config, run_experiment
    summary = run_experiment(load_config("examples/quickstart.yaml", ["train.max_steps=5"]), "runs/api")

Each name is imported on first use (PEP 562), so ``import peftlab`` and ``peftlab --help`` stay fast:
torch and transformers load only when a name that needs them is touched. Where each lives is the
tree's data flow: config -> core (surgery) -> inputs (models, data) -> run (one experiment) ->
study (sweeps, verdicts, report); see docs/architecture.md.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    # config
    "RunConfig": "peftlab.config", "load_config": "peftlab.config",
    # core: what is adapted and how
    "build_model_map": "peftlab.core.modelmap", "select_targets": "peftlab.core.placement",
    "allocate_ranks": "peftlab.core.ranks", "prepare": "peftlab.core.methods",
    "export_peft_adapter": "peftlab.core.export", "import_peft_adapter": "peftlab.core.export",
    "export_merged": "peftlab.core.export",
    # inputs
    "load_model": "peftlab.inputs.models", "load_task_data": "peftlab.inputs.data",
    # one run
    "run_experiment": "peftlab.run.experiment", "inspect_placement": "peftlab.run.inspection",
    "RunSummary": "peftlab.run.summary", "read_summary": "peftlab.run.summary",
    # a finished run
    "load_finished": "peftlab.run.finished", "evaluate_run": "peftlab.run.reuse", "merge_run": "peftlab.run.reuse",
    "push_run": "peftlab.run.push",
    # many runs
    "load_sweep": "peftlab.study.sweep", "run_sweep": "peftlab.study.executors",
    "make_report": "peftlab.study.report",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'peftlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
