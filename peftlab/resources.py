"""Device choice, seeding and resource measurements (peak memory, environment)."""

from __future__ import annotations

import platform
import random
import resource
import sys

import numpy as np
import torch

from .errors import UserError


def resolve_device(name: str) -> torch.device:
    """auto -> cuda, then mps, then cpu; an explicit device that is absent is a user error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is available (use auto or cpu)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("train.device=mps but MPS is not available (use auto or cpu)")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def reset_peak_memory(device: torch.device) -> None:
    """Start a fresh peak, so each run of a multi-run process reports its own.

    On Linux, writing 5 to /proc/self/clear_refs resets the resident-set high-water
    mark (VmHWM); elsewhere the CPU peak is the process's since it started.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def peak_memory(device: torch.device) -> dict[str, float | str]:
    """CUDA: max allocated by tensors during the run; CPU: peak resident set size since the reset."""
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20, "memory_kind": "cuda_max_allocated"}
    high_water = _vm_hwm_kb()
    if high_water is not None:
        return {"peak_memory_mb": high_water / 1024, "memory_kind": "peak_rss"}
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux kilobytes
    return {"peak_memory_mb": kilobytes * scale / 2**20, "memory_kind": "process_peak_rss"}


def _vm_hwm_kb() -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def environment(device: torch.device) -> dict[str, str]:
    import transformers

    import peftlab

    info = {
        "peftlab": peftlab.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_threads": str(torch.get_num_threads()),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
