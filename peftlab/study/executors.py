"""Executors: run a sweep's trials in this process (local) or as Ray tasks (ray).

Both call the same ``run_trial``, which records every outcome in the trial's folder: a failed run
(any exception but a UserError) gets a summary.json with status "failed" and its error, a diverged or
collapsed run keeps the runner's summary, and the sweep goes on. The untrained base model is evaluated
first (the reference trials), so each run can be checked for collapse against it. A UserError is the user's to fix
and stops the sweep (finished trials stay; ``--resume`` continues).

Ray: each trial is a task with one GPU when the cluster has GPUs, else one CPU (``nproc`` of them with
``--nproc``: the trial then runs as a torchrun job, study/multiprocess.py). Workers write into
the same sweep folder, so the driver and every worker must see one filesystem (one machine, or a
shared mount at the same path); the report is then built from that folder as for a local sweep.
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from peftlab.config import config_to_dict
from peftlab.errors import UserError
from peftlab.locking import folder_lock
from peftlab.run.folder import TRIAL_FILE
from peftlab.run.stopping import GracefulStop
from peftlab.run.summary import SUMMARY_FILE, RunSummary, read_summary, write_summary
from peftlab.run.trackers import Scope, require_installed
from peftlab.study.multiprocess import run_in_processes
from peftlab.study.resume import plan
from peftlab.study.sweep import SweepSpec, Trial, expand, write_json_atomic, write_sweep_file

Progress = Callable[[str], None]
_CACHE: Any = None  # one base-model cache per process: the local process, or each Ray worker


def process_model_cache() -> Any:
    """The process's ``BaseModelCache`` (loads each base model once), or None where the runner has none."""
    global _CACHE
    if _CACHE is None:
        try:
            from peftlab.inputs.model_cache import BaseModelCache
        except ImportError:
            return None
        if "model_cache" not in inspect.signature(_run_experiment()).parameters:
            return None
        _CACHE = BaseModelCache()
    return _CACHE


def _run_experiment() -> Callable[..., RunSummary]:
    from peftlab.run.experiment import (
        run_experiment,  # imported late: torch and transformers load only when a trial runs
    )

    return run_experiment


def _run_reference() -> Callable[..., RunSummary]:
    from peftlab.run.experiment import evaluate_reference

    return evaluate_reference


def reference_eval_loss(trial: Trial) -> float | None:
    """The untrained base model's eval loss on this trial's eval set, once its reference trial has completed."""
    if trial.reference is None:
        return None
    try:
        summary = read_summary(trial.out_dir.parent / trial.reference / SUMMARY_FILE)
    except UserError:  # damaged: no collapse check against it (a resumed sweep evaluates the base model again)
        return None
    if summary is None or summary.status != "completed":
        return None
    loss = summary.metrics.get("eval_loss")
    return float(loss) if isinstance(loss, (int, float)) else None


def run_trial(trial: Trial, *, echo: bool = True, model_cache: Any = None, nproc: int = 1) -> RunSummary:
    """Run one trial into its folder and return its summary; failures are recorded, not raised.

    ``nproc`` > 1: a training trial runs as a torchrun job of that many processes (study/multiprocess.py)."""
    write_json_atomic(trial.out_dir / TRIAL_FILE, trial.info())
    extra: dict[str, Any] = {"model_cache": model_cache} if model_cache is not None else {}
    if trial.config.train.report_to:  # only then, so a stand-in runner (tests) need not take a scope
        extra["scope"] = trial_scope(trial)
    started = time.time()
    try:
        if trial.is_reference:
            summary = _run_reference()(trial.config, trial.out_dir, echo=echo, **extra)
        else:
            extra["reference_eval_loss"] = reference_eval_loss(trial)
            # resume=True is safe for a fresh folder too: resume.plan left it empty or with a checkpoint of this config
            summary = (run_in_processes(trial, nproc, extra["reference_eval_loss"], extra.get("scope")) if nproc > 1
                       else _run_experiment()(trial.config, trial.out_dir, resume=True, echo=echo, **extra))
    except UserError as error:
        raise UserError(f"run {trial.run_id}: {error}") from None
    except Exception as error:  # noqa: BLE001 - any bug or OOM in one trial must not end the sweep
        summary = _failed_summary(trial, error, started)
    finally:
        gc.collect()
        _empty_cuda_cache()
    return _record(trial, summary)


