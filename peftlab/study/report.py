"""Sweep reports, rebuilt from the run folders alone: results.csv, summary.csv, comparisons.csv, report.md/html.

Inputs: ``DIR/sweep.json`` (the sweep file as run: strategies, baseline, and the list of its trials),
``DIR/runs/<id>/summary.json`` for each listed trial and ``metrics.jsonl`` for the curves. Folders under
``DIR/runs`` that the sweep does not list (an older version of the sweep file, say) are named in the
report and never averaged in. The report opens with its verdicts: paired comparisons by seed
(peftlab.study.stats), Holm-adjusted across the pairs of each metric. The document is built once as a list of
blocks and rendered twice: Markdown (figures by relative path) and self-contained HTML (figures as
base64 PNG). Every file is written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.study import figures
from peftlab.study import verdicts
from peftlab.diskio import read_json_object, write_atomic, writing
from peftlab.errors import UserError
from peftlab.study.render import Block, render_html, render_markdown
from peftlab.study.stats import (Comparison, GroupStats, Spread, Stat, aggregate, compare_all, group_label,
                    mark_pareto, one_seed_warnings)
from peftlab.study.sweep import REFERENCE, SWEEP_FILE, TRIAL_FILE

SMALL_EVAL = 100  # fewer eval examples than this cannot separate close strategies
SHORT_TRAINING_STEPS = 100  # fewer optimizer steps than this: the ordering may not hold for a real fine-tune
# Quality metrics compared pairwise, per task. Perplexity is exp(eval_loss): its verdicts are eval_loss's.
QUALITY_METRICS = {"classification": ("accuracy", "macro_f1", "eval_loss"),
                   "instruction": ("eval_loss",), "causal_lm": ("eval_loss",)}
HIGHER_IS_BETTER = {"accuracy": True, "macro_f1": True, "eval_loss": False, "perplexity": False}
METRIC_KEYS = ("eval_loss", "perplexity", "accuracy", "macro_f1", "train_accuracy", "train_loss")
RESOURCE_KEYS = ("train_seconds", "tokens_per_s", "peak_memory_mb", "memory_kind", "adapter_bytes", "steps",
                 "total_steps", "train_tokens", "load_avg_max", "cpu_count")
AGGREGATED = ("eval_loss", "perplexity", "accuracy", "macro_f1", "train_accuracy", "train_loss",
              "trainable_params", "percent_trainable", "train_seconds", "tokens_per_s", "peak_memory_mb",
              "adapter_bytes")


@dataclass
class RunRecord:
    run_id: str
    strategy: str
    strategy_index: int
    grid: dict[str, Any]
    seed: int | None
    status: str  # completed | diverged | collapsed | failed | unfinished
    reason: str  # why a run is not in the means
    summary: dict[str, Any] | None
    directory: Path


# --- reading run folders -----------------------------------------------------------------------


def load_runs(directory: Path, trials: list[dict[str, Any]] | None = None) -> list[RunRecord]:
    """The sweep's trials (``trials`` from sweep.json; an alias reads its original's folder), else every folder."""
    if trials is None:
        trials = [{"run_id": p.name} for p in sorted((directory / "runs").glob("*")) if p.is_dir()]
    runs = [_load_run(directory / "runs" / (t.get("alias_of") or t["run_id"]), t) for t in trials]
    return sorted(runs, key=lambda r: (r.strategy_index, r.strategy, json.dumps(r.grid, default=str), r.seed or 0))


def _load_run(run_dir: Path, listed: dict[str, Any]) -> RunRecord:
    summary = read_json_object(run_dir / "summary.json")
    info = {**((summary or {}).get("sweep") or read_json_object(run_dir / TRIAL_FILE) or {}),
            **{k: v for k, v in listed.items() if v is not None}}
    config = (summary or {}).get("config") or {}
    status = summary.get("status", "failed") if summary else "unfinished"
    damage = _damage(run_dir / "summary.json") if summary is None else None
    return RunRecord(
        run_id=info.get("run_id", run_dir.name), strategy=info.get("strategy", run_dir.name),
        strategy_index=info.get("strategy_index", 0), grid=info.get("grid") or {},
        seed=info.get("seed", (config.get("train") or {}).get("seed")), status=status,
        reason=damage or _reason(status, summary), summary=summary, directory=run_dir)


def _damage(path: Path) -> str | None:
    """Why a summary.json that is there could not be read (a truncated copy), or None when there is none."""
    if not path.exists():
        return None
    try:
        json.loads(path.read_bytes().decode("utf-8"))
        why = "not a JSON object"
    except (OSError, ValueError) as error:
        why = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"summary.json is damaged ({why}): move it away, and peftlab sweep --resume redoes the run"


def stray_folders(directory: Path, trials: list[dict[str, Any]] | None) -> list[str]:
    """Run folders under DIR/runs that the current sweep file does not list."""
    if trials is None:
        return []
    listed = {t["run_id"] for t in trials} | {t["alias_of"] for t in trials if t.get("alias_of")}
    return sorted(p.name for p in (directory / "runs").glob("*") if p.is_dir() and p.name not in listed)


def _reason(status: str, summary: dict[str, Any] | None) -> str:
    if status == "unfinished":
        return "no summary.json: interrupted or still running (peftlab sweep --resume continues it)"
    if status == "failed":
        return (summary or {}).get("error") or "failed without an error message"
    if status == "diverged":
        d = (summary or {}).get("divergence") or {}
        named = ", ".join((d.get("parameters") or [])[:3])
        return f"diverged at step {d.get('step')}: {d.get('reason')}" + (f" (parameters: {named})" if named else "")
    if status == "collapsed":
        return f"collapsed: {((summary or {}).get('collapse') or {}).get('reason') or 'no reason recorded'}"
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


# --- tables ------------------------------------------------------------------------------------


def result_row(run: RunRecord) -> dict[str, Any]:
    """One flat row: the run's sweep settings, status and every metric of its summary."""
    s = run.summary or {}
    row: dict[str, Any] = {"run_id": run.run_id, "strategy": run.strategy, "seed": run.seed, "grid": run.grid,
                           **run.grid, "status": run.status, "reason": run.reason, "model": s.get("model"),
                           "task": s.get("task"), "method": s.get("method")}
    row.update(s.get("metrics") or {})
    params = s.get("params") or {}
    row.update({"trainable_params": params.get("trainable"), "total_params": params.get("total"),
                "percent_trainable": params.get("percent")})
    resources = s.get("resources") or {}
    row.update({key: resources.get(key) for key in RESOURCE_KEYS})
    data = s.get("data") or {}
    row.update({"train_examples": data.get("train_examples"), "eval_examples": data.get("eval_examples"),
                "eval_majority_label": data.get("eval_majority_label"),
                "eval_majority_accuracy": data.get("eval_majority_accuracy"),
                "started": s.get("started"), "wall_seconds": s.get("wall_seconds")})
    return row


