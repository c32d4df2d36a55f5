"""Device choice, per-device execution defaults (the batch split), seeding and resource measurements
(peak memory, load, environment, provenance)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import random
import resource
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from peftlab.config import RunConfig, TrainConfig
from peftlab.errors import UserError

if TYPE_CHECKING:
    from peftlab.run.tracking import MetricsLog


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


# train.max_batch_tokens: auto, by device type (the one home of these values; README "Performance").
# cpu 256: one of the seeds' padded micro-batches (1 x 256); bench/levers.py measured the split at
#   1.385x the tokens/s of unsplit batch-8 steps and 2199 vs 7747 MB peak RSS on a 2-core Xeon
#   (smaller activation tensors per pass; why it is also faster was not profiled).
# cuda, mps: off. On a GPU 256-token pieces become many small kernels that underuse it, and its memory
#   is already bounded by what a user sets (batch_size, grad_accum, gradient_checkpointing, base_dtype).
#   No GPU measurement backs another value yet: set an integer where a batch of long rows does not fit.
AUTO_MAX_BATCH_TOKENS: dict[str, int | None] = {"cpu": 256, "cuda": None, "mps": None}


def max_batch_tokens_for(setting: int | str | None, device: torch.device) -> int | None:
    """train.max_batch_tokens as a run uses it on ``device``: auto -> AUTO_MAX_BATCH_TOKENS, else as set."""
    if setting == "auto":
        return AUTO_MAX_BATCH_TOKENS.get(device.type)
    assert setting is None or isinstance(setting, int), setting  # TrainConfig validated it
    return setting


def resolved_split(cfg: TrainConfig, device: torch.device, log: MetricsLog | None = None) -> TrainConfig:
    """``cfg`` with max_batch_tokens resolved for ``device``; ``log`` (train.log) says what a step runs on."""
    value = max_batch_tokens_for(cfg.max_batch_tokens, device)
    if log is not None:
        origin = f" (auto on {device.type})" if cfg.max_batch_tokens == "auto" else ""
        log.message(f"train.max_batch_tokens: {value if value is not None else 'off'}{origin}: " + (
            f"a batch over {value} padded tokens runs as pieces in one optimizer step" if value is not None
            else "batches run whole"))
    return cfg if value == cfg.max_batch_tokens else dataclasses.replace(cfg, max_batch_tokens=value)


def with_resolved_split(config: RunConfig, device: torch.device) -> RunConfig:
    """``config`` with train.max_batch_tokens resolved, so config.yaml and the summary record the value used."""
    return dataclasses.replace(config, train=resolved_split(config.train, device))


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


def load_average() -> float | None:
    """The 1-minute load average, or None where the platform has none (Windows)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Device and software: versions, and the peftlab checkout's commit when run from one."""
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
    info.update(_package_versions("peft", "datasets"))
    info.update(source_checkout())
    return info


def _package_versions(*names: str) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


@functools.lru_cache(maxsize=1)
def source_checkout() -> dict[str, Any]:
    """{"git_commit", "git_dirty"} of the git checkout peftlab is imported from; {} if none or no git.

    Read once per process: the code that runs is the code imported at start, whatever is
    committed later. The package's own files must be tracked, so an installed copy that merely
    lies inside some other repository (a venv in a project) does not report that repository.
    """
    package = Path(__file__).resolve().parent
    try:
        _git(package, "ls-files", "--error-unmatch", Path(__file__).name)
        commit = _git(package, "rev-parse", "HEAD").strip()
        # no optional locks: a run must never hold the index lock against a concurrent git command
        dirty = bool(_git(package, "--no-optional-locks", "status", "--porcelain").strip())
    except (OSError, subprocess.SubprocessError):  # not a checkout, git missing, or git too slow
        return {}
    return {"git_commit": commit, "git_dirty": dirty}


def _git(directory: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True,
                          check=True, timeout=10).stdout


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
_MODEL_HASHES: dict[tuple, str] = {}  # (path, size, mtime) of each weight file -> digest: a sweep hashes once


def model_sha256(source: str) -> str | None:
    """sha256 over the weight files of a model folder (or a hub id's cached snapshot); None if none.

    Files (*.safetensors, *.bin, *.gguf, *.pt) in name order, each as its name then its bytes.
    """
    folder = _model_folder(source)
    files = sorted(f for f in folder.iterdir() if f.suffix in WEIGHT_SUFFIXES and f.is_file()) if folder else []
    if not files:
        return None
    key = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _MODEL_HASHES:
        digest = hashlib.sha256()
        for file in files:
            digest.update(file.name.encode())
            with open(file, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        _MODEL_HASHES[key] = digest.hexdigest()
    return _MODEL_HASHES[key]


def _model_folder(source: str) -> Path | None:
    if Path(source).is_dir():
        return Path(source)
    try:  # a hub id: the snapshot from_pretrained read, if it is in the local cache
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_files_only=True))
    except Exception:  # noqa: BLE001 - provenance is best effort; a run never fails for it
        return None


def data_sha256(train: list[dict], eval_examples: list[dict]) -> str:
    """sha256 of json.dumps({"eval": eval, "train": train}, sort_keys=True, separators=(",", ":")).

    The tokenized examples actually used, so a different split, seed, tokenizer or max_length shows.
    Written piece by piece (the same bytes) so a large data set is never one giant string.
    """
    digest = hashlib.sha256()
    for name, examples in (("eval", eval_examples), ("train", train)):
        digest.update(('{"eval":[' if name == "eval" else '],"train":[').encode())
        for index, example in enumerate(examples):
            text = json.dumps(example, sort_keys=True, separators=(",", ":"), default=_plain)
            digest.update((("," if index else "") + text).encode())
    digest.update(b"]}")
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    return value.tolist() if hasattr(value, "tolist") else str(value)  # numpy / torch scalars and arrays


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
