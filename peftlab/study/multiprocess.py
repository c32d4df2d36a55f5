"""A sweep's training trial as one multi-process run: ``peftlab run --nproc N`` under torchrun.

``peftlab sweep --nproc N`` gives every training run N processes (N GPUs, or N CPU processes with gloo),
data parallel as run/distributed.py does it, with ``train.fsdp`` where the config asks. The run is a
child torchrun job rather than this process, because a process group spans processes that torchrun
starts together; the trial's config travels as a YAML file, the base model's eval loss (the collapse
check) and the trackers' scope (the sweep's grouping) as hidden arguments, and the summary comes back
through the run folder, as for any run.
The base-model reference trials stay in-process: one evaluation needs no second process.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import yaml

from peftlab.config import config_to_dict
from peftlab.errors import UserError
from peftlab.run.distributed import torchrun_command
from peftlab.run.summary import SUMMARY_FILE, RunSummary, read_summary
from peftlab.run.trackers import Scope
from peftlab.study.sweep import Trial

USER_ERROR_PREFIX = "peftlab: error: "  # how `peftlab run` prints a UserError (cli.py) before exiting 2
OUTPUT_TAIL = 20  # lines of the job's output kept in a failed trial's error


class TrialProcessesFailed(RuntimeError):
    """The torchrun job ended without a summary: the sweep records the trial as failed, with the output's end."""


def run_in_processes(trial: Trial, nproc: int, reference_eval_loss: float | None,
                     scope: Scope | None = None) -> RunSummary:
    """Run ``trial`` as a torchrun job of ``nproc`` processes into its folder (resuming what is there);
    ``scope``: where its trackers report (grouped with the sweep's runs), passed on as JSON."""
    with tempfile.TemporaryDirectory(prefix="peftlab-trial-") as scratch:
        config = Path(scratch) / "config.yaml"
        config.write_text(yaml.safe_dump(config_to_dict(trial.config), sort_keys=False))
        args = [str(config), "--out", str(trial.out_dir), "--resume"]
        if reference_eval_loss is not None:
            args += ["--reference-eval-loss", repr(reference_eval_loss)]
        if scope is not None:
            args += ["--tracker-scope", scope.to_json()]
        output = Path(scratch) / "output.log"
        with output.open("w") as handle:
            returncode = subprocess.run(torchrun_command(nproc, args), stdout=handle, stderr=subprocess.STDOUT,
                                        check=False).returncode
        lines = output.read_text(errors="replace").splitlines()
    mistakes = [line[len(USER_ERROR_PREFIX):] for line in lines if line.startswith(USER_ERROR_PREFIX)]
    if mistakes:  # the user's to fix: stops the sweep like an in-process run's UserError
        raise UserError(mistakes[-1])
    summary = read_summary(trial.out_dir / SUMMARY_FILE)
    if summary is None:
        tail = "\n".join(lines[-OUTPUT_TAIL:])
        raise TrialProcessesFailed(f"torchrun with {nproc} processes exited with {returncode} and wrote no "
                                   f"summary; its output ended:\n{tail}")
    return summary
