"""Command line: `peftlab run`, `inspect`, `sweep`, `report`, and for a finished run `generate`, `merge`, `eval`,
`push`; argument parsing only.

A user mistake (UserError) prints one line and exits 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from peftlab import messages
from peftlab.config import METHODS, PLACEMENTS, TASKS, MethodConfig, RankConfig, RunConfig, load_config
from peftlab.errors import UserError

EXECUTORS = ("local", "ray")  # where a sweep's trials run (peftlab.study.executors)

if TYPE_CHECKING:
    from peftlab.run.summary import RunSummary


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        with messages.on_stderr():  # what the library logs reaches the user (a run routes its own)
            return args.handler(args)
    except UserError as error:
        print(f"peftlab: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("peftlab: interrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftlab", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run one experiment from a YAML config")
    run.add_argument("config", help="YAML config file")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key by dotted path, e.g. train.max_steps=5 (repeatable)")
    run.add_argument("--out", help="output directory (default: runs/<config name>)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    run.add_argument("--nproc", type=int, default=1, metavar="N",
                     help="processes (GPUs) for this one run: launches torchrun --nproc_per_node N (data parallel)")
    # a sweep's multi-process trial passes its base model's eval loss, for the collapse check (study/executors.py)
    run.add_argument("--reference-eval-loss", type=float, default=None, help=argparse.SUPPRESS)
    run.add_argument("--tracker-scope", default=None, help=argparse.SUPPRESS)  # its trackers' grouping, as JSON
    run.set_defaults(handler=_run)

    inspect = commands.add_parser("inspect", help="print the placement map of a method on a model")
    inspect.add_argument("--model", required=True, help="embedded alias, hub id, or local dir (config.json is enough)")
    inspect.add_argument("--task", default="instruction", choices=TASKS)
    inspect.add_argument("--method", default="lora", choices=METHODS)
    inspect.add_argument("--placement", default="all_linear",
                         help=" | ".join(PLACEMENTS) + " (checked by the config, with a hint)")
    inspect.add_argument("--layers", default="all", help="all | 0-11 | first_half | last_half | every_other | last_N")
    inspect.add_argument("--targets", nargs="+", help="explicit module names, dotted suffixes or re:<regex>")
    inspect.add_argument("--ranks", default="uniform:8",
                         help="uniform:R | linear_decay:START:END | attention_heavy:ATTN:MLP | empirical:R[:E,M,L] "
                              "| custom:R0,R1,... | custom:FILE.json | budget:PARAMS")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of the table")
    inspect.set_defaults(handler=_inspect)
    add_sweep_commands(commands)
    add_finished_commands(commands)
    return parser


def _run(args: argparse.Namespace) -> int:
    from peftlab.run.experiment import run_experiment  # imported here so `peftlab --help` stays fast
    from peftlab.run.trackers import Scope

    config = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    if args.nproc != 1:
        return _launch_torchrun(args, config, out)
    scope = Scope.from_json(args.tracker_scope) if args.tracker_scope else None
    summary = run_experiment(config, out, resume=args.resume, reference_eval_loss=args.reference_eval_loss,
                             scope=scope)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for the run
        return 0 if summary.status == "completed" else 1
    print(format_summary_table(summary))
    print(f"\nresults in {out}/ (summary.json, metrics.jsonl, train.log)")
    return 0 if summary.status == "completed" else 1


def _launch_torchrun(args: argparse.Namespace, config: RunConfig, out: Path) -> int:
    """``peftlab run --nproc N``: the same command under torchrun (one node), after checking what can be
    checked here, so a mistake is one line instead of N processes' tracebacks."""
    from peftlab.run.folder import check_out_dir

    if args.nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {args.nproc}")
    if "WORLD_SIZE" in os.environ:
        raise UserError("--nproc inside torchrun: run either `torchrun --nproc_per_node N -m peftlab run ...` "
                        "or `peftlab run ... --nproc N`, not both")
    if check_out_dir(config, out, args.resume) is not None:
        print(f"{out} holds a finished run; nothing to do", file=sys.stderr)
        return 0
    from peftlab.run.distributed import torchrun_command

    run_args = [args.config, "--out", str(out), *[item for text in args.overrides for item in ("--set", text)]]
    run_args += ["--resume"] if args.resume else []
    if args.reference_eval_loss is not None:
        run_args += ["--reference-eval-loss", repr(args.reference_eval_loss)]
    if args.tracker_scope is not None:
        run_args += ["--tracker-scope", args.tracker_scope]
    command = torchrun_command(args.nproc, run_args)
    process = subprocess.Popen(command)
    while True:
        try:
            return process.wait()
        except KeyboardInterrupt:  # Ctrl-C reached the workers too: wait while they save a checkpoint and stop
            continue


