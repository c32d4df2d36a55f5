"""Wall time of a whole sweep: ``peftlab sweep`` against the same study run as the seeds ran it.

    .venv/bin/python bench/sweep_wall.py                                  # the whole selective placement study
    .venv/bin/python bench/sweep_wall.py --strategies all_linear,mlp_only --seeds 42 --max-steps 20 --reps 3

Long because it holds both sides of one measurement, their worker, and the table that puts them together.

* peftlab: one ``python -m peftlab sweep SWEEP --out DIR/repR/peftlab --set ...`` process, timed from outside.
* seeds:   for every (strategy, seed) trial of the same expanded sweep (``load_sweep`` + ``expand``: each
           trial's resolved RunConfig), one fresh Python process that imports the libraries, loads the model
           afresh, wraps it with ``peft.get_peft_model`` (the trial's own modules, ranks and alphas, as peftlab
           places them) and trains with HF ``Trainer`` in the seeds' recipe (bench/systems.py's ``hf_seeds``:
           micro-batches of 1 padded to max_length, gradient accumulation up to the trial's batch, random order),
           evaluating every ``train.eval_every`` steps on the same eval set; the processes run one after another.
           Like the seeds, it trains a duplicate strategy again (peftlab trains it once: ``alias_of``).

Both sides get the same ``--set`` overrides, including EQUAL_WORK (no generation, no forgetting, no samples,
no periodic checkpoints), so each does training and evaluation only, plus saving its adapter. What only
peftlab does besides (the untrained base model's reference evaluation, the report) is in its wall time and
also shown apart (PARTS); the "same work" ratio leaves out the report and the duplicate trainings.
Repetitions interleave (peftlab, seeds, peftlab, ...); medians are reported, and the ratio seeds wall /
peftlab wall per repetition and as a median. Writes ``<results>/sweep-wall-<machine>-<date>.json`` and
``.md``; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` and `peftlab` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SWEEP = ROOT / "examples" / "selective_placement.yaml"
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"
# What only peftlab does beyond training and evaluation, turned off on both sides so both do the same work.
EQUAL_WORK = ("eval.generate=null", "eval.reference=null", "train.num_samples=0", "train.save_every=null")
PARTS = {
    "peftlab": "the `peftlab sweep` process: Python start, imports, the base model loaded once per process and "
               "copied per trial, data, placement, training with evaluations every train.eval_every steps and at the "
               "end, adapter export and summary.json per trained trial (a duplicate strategy trained once), the "
               "untrained base model's reference evaluation (also shown apart: its summary's wall_seconds, which "
               "include the first model load and the data the trials then reuse) and the report (also shown apart: "
               "rebuilt with make_report in the bench process, an estimate)",
    "seeds": "one Python process per (strategy, seed) trial, one after another: Python start, imports, the model "
             "loaded afresh, data, get_peft_model, Trainer.train with evaluations every train.eval_every steps, "
             "the final evaluation (peftlab's evaluate, the same loss definition as peftlab's), the adapter saved "
             "with save_pretrained; a duplicate strategy trained again, as the seeds did",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", nargs="?", type=Path, default=DEFAULT_SWEEP, help="sweep file")
    parser.add_argument("--strategies", help="comma list: run only these strategies of the sweep")
    parser.add_argument("--seeds", help="comma list: run only these seeds of the sweep")
    parser.add_argument("--max-steps", type=int, help="train.max_steps for every trial (both sides)")
    parser.add_argument("--train-size", type=int, help="data.train_size for every trial (both sides)")
    parser.add_argument("--eval-size", type=int, help="data.eval_size for every trial (both sides)")
    parser.add_argument("--eval-every", type=int, help="train.eval_every for every trial (both sides)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="any other override, for every trial of both sides")
    parser.add_argument("--reps", type=int, default=1, help="interleaved repetitions of both sides")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "sweep-wall",
                        help="working folder for the runs (must not exist or be empty)")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="where the .json and .md go")
    parser.add_argument("--keep-runs", action="store_true", help="keep each repetition's run folders")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # internal: one seeds-way trial
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error("--reps must be >= 1")
    return args


def overrides_for(args: argparse.Namespace) -> list[str]:
    """Every --set both sides get: the equal-work ones, the shrinking options, then the user's."""
    shrink = {"train.max_steps": args.max_steps, "data.train_size": args.train_size,
              "data.eval_size": args.eval_size, "train.eval_every": args.eval_every}
    return [*EQUAL_WORK, *(f"{k}={v}" for k, v in shrink.items() if v is not None), *args.overrides]


