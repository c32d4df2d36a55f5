"""`peftlab sweep` and `peftlab report`: argument parsing only; the work is in executors and report.

cli.py adds these with ``sweep_cli.add_commands(commands)``; each handler returns the exit code, and
a UserError is printed as one line by cli.main.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    sweep = subparsers.add_parser("sweep", help="run a sweep (strategies x grid x seeds) and write its report")
    sweep.add_argument("sweep_file", metavar="SWEEP.yaml", help="sweep file: base, strategies, grid, seeds, baseline")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a run config key in every run, e.g. model=microsoft/DialoGPT-medium (repeatable)")
    sweep.add_argument("--out", help="sweep directory (default: runs/<sweep name>)")
    sweep.add_argument("--executor", choices=["local", "ray"], default="local",
                       help="local: one run after another in this process; ray: runs as Ray tasks")
    sweep.add_argument("--ray-address", help="address of a running Ray cluster (default: start a local instance)")
    sweep.add_argument("--resume", action="store_true",
                       help="continue an interrupted sweep: finished runs are kept, unfinished ones resumed")
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
    summaries = run_sweep(spec, out, executor=args.executor, address=args.ray_address, resume=args.resume)
    paths = make_report(out)
    counts = Counter(summary.status for summary in summaries)
    print(", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    _print_paths(paths)
    return 1 if counts.get("failed") else 0


def report_command(args: argparse.Namespace) -> int:
    from peftlab.errors import UserError
    from peftlab.study.report import make_report

    directory = Path(args.directory)
    if not directory.is_dir():
        raise UserError(f"sweep directory not found: {directory}")
    _print_paths(make_report(directory, baseline=args.baseline))
    return 0


def _print_paths(paths: dict[str, Path]) -> None:
    for key in ("markdown", "html", "summary", "comparisons", "results"):
        print(f"{key:>11}: {paths[key]}", file=sys.stdout)