def format_summary_table(summary: RunSummary) -> str:
    """A small results table for the terminal."""
    rows = [("status", summary.status)]
    if summary.divergence is not None:
        d = summary.divergence
        rows.append(("diverged", f"step {d.step}: {d.reason} ({', '.join(d.parameters[:3]) or 'no parameter named'})"))
    for key in ("eval_loss", "perplexity", "accuracy", "macro_f1", "train_loss"):
        if key in summary.metrics:
            rows.append((key, f"{summary.metrics[key]:.4f}"))
    params, resources = summary.params, summary.resources
    if params is not None:
        rows.append(("trainable params", f"{params.trainable:,} of {params.total:,} ({params.percent:.3f}%)"))
    if resources is not None:
        rows += [
            ("train time", f"{resources.train_seconds:.1f} s over {resources.steps} steps"),
            ("tokens/s", f"{resources.tokens_per_s:.0f} (non-padding)"),
            ("peak memory", f"{resources.peak_memory_mb:.0f} MiB ({resources.memory_kind})"),
            ("saved", f"{resources.adapter_bytes / 2**20:.2f} MiB"),
        ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    lines += [f"warning: {message}" for message in summary.warning_messages()]
    return "\n".join(lines)


def parse_rank_spec(text: str) -> RankConfig:
    """Parse the --ranks shorthand into a RankConfig."""
    name, _, rest = text.partition(":")
    values = [v for v in rest.split(":") if v] if rest else []
    try:
        if name == "uniform":
            return RankConfig(schedule="uniform", r=int(values[0]) if values else 8)
        if name == "linear_decay":
            return RankConfig(schedule="linear_decay", start=int(values[0]), end=int(values[1]))
        if name == "attention_heavy":
            return RankConfig(schedule="attention_heavy", attention_r=int(values[0]), mlp_r=int(values[1]))
        if name == "empirical":
            multipliers = [float(m) for m in values[1].split(",")] if len(values) > 1 else [0.6, 1.2, 1.0]
            return RankConfig(schedule="empirical", r=int(values[0]), multipliers=multipliers)
        if name == "custom":
            if rest.endswith(".json"):
                return RankConfig(schedule="custom", file=rest)
            return RankConfig(schedule="custom", layer_ranks=[int(r) for r in rest.split(",")])
        if name == "budget":
            return RankConfig(schedule="budget", budget=int(float(values[0])))
    except (IndexError, ValueError):
        raise UserError(f"--ranks {text!r}: malformed; see peftlab inspect --help for the forms") from None
    raise UserError(f"--ranks {text!r}: unknown schedule {name!r}; see peftlab inspect --help")


def _inspect(args: argparse.Namespace) -> int:
    from peftlab.run.inspection import inspect_placement

    method = MethodConfig(name=args.method, placement=args.placement, layers=args.layers,
                          targets=args.targets, ranks=parse_rank_spec(args.ranks))
    report = inspect_placement(args.model, method, task=args.task)
    print(json.dumps(report.as_json(), indent=2) if args.json else report.as_text())
    return 0


# --- sweeps ---------------------------------------------------------------------------------


def add_sweep_commands(subparsers: argparse._SubParsersAction) -> None:
    """`peftlab sweep` and `peftlab report`."""
    sweep = subparsers.add_parser("sweep", help="run a sweep (strategies x grid x seeds) and write its report")
    sweep.add_argument("sweep_file", metavar="SWEEP.yaml", help="sweep file: base, strategies, grid, seeds, baseline")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a run config key in every run, e.g. model=microsoft/DialoGPT-medium (repeatable)")
    sweep.add_argument("--out", help="sweep directory (default: runs/<sweep name>)")
    sweep.add_argument("--executor", choices=EXECUTORS, default="local",
                       help="local: one run after another in this process; ray: runs as Ray tasks")
    sweep.add_argument("--ray-address", help="address of a running Ray cluster (default: start a local instance)")
    sweep.add_argument("--resume", action="store_true",
                       help="continue an interrupted sweep: finished runs are kept, unfinished ones resumed")
    sweep.add_argument("--nproc", type=int, default=1, metavar="N",
                       help="processes (GPUs) per training run: each runs data parallel under torchrun; with "
                            "--executor ray each trial asks Ray for N GPUs (N CPUs where the cluster has none)")
    sweep.set_defaults(handler=sweep_command)

    report = subparsers.add_parser("report", help="rebuild a sweep's tables, figures and report from its run dirs")
    report.add_argument("directory", metavar="DIR", help="a sweep directory (holding runs/<id>/summary.json)")
    report.add_argument("--baseline", help="strategy to compare against (default: the sweep's baseline)")
    report.set_defaults(handler=report_command)


def sweep_command(args: argparse.Namespace) -> int:
    from peftlab.study.executors import run_sweep  # imported here so `peftlab --help` stays fast
    from peftlab.study.report import make_report
    from peftlab.study.sweep import load_sweep

    spec = load_sweep(args.sweep_file, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / spec.name
    summaries = run_sweep(spec, out, executor=args.executor, address=args.ray_address, resume=args.resume,
                          nproc=args.nproc)
    paths = make_report(out)
    counts = Counter(summary.status for summary in summaries)
    print(", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    _print_paths(paths)
    return 1 if counts.get("failed") else 0


def report_command(args: argparse.Namespace) -> int:
    from peftlab.study.report import make_report

    directory = Path(args.directory)
    if not directory.is_dir():
        raise UserError(f"sweep directory not found: {directory}")
    _print_paths(make_report(directory, baseline=args.baseline))
    return 0


def _print_paths(paths: dict[str, Path]) -> None:
    for key in ("markdown", "html", "summary", "comparisons", "results"):
        print(f"{key:>11}: {paths[key]}", file=sys.stdout)


# --- finished runs ---------------------------------------------------------------------------


def add_finished_commands(subparsers: argparse._SubParsersAction) -> None:
    """`peftlab generate`, `merge`, `eval` and `push`: use a completed run's saved model."""
    generate = subparsers.add_parser("generate", help="greedy completions from a finished run, in its prompt template")
    generate.add_argument("run_dir", metavar="RUN_DIR", help="a completed run's folder")
    generate.add_argument("--prompt", dest="prompts", action="append", default=[], metavar="TEXT",
                          help="an instruction (instruction runs) or text to continue (causal_lm runs); repeatable")
    generate.add_argument("--file", help="prompts.txt (one a line) or prompts.jsonl ({instruction, input} or {text})")
    generate.add_argument("--max-new-tokens", type=int,
                          help="tokens to generate (default: the run's train.max_new_tokens)")
    generate.set_defaults(handler=_generate)

    merge = subparsers.add_parser("merge", help="save a finished run as a standalone transformers model")
    merge.add_argument("run_dir", metavar="RUN_DIR")
    merge.add_argument("--out", required=True, help="new (or empty) folder for the model and its tokenizer")
    merge.set_defaults(handler=_merge)

    evaluate = subparsers.add_parser("eval", help="evaluate a finished run on other data of the same task")
    evaluate.add_argument("run_dir", metavar="RUN_DIR")
    evaluate.add_argument("--data", required=True, metavar="SOURCE", help="data alias, local file or hub dataset id")
    evaluate.add_argument("--set", dest="overrides", action="append", default=[], metavar="data.KEY=VALUE",
                          help="override a data key of the run's config, e.g. data.fields={text: review} (repeatable)")
    evaluate.add_argument("--split", default="all", choices=("all", "eval"),
                          help="all: every example of SOURCE; eval: the eval split the run's data settings cut")
    evaluate.add_argument("--json", dest="json_file", metavar="FILE", help="also write the result as JSON")
    evaluate.set_defaults(handler=_evaluate)

    push = subparsers.add_parser("push", help="upload a finished run to the Hugging Face Hub, with a model card")
    push.add_argument("run_dir", metavar="RUN_DIR")
    push.add_argument("--repo", required=True, metavar="ID", help="Hub repository id, owner/name")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--dry-run", action="store_true", help="list the files that would be uploaded; send nothing")
    push.set_defaults(handler=_push)


def _generate(args: argparse.Namespace) -> int:
    from peftlab.run.finished import check_finished, load_finished
    from peftlab.run.reuse import generate, read_prompts

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    config, _, _ = check_finished(args.run_dir)
    records = read_prompts(args.prompts, args.file, config.task)  # before the model loads: a mistake costs nothing
    for number, sample in enumerate(generate(load_finished(args.run_dir), records, args.max_new_tokens), 1):
        print(f"### prompt {number}\n{sample['prompt']}\n### completion {number}\n{sample['generated']}\n")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from peftlab.run.reuse import merge_run

    print(f"merged model and tokenizer in {merge_run(args.run_dir, args.out)}/")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from peftlab.diskio import write_atomic
    from peftlab.run.reuse import evaluate_run

    result = evaluate_run(args.run_dir, args.data, args.overrides, args.split)
    print(f"{result.examples} examples of {result.source} ({result.split}"
          + (f", {result.dropped} records left out" if result.dropped else "") + ")")
    for key, value in result.metrics.items():
        print(f"{key:>12}  {value:.4f}" if isinstance(value, float) else f"{key:>12}  {value}")
    if args.json_file:
        write_atomic(Path(args.json_file), json.dumps(result.to_json(), indent=2) + "\n")
    return 0


def _push(args: argparse.Namespace) -> int:
    from peftlab.run.push import push_run

    plan = push_run(args.run_dir, args.repo, private=args.private, dry_run=args.dry_run)
    visibility = "private" if plan.private else "public"
    print(f"{'would upload' if args.dry_run else 'uploaded'} to {plan.repo} ({visibility}):")
    for line in plan.lines():
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