def trial_scope(trial: Trial) -> Scope:
    """Where the trackers put a sweep's run: grouped under the sweep's name, with local tracker files
    (one TensorBoard folder, one MLflow store, W&B's offline runs) in the sweep folder, beside runs/."""
    return Scope(trial.run_id, trial.out_dir, trial.out_dir.parent.parent, group=trial.sweep or None,
                 tags={"strategy": trial.strategy, "grid": trial.grid, "seed": trial.seed})


def _record(trial: Trial, summary: RunSummary) -> RunSummary:
    """Write the trial's summary with its sweep info (what the report groups it by); return it as written."""
    return write_summary(trial.out_dir / SUMMARY_FILE, dataclasses.replace(summary, sweep=trial.info()))


def _failed_summary(trial: Trial, error: BaseException, started: float) -> RunSummary:
    """A failed trial's summary: no measurements, the error in one line and in full."""
    return RunSummary(
        status="failed", name=trial.run_id, model=trial.config.model, task=trial.config.task,
        method=trial.config.method.name,
        error=f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}",  # one line; full text below
        traceback=traceback.format_exc(),
        started=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)), wall_seconds=time.time() - started,
        config=config_to_dict(trial.config))


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def status_line(summary: RunSummary) -> str:
    """One line per finished trial for the terminal."""
    status = summary.status
    if status == "failed":
        return f"failed: {summary.error or ''}"
    if status == "diverged" and summary.divergence is not None:
        return f"diverged at step {summary.divergence.step}: {summary.divergence.reason}"
    if status == "collapsed" and summary.collapse is not None:
        return f"collapsed: {summary.collapse.reason}"
    metrics = summary.metrics
    shown = [f"{k}={metrics[k]:.4f}" for k in ("eval_loss", "accuracy") if k in metrics]
    return f"{status} " + " ".join(shown)


def _say(text: str) -> None:
    print(f"peftlab sweep: {text}", file=sys.stderr, flush=True)


# --- local -------------------------------------------------------------------------------------


def time_left(seconds_per_run: list[float], runs_left: int) -> str:
    """"about 42 min left" from the training runs finished so far (their mean), or "" before the first."""
    if not seconds_per_run or runs_left <= 0:
        return ""
    minutes = round(sum(seconds_per_run) / len(seconds_per_run) * runs_left / 60)
    if minutes < 1:
        return "under a minute left"
    hours, minutes = divmod(minutes, 60)
    return f"about {hours} h {minutes:02d} min left" if hours else f"about {minutes} min left"