def result_columns(rows: list[dict[str, Any]], grid_keys: list[str]) -> list[str]:
    extra_metrics = sorted({k for r in rows for k in r if k not in METRIC_KEYS} - _KNOWN - set(grid_keys) - {"grid"})
    metrics = [k for k in METRIC_KEYS if any(r.get(k) is not None for r in rows)] + extra_metrics
    return (["run_id", "strategy", *grid_keys, "seed", "status", "reason", "model", "task", "method", *metrics,
             "trainable_params", "total_params", "percent_trainable", *RESOURCE_KEYS, "train_examples",
             "eval_examples", "started", "wall_seconds"])


_KNOWN = {"run_id", "strategy", "seed", "status", "reason", "model", "task", "method", "trainable_params",
          "total_params", "percent_trainable", *RESOURCE_KEYS, "train_examples", "eval_examples", "started",
          "wall_seconds"}


def summary_rows(groups: list[GroupStats], metrics: list[str], grid_keys: list[str]) -> tuple[list[dict], list[str]]:
    columns = ["group", "strategy", *grid_keys, "n_runs", "n_completed", "excluded_runs"]
    for metric in metrics:
        columns += [f"{metric}_mean", f"{metric}_std", f"{metric}_ci95_low", f"{metric}_ci95_high"]
    comparison_keys = list(groups[0].comparisons) if groups else []
    columns += comparison_keys + ["pareto_quality_vs_params", "pareto_quality_vs_time"]
    rows = []
    for group in groups:
        row: dict[str, Any] = {"group": group.label, "strategy": group.strategy, **group.grid,
                               "n_runs": group.n_runs, "n_completed": group.n,
                               "excluded_runs": "; ".join(f"{e['run_id']} ({e['status']})" for e in group.excluded)}
        for metric in metrics:
            stat = group.stats.get(metric)
            row.update({f"{metric}_mean": stat.mean if stat else None, f"{metric}_std": stat.std if stat else None,
                        f"{metric}_ci95_low": stat.ci_low if stat else None,
                        f"{metric}_ci95_high": stat.ci_high if stat else None})
        row.update(group.comparisons)
        row.update({"pareto_quality_vs_params": group.pareto.get("params"),
                    "pareto_quality_vs_time": group.pareto.get("time")})
        rows.append(row)
    return rows, columns


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else _csv_value(row.get(k))) for k in columns})
    _write_text_atomic(path, buffer.getvalue())


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):  # repr keeps every digit: tables compare exactly; NaN/inf are never written
        return repr(value) if math.isfinite(value) else ""
    return value


