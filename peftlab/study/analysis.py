"""A sweep folder read into an Analysis: its runs, one flat row per run, groups, comparisons, Pareto flags.

Inputs: ``DIR/sweep.json`` (the sweep file as run: strategies, baseline, and the list of its trials),
``DIR/runs/<id>/summary.json`` for each listed trial (read as a RunSummary) and ``metrics.jsonl`` for
the curves. Folders under ``DIR/runs`` that the sweep does not list (an older version of the sweep
file, say) are named (``strays``) and never averaged in; a run without a readable summary is listed
with the reason. The paired comparisons by seed (peftlab.study.stats) are Holm-adjusted across the
pairs of each metric. Tables (tables.py) and the report document (report.py) are written from this.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.diskio import read_json_object
from peftlab.errors import UserError
from peftlab.run.folder import TRIAL_FILE
from peftlab.run.summary import SUMMARY_FILE, DamagedSummary, RunSummary, load_summary
from peftlab.study.stats import Comparison, GroupStats, aggregate, compare_all, group_label, mark_pareto
from peftlab.study.sweep import REFERENCE, SWEEP_FILE

# Quality metrics compared pairwise, per task; the first is the report's quality metric. Perplexity is
# exp(eval_loss): its verdicts are eval_loss's. A metric no run has (generation scores and forgetting are
# measured only when the config's eval section asks) gives no comparisons.
GENERATION_KEYS = ("gen_exact_match", "gen_rougeL", "gen_contains")  # run/generation.py: gen_<metric>
FORGETTING_KEYS = ("forgetting", "reference_loss_before", "reference_loss_after")  # run/forgetting.py
QUALITY_METRICS = {"classification": ("accuracy", "macro_f1", "eval_loss"),
                   "instruction": ("eval_loss", *GENERATION_KEYS, "forgetting"),
                   "causal_lm": ("eval_loss", "forgetting")}
HIGHER_IS_BETTER = {"accuracy": True, "macro_f1": True, "eval_loss": False, "perplexity": False,
                    **{key: True for key in GENERATION_KEYS}, "forgetting": False}
RESOURCE_KEYS = ("train_seconds", "tokens_per_s", "peak_memory_mb", "memory_kind", "adapter_bytes", "steps",
                 "total_steps", "train_tokens", "load_avg_max", "cpu_count")
AGGREGATED = ("eval_loss", "perplexity", "accuracy", "macro_f1", "train_accuracy", "train_loss",
              "trainable_params", "percent_trainable", "train_seconds", "tokens_per_s", "peak_memory_mb",
              "adapter_bytes", *GENERATION_KEYS, *FORGETTING_KEYS)


@dataclass
class RunRecord:
    run_id: str
    strategy: str
    strategy_index: int
    grid: dict[str, Any]
    seed: int | None
    status: str  # completed | diverged | collapsed | failed | unfinished
    reason: str  # why a run is not in the means
    summary: RunSummary | None  # None: no summary.json yet, or a damaged one (``reason`` says which)
    directory: Path


# --- reading run folders -----------------------------------------------------------------------


def load_runs(directory: Path, trials: list[dict[str, Any]] | None = None) -> list[RunRecord]:
    """The sweep's trials (``trials`` from sweep.json; an alias reads its original's folder), else every folder."""
    if trials is None:
        trials = [{"run_id": p.name} for p in sorted((directory / "runs").glob("*")) if p.is_dir()]
    runs = [_load_run(directory / "runs" / (t.get("alias_of") or t["run_id"]), t) for t in trials]
    return sorted(runs, key=lambda r: (r.strategy_index, r.strategy, json.dumps(r.grid, default=str), r.seed or 0))


def _load_run(run_dir: Path, listed: dict[str, Any]) -> RunRecord:
    summary, damage = _read_summary(run_dir / SUMMARY_FILE)
    info = {**((summary.sweep if summary else None) or read_json_object(run_dir / TRIAL_FILE) or {}),
            **{k: v for k, v in listed.items() if v is not None}}
    config = summary.config if summary else {}
    status = summary.status if summary else "unfinished"
    return RunRecord(
        run_id=info.get("run_id", run_dir.name), strategy=info.get("strategy", run_dir.name),
        strategy_index=info.get("strategy_index", 0), grid=info.get("grid") or {},
        seed=info.get("seed", (config.get("train") or {}).get("seed")), status=status,
        reason=damage or _reason(status, summary), summary=summary, directory=run_dir)


def _read_summary(path: Path) -> tuple[RunSummary | None, str | None]:
    """(the run's summary, None); (None, why) for one that is there but damaged (a truncated copy); (None, None)."""
    try:
        return load_summary(path), None
    except FileNotFoundError:
        return None, None
    except DamagedSummary as error:
        return None, f"summary.json is damaged ({error}): move it away, and peftlab sweep --resume redoes the run"


def stray_folders(directory: Path, trials: list[dict[str, Any]] | None) -> list[str]:
    """Run folders under DIR/runs that the current sweep file does not list."""
    if trials is None:
        return []
    listed = {t["run_id"] for t in trials} | {t["alias_of"] for t in trials if t.get("alias_of")}
    return sorted(p.name for p in (directory / "runs").glob("*") if p.is_dir() and p.name not in listed)


def _reason(status: str, summary: RunSummary | None) -> str:
    """Why a run is not in the means ("" for a completed one)."""
    if status == "unfinished" or summary is None:
        return "no summary.json: interrupted or still running (peftlab sweep --resume continues it)"
    if status == "failed":
        return summary.error or "failed without an error message"
    if status == "diverged":
        d = summary.divergence
        named = ", ".join(d.parameters[:3]) if d else ""
        return (f"diverged at step {d.step if d else None}: {d.reason if d else None}"
                + (f" (parameters: {named})" if named else ""))
    if status == "collapsed":
        return f"collapsed: {summary.collapse.reason if summary.collapse else 'no reason recorded'}"
    return ""


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl records; a half-written last line (a killed run) is skipped."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records



def result_row(run: RunRecord) -> dict[str, Any]:
    """One flat row: the run's sweep settings, status and every metric of its summary (None where it has none)."""
    s = run.summary
    row: dict[str, Any] = {"run_id": run.run_id, "strategy": run.strategy, "seed": run.seed, "grid": run.grid,
                           **run.grid, "status": run.status, "reason": run.reason, "model": s and s.model,
                           "task": s and s.task, "method": s and s.method}
    row.update(s.metrics if s else {})
    params = s.params if s else None
    row.update({"trainable_params": params and params.trainable, "total_params": params and params.total,
                "percent_trainable": params and params.percent})
    resources = s.resources if s else None
    row.update({key: getattr(resources, key) if resources else None for key in RESOURCE_KEYS})
    data = s.data if s else None
    row.update({"train_examples": data and data.train_examples, "eval_examples": data and data.eval_examples,
                "eval_majority_label": data and data.eval_majority_label,
                "eval_majority_accuracy": data and data.eval_majority_accuracy,
                "started": s and s.started, "wall_seconds": s and s.wall_seconds})
    # train.keep_best / train.early_stopping: the step the metrics (and weights) are from, where training stopped
    row.update({"best_step": s.best.step if s and s.best else None,
                "stopped_early_step": s.stopped_early.step if s and s.stopped_early else None})
    return row



@dataclass
class Analysis:
    name: str
    runs: list[RunRecord]  # the sweep's trained runs (aliases included, under their own strategy name)
    rows: list[dict[str, Any]]
    groups: list[GroupStats]
    baseline: str
    quality: str
    higher_is_better: bool
    task: str
    grid_keys: list[str]
    sweep: dict[str, Any]
    references: list[RunRecord] = field(default_factory=list)  # the untrained base model, evaluated once
    comparisons: list[Comparison] = field(default_factory=list)  # every pair, every quality metric
    strays: list[str] = field(default_factory=list)  # folders under runs/ that this sweep does not list
    aliases: dict[str, str] = field(default_factory=dict)  # strategy -> the strategy whose runs it shares

    @property
    def reference(self) -> RunRecord | None:
        done = [r for r in self.references if r.status == "completed"]
        return done[0] if len(done) == 1 else None


def analyse(directory: Path, baseline: str | None = None) -> Analysis:
    directory = Path(directory)
    sweep = read_json_object(directory / SWEEP_FILE) or {}
    trials = sweep.get("trials")
    everything = load_runs(directory, trials)
    runs = [r for r in everything if r.strategy != REFERENCE]
    if not runs:
        raise UserError(f"{directory} holds no runs (expected {directory}/runs/<id>/summary.json)")
    strategies = list(dict.fromkeys(r.strategy for r in runs))
    baseline = baseline or sweep.get("baseline") or strategies[0]
    if baseline not in strategies:
        raise UserError(f"baseline {baseline!r} is not a strategy of {directory} (strategies: {', '.join(strategies)})")
    completed = [r for r in runs if r.status == "completed"]
    task = next((r.summary.task for r in completed[:1] if r.summary and r.summary.task), "instruction")
    quality = QUALITY_METRICS.get(task, ("eval_loss",))[0]
    rows = [result_row(r) for r in runs]
    grid_keys = list(dict.fromkeys(k for r in runs for k in r.grid))
    metrics = [m for m in AGGREGATED if any(isinstance(row.get(m), (int, float)) for row in rows)]
    groups = aggregate(rows, metrics, baseline=baseline, quality=quality)
    aliases = _aliases(trials or [])
    # An alias shares its original's runs: comparing it again would repeat rows and widen Holm's family.
    distinct = [g for g in groups if g.strategy not in aliases]
    comparisons = [c for metric in QUALITY_METRICS.get(task, ("eval_loss",))
                   for c in compare_all(distinct, metric, higher_is_better=HIGHER_IS_BETTER[metric])]
    mark_pareto(distinct, quality, comparisons)
    by_label = {g.label: g for g in groups}
    for group in groups:
        if group.strategy in aliases:
            group.pareto = dict(by_label[group_label(aliases[group.strategy], group.grid)].pareto)
    return Analysis(sweep.get("name") or directory.name, runs, rows, groups, baseline, quality,
                    HIGHER_IS_BETTER[quality], task, grid_keys, sweep,
                    references=[r for r in everything if r.strategy == REFERENCE], comparisons=comparisons,
                    strays=stray_folders(directory, trials), aliases=aliases)


def _aliases(trials: list[dict[str, Any]]) -> dict[str, str]:
    """strategy -> the earlier strategy whose runs it shares (every one of its trials an alias of that one's)."""
    owner = {t["run_id"]: t["strategy"] for t in trials}
    targets: dict[str, set[str | None]] = {}
    for trial in trials:
        targets.setdefault(trial["strategy"], set()).add(owner.get(trial.get("alias_of")))
    return {strategy: next(iter(found)) for strategy, found in targets.items() if len(found) == 1 and None not in found}