def run_local(todo: list[tuple[Trial, bool]], *, echo: bool = True, progress: Progress = _say,
              nproc: int = 1) -> list[RunSummary]:
    """Trials one after another in this process, sharing one base-model cache.

    Each finished training run's line ends with an estimate of the time left: the mean wall time of the
    training runs done so far times those still to do (base-model evaluations are quick and not counted).
    A progress bar over the runs (tqdm's, on stderr; off where stderr is not a terminal) stays below the lines.
    """
    cache = process_model_cache()
    summaries, seconds_per_run = [], []
    training_left = sum(1 for trial, _ in todo if not trial.is_reference)
    bar = tqdm(total=len(todo), desc="base models" if training_left == 0 else "sweep", unit="run", file=sys.stderr,
               dynamic_ncols=True, disable=None)

    def say(text: str) -> None:  # the line above the bar, which is drawn again below it
        with tqdm.external_write_mode(file=sys.stderr):
            progress(text)

    with GracefulStop() as stop, bar:  # a signal outside a run's training loop stops the sweep before the next run
        for index, (trial, resumed) in enumerate(todo, 1):
            if stop.requested:
                say(f"stopped before run {index} of {len(todo)}; rerun with --resume to continue")
                raise KeyboardInterrupt
            say(f"[{index}/{len(todo)}] {trial.run_id}" + (" (resuming from its checkpoint)" if resumed else ""))
            started = time.monotonic()
            summary = run_trial(trial, echo=echo, model_cache=cache, nproc=nproc)
            if not trial.is_reference:
                seconds_per_run.append(time.monotonic() - started)
                training_left -= 1
            estimate = time_left(seconds_per_run, training_left)
            say(f"[{index}/{len(todo)}] {trial.run_id}: {status_line(summary)}" + (f"; {estimate}" if estimate else ""))
            bar.update(1)
            summaries.append(summary)
    return summaries


# --- ray ---------------------------------------------------------------------------------------


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UserError("the ray executor needs Ray: pip install 'peftlab[ray]'") from None
    return ray


def _ray_trial(trial: Trial, echo: bool, nproc: int = 1) -> RunSummary | UserError:
    """The Ray task body: a UserError comes back as a value, so the driver can print it as one line."""
    try:
        return run_trial(trial, echo=echo, model_cache=process_model_cache() if nproc == 1 else None, nproc=nproc)
    except UserError as error:
        return UserError(str(error))


def run_ray(todo: list[tuple[Trial, bool]], *, address: str | None = None, echo: bool = True,
            progress: Progress = _say, nproc: int = 1) -> list[RunSummary]:
    """Trials as Ray tasks on a local instance (2 CPUs) or the cluster at ``address``; each training trial
    takes ``nproc`` GPUs (CPUs on a cluster without GPUs), and Ray runs as many side by side as fit."""
    ray = _import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        if address:
            ray.init(address=address, log_to_driver=echo)
        else:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=echo)
    pending: list[Any] = []
    try:
        training, reference = _ray_task(ray, nproc), _ray_task(ray, 1)  # a base-model evaluation needs one
        refs = {(reference if trial.is_reference else training).remote(trial, echo, nproc): trial
                for trial, _ in todo}
        pending = list(refs)
        results: dict[str, RunSummary] = {}
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            trial = refs[done[0]]
            try:
                summary = ray.get(done[0])
            except ray.exceptions.RayError as error:  # the worker died (e.g. killed for memory): record it
                summary = _record(trial, _failed_summary(trial, error, time.time()))
            if isinstance(summary, UserError):
                raise UserError(str(summary))
            results[trial.run_id] = summary
            progress(f"[{len(results)}/{len(todo)}] {trial.run_id}: {status_line(summary)}")
        return [results[trial.run_id] for trial, _ in todo]
    finally:
        for ref in pending:  # interrupted or stopped by a user error: stop the rest; --resume picks them up
            ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()


def _ray_task(ray: Any, nproc: int) -> Any:
    """The trial task with its resources: ``nproc`` GPUs on one node, or ``nproc`` CPUs where there are no GPUs.

    Ray would wait forever for a trial no node can hold, so that is refused here."""
    nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive", True)]
    most_gpus = max((node.get("GPU", 0) for node in nodes), default=0)
    if most_gpus >= 1:
        if most_gpus < nproc:
            raise UserError(f"--nproc {nproc}: each trial needs {nproc} GPUs on one node, and no node of the Ray "
                            f"cluster has more than {most_gpus:g}")
        return ray.remote(num_cpus=1, num_gpus=nproc, max_retries=0)(_ray_trial)
    most_cpus = max((node.get("CPU", 0) for node in nodes), default=0)
    if most_cpus < nproc:
        raise UserError(f"--nproc {nproc}: each trial needs {nproc} CPUs on one node (the cluster has no GPUs), and "
                        f"no node of the Ray cluster has more than {most_cpus:g}")
    return ray.remote(num_cpus=nproc, num_gpus=0, max_retries=0)(_ray_trial)


