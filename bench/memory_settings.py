"""What train.base_dtype and train.gradient_checkpointing buy: peak memory, speed and loss of one run.

Each setting trains the same LoRA run (examples/quickstart.yaml on the embedded SmolLM2-135M, a few
optimizer steps) through the real `peftlab run` command, in a fresh process, so a run's peak memory is
its own. The settings are interleaved repetition by repetition (a slow moment of the machine hits every
setting alike), and the table gives medians with ratios against fp32 without checkpointing.

    .venv/bin/python bench/memory_settings.py --steps 8 --reps 3            # ~6 min on a 2-core CPU
    .venv/bin/python bench/memory_settings.py --device cuda --steps 50      # GPU: cuda_max_allocated

Writes bench/results/memory-settings-<device>-<date>.json (every run) and .md (the table).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SETTINGS = {  # name -> --set overrides
    "fp32": ["train.base_dtype=fp32", "train.gradient_checkpointing=false"],
    "fp32 + checkpointing": ["train.base_dtype=fp32", "train.gradient_checkpointing=true"],
    "bf16 base": ["train.base_dtype=bf16", "train.gradient_checkpointing=false"],
    "bf16 base + checkpointing": ["train.base_dtype=bf16", "train.gradient_checkpointing=true"],
}


def run_once(setting: str, steps: int, seed: int, device: str, folder: Path, model: str = "smollm2-135m") -> dict:
    """One `peftlab run` of ``setting`` in a fresh process; the numbers of its summary.json."""
    out = folder / f"{setting.replace(' ', '_').replace('+', '')}-{seed}"
    overrides = SETTINGS[setting] + [f"train.max_steps={steps}", f"train.seed={seed}", f"train.device={device}",
                                     "train.num_samples=0", "data.eval_size=64", "train.save_every=null",
                                     f"model={model}"]
    command = [sys.executable, "-m", "peftlab", "run", str(REPO / "examples" / "quickstart.yaml"), "--out", str(out)]
    command += [item for text in overrides for item in ("--set", text)]
    done = subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if not (out / "summary.json").exists():  # a run that ended without a summary: show why
        raise SystemExit(f"{setting} (seed {seed}) failed:\n{done.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    resources = summary["resources"]
    return {"setting": setting, "seed": seed, "status": summary["status"], "eval_loss": summary["metrics"]["eval_loss"],
            "tokens_per_s": resources["tokens_per_s"], "train_seconds": resources["train_seconds"],
            "peak_memory_mb": resources["peak_memory_mb"], "memory_kind": resources["memory_kind"]}


def table(runs: list[dict]) -> str:
    """Medians per setting, and ratios against plain fp32."""
    def median(setting: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["setting"] == setting)

    base_memory, base_speed = median("fp32", "peak_memory_mb"), median("fp32", "tokens_per_s")
    lines = ["| setting | peak memory MiB | vs fp32 | tokens/s | vs fp32 | eval loss |",
             "|---|---:|---:|---:|---:|---:|"]
    for setting in SETTINGS:
        memory, speed = median(setting, "peak_memory_mb"), median(setting, "tokens_per_s")
        lines.append(f"| {setting} | {memory:.0f} | {memory / base_memory:.2f}x | {speed:.1f} | "
                     f"{speed / base_speed:.2f}x | {median(setting, 'eval_loss'):.4f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--model", default="smollm2-135m", help="embedded alias or local model folder")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    return measure(parser.parse_args())


def measure(args: argparse.Namespace) -> int:
    """Every setting, ``args.reps`` times interleaved; writes the JSON and the table."""
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        for rep in range(args.reps):
            for setting in SETTINGS:
                run = run_once(setting, args.steps, 42 + rep, args.device, Path(folder), args.model)
                runs.append(run)
                print(f"rep {rep + 1}/{args.reps} {setting}: {run['peak_memory_mb']:.0f} MiB, "
                      f"{run['tokens_per_s']:.1f} tok/s, eval loss {run['eval_loss']:.4f}", file=sys.stderr)
    stem = Path(args.out) / f"memory-settings-{args.device}-{time.strftime('%Y-%m-%d')}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"steps": args.steps, "reps": args.reps, "runs": runs}, indent=2))
    text = (f"# train.base_dtype and train.gradient_checkpointing: {args.steps} steps of examples/quickstart.yaml, "
            f"{args.reps} interleaved repetitions, medians ({runs[0]['memory_kind']})\n\n{table(runs)}\n")
    stem.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
