"""Experiment trackers (``train.report_to``): TensorBoard, Weights & Biases and MLflow, one class per backend.

Long because the three backends live together behind one small protocol (``Tracker``), each with its
own start, resume and close, so the rest of peftlab knows only ``Trackers``.

A run's ``MetricsLog`` (run/tracking.py) hands every record it writes to metrics.jsonl to ``Trackers``,
so each tracker holds exactly the lines the run folder holds (train steps with lr and grad_norm,
evaluations); at the end each gets the run's hyperparameters and its final summary metrics, under
``final/``. A sweep passes a ``Scope`` that groups its runs: the sweep name is the W&B group and the
MLflow experiment, and the runs share one TensorBoard folder (a subfolder each) and one MLflow store.

Each backend is an optional dependency (``pip install 'peftlab[wandb]'``); ``require_installed`` checks
them before a run writes anything. Only rank 0 of a multi-process run reports (run/experiment.py).
A resumed run continues the same tracker runs (their ids are kept in ``trackers.json``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import netrc
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from peftlab.config import RunConfig, config_to_dict
from peftlab.diskio import write_atomic
from peftlab.errors import UserError
from peftlab.messages import to_stderr

if TYPE_CHECKING:  # run/summary.py reads metrics.jsonl through run/tracking.py, which feeds these trackers
    from peftlab.run.summary import RunSummary

TRACKERS_FILE = "trackers.json"  # the tracker run ids of this run folder, so a resume continues them
WANDB_PROJECT = "peftlab"  # default W&B project and MLflow experiment of a run outside a sweep
# what each backend imports (TensorBoard is written through torch.utils.tensorboard, which needs it)
MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


@dataclass(frozen=True)
class Scope:
    """Where a run's tracker records go: ``folder`` is the run's, ``root`` holds local tracker files.

    A run alone: root = its folder, no group. A sweep's run: root = the sweep folder, group = its name,
    ``tags`` = the trial's strategy, grid values and seed (sweep.Trial.info).
    """

    name: str
    folder: Path
    root: Path
    group: str | None = None
    tags: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """The scope as one JSON string: a sweep passes it to a multi-process run (study/multiprocess.py)."""
        return json.dumps({"name": self.name, "folder": str(self.folder), "root": str(self.root),
                           "group": self.group, "tags": self.tags})

    @classmethod
    def from_json(cls, text: str) -> Scope:
        raw = json.loads(text)
        return cls(raw["name"], Path(raw["folder"]), Path(raw["root"]), raw.get("group"), raw.get("tags") or {})

    @property
    def tensorboard_dir(self) -> Path:
        return self.root / "tensorboard" / self.name if self.group else self.root / "tensorboard"


def run_scope(config: RunConfig, out_dir: Path) -> Scope:
    """The scope of a run started on its own: everything local goes into its folder."""
    return Scope(config.name or out_dir.resolve().name, out_dir, out_dir)


def require_installed(names: list[str] | tuple[str, ...]) -> None:
    """Refuse (one line) a ``report_to`` whose client library is missing, before anything is written."""
    missing = [name for name in names if importlib.util.find_spec(MODULES[name]) is None]
    if missing:
        raise UserError(f"train.report_to: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
                        f"installed; pip install 'peftlab[{','.join(missing)}]'")


class Tracker(Protocol):
    """One backend. ``log``: a metric line's numbers at its step. ``finish``: status is completed,
    collapsed, diverged, failed or interrupted; ``metrics`` the final summary metrics (empty when none)."""

    def log(self, record: dict[str, float], step: int) -> None: ...

    def rewind(self, step: int) -> None: ...

    def finish(self, status: str, metrics: dict[str, float]) -> None: ...

    def ids(self) -> dict[str, str]: ...


class Trackers:
    """The run's trackers together; a context manager that closes them on any way out of the run."""

    def __init__(self, trackers: list[Tracker] | None = None):
        self.trackers, self.finished = list(trackers or []), False

    def log(self, record: dict[str, Any]) -> None:
        """A metric line: its numbers (not the step) at its step."""
        if not self.trackers:
            return
        step = record.get("step", 0)
        numbers = {key: float(value) for key, value in record.items()
                   if key != "step" and _is_number(value) and math.isfinite(value)}
        for tracker in self.trackers:
            tracker.log(numbers, step if isinstance(step, int) else 0)

    def rewind(self, step: int) -> None:
        """A resume from ``step``: what was logged after it is to be logged again."""
        for tracker in self.trackers:
            tracker.rewind(step)

    def finish(self, summary: RunSummary) -> None:
        """The run's end: its status and final metrics; the trackers are closed."""
        self._close(summary.status, final_metrics(summary))

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, _tb: Any) -> None:
        if kind is None:
            self._close("completed", {})  # a run that returned without a summary (none does today)
            return
        status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        try:
            self._close(status, {})
        except Exception as closing:  # noqa: BLE001 - the run's own error is the one to report
            to_stderr(f"warning: closing the trackers after a {status} run failed: {closing}")

    def _close(self, status: str, metrics: dict[str, float]) -> None:
        if self.finished:
            return
        self.finished = True
        errors = []
        for tracker in self.trackers:  # each is closed even when another fails to
            try:
                tracker.finish(status, metrics)
            except Exception as error:  # noqa: BLE001 - re-raised below, after the others are closed
                errors.append(error)
        if errors:
            raise errors[0]