def _write_text_atomic(path: Path, text: str | bytes) -> None:
    write_atomic(path, text)  # a full or read-only disk: one line naming the file, no temp file left


# --- the report --------------------------------------------------------------------------------


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
    task = (completed[0].summary or {}).get("task", "instruction") if completed else "instruction"
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


def make_report(directory: str | Path, baseline: str | None = None) -> dict[str, Path]:
    """Write results.csv, summary.csv, comparisons.csv, figures/*.png, report.md and report.html."""
    directory = Path(directory)
    analysis = analyse(directory, baseline)
    write_csv(directory / "results.csv", analysis.rows, result_columns(analysis.rows, analysis.grid_keys))
    metrics = [m for m in AGGREGATED if any(m in g.stats for g in analysis.groups)]
    rows, columns = summary_rows(analysis.groups, metrics, analysis.grid_keys)
    write_csv(directory / "summary.csv", rows + reference_rows(analysis, metrics), columns)
    write_csv(directory / "comparisons.csv", verdicts.comparison_rows(analysis.comparisons), verdicts.COLUMNS)
    with writing(directory / "figures"):
        figure_paths = _figures(analysis, directory / "figures")
    blocks = document(analysis, figure_paths, directory)
    _write_text_atomic(directory / "report.md", render_markdown(blocks))
    _write_text_atomic(directory / "report.html", render_html(blocks, directory, analysis.name))
    return {"results": directory / "results.csv", "summary": directory / "summary.csv",
            "comparisons": directory / "comparisons.csv", "markdown": directory / "report.md",
            "html": directory / "report.html"}


def reference_rows(a: Analysis, metrics: list[str]) -> list[dict[str, Any]]:
    """summary.csv rows for the untrained base model (one evaluation: a mean with n = 1, no interval)."""
    rows = []
    for run in a.references:
        row = result_row(run)
        rows.append({"group": REFERENCE, "strategy": REFERENCE, "n_runs": 1, "n_completed": int(run.status == "completed"),
                     "excluded_runs": "" if run.status == "completed" else f"{run.run_id} ({run.status})",
                     **{f"{m}_mean": row.get(m) for m in metrics if isinstance(row.get(m), (int, float))}})
    return rows


def quality_label(quality: str, task: str) -> str:
    if quality == "accuracy":
        return "eval accuracy (fraction correct)"
    return "eval loss (nats per example)" if task == "classification" else "eval loss (nats per target token)"


