"""The report's "What this data can and cannot say": every caveat a reader needs before trusting a number.

Runs left out of the means and why, groups with one seed, a classifier that does not beat the
majority class, a small eval set, short training, generation metrics over few answers, a shared
machine, CPU memory figures, and what the runs themselves warned about (the data loader's findings).
"""

from __future__ import annotations

from peftlab.run.summary import SMALL_EVAL, SMALL_EVAL_EXAMPLES
from peftlab.study.analysis import Analysis
from peftlab.study.stats import one_seed_warnings

SHORT_TRAINING_STEPS = 100  # fewer optimizer steps than this: the ordering may not hold for a real fine-tune


def warning_lines(a: Analysis) -> list[str]:
    """The section's lines, in the order a reader needs them; one line saying so when there is nothing to say."""
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
    lines += generation_warnings(a)
    # each run's small-eval warning is left out: regime_warnings words it once, for the whole sweep
    runner = {m for r in a.runs if r.summary for m in r.summary.warning_messages(leave_out=(SMALL_EVAL,))}
    lines += [f"runner: {m}" for m in sorted(runner)]
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
    if eval_sizes and min(eval_sizes) < SMALL_EVAL_EXAMPLES:
        lines.append(f"Runs were evaluated on only {min(eval_sizes)} examples (fewer than {SMALL_EVAL_EXAMPLES}): "
                     "small differences are within evaluation noise.")
    steps = [r["steps"] for r in a.rows if isinstance(r.get("steps"), int)]
    if steps and min(steps) < SHORT_TRAINING_STEPS:
        lines.append(f"Runs trained for as few as {min(steps)} optimizer steps (fewer than {SHORT_TRAINING_STEPS}): "
                     "an ordering of strategies this early may not hold for a full fine-tune.")
    return lines


def generation_warnings(a: Analysis) -> list[str]:
    """Generation metrics over few examples: one answer more or less moves exact match by 1/n."""
    counts = [r["gen_examples"] for r in a.rows if isinstance(r.get("gen_examples"), int)]
    if not counts or min(counts) >= SMALL_EVAL_EXAMPLES:
        return []
    return [f"Generation metrics are means over only {min(counts)} generated answers (fewer than "
            f"{SMALL_EVAL_EXAMPLES}): one answer more or less moves exact match and contains by "
            f"{1 / min(counts):.2g}."]


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

