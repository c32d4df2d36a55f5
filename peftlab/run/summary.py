"""A run's summary (summary.json) as one typed record: what every run writes and every report reads.

Owns: ``RunSummary`` and its fixed-shape parts (Params, Resources, Artifact, DataInfo, Divergence,
Collapse, Best, StoppedEarly, PlacedModule, RunWarning), the kinds of warning a run records, the small-eval threshold,
and reading and writing summary.json. Metrics, environment, config, samples and the sweep's trial
info stay dicts: their keys are open sets.

The JSON keys are the ones peftlab has always written, so result folders from before this module
load as they are; only warnings changed, from plain strings to {"kind", "message"} objects, and
older files' strings are still read (``_warning_from_json``). What is written is strict JSON: a NaN
or inf is left out (``finite_only``), never written as NaN/Infinity.

Built from light modules only: ``peftlab report`` reads summaries without importing torch.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from peftlab.diskio import write_atomic
from peftlab.errors import UserError
from peftlab.run.tracking import finite_only

SUMMARY_FILE = "summary.json"
SMALL_EVAL_EXAMPLES = 100  # fewer eval examples than this cannot separate close strategies

# The kinds of RunWarning. The report words its own small-eval warning for the whole sweep, so it
# leaves out each run's SMALL_EVAL warning and lists every other kind.
SMALL_EVAL = "small_eval"  # the eval set is smaller than SMALL_EVAL_EXAMPLES
DATA = "data"  # the data loader's findings (TaskData.warnings): eval-only labels, label gaps, empty texts
WARNING_KINDS = (SMALL_EVAL, DATA)

# The small-eval warning as runs from before warning kinds worded it ("only 20 eval examples: ...").
# Matched exactly, not by "eval examples" alone: a data warning ("1 of 6 eval examples have a label
# that no training example has") contains those words too, and is a data warning.
_OLD_SMALL_EVAL = re.compile(r"^only \d+ eval examples: ")


class DamagedSummary(ValueError):
    """A summary.json that is there but cannot be read as a run summary; the message says why, in one line."""


@dataclass(frozen=True)
class RunWarning:
    kind: str  # one of WARNING_KINDS
    message: str


def small_eval_warning(eval_examples: int) -> RunWarning | None:
    """The warning for an eval set too small to separate close strategies, or None."""
    if eval_examples >= SMALL_EVAL_EXAMPLES:
        return None
    return RunWarning(SMALL_EVAL, f"only {eval_examples} eval examples: differences between strategies may be noise")


def data_warnings(messages: list[str]) -> list[RunWarning]:
    """The data loader's warnings (TaskData.warnings, plain strings) as RunWarnings of kind DATA."""
    return [RunWarning(DATA, message) for message in messages]


def _warning_from_json(raw: Any) -> RunWarning:
    if isinstance(raw, dict):
        return RunWarning(str(raw["kind"]), str(raw["message"]))
    # Older files hold plain strings: the runner's own small-eval sentence is SMALL_EVAL (the report
    # leaves it out, as it always did); every other string came from the data loader.
    text = str(raw)
    return RunWarning(SMALL_EVAL if _OLD_SMALL_EVAL.match(text) else DATA, text)


# --- fixed-shape parts -------------------------------------------------------------------------

_Part = TypeVar("_Part", bound="_Record")