def subset_sweep(args: argparse.Namespace, out: Path) -> Path:
    """The sweep file, cut to --strategies and --seeds, written to ``out`` with its paths made absolute."""
    from peftlab.config import load_yaml
    from peftlab.errors import UserError
    from peftlab.study.sweep import portable_base

    raw = load_yaml(args.sweep)
    raw["base"] = portable_base(raw.get("base"), args.sweep.parent)
    if args.strategies:
        wanted = args.strategies.split(",")
        missing = sorted(set(wanted) - set(raw.get("strategies") or {}))
        if missing:
            raise UserError(f"--strategies: {', '.join(missing)} not in {args.sweep}")
        raw["strategies"] = {name: raw["strategies"][name] for name in wanted}
        if raw.get("baseline") not in raw["strategies"]:
            raw["baseline"] = wanted[0]
    if args.seeds:
        raw["seeds"] = [int(seed) for seed in args.seeds.split(",")]
    raw.setdefault("name", args.sweep.stem)
    path = out / "sweep.yaml"
    path.write_text(json.dumps(raw, indent=2))  # JSON is YAML
    return path


# --- the trials and their peft configs -------------------------------------------------------------


def plan_trials(sweep: Path, overrides: list[str], out: Path) -> list[dict[str, Any]]:
    """Every training trial of the expanded sweep: its id, config, alias and peft LoraConfig arguments."""
    from peftlab.config import config_to_dict
    from peftlab.study.sweep import expand, load_sweep

    trials = [t for t in expand(load_sweep(sweep, overrides), out) if not t.is_reference]
    return [{"run_id": t.run_id, "strategy": t.strategy, "seed": t.seed, "alias_of": t.alias_of,
             "config": config_to_dict(t.config), **lora_arguments(t.config)} for t in trials]


def lora_arguments(config: Any) -> dict[str, Any]:
    """peft's LoraConfig arguments for the modules, ranks and alphas peftlab places for ``config``.

    Full module names as target_modules (peft matches a name by equality or dotted suffix), the most common
    rank and alpha as r and lora_alpha, the others as rank_pattern / alpha_pattern, anchored on full names."""
    import re

    from peftlab.errors import UserError
    from peftlab.run.inspection import inspect_placement

    method = config.method
    if method.name != "lora" or method.quantize_base or config.task not in ("instruction", "causal_lm"):
        raise UserError(f"sweep_wall compares LoRA on causal LMs only; this sweep has a {method.name} "
                        f"{config.task} trial")
    report = inspect_placement(config.model, method, task=config.task)
    prepared = report.prepared
    if any(t.slices for t in prepared.targets):
        raise UserError("sweep_wall: a placement on slices of a fused projection has no peft equivalent")
    r = Counter(prepared.ranks.values()).most_common(1)[0][0]
    alpha = Counter(prepared.alphas.values()).most_common(1)[0][0]
    names = [t.name for t in prepared.targets]
    pattern = {name: f"^{re.escape(name)}$" for name in names}
    return {"peftlab_trainable": prepared.trainable_params,
            "lora": {"target_modules": names, "r": r, "lora_alpha": alpha, "lora_dropout": method.dropout,
                     "rank_pattern": {pattern[n]: prepared.ranks[n] for n in names if prepared.ranks[n] != r},
                     "alpha_pattern": {pattern[n]: prepared.alphas[n] for n in names if prepared.alphas[n] != alpha},
                     "use_rslora": method.rslora, "use_dora": method.dora}}


# --- one seeds-way trial: the worker (a fresh process) ---------------------------------------------