def _figures(analysis: Analysis, folder: Path) -> list[tuple[Path, str]]:
    groups = analysis.groups
    memory_kinds = {r.get("memory_kind") for r in analysis.rows if r.get("memory_kind")}
    loss_unit = "nats per example" if analysis.task == "classification" else "nats per target token"
    curves: dict[str, list[list[dict]]] = {}
    placements: dict[str, list[dict]] = {}
    for run in analysis.runs:
        if run.status != "completed":
            continue
        label = group_label(run.strategy, run.grid)
        curves.setdefault(label, []).append(read_metrics(run.directory))
        placements.setdefault(label, (run.summary or {}).get("placement") or [])
    reference = analysis.reference
    base = ((reference.summary or {}).get("metrics") or {}) if reference is not None else {}
    made = [
        (figures.quality_vs_params(groups, analysis.quality, quality_label(analysis.quality, analysis.task),
                                   analysis.higher_is_better, folder / "quality_vs_params.png",
                                   reference=base.get(analysis.quality)),
         "Quality against trainable parameters (log scale; bars: 95% CI of the mean over seeds); dashed: the Pareto "
         "frontier, which a strategy leaves only when a cheaper one is better by a separated paired comparison; "
         "dotted: the untrained base model."),
        (figures.time_and_memory(groups, "/".join(sorted(memory_kinds)) or "unknown", folder / "time_memory.png"),
         "Training time and peak memory per strategy: median over seeds, whiskers from the lowest to the highest."),
        (figures.loss_curves(curves, loss_unit, folder / "loss_curves.png", reference=base.get("eval_loss")),
         "Training loss (running mean over a tenth of the run, once the window is full: length-grouped batches make "
         "single-step losses swing) and evaluation loss through training, from the untrained base model at step 0."),
        (figures.rank_heatmaps(placements, folder / "rank_heatmap.png"),
         "LoRA rank per layer and module for each LoRA strategy."),
    ]
    return [(path, caption) for path, caption in made if path is not None]


def document(analysis: Analysis, figure_paths: list[tuple[Path, str]], directory: Path) -> list[Block]:
    blocks: list[Block] = [("h1", f"{analysis.name}: which strategy, and by how much")]
    blocks += verdicts.verdict_blocks(analysis)
    blocks += setup_blocks(analysis)
    blocks += [("h2", "What this data can and cannot say"), ("ul", warning_lines(analysis))]
    blocks += [("h2", "Summary (quality: mean over completed seeds ± half-width of the 95% Student-t interval; "
                      "time and memory: median (min-max))"), summary_table(analysis)]
    blocks += [("p", "Full tables: results.csv (one row per run), summary.csv (per strategy: mean, std, 95% CI and n "
                     "of every metric, changes against the baseline, Pareto flags) and comparisons.csv (every pair "
                     "of strategies on every quality metric, paired by seed).")]
    blocks += [("h2", "Figures")]
    for path, caption in figure_paths:
        blocks.append(("img", path.relative_to(directory).as_posix(), caption))
    blocks += [("h2", "All runs"), runs_table(analysis)]
    blocks += environment_blocks(analysis)
    return blocks


def setup_blocks(a: Analysis) -> list[Block]:
    """What was compared, on what, for how long: enough for a reader who never saw the config."""
    configs = [r.summary["config"] for r in a.runs if r.summary and r.summary.get("config")] or [{}]
    config = configs[0]
    data = config.get("data") or {}
    # A setting a strategy or grid overrides differs between runs: say so rather than show run 1's value.
    train = {key: _shared([(c.get("train") or {}).get(key) for c in configs])
             for key in ("max_steps", "epochs", "batch_size", "grad_accum", "lr", "scheduler", "warmup_ratio",
                         "weight_decay")}
    seeds = sorted({r.seed for r in a.runs if r.seed is not None})
    length = f"{train.get('max_steps')} optimizer steps" if train.get("max_steps") else f"{train.get('epochs')} epochs"
    eval_sizes = sorted({r["eval_examples"] for r in a.rows if r.get("eval_examples")})
    train_sizes = sorted({r["train_examples"] for r in a.rows if r.get("train_examples")})
    lines = [
        f"model: {config.get('model')}; task: {a.task}; data: {data.get('source')} "
        f"({'/'.join(map(str, train_sizes)) or '?'} train, {'/'.join(map(str, eval_sizes)) or '?'} eval examples)",
        f"training: {length} of batch {train.get('batch_size')} x grad_accum {train.get('grad_accum')}, "
        f"lr {train.get('lr')} ({train.get('scheduler')}, warmup {train.get('warmup_ratio')}), "
        f"weight decay {train.get('weight_decay')}; seeds: {', '.join(map(str, seeds))}",
        f"quality metric: {quality_label(a.quality, a.task)}, {'higher' if a.higher_is_better else 'lower'} is better;"
        f" baseline strategy: {a.baseline}",
    ]
    blocks: list[Block] = [("h2", "Setup"), ("ul", lines)]
    strategies = a.sweep.get("strategies") or {}
    if strategies:
        rows = [[name, ", ".join(f"{k}={v}" for k, v in bundle.items()) or "(the base config)"]
                for name, bundle in strategies.items()]
        blocks += [("p", "Strategies (overrides of the base config):"), ("table", ["strategy", "overrides"], rows)]
    if a.sweep.get("grid"):
        blocks.append(("p", "Grid: " + "; ".join(f"{k} in {v}" for k, v in a.sweep["grid"].items())))
    return blocks


