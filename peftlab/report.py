"""Sweep reports, rebuilt from the run folders alone: results.csv, summary.csv, report.md, report.html.

Inputs: ``DIR/runs/*/summary.json`` (with ``sweep_run.json`` beside it naming the strategy, grid
values and seed) and ``metrics.jsonl`` for the curves; ``DIR/sweep.json``, when present, gives the
strategy order, the baseline and each strategy's overrides. The document is built once as a list of
blocks and rendered twice: Markdown (figures by relative path) and self-contained HTML (figures as
base64 PNG). Every file is written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import figures
from .errors import UserError
from .render import Block, render_html, render_markdown
from .stats import GroupStats, Stat, aggregate, group_label, separation_warnings
from .sweep import SWEEP_FILE, TRIAL_FILE

SMALL_EVAL = 100  # fewer eval examples than this cannot separate close strategies
METRIC_KEYS = ("eval_loss", "perplexity", "accuracy", "macro_f1", "train_accuracy", "train_loss")
RESOURCE_KEYS = ("train_seconds", "tokens_per_s", "peak_memory_mb", "memory_kind", "adapter_bytes", "steps",
                 "total_steps", "train_tokens")
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
    status: str  # completed | diverged | failed | unfinished
    reason: str  # why a run is not in the means
    summary: dict[str, Any] | None
    directory: Path


# --- reading run folders -----------------------------------------------------------------------


def load_runs(directory: Path) -> list[RunRecord]:
    runs = []
    for run_dir in sorted(p for p in (directory / "runs").glob("*") if p.is_dir()):
        summary = _read_json(run_dir / "summary.json")
        info = (summary or {}).get("sweep") or _read_json(run_dir / TRIAL_FILE) or {}
        config = (summary or {}).get("config") or {}
        status = summary.get("status", "failed") if summary else "unfinished"
        runs.append(RunRecord(
            run_id=info.get("run_id", run_dir.name), strategy=info.get("strategy", run_dir.name),
            strategy_index=info.get("strategy_index", 0), grid=info.get("grid") or {},
            seed=info.get("seed", (config.get("train") or {}).get("seed")), status=status,
            reason=_reason(status, summary), summary=summary, directory=run_dir))
    return sorted(runs, key=lambda r: (r.strategy_index, r.strategy, json.dumps(r.grid, default=str), r.seed or 0))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _reason(status: str, summary: dict[str, Any] | None) -> str:
    if status == "unfinished":
        return "no summary.json: interrupted or still running (peftlab sweep --resume continues it)"
    if status == "failed":
        return (summary or {}).get("error") or "failed without an error message"
    if status == "diverged":
        d = (summary or {}).get("divergence") or {}
        named = ", ".join((d.get("parameters") or [])[:3])
        return f"diverged at step {d.get('step')}: {d.get('reason')}" + (f" (parameters: {named})" if named else "")
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
    return repr(value) if isinstance(value, float) else value  # repr keeps every digit: tables compare exactly


def _write_text_atomic(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if isinstance(text, bytes):
        temporary.write_bytes(text)
    else:
        temporary.write_text(text)
    os.replace(temporary, path)


# --- the report --------------------------------------------------------------------------------


@dataclass
class Analysis:
    name: str
    runs: list[RunRecord]
    rows: list[dict[str, Any]]
    groups: list[GroupStats]
    baseline: str
    quality: str
    higher_is_better: bool
    task: str
    grid_keys: list[str]
    sweep: dict[str, Any]


def analyse(directory: Path, baseline: str | None = None) -> Analysis:
    directory = Path(directory)
    runs = load_runs(directory)
    if not runs:
        raise UserError(f"{directory} holds no runs (expected {directory}/runs/<id>/summary.json)")
    sweep = _read_json(directory / SWEEP_FILE) or {}
    strategies = list(dict.fromkeys(r.strategy for r in runs))
    baseline = baseline or sweep.get("baseline") or strategies[0]
    if baseline not in strategies:
        raise UserError(f"baseline {baseline!r} is not a strategy of {directory} (strategies: {', '.join(strategies)})")
    completed = [r for r in runs if r.status == "completed"]
    task = (completed[0].summary or {}).get("task", "instruction") if completed else "instruction"
    quality, higher = ("accuracy", True) if task == "classification" else ("eval_loss", False)
    rows = [result_row(r) for r in runs]
    grid_keys = list(dict.fromkeys(k for r in runs for k in r.grid))
    metrics = [m for m in AGGREGATED if any(isinstance(row.get(m), (int, float)) for row in rows)]
    groups = aggregate(rows, metrics, baseline=baseline, quality=quality, higher_is_better=higher)
    return Analysis(sweep.get("name") or directory.name, runs, rows, groups, baseline, quality, higher, task,
                    grid_keys, sweep)


def make_report(directory: str | Path, baseline: str | None = None) -> dict[str, Path]:
    """Write results.csv, summary.csv, figures/*.png, report.md and report.html into ``directory``."""
    directory = Path(directory)
    analysis = analyse(directory, baseline)
    write_csv(directory / "results.csv", analysis.rows, result_columns(analysis.rows, analysis.grid_keys))
    metrics = [m for m in AGGREGATED if any(m in g.stats for g in analysis.groups)]
    rows, columns = summary_rows(analysis.groups, metrics, analysis.grid_keys)
    write_csv(directory / "summary.csv", rows, columns)
    figure_paths = _figures(analysis, directory / "figures")
    blocks = document(analysis, figure_paths, directory)
    _write_text_atomic(directory / "report.md", render_markdown(blocks))
    _write_text_atomic(directory / "report.html", render_html(blocks, directory, analysis.name))
    return {"results": directory / "results.csv", "summary": directory / "summary.csv",
            "markdown": directory / "report.md", "html": directory / "report.html"}


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
    made = [
        (figures.quality_vs_params(groups, analysis.quality, quality_label(analysis.quality, analysis.task),
                                   analysis.higher_is_better, folder / "quality_vs_params.png"),
         "Quality against trainable parameters (log scale); dashed: the Pareto frontier."),
        (figures.time_and_memory(groups, "/".join(sorted(memory_kinds)) or "unknown", folder / "time_memory.png"),
         "Training time and peak memory per strategy."),
        (figures.loss_curves(curves, loss_unit, folder / "loss_curves.png"),
         "Training and evaluation loss per strategy."),
        (figures.rank_heatmaps(placements, folder / "rank_heatmap.png"),
         "LoRA rank per layer and module for each LoRA strategy."),
    ]
    return [(path, caption) for path, caption in made if path is not None]


def document(analysis: Analysis, figure_paths: list[tuple[Path, str]], directory: Path) -> list[Block]:
    blocks: list[Block] = [("h1", f"{analysis.name}: which strategy, and by how much")]
    blocks += setup_blocks(analysis)
    blocks += [("h2", "What this data can and cannot say"), ("ul", warning_lines(analysis))]
    blocks += [("h2", "Summary (mean over completed seeds, ± half-width of the 95% Student-t interval)"),
               summary_table(analysis)]
    blocks += [("p", "Full tables: results.csv (one row per run) and summary.csv (per strategy: mean, std, "
                     "95% CI and n of every metric, changes against the baseline, Pareto flags).")]
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
    excluded = [r for r in a.runs if r.status != "completed"]
    for run in excluded:
        lines.append(f"{run.run_id} is {run.status} and is excluded from every mean: {run.reason}")
    lines += separation_warnings(a.groups, a.quality)
    lines += majority_class_warnings(a)
    eval_sizes = sorted({r["eval_examples"] for r in a.rows if r.get("eval_examples")})
    if eval_sizes and min(eval_sizes) < SMALL_EVAL:
        lines.append(f"Runs were evaluated on only {min(eval_sizes)} examples (fewer than {SMALL_EVAL}): small "
                     "differences are within evaluation noise, and this data cannot separate strategies that close.")
    runner = {w for r in a.runs for w in (r.summary or {}).get("warnings", []) if "eval examples" not in w}
    lines += [f"runner: {w}" for w in sorted(runner)]
    kinds = {r.get("memory_kind") for r in a.rows if r.get("memory_kind")}
    if kinds & {"peak_rss", "process_peak_rss"}:
        lines.append("Peak memory on CPU is the process's peak resident set size: it includes the frozen base "
                     "model, a local sweep's cached copy of it, and memory the process kept from earlier runs, so "
                     "runs later in a sweep can read higher; treat CPU memory differences as rough (a GPU's "
                     "cuda_max_allocated is measured per run).")
    if not lines:
        lines.append("No warnings: every run completed, and the 95% intervals of the quality metric do not overlap.")
    return lines


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
            fmt_stat(g.stats.get("train_seconds"), 3), fmt_stat(g.stats.get("peak_memory_mb"), 4),
            f"{'yes' if g.pareto.get('params') else 'no'} / {'yes' if g.pareto.get('time') else 'no'}"])
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


def fmt_stat(stat: Stat | None, digits: int = 4) -> str:
    if stat is None:
        return "-"
    if stat.half_width is None:
        return f"{stat.mean:.{digits}g} (1 seed, no CI)"
    return f"{stat.mean:.{digits}g} ± {stat.half_width:.2g}"