def seeds_trial(job: dict[str, Any]) -> dict[str, Any]:
    """One trial as a seed script ran it: fresh model, peft, HF Trainer with periodic evaluation."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

    from bench.systems import CountingCollator, Spec, _ListDataset, hf_recipe
    from peftlab.config import RunConfig, from_dict
    from peftlab.core.params import count_params
    from peftlab.inputs.data import load_task_data
    from peftlab.inputs.models import load_model, load_tokenizer
    from peftlab.run.resources import resolve_device
    from peftlab.run.train import evaluate_on

    config = from_dict(RunConfig, job["config"])
    train, device = config.train, resolve_device(config.train.device)
    tokenizer = load_tokenizer(config.model)
    data = load_task_data(config.data, config.task, tokenizer)
    set_seed(train.seed)
    model = get_peft_model(load_model(config.model, config.task, tokenizer=tokenizer).model,
                           LoraConfig(**job["lora"], bias="none", task_type="CAUSAL_LM"))
    # the seeds' recipe: batch 1 padded to max_length, accumulated up to the trial's batch (the same steps)
    recipe = Spec(seeds_grad_accum=train.batch_size * train.grad_accum, max_length=config.data.max_length)
    batch, accumulation, sampler, _ = hf_recipe("hf_seeds", recipe)
    collator = CountingCollator(tokenizer.pad_token_id, config.data.max_length)

    class NoEvalAtTheEnd(TrainerCallback):  # as peftlab: periodic evaluations before the last step, one final
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if state.global_step >= state.max_steps:
                control.should_evaluate = False
            return control

    arguments = TrainingArguments(
        output_dir=job["out_dir"], num_train_epochs=train.epochs, max_steps=train.max_steps or -1,
        learning_rate=train.lr, lr_scheduler_type=train.scheduler, warmup_steps=train.warmup_ratio,
        weight_decay=train.weight_decay, max_grad_norm=train.max_grad_norm or 0.0, seed=train.seed,
        per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        train_sampling_strategy=sampler, per_device_eval_batch_size=train.batch_size,
        eval_strategy="steps" if train.eval_every else "no", eval_steps=train.eval_every,
        logging_strategy="steps", logging_steps=train.log_every, save_strategy="no", report_to="none",
        disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0,
        bf16=device.type == "cuda", use_cpu=device.type == "cpu")
    trainer = Trainer(model=model, args=arguments, train_dataset=_ListDataset(data.train),
                      eval_dataset=_ListDataset(data.eval), data_collator=collator, callbacks=[NoEvalAtTheEnd()])
    result = trainer.train()
    final = evaluate_on(model.get_base_model(), data.eval, config.task, train, tokenizer.pad_token_id, device)
    model.save_pretrained(Path(job["out_dir"]) / "adapter")
    evaluations = sum(1 for entry in trainer.state.log_history if "eval_loss" in entry) + 1
    return {"eval_loss": final.loss, "steps": int(result.global_step), "trainable": count_params(model)[0],
            "evaluations": evaluations, "train_examples": len(data.train), "eval_examples": len(data.eval),
            "status": "completed" if torch.isfinite(torch.tensor(final.loss)) else "diverged"}


def _worker(job_path: Path) -> int:
    job = json.loads(job_path.read_text())
    Path(job["result"]).write_text(json.dumps(seeds_trial(job)))
    return 0


# --- the two sides ---------------------------------------------------------------------------------


def _environment() -> dict[str, str]:
    # no progress bars on either side (HF's is off by disable_tqdm); nothing reaches the network
    return {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def _timed(command: list[str], log: Path) -> float:
    started = time.perf_counter()
    with log.open("w") as handle:
        completed = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, env=_environment())
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(command[:4])} ... failed (exit {completed.returncode}), log {log}:\n{tail}")
    return seconds


def run_peftlab(sweep: Path, overrides: list[str], out: Path, trials: list[dict]) -> dict[str, Any]:
    """One `peftlab sweep` process, timed; per-trial results from its summaries; the report rebuilt, timed."""
    sets = [item for text in overrides for item in ("--set", text)]
    wall = _timed([sys.executable, "-m", "peftlab", "sweep", str(sweep), "--out", str(out), *sets],
                  out.parent / "peftlab-sweep.log")
    from peftlab.study.report import make_report

    started = time.perf_counter()  # the report again, here (libraries imported): an estimate of the sweep's own
    make_report(out)
    report = time.perf_counter() - started
    runs = out / "runs"
    summaries = {p.parent.name: json.loads(p.read_text()) for p in runs.glob("*/summary.json")}
    reference = sum(s["wall_seconds"] for name, s in summaries.items() if name.startswith("base_model__"))
    per_trial = {}
    for trial in trials:
        summary = summaries.get(trial["alias_of"] or trial["run_id"], {})
        per_trial[trial["run_id"]] = {
            "eval_loss": (summary.get("metrics") or {}).get("eval_loss"), "status": summary.get("status"),
            "steps": (summary.get("resources") or {}).get("steps"),
            "trainable": (summary.get("params") or {}).get("trainable"),
            "wall_seconds": None if trial["alias_of"] else summary.get("wall_seconds")}
    return {"wall_seconds": wall, "reference_seconds": reference, "report_seconds": report,
            "same_work_seconds": wall - report, "trials": per_trial}


def run_seeds(trials: list[dict], out: Path) -> dict[str, Any]:
    """One fresh process per trial, one after another, each timed from outside."""
    per_trial, started = {}, time.perf_counter()
    for trial in trials:
        folder = out / trial["run_id"]
        folder.mkdir(parents=True)
        job = {"config": trial["config"], "lora": trial["lora"], "out_dir": str(folder),
               "result": str(folder / "result.json")}
        (folder / "job.json").write_text(json.dumps(job))
        seconds = _timed([sys.executable, str(Path(__file__).resolve()), "--worker", str(folder / "job.json")],
                         folder / "worker.log")
        record = per_trial[trial["run_id"]] = {**json.loads((folder / "result.json").read_text()),
                                               "wall_seconds": seconds}
        _progress(f"  seeds way {trial['run_id']}: {seconds:.1f} s, eval loss {record['eval_loss']:.4f}")
    wall = time.perf_counter() - started  # around all the processes: theirs plus the little between them
    duplicates = sum(per_trial[t["run_id"]]["wall_seconds"] for t in trials if t["alias_of"])
    return {"wall_seconds": wall, "distinct_seconds": wall - duplicates,
            "trials": per_trial}


# --- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any] | int:
    args = parse_args(argv)
    if args.worker:
        return _worker(args.worker)
    from peftlab.errors import UserError

    try:
        return measure(args, argv if argv is not None else sys.argv[1:])
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def measure(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    import torch

    from bench import machine
    from peftlab.errors import UserError

    out = args.out.absolute()
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} is not empty; give a new folder (its runs must not be resumed)")
    out.mkdir(parents=True, exist_ok=True)
    overrides = overrides_for(args)
    sweep = subset_sweep(args, out)
    trials = plan_trials(sweep, overrides, out / "plan")
    _progress(f"{len(trials)} trials ({sum(1 for t in trials if t['alias_of'])} duplicates peftlab trains once), "
              f"{args.reps} repetition(s), into {out}")
    reps = []
    for rep in range(args.reps):
        folder = out / f"rep{rep + 1}"
        (folder / "seeds").mkdir(parents=True)
        _progress(f"[rep {rep + 1}/{args.reps}] peftlab sweep ...")
        peftlab = run_peftlab(sweep, overrides, folder / "peftlab", trials)
        _progress(f"[rep {rep + 1}/{args.reps}] peftlab: {peftlab['wall_seconds']:.1f} s; seeds way ...")
        seeds = run_seeds(trials, folder / "seeds")
        _progress(f"[rep {rep + 1}/{args.reps}] seeds way: {seeds['wall_seconds']:.1f} s, "
                  f"ratio {seeds['wall_seconds'] / peftlab['wall_seconds']:.2f}x")
        reps.append({"rep": rep + 1, "peftlab": peftlab, "seeds": seeds,
                     "ratio": seeds["wall_seconds"] / peftlab["wall_seconds"],
                     "ratio_same_work": seeds["distinct_seconds"] / peftlab["same_work_seconds"]})
        if not args.keep_runs:
            shutil.rmtree(folder)
    info = machine.describe(torch.device("cpu" if not torch.cuda.is_available() else "cuda"))
    results = summarise(args, argv, overrides, trials, reps, info)
    json_path, md_path = write_results(results, args.results)
    _progress(f"wrote {json_path} and {md_path}")
    print(render_markdown(results))
    return results


def _progress(text: str) -> None:
    print(f"sweep_wall {time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def summarise(args: argparse.Namespace, argv: list[str], overrides: list[str], trials: list[dict], reps: list[dict],
              info: dict) -> dict[str, Any]:
    def median(side: str, key: str) -> float:
        return statistics.median(r[side][key] for r in reps)

    loss_sums = {side: [sum(r[side]["trials"][t["run_id"]]["eval_loss"] for t in trials) for r in reps]
                 for side in ("peftlab", "seeds")}
    return {
        "machine": info, "date": time.strftime("%Y-%m-%d"), "time": time.strftime("%H:%M:%S"),
        "command": " ".join(["bench/sweep_wall.py", *argv]),
        "settings": {"sweep": str(args.sweep), "strategies": args.strategies, "seeds": args.seeds,
                     "overrides": overrides, "reps": args.reps},
        "parts": PARTS,
        "trials": [{k: t[k] for k in ("run_id", "strategy", "seed", "alias_of", "peftlab_trainable", "lora")}
                   for t in trials],
        "reps": reps,
        "summary": {"peftlab_wall_median": median("peftlab", "wall_seconds"),
                    "peftlab_reference_median": median("peftlab", "reference_seconds"),
                    "peftlab_report_median": median("peftlab", "report_seconds"),
                    "peftlab_same_work_median": median("peftlab", "same_work_seconds"),
                    "seeds_wall_median": median("seeds", "wall_seconds"),
                    "seeds_distinct_median": median("seeds", "distinct_seconds"),
                    "ratio_median": statistics.median(r["ratio"] for r in reps),
                    "ratio_of_medians": median("seeds", "wall_seconds") / median("peftlab", "wall_seconds"),
                    "ratio_same_work_median": statistics.median(r["ratio_same_work"] for r in reps),
                    "eval_loss_sum": {side: statistics.median(sums) for side, sums in loss_sums.items()},
                    "eval_loss_sum_all": loss_sums},
    }


def write_results(results: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    from bench import machine

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"sweep-wall-{machine.machine_slug(results['machine'])}-{results['date']}"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    md_path.write_text(render_markdown(results))
    return json_path, md_path


def render_markdown(results: dict[str, Any]) -> str:
    m, s, reps = results["machine"], results["summary"], results["reps"]
    lines = [f"## Sweep wall time: peftlab vs the seeds' way — {results['date']}", "",
             f"Machine: {m['cpu']}, {m['cores']} cores{', ' + m['gpu'] if m.get('gpu') else ''}; torch {m['torch']}, "
             f"transformers {m['transformers']}, peft {m['peft']}. Sweep {results['settings']['sweep']}, "
             f"{len(results['trials'])} trials, overrides on both sides: "
             f"{', '.join(f'`{o}`' for o in results['settings']['overrides'])}.", "",
             "| rep | peftlab wall s | of which reference eval s | of which report s | seeds-way wall s | "
             "of which duplicate trainings s | ratio seeds/peftlab | ratio, same work only |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in reps:
        p, q = r["peftlab"], r["seeds"]
        lines.append(f"| {r['rep']} | {p['wall_seconds']:.1f} | {p['reference_seconds']:.1f} | "
                     f"{p['report_seconds']:.1f} | {q['wall_seconds']:.1f} | "
                     f"{q['wall_seconds'] - q['distinct_seconds']:.1f} | {r['ratio']:.2f}x | "
                     f"{r['ratio_same_work']:.2f}x |")
    lines += [f"| median | {s['peftlab_wall_median']:.1f} | {s['peftlab_reference_median']:.1f} | "
              f"{s['peftlab_report_median']:.1f} | {s['seeds_wall_median']:.1f} | "
              f"{s['seeds_wall_median'] - s['seeds_distinct_median']:.1f} | {s['ratio_median']:.2f}x | "
              f"{s['ratio_same_work_median']:.2f}x |", "",
              "Ratio: seeds-way wall / peftlab wall, per repetition (interleaved) and its median "
              f"(ratio of medians {s['ratio_of_medians']:.2f}x). Same work only: the seeds way without its duplicate "
              "trainings / peftlab without its report (an estimate: the report as rebuilt); the reference evaluation "
              "stays in peftlab's wall (it also holds the first model load the trials reuse).",
              "", f"- peftlab's wall: {results['parts']['peftlab']}.",
              f"- seeds-way wall: {results['parts']['seeds']}.",
              "", "| trial | duplicate of | trainable (peftlab / peft) | steps (peftlab / HF) | eval loss peftlab | "
              "eval loss seeds way |", "|---|---|---|---|---:|---:|"]
    first = reps[0]
    for t in results["trials"]:
        p, q = first["peftlab"]["trials"][t["run_id"]], first["seeds"]["trials"][t["run_id"]]
        lines.append(f"| {t['run_id']} | {t['alias_of'] or '-'} | {p['trainable']:,} / {q['trainable']:,} | "
                     f"{p['steps']} / {q['steps']} | {p['eval_loss']:.4f} | {q['eval_loss']:.4f} |")
    sums = s["eval_loss_sum"]
    lines += ["", f"Eval losses of repetition 1 (the same token-weighted loss on the same eval set on both sides). "
              f"Sum over trials (median over repetitions): peftlab {sums['peftlab']:.4f}, seeds way "
              f"{sums['seeds']:.4f}. Command: `.venv/bin/python {results['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    outcome = main()
    sys.exit(outcome if isinstance(outcome, int) else 0)