def majority_class_warnings(a: Analysis) -> list[str]:
    """Name the strategies a constant answer (the eval set's most frequent class) does as well as."""
    floors = {r["eval_majority_accuracy"] for r in a.rows if r.get("eval_majority_accuracy") is not None}
    if a.quality != "accuracy" or len(floors) != 1:
        return []
    floor = floors.pop()
    label = next((r["eval_majority_label"] for r in a.rows if r.get("eval_majority_label")), None)
    named = f" ({label!r})" if label else ""
    line = (f"Always answering the eval set's most frequent class{named} scores accuracy {floor:.4g}: that is the "
            "floor a classifier must beat, not 1 / the number of classes.")
    stuck = [g.label for g in a.groups
             if (stat := g.stats.get("accuracy")) is not None and (stat.ci_low if stat.ci_low is not None
                                                                     else stat.mean) <= floor]
    if stuck:
        line += (f" {', '.join(stuck)}: accuracy not above it (95% interval reaches it), so this data does not show "
                 "that they learned more than the class balance (answering one class for everything gives a macro_f1 "
                 "of at most 1 / the number of classes).")
    return [line]


def _shared(values: list[Any]) -> Any:
    """The one value every run used, or "per strategy" where runs differ."""
    distinct = {json.dumps(v, sort_keys=True, default=str) for v in values}
    return values[0] if len(distinct) == 1 else "per strategy"


def warning_lines(a: Analysis) -> list[str]:
    lines = []
    if a.sweep.get("trials") is None:
        lines.append("sweep.json lists no trials (a sweep folder from an older peftlab): every folder under runs/ is "
                     "included, whatever sweep file made it.")
    if a.strays:
        lines.append(f"{len(a.strays)} folder(s) under runs/ are not part of this sweep file (an earlier version of "
                     f"it, say) and are not in any table: {', '.join(a.strays)}.")
    for run in [r for r in a.runs + a.references if r.status != "completed"]:
        lines.append(f"{run.run_id} is {run.status} and is excluded from every mean: {run.reason}")
    lines += one_seed_warnings(a.groups, a.quality)
    lines += majority_class_warnings(a)
    lines += regime_warnings(a)
    runner = {w for r in a.runs for w in (r.summary or {}).get("warnings", []) if "eval examples" not in w}
    lines += [f"runner: {w}" for w in sorted(runner)]
    lines += load_warnings(a)
    kinds = {r.get("memory_kind") for r in a.rows if r.get("memory_kind")}
    if kinds & {"peak_rss", "process_peak_rss"}:
        lines.append("Peak memory on CPU is the process's peak resident set size: it includes the frozen base "
                     "model, a local sweep's cached copy of it, and memory the process kept from earlier runs, so "
                     "runs later in a sweep can read higher; treat CPU memory differences as rough (a GPU's "
                     "cuda_max_allocated is measured per run).")
    return lines or ["No warnings: every run completed."]


def regime_warnings(a: Analysis) -> list[str]:
    """Small eval sets and short training: what the ordering of strategies may not carry over to."""
    lines = []
    eval_sizes = sorted({r["eval_examples"] for r in a.rows if r.get("eval_examples")})
    if eval_sizes and min(eval_sizes) < SMALL_EVAL:
        lines.append(f"Runs were evaluated on only {min(eval_sizes)} examples (fewer than {SMALL_EVAL}): small "
                     "differences are within evaluation noise.")
    steps = [r["steps"] for r in a.rows if isinstance(r.get("steps"), int)]
    if steps and min(steps) < SHORT_TRAINING_STEPS:
        lines.append(f"Runs trained for as few as {min(steps)} optimizer steps (fewer than {SHORT_TRAINING_STEPS}): "
                     "an ordering of strategies this early may not hold for a full fine-tune.")
    return lines