class _Record:
    """A dataclass written as a JSON object of its fields; OPTIONAL fields are left out while None."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ()

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k not in self.OPTIONAL}

    @classmethod
    def from_json(cls: type[_Part], raw: dict[str, Any]) -> _Part:
        """Read the known keys (values as they are: an int stays an int); a missing required key raises."""
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in raw.items() if k in names})


@dataclass
class Params(_Record):
    trainable: int
    total: int
    percent: float  # trainable / total, in percent


@dataclass
class Resources(_Record):
    """What training cost: time, tokens, peak memory, the saved size, and how busy the machine was.

    Every run measures each of these; one that was not a number is left out of the file (strict
    JSON), so reading back gives None for it rather than refusing the whole summary.
    """

    train_seconds: float | None = None
    train_tokens: int | None = None
    tokens_per_s: float | None = None  # non-padding tokens
    steps: int | None = None
    total_steps: int | None = None
    adapter_bytes: int | None = None  # the saved artifact's size (for full fine-tuning: all weights)
    peak_memory_mb: float | None = None
    memory_kind: str | None = None  # cuda_max_allocated | peak_rss | process_peak_rss
    load_avg_max: float | None = None  # highest 1-minute load average; None where the OS has none
    cpu_count: int | None = None
    OPTIONAL: ClassVar[tuple[str, ...]] = ("load_avg_max",)


@dataclass
class Artifact(_Record):
    """The trained parameters on disk: format peft | safetensors | transformers | none, path relative to the run folder.

    ``bytes`` is the size of ``path`` (a folder: all its files). Full and partial runs also keep the
    whole model as ``save_pretrained`` writes it (with the tokenizer) in ``model_path``, ``model_bytes``
    big; for full fine-tuning that folder is the artifact itself (format transformers).
    """

    format: str
    path: str | None
    bytes: int
    note: str | None = None  # why there is no file, or why it is not in the usual form
    model_path: str | None = None  # a folder AutoModel*.from_pretrained loads; None: no whole model was saved
    model_bytes: int | None = None
    OPTIONAL: ClassVar[tuple[str, ...]] = ("note", "model_path", "model_bytes")


@dataclass
class DataInfo(_Record):
    train_examples: int
    eval_examples: int
    # classification: always answering the eval set's most frequent class, the floor a classifier must beat
    eval_majority_label: str | None = None
    eval_majority_accuracy: float | None = None
    template: str | None = None  # instruction: the prompt template the run used (what `peftlab generate` reuses)
    OPTIONAL: ClassVar[tuple[str, ...]] = ("eval_majority_label", "eval_majority_accuracy", "template")


@dataclass
class Divergence(_Record):
    step: int
    reason: str
    parameters: list[str] = field(default_factory=list)  # the parameters that went non-finite


@dataclass
class Collapse(_Record):
    reason: str
    eval_loss: float
    threshold: float


@dataclass
class Best(_Record):
    """train.keep_best: the evaluation whose weights were exported and whose metrics are the summary's.

    The last evaluation's metrics are kept beside it (also in metrics.jsonl, as every evaluation's are)."""

    metric: str  # eval_loss | accuracy
    step: int
    value: float
    last_step: int  # the last evaluation: the final one, or the one training stopped early at
    last_metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class StoppedEarly(_Record):
    """train.early_stopping ended training before its last step; the run is still completed."""

    step: int
    reason: str


@dataclass
class PlacedModule(_Record):
    """One adapted module: its name, layer, role, the slices of a fused projection, and its LoRA rank."""

    module: str
    layer: int | None
    role: str | None
    slices: list[str] | None = None
    rank: int | None = None


def _part(cls: type[_Part], raw: Any) -> _Part | None:
    """A part read back; an empty object or null is None (a failed run measured nothing)."""
    return cls.from_json(raw) if raw else None


def _part_json(part: _Record | None) -> dict[str, Any]:
    return part.to_json() if part is not None else {}  # {} as failed runs have always written it


# --- the summary -------------------------------------------------------------------------------


@dataclass
class RunSummary:
    """summary.json of a training run, a base-model reference evaluation (role "reference") or a failed trial.

    status: completed | diverged | collapsed | failed. Parts a run did not get to are None: a failed
    trial has no params, resources, data or artifact; only a collapsed run has a collapse record.
    """

    status: str
    name: str
    model: str
    task: str
    method: str
    metrics: dict[str, float] = field(default_factory=dict)
    params: Params | None = None
    resources: Resources | None = None
    divergence: Divergence | None = None
    placement: list[PlacedModule] = field(default_factory=list)
    artifacts: Artifact | None = None
    samples: list[dict[str, Any]] | None = None  # instruction runs: generated answers; None: a failed trial
    data: DataInfo | None = None
    warnings: list[RunWarning] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)  # device, versions, model and data hashes
    started: str = ""  # local time, %Y-%m-%dT%H:%M:%S
    wall_seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)  # the resolved RunConfig
    role: str | None = None  # "reference" for the untrained base model's evaluation
    error: str | None = None  # a failed trial: the exception in one line ...
    traceback: str | None = None  # ... and in full
    collapse: Collapse | None = None
    sweep: dict[str, Any] | None = None  # the trial's info when a sweep ran it (sweep.Trial.info)
    best: Best | None = None  # train.keep_best
    stopped_early: StoppedEarly | None = None  # train.early_stopping

    def warning_messages(self, *, leave_out: tuple[str, ...] = ()) -> list[str]:
        return [w.message for w in self.warnings if w.kind not in leave_out]

    def to_json(self) -> dict[str, Any]:
        """The summary.json object, in the order peftlab has always written it, without NaN or inf."""
        payload: dict[str, Any] = {"status": self.status, **_present(role=self.role), "name": self.name,
                                   **_present(error=self.error, traceback=self.traceback),
                                   "model": self.model, "task": self.task, "method": self.method,
                                   "metrics": dict(self.metrics), "params": _part_json(self.params),
                                   "resources": _part_json(self.resources),
                                   "divergence": self.divergence.to_json() if self.divergence else None,
                                   "placement": [p.to_json() for p in self.placement]}
        if self.artifacts is not None:
            payload["artifacts"] = self.artifacts.to_json()
        if self.samples is not None:
            payload["samples"] = [dict(s) for s in self.samples]
        payload.update({"data": _part_json(self.data), "warnings": [asdict(w) for w in self.warnings],
                        "environment": dict(self.environment), "started": self.started,
                        "wall_seconds": self.wall_seconds, "config": self.config,
                        **_present(collapse=self.collapse.to_json() if self.collapse else None, sweep=self.sweep,
                                   best=self.best.to_json() if self.best else None,
                                   stopped_early=self.stopped_early.to_json() if self.stopped_early else None)})
        return finite_only(payload)

    @classmethod
    def from_json(cls, raw: Any) -> RunSummary:
        """Read a summary.json object (also one written before warnings had kinds); DamagedSummary if it is not one."""
        if not isinstance(raw, dict):
            raise DamagedSummary("not a JSON object")
        try:
            return cls._from_object(raw)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise DamagedSummary(_why(error)) from None

    @classmethod
    def _from_object(cls, raw: dict[str, Any]) -> RunSummary:
        return cls(
            status=_text(raw["status"]), name=_text(raw["name"]), model=_text(raw["model"]),
            task=_text(raw["task"]), method=_text(raw["method"]), metrics=dict(raw.get("metrics") or {}),
            params=_part(Params, raw.get("params")), resources=_part(Resources, raw.get("resources")),
            divergence=_part(Divergence, raw.get("divergence")),
            placement=[PlacedModule.from_json(p) for p in raw.get("placement") or []],
            artifacts=_part(Artifact, raw.get("artifacts")),
            samples=None if raw.get("samples") is None else [dict(s) for s in raw["samples"]],
            data=_part(DataInfo, raw.get("data")), warnings=[_warning_from_json(w) for w in raw.get("warnings") or []],
            environment=dict(raw.get("environment") or {}), started=raw.get("started") or "",
            wall_seconds=raw.get("wall_seconds") or 0.0, config=dict(raw.get("config") or {}),
            role=raw.get("role"), error=raw.get("error"), traceback=raw.get("traceback"),
            collapse=_part(Collapse, raw.get("collapse")), sweep=raw.get("sweep"), best=_part(Best, raw.get("best")),
            stopped_early=_part(StoppedEarly, raw.get("stopped_early")))


def _present(**values: Any) -> dict[str, Any]:
    """The keys whose value is not None: keys a summary writes only when they apply (role, error, collapse...)."""
    return {k: v for k, v in values.items() if v is not None}


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected text, found {value!r}")
    return value


def _why(error: BaseException) -> str:
    if isinstance(error, KeyError):
        return f"no {error.args[0]!r}"
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# --- summary.json on disk ----------------------------------------------------------------------


def load_summary(path: Path) -> RunSummary:
    """Read ``path``; FileNotFoundError when it is not there, DamagedSummary when it cannot be read as a summary."""
    if not path.exists():
        raise FileNotFoundError(path)
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as error:  # a truncated copy, a bad sector: never a traceback
        raise DamagedSummary(_why(error)) from None
    return RunSummary.from_json(raw)


def read_summary(path: Path) -> RunSummary | None:
    """A run's summary.json, None when there is none; a damaged one is a one-line UserError."""
    try:
        return load_summary(path)
    except FileNotFoundError:
        return None
    except DamagedSummary as error:
        raise UserError(f"{path} is damaged ({error}); move it away, and --resume redoes the run from its last "
                        f"checkpoint (or from the start)") from None


def write_summary(path: Path, summary: RunSummary) -> RunSummary:
    """Write ``summary`` atomically as strict JSON; return it as written (a NaN or inf left out), to hand on."""
    text = json.dumps(summary.to_json(), indent=2, default=str, allow_nan=False)
    write_atomic(path, text)
    return RunSummary.from_json(json.loads(text))  # exactly what a later read gets (default=str included)
