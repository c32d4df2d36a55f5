"""A run folder before a run starts in it: reusable, a finished run to return, or one to refuse.

Owns the rules ``run_experiment`` and ``evaluate_reference`` check a --out folder against: what
counts as a trained step (``holds_training``), which files a run writes before training
(``RUN_FILES``: such a folder is as good as an empty one), and when --resume returns the finished
summary instead of training again (``FINISHED``) or is refused (a changed config).
"""

from __future__ import annotations

from pathlib import Path

from peftlab.config import RunConfig, changed_keys, config_to_dict, from_dict, load_yaml
from peftlab.errors import UserError
from peftlab.locking import LOCK_FILE
from peftlab.run.checkpoint import has_checkpoint
from peftlab.run.summary import SUMMARY_FILE, RunSummary, read_summary
from peftlab.run.trackers import TRACKERS_FILE
from peftlab.run.tracking import read_records

TRIAL_FILE = "sweep_run.json"  # written by a sweep before the run: which strategy, grid values and seed
FINISHED = ("completed", "collapsed")  # training ran to its end: --resume returns the summary
# what a run (or a sweep, for its runs) writes before training: with no trained step, such a folder is reusable
# (a run alone keeps its tracker files in its folder too: run/trackers.py)
RUN_FILES = frozenset({"config.yaml", "metrics.jsonl", "train.log", LOCK_FILE, TRIAL_FILE, TRACKERS_FILE,
                       "tensorboard", "mlruns", "wandb"})


def check_out_dir(config: RunConfig, out_dir: Path, resume: bool) -> RunSummary | None:
    """Refuse to overwrite a run; on resume, return a finished summary or check the config matches.

    A folder that holds no trained step (``holds_training``) and only files a run writes is as good
    as an empty one, so a command corrected after a mistake (a run that stopped before training)
    runs into the same --out, with or without --resume.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a folder")
    if not out_dir.exists():
        return None
    if not holds_training(out_dir):
        others = sorted(p.name for p in out_dir.iterdir() if p.name not in RUN_FILES and not p.name.endswith(".tmp"))
        if others and not resume:
            raise UserError(f"{out_dir} already holds other files ({', '.join(others[:3])}); choose another --out")
        return None
    if not resume:
        raise UserError(f"{out_dir} already holds a run; pass --resume to continue it, or choose another --out")
    saved_path = out_dir / "config.yaml"
    if saved_path.exists():
        saved = from_dict(RunConfig, load_yaml(saved_path))
        # changed_keys, not !=: an execution-only key (train.max_batch_tokens) is not a changed config
        changed = changed_keys(config_to_dict(saved), config_to_dict(config))
        if changed:
            raise UserError(f"--resume with a different config than the run in {out_dir} "
                            f"(changed: {', '.join(changed)})")
    summary = read_summary(out_dir / SUMMARY_FILE)
    if summary is not None and summary.status in FINISHED:
        return summary
    return None


def check_reference_dir(config: RunConfig, out_dir: Path) -> RunSummary | None:
    """``check_out_dir`` for a reference evaluation: a finished one is returned, a training run refused."""
    previous = check_out_dir(config, out_dir, resume=True)
    if previous is not None and previous.role != "reference":
        raise UserError(f"{out_dir} holds a training run, not a reference evaluation; choose another folder")
    return previous


def holds_training(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds a trained step: a checkpoint, a summary, or a metric line at step >= 1."""
    if has_checkpoint(out_dir) or (out_dir / SUMMARY_FILE).exists():
        return True
    return any(isinstance(r.get("step"), int) and r["step"] >= 1 for r in read_records(out_dir / "metrics.jsonl"))