def open_trackers(config: RunConfig, scope: Scope, *, continuing: bool) -> Trackers:
    """The trackers ``config.train.report_to`` names, started; ``continuing``: a resume of a trained run,
    whose tracker runs (ids in trackers.json) are continued rather than started anew."""
    names = config.train.report_to
    if not names:
        return Trackers()
    require_installed(names)
    saved = _saved_ids(scope.folder) if continuing else {}
    trackers: list[Tracker] = []
    try:
        for name in names:
            trackers.append(_BACKENDS[name](config, scope, saved.get(name), continuing))
    except BaseException:
        Trackers(trackers)._close("failed", {})
        raise
    write_atomic(scope.folder / TRACKERS_FILE,
                 json.dumps({key: value for t in trackers for key, value in t.ids().items()}, indent=1) + "\n")
    return Trackers(trackers)


def final_metrics(summary: RunSummary) -> dict[str, float]:
    """The summary's metrics and measurements, each under ``final/`` (apart from the per-step lines)."""
    values: dict[str, Any] = dict(summary.metrics)
    if summary.params is not None:
        values["trainable_params"] = summary.params.trainable
    if summary.resources is not None:
        values.update(tokens_per_s=summary.resources.tokens_per_s, peak_memory_mb=summary.resources.peak_memory_mb)
    values["wall_seconds"] = summary.wall_seconds
    return {f"final/{key}": float(value) for key, value in values.items()
            if _is_number(value) and math.isfinite(value)}


def hyperparameters(config: RunConfig, scope: Scope) -> dict[str, Any]:
    """The run config as flat dotted keys (``train.lr``), with the sweep's trial info under ``sweep.``."""
    return _flatten({**config_to_dict(config), **_sweep_part(scope)})


# --- backends ------------------------------------------------------------------------------------


class TensorBoardTracker:
    """Scalars per metric line, and an HParams entry (config + final metrics) at the end.

    The writer opens at the first record, so a resume's ``rewind`` can hide the steps after the
    checkpoint (TensorBoard's purge_step); a run started afresh hides whatever an earlier attempt left.
    """

    def __init__(self, config: RunConfig, scope: Scope, _saved_id: str | None, _continuing: bool):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self._writer_class, self.directory = SummaryWriter, scope.tensorboard_dir
        self.hparams = {key: _hparam_value(value) for key, value in hyperparameters(config, scope).items()}
        self.writer: Any = None
        self.purge_step, self.last_step = 0, 0

    def ids(self) -> dict[str, str]:
        return {}

    def rewind(self, step: int) -> None:
        if self.writer is None:
            self.purge_step = step + 1

    def log(self, record: dict[str, float], step: int) -> None:
        writer = self._open()
        for key, value in record.items():
            writer.add_scalar(key, value, step)
        self.last_step = max(self.last_step, step)

    def finish(self, status: str, metrics: dict[str, float]) -> None:
        from torch.utils.tensorboard.summary import hparams

        writer = self._open()
        for key, value in metrics.items():
            writer.add_scalar(key, value, self.last_step)
        # the hparams plugin's three summaries, in this run's own folder (add_hparams would make a new one)
        for summary in hparams({**self.hparams, "status": status}, metrics):
            writer.file_writer.add_summary(summary)
        writer.close()

    def _open(self) -> Any:
        if self.writer is None:
            self.writer = self._writer_class(str(self.directory), purge_step=self.purge_step)
        return self.writer