def load_warnings(a: Analysis) -> list[str]:
    """Name runs during which the machine was busier than its cores: their times are not comparable."""
    busy = [(r["run_id"], r["load_avg_max"], r.get("cpu_count")) for r in a.rows
            if isinstance(r.get("load_avg_max"), (int, float)) and isinstance(r.get("cpu_count"), int)
            and r["load_avg_max"] > r["cpu_count"] + 0.5]
    if not busy:
        return []
    worst = max(busy, key=lambda item: item[1])
    return [f"The machine was shared during {len(busy)} run(s) (1-minute load average up to {worst[1]:.1f} on "
            f"{worst[2]} CPUs, in {worst[0]}): their time and tokens/s are not comparable with the other runs'."]


def summary_table(a: Analysis) -> Block:
    extra = [m for m in ("eval_loss", "perplexity", "macro_f1", "train_accuracy")
             if m != a.quality and any(m in g.stats for g in a.groups)]
    headers = ["strategy", "n", f"{a.quality}", f"{a.quality} vs {a.baseline}", *extra, "trainable params",
               "% trainable", "param reduction", "loss increase per M params saved", "train time (s)",
               "peak memory (MiB)", "Pareto (params / time)"]
    rows = []
    for g in a.groups:
        c = g.comparisons
        params = g.mean("trainable_params")
        rows.append([
            g.label, f"{g.n}/{g.n_runs}", fmt_stat(g.stats.get(a.quality)),
            _pct(c.get(f"{a.quality}_change_pct")), *[fmt_stat(g.stats.get(m)) for m in extra],
            f"{params:,.0f}" if params is not None else "-", _num(g.mean("percent_trainable"), "{:.3f}%"),
            _pct(c.get("param_reduction_pct")), _num(c.get("efficiency_ratio"), "{:+.4g}"),
            fmt_spread(g.spreads.get("train_seconds"), "{:.3g}"), fmt_spread(g.spreads.get("peak_memory_mb"), "{:.0f}"),
            f"{'yes' if g.pareto.get('params') else 'no'} / {'yes' if g.pareto.get('time') else 'no'}"])
    reference = a.reference
    if reference is not None:
        row = result_row(reference)
        rows.append([f"{REFERENCE} (untrained, step 0)", "1/1", _num(row.get(a.quality), "{:.4g}"), "-",
                     *[_num(row.get(m), "{:.4g}") for m in extra], "0", "0.000%", "-", "-", "-",
                     _num(row.get("peak_memory_mb"), "{:.0f}"), "-"])
    return ("table", headers, rows)


def runs_table(a: Analysis) -> Block:
    headers = ["run", "strategy", "seed", "status", a.quality, "trainable params", "train time (s)", "note"]
    rows = [[r["run_id"], r["strategy"], r["seed"], r["status"], _num(r.get(a.quality), "{:.4f}"),
             _num(r.get("trainable_params"), "{:,.0f}"), _num(r.get("train_seconds"), "{:.1f}"), r["reason"]]
            for r in a.rows]
    return ("table", headers, rows)


def environment_blocks(a: Analysis) -> list[Block]:
    envs = [r.summary.get("environment") or {} for r in a.runs if r.summary]
    keys = list(dict.fromkeys(k for env in envs for k in env))
    lines = [f"{key}: {', '.join(sorted({str(env[key]) for env in envs if key in env}))}" for key in keys]
    starts = sorted(r.summary["started"] for r in a.runs if r.summary and r.summary.get("started"))
    if starts:
        lines.append(f"runs started between {starts[0]} and {starts[-1]}")
    lines.append(f"report generated {time.strftime('%Y-%m-%d %H:%M:%S')}")
    return [("h2", "Environment"), ("ul", lines)]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}%"


def _num(value: Any, form: str) -> str:
    return "-" if not isinstance(value, (int, float)) else form.format(value)


def fmt_spread(summary: Spread | None, form: str) -> str:
    if summary is None:
        return "-"
    if summary.n == 1:
        return form.format(summary.median) + " (1 run)"
    return f"{form.format(summary.median)} ({form.format(summary.low)}-{form.format(summary.high)})"


def fmt_stat(stat: Stat | None, digits: int = 4) -> str:
    if stat is None:
        return "-"
    if stat.half_width is None:
        return f"{stat.mean:.{digits}g} (1 seed, no CI)"
    return f"{stat.mean:.{digits}g} ± {stat.half_width:.2g}"
