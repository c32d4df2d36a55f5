"""A sweep's tables: results.csv (one row per run), summary.csv (one per group, and the base model).

comparisons.csv is written from verdicts.comparison_rows the same way. Floats keep every digit
(repr), so tables compare exactly; a NaN or inf is never written (an empty cell instead). Every
file is written atomically.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from peftlab.diskio import write_atomic
from peftlab.study import verdicts
from peftlab.study.analysis import AGGREGATED, FORGETTING_KEYS, GENERATION_KEYS, RESOURCE_KEYS, Analysis, result_row
from peftlab.study.stats import GroupStats
from peftlab.study.sweep import REFERENCE

METRIC_KEYS = ("eval_loss", "perplexity", "accuracy", "macro_f1", "train_accuracy", "train_loss", *GENERATION_KEYS,
               "gen_examples", *FORGETTING_KEYS)
STEP_KEYS = ("best_step", "stopped_early_step")  # train.keep_best, train.early_stopping


def write_tables(directory: Path, analysis: Analysis) -> dict[str, Path]:
    """Write results.csv, summary.csv and comparisons.csv into ``directory``; return their paths."""
    paths = {name: directory / f"{name}.csv" for name in ("results", "summary", "comparisons")}
    write_csv(paths["results"], analysis.rows, result_columns(analysis.rows, analysis.grid_keys))
    metrics = [m for m in AGGREGATED if any(m in g.stats for g in analysis.groups)]
    rows, columns = summary_rows(analysis.groups, metrics, analysis.grid_keys)
    write_csv(paths["summary"], rows + reference_rows(analysis, metrics), columns)
    write_csv(paths["comparisons"], verdicts.comparison_rows(analysis.comparisons), verdicts.COLUMNS)
    return paths


def result_columns(rows: list[dict[str, Any]], grid_keys: list[str]) -> list[str]:
    """results.csv's columns: the known metrics a run has, then any other metric a run reported, then the rest."""
    extra_metrics = sorted({k for r in rows for k in r if k not in METRIC_KEYS} - _KNOWN - set(grid_keys) - {"grid"})
    metrics = [k for k in METRIC_KEYS if any(r.get(k) is not None for r in rows)] + extra_metrics
    steps = [k for k in STEP_KEYS if any(r.get(k) is not None for r in rows)]  # only in sweeps that use them
    return (["run_id", "strategy", *grid_keys, "seed", "status", "reason", "model", "task", "method", *metrics, *steps,
             "trainable_params", "total_params", "percent_trainable", *RESOURCE_KEYS, "train_examples",
             "eval_examples", "started", "wall_seconds"])


_KNOWN = {"run_id", "strategy", "seed", "status", "reason", "model", "task", "method", "trainable_params",
          "total_params", "percent_trainable", *RESOURCE_KEYS, "train_examples", "eval_examples", "started",
          "wall_seconds", *STEP_KEYS}


def summary_rows(groups: list[GroupStats], metrics: list[str], grid_keys: list[str]) -> tuple[list[dict], list[str]]:
    """summary.csv: per group the mean, std and 95% interval of each metric, its changes and Pareto flags."""
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
    write_atomic(path, buffer.getvalue())  # a full or read-only disk: one line naming the file, no temp file left


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):  # repr keeps every digit: tables compare exactly; NaN/inf are never written
        return repr(value) if math.isfinite(value) else ""
    return value


def reference_rows(a: Analysis, metrics: list[str]) -> list[dict[str, Any]]:
    """summary.csv rows for the untrained base model (one evaluation: a mean with n = 1, no interval)."""
    rows = []
    for run in a.references:
        row = result_row(run)
        rows.append({"group": REFERENCE, "strategy": REFERENCE, "n_runs": 1,
                     "n_completed": int(run.status == "completed"),
                     "excluded_runs": "" if run.status == "completed" else f"{run.run_id} ({run.status})",
                     **{f"{m}_mean": row.get(m) for m in metrics if isinstance(row.get(m), (int, float))}})
    return rows
