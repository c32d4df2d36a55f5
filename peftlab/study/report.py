"""Sweep reports, rebuilt from the run folders alone: results.csv, summary.csv, comparisons.csv, report.md/html.

The sweep folder is read into an Analysis (analysis.py), its tables written by tables.py; this module
draws the figures and builds the document. The report opens with its verdicts (verdicts.py), then the
setup, the caveats (caveats.py), the summary table, the figures, every run and the environment. The
document is built once as a list of blocks and rendered twice: Markdown (figures by relative path)
and self-contained HTML (figures as base64 PNG). Every file is written atomically.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from peftlab.diskio import write_atomic, writing
from peftlab.study import figures, verdicts
from peftlab.study.analysis import FORGETTING_KEYS, GENERATION_KEYS, Analysis, analyse, read_metrics, result_row
from peftlab.study.caveats import warning_lines
from peftlab.study.render import Block, render_html, render_markdown
from peftlab.study.stats import Spread, Stat, group_label
from peftlab.study.sweep import REFERENCE
from peftlab.study.tables import write_tables


def make_report(directory: str | Path, baseline: str | None = None) -> dict[str, Path]:
    """Write results.csv, summary.csv, comparisons.csv, figures/*.png, report.md and report.html."""
    directory = Path(directory)
    analysis = analyse(directory, baseline)
    tables = write_tables(directory, analysis)
    with writing(directory / "figures"):
        figure_paths = _figures(analysis, directory / "figures")
    blocks = document(analysis, figure_paths, directory)
    write_atomic(directory / "report.md", render_markdown(blocks))
    write_atomic(directory / "report.html", render_html(blocks, directory, analysis.name))
    return {**tables, "markdown": directory / "report.md", "html": directory / "report.html"}


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
        placements.setdefault(label, [p.to_json() for p in run.summary.placement] if run.summary else [])
    reference = analysis.reference
    base = reference.summary.metrics if reference is not None and reference.summary else {}
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
    blocks += sample_blocks(analysis)
    blocks += [("h2", "All runs"), runs_table(analysis)]
    blocks += environment_blocks(analysis)
    return blocks


def setup_blocks(a: Analysis) -> list[Block]:
    """What was compared, on what, for how long: enough for a reader who never saw the config."""
    configs = [r.summary.config for r in a.runs if r.summary and r.summary.config] or [{}]
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
        *eval_lines(configs, a.rows),
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



def _shared(values: list[Any]) -> Any:
    """The one value every run used, or "per strategy" where runs differ."""
    distinct = {json.dumps(v, sort_keys=True, default=str) for v in values}
    return values[0] if len(distinct) == 1 else "per strategy"



def eval_lines(configs: list[dict], rows: list[dict[str, Any]]) -> list[str]:
    """What the eval section measured besides the eval loss: generation metrics and forgetting, and how."""
    sections = [c.get("eval") or {} for c in configs]
    lines = []
    generate = _shared([s.get("generate") for s in sections])
    counts = sorted({r["gen_examples"] for r in rows if isinstance(r.get("gen_examples"), int)})
    if counts:
        how = (f"max_new_tokens {generate.get('max_new_tokens')}" if isinstance(generate, dict)
               else "settings per strategy")
        lines.append(f"generation metrics (higher is better): greedy answers to the first {'/'.join(map(str, counts))} "
                     f"eval prompts ({how}) scored against the reference outputs: exact match (after stripping "
                     f"whitespace), contains (the reference appears in the answer), ROUGE-L F-measure")
    if any(isinstance(r.get("forgetting"), (int, float)) for r in rows):
        reference = _shared([s.get("reference") for s in sections])
        size = _shared([s.get("reference_size") for s in sections])
        lines.append(f"forgetting (lower is better): the loss on {size} chunks of {reference} after training minus "
                     f"before (nats per token; positive: training made the model worse at that text)")
    return lines


def summary_table(a: Analysis) -> Block:
    extra = [m for m in ("eval_loss", "perplexity", "macro_f1", "train_accuracy", *GENERATION_KEYS, "forgetting")
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
    measured = [m for m in (*GENERATION_KEYS, *FORGETTING_KEYS) if any(r.get(m) is not None for r in a.rows)]
    headers = ["run", "strategy", "seed", "status", a.quality, *measured, "trainable params", "train time (s)", "note"]
    rows = [[r["run_id"], r["strategy"], r["seed"], r["status"], _num(r.get(a.quality), "{:.4f}"),
             *[_num(r.get(m), "{:.4f}") for m in measured],
             _num(r.get("trainable_params"), "{:,.0f}"), _num(r.get("train_seconds"), "{:.1f}"),
             r["reason"] or _steps(r)]
            for r in a.rows]
    return ("table", headers, rows)


def _steps(row: dict[str, Any]) -> str:
    """A completed run's note: the step its metrics are from (train.keep_best), where it stopped early."""
    notes = ([f"best at step {row['best_step']}"] if row.get("best_step") is not None else []) + \
        ([f"stopped early at step {row['stopped_early_step']}"] if row.get("stopped_early_step") is not None else [])
    return "; ".join(notes)


SAMPLE_CHARS = 240  # a longer answer is cut in the report, a longer prompt keeps its end (summary.json: whole)


def sample_blocks(a: Analysis) -> list[Block]:
    """A few generated answers per strategy, side by side on the same eval prompts (one seed's runs)."""
    picked = _sample_runs(a)
    if picked is None:
        return []
    seed, runs = picked
    rows = []
    for index, sample in enumerate(runs[0][1]):
        answers = [samples[index].get("generated", "") if index < len(samples)
                   and samples[index].get("prompt") == sample.get("prompt") else "-" for _, samples in runs]
        rows.append([_cut(str(sample.get("prompt", "")), keep_end=True), _cut(str(sample.get("reference", ""))),
                     *[_cut(str(answer)) for answer in answers]])
    return [("h2", "Samples"),
            ("p", f"Greedy answers to the first eval prompts by the runs of seed {seed}, every strategy on the same "
                  f"prompts (shown by their end, where the question is; summary.json holds them whole). "
                  f"-: that run has no answer to this prompt."),
            ("table", ["prompt", "reference", *[label for label, _ in runs]], rows)]


def _sample_runs(a: Analysis) -> tuple[Any, list[tuple[str, list[dict]]]] | None:
    """(seed, [(group label, that run's samples)]): the seed with samples from the most strategies, lowest first."""
    by_seed: dict[Any, dict[str, list[dict]]] = {}
    for run in a.runs:
        if run.status == "completed" and run.summary and run.summary.samples:
            by_seed.setdefault(run.seed, {}).setdefault(group_label(run.strategy, run.grid), run.summary.samples)
    if not by_seed:
        return None
    seed = min(by_seed, key=lambda s: (-len(by_seed[s]), s is None, s or 0))
    return seed, [(g.label, by_seed[seed][g.label]) for g in a.groups if g.label in by_seed[seed]]


def _cut(text: str, keep_end: bool = False) -> str:
    text = text.strip()
    if len(text) <= SAMPLE_CHARS:
        return text
    return "…" + text[1 - SAMPLE_CHARS:] if keep_end else text[:SAMPLE_CHARS - 1] + "…"


def environment_blocks(a: Analysis) -> list[Block]:
    envs = [r.summary.environment for r in a.runs if r.summary]
    keys = list(dict.fromkeys(k for env in envs for k in env))
    lines = [f"{key}: {', '.join(sorted({str(env[key]) for env in envs if key in env}))}" for key in keys]
    starts = sorted(r.summary.started for r in a.runs if r.summary and r.summary.started)
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
