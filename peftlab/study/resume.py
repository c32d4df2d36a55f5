"""Resuming a sweep: what each trial's folder holds, and which trials still have to run.

A trial whose summary.json says completed, diverged or collapsed is done (a divergence is a result,
and deterministic: rerunning it would diverge again; delete its folder to redo it). A trial with a
checkpoint continues from it; any other partial trial folder (killed before its first checkpoint, or
failed) is cleared and restarted, so metrics.jsonl never holds two attempts. A kept result must come
from the same config as the sweep file now gives it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from peftlab.config import RunConfig, changed_keys, config_to_dict, from_dict, load_yaml, result_keys
from peftlab.diskio import write_atomic
from peftlab.errors import UserError
from peftlab.run.checkpoint import has_checkpoint
from peftlab.study.sweep import DONE_STATUSES, PATH_KEYS, Trial


def trial_status(out_dir: Path) -> str:
    """new | completed | diverged | failed | checkpoint (resumable) | partial (killed before a checkpoint)."""
    summary = out_dir / "summary.json"
    if summary.is_file():
        status = _summary_status(summary)
        if status in DONE_STATUSES:
            return status
    if has_checkpoint(out_dir):
        return "checkpoint"
    if summary.is_file():
        return "failed"
    return "partial" if out_dir.exists() and any(out_dir.iterdir()) else "new"


def _summary_status(path: Path) -> str:
    """The status a run's summary.json records; a damaged one (a truncated copy) is a one-line UserError."""
    try:
        summary = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is damaged ({(str(error).splitlines() or [''])[0]}); move it away, and "
                        f"--resume redoes that run from its last checkpoint (or from the start)") from None
    status = summary.get("status", "failed") if isinstance(summary, dict) else None
    if not isinstance(status, str):
        raise UserError(f"{path} is damaged (no status); move it away, and --resume redoes that run")
    return status


def plan(trials: list[Trial], out: Path, *, resume: bool) -> list[tuple[Trial, bool]]:
    """Check the sweep dir and return the trials still to run, each with its resume flag.

    Nothing is deleted until every check has passed, so a refused --resume leaves DIR untouched.
    """
    trials = [t for t in trials if t.alias_of is None]  # an alias reads its original's folder
    statuses = {t.run_id: trial_status(t.out_dir) for t in trials}
    if any(status != "new" for status in statuses.values()) and not resume:
        raise UserError(f"{out} already holds this sweep's runs; pass --resume to continue it, or choose another --out")
    for trial in trials:
        if trial.is_reference and statuses[trial.run_id] != "new" and _config_differs(trial):
            statuses[trial.run_id] = "failed"  # a base-model evaluation is cheap and deterministic: redo it
    for trial in trials:  # kept results must come from the same config; restarted ones may change
        if statuses[trial.run_id] in (*DONE_STATUSES, "checkpoint"):
            _check_same_config(trial, resumes=statuses[trial.run_id] == "checkpoint")
    todo = []
    for trial in trials:
        status = statuses[trial.run_id]
        if status in DONE_STATUSES:
            continue
        if status in ("failed", "partial"):
            shutil.rmtree(trial.out_dir)  # a restart from step 0 must not append to an old metrics.jsonl
        todo.append((trial, status == "checkpoint"))
    return todo


def _saved_config(trial: Trial) -> dict[str, Any] | None:
    saved = trial.out_dir / "config.yaml"
    return config_to_dict(from_dict(RunConfig, load_yaml(saved))) if saved.is_file() else None


def _config_differs(trial: Trial) -> bool:
    old = _saved_config(trial)
    return old is not None and result_keys(old) != result_keys(config_to_dict(trial.config))


def _check_same_config(trial: Trial, *, resumes: bool) -> None:
    """Refuse a kept run made with another config; a run that only moved with its checkout is kept, and
    one that ``resumes`` from its checkpoint takes the new paths (run_experiment checks them again)."""
    old, new = _saved_config(trial), config_to_dict(trial.config)
    if old is None:
        return
    if result_keys(old) != result_keys(new):  # where it is reported (train.report_to) may change
        changed = changed_keys(result_keys(old), result_keys(new))
        if _moved_only(old, new, changed):  # the same sweep read from another checkout
            if resumes:
                write_atomic(trial.out_dir / "config.yaml", yaml.safe_dump(new, sort_keys=False))
            return
        raise UserError(f"--resume: run {trial.run_id} was made with a different config (changed: "
                        f"{', '.join(changed) or 'structure'}); use another --out for a changed sweep")


def _moved_only(old: dict[str, Any], new: dict[str, Any], changed: list[str]) -> bool:
    """Whether two configs differ only in where the same files lie: a sweep resumed from another checkout.

    Relative paths in a sweep file are stored absolute (study/sweep.py), so a copied or moved sweep
    folder names its rank file under another folder. The trial's id already says the sweep file names
    the same path; here each changed key must be such a path, with the same file name, and where the old
    file still exists, the same bytes (an edited file is a changed config).
    """
    for key in changed:
        before, after = _dotted(old, key), _dotted(new, key)
        if key not in PATH_KEYS or not isinstance(before, str) or not isinstance(after, str):
            return False
        if Path(before).name != Path(after).name:
            return False
        if Path(before).is_file() and not _same_bytes(Path(before), Path(after)):
            return False
    return True


def _same_bytes(first: Path, second: Path) -> bool:
    return second.is_file() and first.read_bytes() == second.read_bytes()


def _dotted(config: dict[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node