class WandbTracker:
    """A W&B run: config, a history row per metric line, final metrics in its summary.

    Offline (WANDB_MODE=offline, or no API key configured) it writes the run under ``root``/wandb for
    ``wandb sync`` to upload later. WANDB_PROJECT names the project (default: peftlab).
    """

    def __init__(self, config: RunConfig, scope: Scope, saved_id: str | None, continuing: bool):
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_key_configured() else "offline")
        scope.root.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or WANDB_PROJECT, group=scope.group, name=scope.name,
            dir=str(scope.root), mode=mode, config={**config_to_dict(config), **_sweep_part(scope)},
            id=saved_id if continuing else None, resume="allow" if continuing and saved_id else None,
            settings=wandb.Settings(console="off", silent=True))

    def ids(self) -> dict[str, str]:
        return {"wandb": self.run.id}

    def rewind(self, step: int) -> None:
        """W&B keeps the first record of a step; a resume logs the same values again (resume is exact)."""

    def log(self, record: dict[str, float], step: int) -> None:
        self.run.log(record, step=step)

    def finish(self, status: str, metrics: dict[str, float]) -> None:
        self.run.summary.update({**metrics, "status": status})
        self.run.finish(exit_code=0 if status in ("completed", "collapsed") else 1)


class MlflowTracker:
    """An MLflow run: config as params, a metric point per metric line, final metrics, status at the end.

    With no MLFLOW_TRACKING_URI set, a file store in ``root``/mlruns (mlflow 3 refuses file stores
    unless MLFLOW_ALLOW_FILE_STORE=true, which is set for that store). Experiment: the sweep's name,
    else MLFLOW_EXPERIMENT_NAME, else peftlab.
    """

    def __init__(self, config: RunConfig, scope: Scope, saved_id: str | None, continuing: bool):
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            (scope.root / "mlruns").mkdir(parents=True, exist_ok=True)
            uri = (scope.root / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        self.last_step = 0
        if continuing and saved_id and self._reopen(saved_id):
            return
        experiment = _mlflow_experiment(self.client, scope.group or os.environ.get("MLFLOW_EXPERIMENT_NAME")
                                        or WANDB_PROJECT)
        tags = {"peftlab.folder": str(scope.folder.resolve()),
                **{f"sweep.{key}": str(value) for key, value in _flatten(scope.tags).items()}}
        self.run_id = self.client.create_run(experiment, run_name=scope.name, tags=tags).info.run_id
        self._log_params(hyperparameters(config, scope))

    def ids(self) -> dict[str, str]:
        return {"mlflow": self.run_id}

    def _reopen(self, run_id: str) -> bool:
        """Continue run ``run_id``; False where this store does not hold it (another MLFLOW_TRACKING_URI)."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.update_run(run_id, status="RUNNING")
        except MlflowException:
            return False
        self.run_id = run_id
        return True

    def rewind(self, step: int) -> None:
        """MLflow keeps every point: the steps after the checkpoint get a second, equal point (resume is exact)."""

    def log(self, record: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step) for key, value in record.items()])
        self.last_step = max(self.last_step, step)

    def finish(self, status: str, metrics: dict[str, float]) -> None:
        if metrics:
            self.log(metrics, self.last_step)
        self.client.set_tag(self.run_id, "peftlab.status", status)
        end = {"completed": "FINISHED", "collapsed": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED")
        self.client.set_terminated(self.run_id, end)

    def _log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(key, str(value)[:6000]) for key, value in params.items()]  # mlflow's value length limit
        for start in range(0, len(items), 100):  # mlflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start:start + 100])


_BACKENDS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


# --- helpers -------------------------------------------------------------------------------------


def _saved_ids(folder: Path) -> dict[str, str]:
    try:
        saved = json.loads((folder / TRACKERS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in saved.items()} if isinstance(saved, dict) else {}


def _mlflow_experiment(client: Any, name: str) -> str:
    """The id of experiment ``name``, created if new (a parallel worker may create it first)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # noqa: BLE001 - created meanwhile by another Ray worker: read it back
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _wandb_key_configured() -> bool:
    """Whether W&B has an API key here (WANDB_API_KEY or `wandb login`'s netrc entry); else it runs offline."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _sweep_part(scope: Scope) -> dict[str, Any]:
    return {"sweep": scope.tags} if scope.tags else {}


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _hparam_value(value: Any) -> Any:
    """TensorBoard's hparams take numbers, strings and bools only: anything else as its JSON text."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
