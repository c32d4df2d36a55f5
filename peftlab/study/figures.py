"""Report figures (matplotlib, Agg): each titled, axes labelled with units, with a legend.

Figures are built on ``matplotlib.figure.Figure`` with an Agg canvas, never through pyplot, so
making a report changes no global matplotlib state and needs no display. Each function writes one
PNG and returns its path, or None when the sweep has nothing to draw for it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from peftlab.core.roles import ROLES
from peftlab.study.stats import GroupStats

DPI = 110


def palette(labels: Sequence[str]) -> dict[str, Any]:
    """One colour per strategy, the same in every figure."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def _count(value: float, _position: Any = None) -> str:
    """1500 -> 1.5k, 4884480 -> 4.88M: tick labels a reader takes in at a glance."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _half(group: GroupStats, metric: str) -> float:
    stat = group.stats.get(metric)
    return 0.0 if stat is None or stat.half_width is None else stat.half_width


def quality_vs_params(groups: list[GroupStats], quality: str, quality_label: str, higher_is_better: bool,
                      path: Path, reference: float | None = None) -> Path | None:
    """Mean quality (95% CI bars) against trainable parameters on a log axis; the Pareto frontier marked.

    ``reference``: the untrained base model's value, drawn as a horizontal line (it has no trainable
    parameters, so no place on the log axis).
    """
    points = [g for g in groups if g.mean(quality) is not None and g.mean("trainable_params")]
    if not points:
        return None
    colors = palette([g.label for g in groups])
    fig = Figure(figsize=(8, 5.2), layout="constrained")
    ax = fig.add_subplot()
    labels = []
    for group in points:
        one_seed = group.stats[quality].n == 1
        ax.errorbar(group.mean("trainable_params"), group.mean(quality), yerr=_half(group, quality), fmt="o",
                    color=colors[group.label], mfc="white" if one_seed else colors[group.label], capsize=4, ms=7,
                    label=f"{group.label} (n={group.stats[quality].n}{', no CI' if one_seed else ''})")
        labels.append(ax.annotate(group.label, (group.mean("trainable_params"), group.mean(quality)), fontsize=7,
                                  xytext=(6, 4), textcoords="offset points"))
    front = sorted((g for g in points if g.pareto.get("params")), key=lambda g: g.mean("trainable_params"))
    if front:
        ax.plot([g.mean("trainable_params") for g in front], [g.mean(quality) for g in front], "--", color="0.3",
                lw=1.2, drawstyle="steps-post",
                label="Pareto frontier (off it only if a cheaper strategy is better, paired by seed)")
    if reference is not None:
        ax.axhline(reference, color="0.2", ls=":", lw=1.2, label=f"untrained base model (step 0): {reference:.4g}")
    ax.set_xscale("log")
    costs = [g.mean("trainable_params") for g in points]
    ax.xaxis.set_major_formatter(FuncFormatter(_count))
    # Over a decade or two few major ticks fall in range: label the minor ticks too.
    narrow = math.log10(max(costs) / min(costs)) < 2
    if narrow:
        ax.xaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 3.0, 5.0)))
    ax.xaxis.set_minor_formatter(FuncFormatter(_count) if narrow else NullFormatter())
    ax.set_xlabel("trainable parameters (count, log scale)")
    ax.set_ylabel(f"{quality_label} ({'higher' if higher_is_better else 'lower'} is better)")
    ax.set_title("Quality against trainable parameters (mean over seeds, bars: 95% CI)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    _separate_labels(fig, labels)
    return _save(fig, path)


def _separate_labels(fig: Figure, labels: list[Any]) -> None:
    """Move point labels down, one line at a time, until no two overlap (they start beside their points)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # lay the figure out first: extents are only final after a draw
    renderer = canvas.get_renderer()
    placed: list[Any] = []
    for label in sorted(labels, key=lambda t: -t.get_window_extent(renderer).y0):
        for _ in range(12):
            box = label.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                break
            x, y = label.xyann
            label.xyann = (x, y - (box.height + 1) * 72 / fig.dpi)  # extents are pixels, offsets points
        placed.append(label.get_window_extent(renderer))


