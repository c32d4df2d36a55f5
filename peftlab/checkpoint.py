"""Training checkpoints: trainable weights, optimizer, scheduler, RNG and data position.

Only trainable parameters are saved (the frozen base is reloaded from its
source), so a LoRA checkpoint is megabytes, not the whole model. Writes are
atomic (temp file + rename): a run killed mid-save keeps its previous checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class TrainState:
    """Where training stands; enough to continue exactly where it stopped."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next micro-batch
    batch_in_epoch: int = 0  # index of the next micro-batch within its epoch
    train_seconds: float = 0.0  # wall time spent in training steps (eval and saving excluded)
    train_tokens: int = 0  # non-padding tokens trained on


def save_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, state: TrainState, history: list[dict]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "trainable": {name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "state": asdict(state),
        "history": history,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    path = directory / CHECKPOINT_FILE
    temporary = path.with_suffix(".tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)
    return path


def has_checkpoint(directory: Path) -> bool:
    return (directory / CHECKPOINT_FILE).is_file()


def load_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any) -> tuple[TrainState, list[dict]]:
    payload = torch.load(directory / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in payload["trainable"].items():
            parameters[name].copy_(value)
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    torch.set_rng_state(payload["rng_cpu"])
    if payload["rng_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["rng_cuda"])
    return TrainState(**payload["state"]), payload["history"]