def execute(todo: list[tuple[Trial, bool]], executor: str = "local", *, address: str | None = None,
            echo: bool = True, progress: Progress = _say, nproc: int = 1) -> list[RunSummary]:
    if nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {nproc}")
    if executor == "local":
        if address:
            raise UserError("--ray-address needs --executor ray")
        return run_local(todo, echo=echo, progress=progress, nproc=nproc)
    if executor == "ray":
        return run_ray(todo, address=address, echo=echo, progress=progress, nproc=nproc)
    raise UserError(f"--executor {executor!r}: use local or ray")


def run_sweep(spec: SweepSpec, out: str | Path, *, executor: str = "local", address: str | None = None,
              resume: bool = False, echo: bool = True, progress: Progress = _say, nproc: int = 1) -> list[RunSummary]:
    """Expand, check the folder (resume rules in resume.plan), run what is left; return every run's summary.

    The base-model reference trials run first and are not among the returned summaries.
    """
    if executor not in ("local", "ray") or (address and executor != "ray"):
        raise UserError("--ray-address needs --executor ray" if address
                        else f"--executor {executor!r}: use local or ray")
    out = Path(out)
    trials = expand(spec, out)
    # a missing tracker client stops the sweep before it writes anything, not at its first run
    require_installed(sorted({name for trial in trials for name in trial.config.train.report_to}))
    with folder_lock(out, "sweep"):  # one sweep per folder: two would train the same runs into the same folders
        return _run_sweep_locked(spec, out, trials, executor, address, resume, echo, progress, nproc)


def _run_sweep_locked(spec: SweepSpec, out: Path, trials: list[Trial], executor: str, address: str | None,
                      resume: bool, echo: bool, progress: Progress, nproc: int = 1) -> list[RunSummary]:
    todo = plan(trials, out, resume=resume)
    write_sweep_file(spec, trials, out)
    runs = [t for t in trials if not t.is_reference]
    trained = [t for t in runs if t.alias_of is None]
    done = len(trained) - sum(not t.is_reference for t, _ in todo)
    progress(f"{spec.name}: {len(runs)} runs ({len(spec.strategies)} strategies x "
             f"{len(runs) // (len(spec.strategies) * len(spec.seeds))} grid points x {len(spec.seeds)} seeds)"
             + _aliases_note(runs) + (f", {done} already done" if done else "") + f", into {out}")
    fresh: dict[str, RunSummary] = {}
    # The base model first: each run's collapse check reads its eval loss.
    for batch in ([item for item in todo if item[0].is_reference], [item for item in todo if not item[0].is_reference]):
        if batch:
            fresh.update({t.run_id: s for (t, _), s in zip(batch, execute(batch, executor, address=address,
                                                                           echo=echo, progress=progress,
                                                                           nproc=nproc), strict=True)})
    return [fresh.get(t.alias_of or t.run_id) or _read_summary(t) for t in runs]


def _aliases_note(runs: list[Trial]) -> str:
    aliases = {(t.strategy, next(o.strategy for o in runs if o.run_id == t.alias_of)) for t in runs if t.alias_of}
    if not aliases:
        return ""
    named = "; ".join(f"{alias} = {original}" for alias, original in sorted(aliases))
    return f" (identical configs trained once and reported under each name: {named})"


def _read_summary(trial: Trial) -> RunSummary:
    """A run this sweep did not run now: resume.plan found it finished, so its summary is there."""
    path = trial.out_dir.parent / (trial.alias_of or trial.run_id) / SUMMARY_FILE
    summary = read_summary(path)
    if summary is None:
        raise UserError(f"{path} disappeared while the sweep ran; rerun with --resume")
    return summary