def time_and_memory(groups: list[GroupStats], memory_kind: str, path: Path) -> Path | None:
    """Training time and peak memory per strategy: median bars, whiskers from the fastest to the slowest seed.

    Medians and ranges rather than mean +- t interval: times are skewed by a busy machine and an
    interval over three seeds can reach below zero.
    """
    shown = [g for g in groups if g.median("train_seconds") is not None]
    if not shown:
        return None
    colors = palette([g.label for g in groups])
    fig = Figure(figsize=(11, 0.45 * len(shown) + 2.2), layout="constrained")
    labels = [g.label for g in shown]
    y = np.arange(len(shown))
    panels = (("train_seconds", "training time (s, optimizer steps only)", "Training time per strategy"),
              ("peak_memory_mb", f"peak memory (MiB, {memory_kind})", "Peak memory per strategy"))
    for index, (metric, xlabel, title) in enumerate(panels, 1):
        ax = fig.add_subplot(1, 2, index)
        values = [g.median(metric) or 0.0 for g in shown]
        ax.barh(y, values, xerr=_range_whiskers(shown, metric), capsize=3, color=[colors[label] for label in labels])
        ax.set_yticks(y, labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        ax.grid(True, axis="x", alpha=0.3)
    handles = [Patch(color=colors[label], label=label) for label in labels]
    handles.append(Line2D([], [], color="black", marker="|", ms=10, lw=1.2, label="range over seeds (min-max)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(6, len(handles)), fontsize=7,
               title="bar: median over completed seeds", title_fontsize=7)
    return _save(fig, path)


def _range_whiskers(groups: list[GroupStats], metric: str) -> np.ndarray:
    """Asymmetric whiskers (below, above) from the median to the lowest and highest seed."""
    below, above = [], []
    for group in groups:
        summary = group.spreads.get(metric)
        below.append(0.0 if summary is None else summary.median - summary.low)
        above.append(0.0 if summary is None else summary.high - summary.median)
    return np.array([below, above])


def loss_curves(curves: dict[str, list[list[dict[str, Any]]]], loss_label: str, path: Path,
                reference: float | None = None) -> Path | None:
    """Train and eval loss against optimizer step: per strategy the mean over seeds, band = min..max.

    The training panel shows a running mean over a trailing window of steps (see ``running_loss``):
    batches are grouped by length, so one batch's loss swings with its length (and the longest batch
    comes first), which a raw per-step curve shows as a spike that is not learning. The evaluation panel
    starts at step 0 with the untrained base model (``reference``) when it was evaluated.
    """
    if not any(records for runs in curves.values() for records in runs):
        return None
    colors = palette(list(curves))
    window = _smoothing_window(curves)
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    panels = (("train_loss", f"Training loss (mean of the last {window} steps; it moves with the lengths of\n"
                             "the batches in the window: compare strategies on the eval panel)"),
              ("eval_loss", "Evaluation loss (eval set, through training)"))
    for index, (key, title) in enumerate(panels, 1):
        ax = fig.add_subplot(1, 2, index)
        for label, runs in curves.items():
            series = [running_loss(records, window) for records in runs] if key == "train_loss" else runs
            steps, mean, low, high = _mean_curve(series, key, reference if key == "eval_loss" else None)
            if not steps:
                continue
            marker = "o" if key == "eval_loss" else None
            ax.plot(steps, mean, color=colors[label], marker=marker, ms=4, lw=1.5, label=f"{label} (n={len(runs)})")
            if len(runs) > 1:
                ax.fill_between(steps, low, high, color=colors[label], alpha=0.15)
        if key == "eval_loss" and reference is not None:
            ax.plot([0], [reference], marker="*", ms=12, color="black", ls="none",
                    label="untrained base model (step 0)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"{key.replace('_', ' ')} ({loss_label})")
        ax.set_title(f"{title}\nper strategy: mean over seeds, band min-max", fontsize=10)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    return _save(fig, path)


def _smoothing_window(curves: dict[str, list[list[dict[str, Any]]]]) -> int:
    """About a tenth of the longest run, at least one step."""
    longest = max((int(r["step"]) for runs in curves.values() for records in runs for r in records if "step" in r),
                  default=1)
    return max(1, round(longest / 10))


def running_loss(records: list[dict[str, Any]], window: int) -> list[dict[str, Any]]:
    """Training records with train_loss replaced by the mean of the last ``window`` steps' losses.

    Each step counts once, not by its tokens: batches are length-grouped and the longest comes first,
    and per-token loss falls with length, so a token-weighted window is the first batch's loss until
    that batch leaves it (a jump that is not learning). The curve starts once the window is full.
    """
    steps = [r for r in records if isinstance(r.get("train_loss"), (int, float)) and math.isfinite(r["train_loss"])]
    smoothed = []
    for index, record in enumerate(steps):
        if index + 1 < window and index + 1 < len(steps):
            continue
        recent = steps[max(0, index - window + 1): index + 1]
        smoothed.append({"step": record["step"], "train_loss": sum(r["train_loss"] for r in recent) / len(recent)})
    return smoothed


def _mean_curve(runs: list[list[dict[str, Any]]], key: str,
                start: float | None = None) -> tuple[list[int], list[float], list[float], list[float]]:
    by_step: dict[int, list[float]] = {0: [start]} if start is not None else {}
    for records in runs:
        for record in records:
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                by_step.setdefault(int(record["step"]), []).append(float(value))
    if start is not None and len(by_step) == 1:
        return [], [], [], []
    steps = sorted(by_step)
    return (steps, [float(np.mean(by_step[s])) for s in steps], [min(by_step[s]) for s in steps],
            [max(by_step[s]) for s in steps])


def rank_heatmaps(placements: dict[str, list[dict[str, Any]]], path: Path) -> Path | None:
    """Per strategy, the LoRA rank of every adapted module: layers (rows) x roles (columns); grey = not adapted."""
    ranked = {label: [p for p in entries if p.get("rank") and p.get("layer") is not None]
              for label, entries in placements.items()}
    ranked = {label: entries for label, entries in ranked.items() if entries}
    if not ranked:
        return None
    n_layers = 1 + max(p["layer"] for entries in ranked.values() for p in entries)
    vmax = max(p["rank"] for entries in ranked.values() for p in entries)
    cols = min(3, len(ranked))
    rows = math.ceil(len(ranked) / cols)
    fig = Figure(figsize=(4.6 * cols + 1, rows * (0.2 * n_layers + 2.4)), layout="constrained")
    image = None
    columns = _columns([p for entries in ranked.values() for p in entries])  # shared: placements compare
    for index, (label, entries) in enumerate(ranked.items(), 1):
        ax = fig.add_subplot(rows, cols, index)
        grid = np.full((n_layers, len(columns)), np.nan)
        for entry in entries:
            grid[entry["layer"], columns.index(_column(entry))] = entry["rank"]
        ax.set_facecolor("0.85")  # NaN cells show the background: not adapted
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        if grid.size <= 320:
            for (layer, col), value in np.ndenumerate(grid):
                if not math.isnan(value):
                    ax.text(col, layer, str(int(value)), ha="center", va="center", fontsize=6,
                            color="white" if value < 0.6 * vmax else "black")
        ax.set_xticks(range(len(columns)), [f"{leaf}\n({role})" for role, leaf in columns], fontsize=6, rotation=45,
                      ha="right")
        ax.set_yticks(range(0, n_layers, max(1, n_layers // 10)))
        ax.set_xlabel("module (role)")
        ax.set_ylabel("layer index")
        ranks = [p["rank"] for p in entries]
        ax.set_title(f"{label}: {len(entries)} modules, r {min(ranks)}-{max(ranks)}", fontsize=9)
    fig.suptitle("LoRA rank per layer and module (grey: not adapted)")
    fig.colorbar(image, ax=fig.axes, label="LoRA rank r", shrink=0.8)
    return _save(fig, path)


def _column(entry: dict[str, Any]) -> tuple[str, str]:
    """(role, module name within its block, with adapted slices), e.g. ("attn_qkv", "c_attn:q,v")."""
    name, layer = entry["module"], entry["layer"]
    match = re.search(rf"(?:^|\.){layer}\.(.+)$", name)
    leaf = (match.group(1) if match else name).rsplit(".", 1)[-1]
    if entry.get("slices"):
        leaf += ":" + ",".join(entry["slices"])
    return entry.get("role") or "other", leaf


def _columns(entries: list[dict[str, Any]]) -> list[tuple[str, str]]:
    order = {role: i for i, role in enumerate(ROLES)}  # the model map's order: attention, MLP, head
    return sorted({_column(e) for e in entries}, key=lambda c: (order.get(c[0], len(order)), c[1]))
