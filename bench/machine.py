"""What the benchmark runs on: the machine's description and its measured matmul peak.

MFU (model-FLOPs utilisation) = model FLOPs per second of training / this machine's matmul peak,
where the peak is measured here by a GEMM micro-benchmark in the same run (fp32 on CPU, bf16 on
GPU), not taken from a datasheet: it is what the matmul library actually reaches on this machine.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from pathlib import Path

import torch

from peftlab.run.resources import _cpu_name  # the one /proc/cpuinfo reader


def describe(device: torch.device) -> dict[str, str | int]:
    """CPU model, cores, threads, torch / transformers / peft versions and the GPU if any."""
    import peft
    import transformers

    info: dict[str, str | int] = {
        "cpu": _cpu_name(), "cores": os.cpu_count() or 0, "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "python": platform.python_version(), "platform": platform.platform(), "device": device.type,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_slug(info: dict) -> str:
    """A file-name-safe machine name: the GPU, else the CPU model and its core count."""
    name = str(info.get("gpu") or f"{info['cpu']}-{info['cores']}c")
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write_results(out: Path, kind: str, results: dict, markdown: str) -> Path:
    """``<out>/<kind>-<machine>-<date>.json`` (every number) and ``.md`` (the table), the markdown printed too;
    ``results`` carries ``machine`` (describe's dict) and ``date``. Returns the path without suffix."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{kind}-{machine_slug(results['machine'])}-{results['date']}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown)
    print(markdown)
    return stem


def gemm_peak(device: torch.device, sizes: tuple[int, ...] | None = None, reps: int = 5) -> dict:
    """Best matmul throughput (FLOP/s) over square GEMMs: fp32 on CPU, bf16 on GPU.

    The best of several repetitions, since the peak is what the hardware can do; the
    per-size medians are kept too, to show the spread on a shared machine.
    """
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sizes = sizes or ((4096, 8192) if device.type == "cuda" else (1024, 2048))
    per_size = {}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm-up: library initialisation and kernel choice
        times = []
        for _ in range(reps):
            _sync(device)
            started = time.perf_counter()
            a @ b
            _sync(device)
            times.append(time.perf_counter() - started)
        flops = 2 * n**3
        per_size[str(n)] = {"best_flops": flops / min(times), "median_flops": flops / sorted(times)[len(times) // 2]}
    peak = max(v["best_flops"] for v in per_size.values())
    return {"dtype": str(dtype).replace("torch.", ""), "peak_flops": peak, "sizes": per_size}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_flops(n_params: int, tokens: int, *, full_finetune: bool = False) -> float:
    """Nominal training FLOPs: 4 N per token with a frozen base (forward 2N + input gradients 2N),
    6 N for full fine-tuning (+ weight gradients 2N). LoRA's own FLOPs are under 4% at r=16 and
    are not counted, nor is attention's T^2 term (short sequences here)."""
    return (6 if full_finetune else 4) * n_params * tokens
