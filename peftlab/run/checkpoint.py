"""Training checkpoints: trainable weights, optimizer, scheduler, RNG and data position.

Only trainable parameters are saved (the frozen base is reloaded from its
source), so a LoRA checkpoint is megabytes, not the whole model. Writes are
atomic (temp file + rename): a run killed mid-save keeps its previous checkpoint.

The file is data only, so a run folder received from someone else cannot run code on
``--resume``: one safetensors file whose tensors are

  param/<name>            the trainable parameters
  best/<name>             train.keep_best: the trainable parameters of the best evaluation so far
  optim/<id>/<key>        optimizer state tensors (AdamW exp_avg, exp_avg_sq, step)
  rng/cpu, rng/cuda/<i>   torch RNG states (uint8)

and whose metadata holds, under the key "peftlab", one JSON object: the format tag, the
TrainState, the metric history, the optimizer's param_groups and non-tensor state, the
scheduler's state (LambdaLR's lr_lambdas left out: they are rebuilt from the config) and, under
"best", what the evaluations decided (run/best.py's BestState: best and last evaluation, early
stopping's count and stop). A checkpoint without "best" (written before it existed) resumes with
nothing decided yet, which is what a run without keep_best or early_stopping holds anyway.
It is named ``checkpoint.safetensors`` for what it is. A ``checkpoint.pt`` left by an older
peftlab (a pickle) still counts as a checkpoint, so --resume refuses it with one line instead of
quietly starting over; it is never unpickled.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from peftlab.diskio import write_atomic_by, writing
from peftlab.errors import UserError
from peftlab.run.best import BestState
from peftlab.run.sharding import full, shard_like

CHECKPOINT_FILE = "checkpoint.safetensors"  # its presence means "a checkpoint exists" (run.py, sweep.py)
LEGACY_CHECKPOINT_FILE = "checkpoint.pt"  # older peftlab's pickle: recognised, refused, never loaded
FORMAT = "peftlab-checkpoint/2"  # /1 was the pickle format, which is refused
METADATA_KEY = "peftlab"
PARAM, BEST, OPTIM, RNG_CPU, RNG_CUDA = "param/", "best/", "optim/", "rng/cpu", "rng/cuda/"


@dataclass
class TrainState:
    """Where training stands; enough to continue exactly where it stopped."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next micro-batch
    batch_in_epoch: int = 0  # index of the next micro-batch within its epoch
    train_seconds: float = 0.0  # wall time spent in training steps (eval and saving excluded)
    train_tokens: int = 0  # non-padding tokens trained on


@dataclass
class Restored:
    """What load_checkpoint hands back besides the weights, optimizer, scheduler and RNG it restored."""

    state: TrainState
    history: list[dict]
    best: BestState


class _Refused(Exception):
    """Why a checkpoint cannot be loaded; load_checkpoint turns it into the one-line UserError."""


# --- save ---------------------------------------------------------------------------------------


def save_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, state: TrainState, history: list[dict], best: BestState | None = None, *,
                    write: bool = True) -> Path:
    """Write the checkpoint; ``write=False``: a sharded run's other ranks, which only help gather the
    shards (run/sharding.py: every rank must take part in each gather, in the same order)."""
    optimizer_tensors, optimizer_json = _split_optimizer_state(optimizer.state_dict())
    tensors = {PARAM + name: _plain(p) for name, p in model.named_parameters() if p.requires_grad}
    tensors.update({BEST + name: _plain(value) for name, value in (best.weights if best else {}).items()})
    path = directory / CHECKPOINT_FILE
    if not write:
        return path
    with writing(directory):
        directory.mkdir(parents=True, exist_ok=True)
    tensors.update(optimizer_tensors)
    tensors.update(_rng_tensors())
    scheduler_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    document = {"format": FORMAT, "state": asdict(state), "history": history,
                "optimizer": optimizer_json, "scheduler": scheduler_state, "best": (best or BestState()).to_json()}
    # a full or read-only disk: one line, and the previous checkpoint kept
    write_atomic_by(path, lambda temporary: save_file(tensors, str(temporary),
                                                      metadata={METADATA_KEY: json.dumps(document)}))
    return path


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    # safetensors wants contiguous CPU tensors; clone so no entry shares memory with a live one.
    # A shard of a sharded block (train.fsdp) is saved whole, so any number of ranks can resume it.
    return full(tensor).detach().cpu().contiguous().clone()


def _split_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state -> (tensors keyed optim/<id>/<key>, the JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict] = {}
    for param_id, entries in state_dict["state"].items():
        plain[str(param_id)] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{OPTIM}{param_id}/{key}"] = _plain(value)
            else:
                plain[str(param_id)][key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "state": plain}


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {RNG_CPU: torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"{RNG_CUDA}{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return tensors


# --- load ---------------------------------------------------------------------------------------


def has_checkpoint(directory: Path) -> bool:
    """True for a checkpoint, an older peftlab's pickle one included: load_checkpoint refuses that."""
    return (directory / CHECKPOINT_FILE).is_file() or (directory / LEGACY_CHECKPOINT_FILE).is_file()


def load_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any) -> Restored:
    """Restore a checkpoint written by save_checkpoint; anything else is refused with one line.

    Everything is checked before anything is changed, so a refused checkpoint leaves the model,
    optimizer and scheduler as they were.
    """
    path = directory / CHECKPOINT_FILE
    if not path.is_file() and (directory / LEGACY_CHECKPOINT_FILE).is_file():
        raise UserError(f"checkpoint {directory / LEGACY_CHECKPOINT_FILE} cannot be loaded safely: it is an old "
                        "pickle-format checkpoint (older peftlab), which could run code; delete it to restart the run")
    try:
        tensors, document = _read(path)
        trainable = _checked_parameters(tensors, model)
        optimizer_state = _checked_optimizer_state(tensors, document, optimizer)
        scheduler_state = _checked_scheduler_state(document, scheduler)
        state, history = _checked_progress(document)
        best = _checked_best(tensors, document, model)
        rng_cpu, rng_cuda = _checked_rng(tensors)
    except _Refused as why:
        raise UserError(f"checkpoint {path} cannot be loaded safely: {why}; delete it to restart the run") from None
    with torch.no_grad():
        for parameter, value in trainable:
            parameter.copy_(shard_like(value, parameter))
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    torch.set_rng_state(rng_cpu)
    for index, value in rng_cuda:
        torch.cuda.set_rng_state(value, index)
    return Restored(state, history, best)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the JSON document; never unpickles (safetensors parses a fixed format)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error type, or OSError
        raise _Refused(_unreadable_reason(path, error)) from None
    if METADATA_KEY not in metadata:
        raise _Refused("it has no peftlab metadata")
    try:
        document = json.loads(metadata[METADATA_KEY])
    except (ValueError, RecursionError):
        raise _Refused("its metadata is not valid JSON") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise _Refused(f"its metadata is not in the {FORMAT} format")
    return tensors, document


def _unreadable_reason(path: Path, error: Exception) -> str:
    try:
        with path.open("rb") as handle:
            head = handle.read(2)
    except OSError:
        head = b""
    # torch.save writes a zip archive ("PK"), or with the legacy serializer a pickle (0x80).
    if head == b"PK" or head[:1] == b"\x80":
        return "it is an old pickle-format checkpoint, which peftlab no longer opens"
    detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"it is not a complete safetensors file ({detail})"


def _checked_parameters(tensors: dict[str, torch.Tensor],
                        model: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(parameter, saved value) pairs; the saved names must be exactly the model's trainable ones."""
    parameters = dict(model.named_parameters())
    saved = {key[len(PARAM):]: value for key, value in tensors.items() if key.startswith(PARAM)}
    _check_trainable_set(saved, model)
    return [(parameters[name], value) for name, value in saved.items()]


def _check_trainable_set(saved: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Every saved name is a model parameter of the same shape, and every trainable one is saved."""
    parameters = dict(model.named_parameters())
    for name, value in saved.items():
        if name not in parameters:
            raise _Refused(f"the model has no parameter {name!r}")
        if value.shape != parameters[name].shape:
            raise _Refused(f"{name!r} has shape {list(value.shape)}, the model's is {list(parameters[name].shape)}")
    missing = [name for name, p in parameters.items() if p.requires_grad and name not in saved]
    if missing:
        raise _Refused(f"it lacks the trainable parameter {missing[0]!r}")


def _checked_best(tensors: dict[str, torch.Tensor], document: dict, model: nn.Module) -> BestState:
    """The best-so-far record; its weights, when there are any, must be exactly the model's trainable ones."""
    weights = {key[len(BEST):]: value for key, value in tensors.items() if key.startswith(BEST)}
    if weights:
        _check_trainable_set(weights, model)
    if "best" not in document:  # written before keep_best and early_stopping existed
        return BestState()
    try:
        return BestState.from_json(document["best"], weights)
    except ValueError as why:
        raise _Refused(str(why)) from None


def _checked_optimizer_state(tensors: dict[str, torch.Tensor], document: dict,
                             optimizer: torch.optim.Optimizer) -> dict:
    """A state_dict for optimizer.load_state_dict, checked against the live optimizer's groups."""
    saved = document.get("optimizer")
    if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list) \
            or not isinstance(saved.get("state"), dict):
        raise _Refused("its optimizer state is malformed")
    groups = [_checked_group(g, live) for g, live in _paired(saved["param_groups"], optimizer.param_groups)]
    params_by_id = {i: p for g, live in zip(groups, optimizer.param_groups, strict=True)
                    for i, p in zip(g["params"], live["params"], strict=True)}
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith(OPTIM):
            param_id, _, name = key[len(OPTIM):].partition("/")
            state.setdefault(_param_id(param_id, params_by_id), {})[name] = value
    for param_id, entries in saved["state"].items():
        if not isinstance(entries, dict):
            raise _Refused("its optimizer state is malformed")
        state.setdefault(_param_id(param_id, params_by_id), {}).update(entries)
    for param_id, entries in state.items():
        _check_state_shapes(entries, params_by_id[param_id])
    # a sharded parameter's moments are sharded like it (saved whole; a scalar step stays as it is)
    state = {param_id: {name: shard_like(value, params_by_id[param_id])
                        if isinstance(value, torch.Tensor) and value.dim() > 0 else value
                        for name, value in entries.items()} for param_id, entries in state.items()}
    return {"state": state, "param_groups": groups}


def _paired(saved: list, live: list[dict]) -> list[tuple[dict, dict]]:
    if len(saved) != len(live) or not all(isinstance(g, dict) for g in saved):
        raise _Refused(f"it has {len(saved)} optimizer parameter groups, the run has {len(live)}")
    return list(zip(saved, live, strict=True))


def _checked_group(saved: dict, live: dict) -> dict:
    params = saved.get("params")
    if not isinstance(params, list) or len(params) != len(live["params"]) \
            or not all(isinstance(i, int) for i in params):
        raise _Refused("its optimizer parameter groups do not match the run's trainable parameters")
    # JSON turns tuples (AdamW's betas) into lists; give them back the live group's type.
    return {k: tuple(v) if isinstance(live.get(k), tuple) and isinstance(v, list) else v for k, v in saved.items()}


def _param_id(text: str, params_by_id: dict[int, nn.Parameter]) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) not in params_by_id:
        raise _Refused(f"its optimizer state names parameter {text!r}, which no parameter group holds")
    return int(text)


def _check_state_shapes(entries: dict, parameter: nn.Parameter) -> None:
    # Moment buffers (exp_avg, exp_avg_sq) have their parameter's shape; step is a scalar.
    for name, value in entries.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != parameter.shape:
            raise _Refused(f"optimizer state {name!r} has shape {list(value.shape)}, "
                           f"its parameter's is {list(parameter.shape)}")


def _checked_scheduler_state(document: dict, scheduler: Any) -> dict:
    saved = document.get("scheduler")
    live = scheduler.state_dict()
    # load_state_dict copies every key into the scheduler's attributes: allow only its own ones
    # (a subset: a newer torch may add keys that an older checkpoint lacks).
    if not isinstance(saved, dict) or "last_epoch" not in saved or not set(saved) <= set(live) - {"lr_lambdas"}:
        raise _Refused("its scheduler state does not match the run's scheduler")
    if "lr_lambdas" in live:  # None per lambda: keep the functions built from the config as they are
        return {**saved, "lr_lambdas": [None] * len(live["lr_lambdas"])}
    return dict(saved)


def _checked_progress(document: dict) -> tuple[TrainState, list[dict]]:
    state, history = document.get("state"), document.get("history")
    fields = {f.name: f.type for f in dataclasses.fields(TrainState)}
    if not isinstance(state, dict) or set(state) != set(fields) \
            or not all(_is_number(state[name], kind) for name, kind in fields.items()):
        raise _Refused("its training state is malformed")
    if not isinstance(history, list) or not all(isinstance(record, dict) for record in history):
        raise _Refused("its metric history is malformed")
    return TrainState(**state), history


def _is_number(value: Any, kind: str) -> bool:
    allowed = (int,) if kind == "int" else (int, float)
    return isinstance(value, allowed) and not isinstance(value, bool)


def _checked_rng(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
    """The CPU state, and the CUDA states for the devices this machine has."""
    cpu = tensors.get(RNG_CPU)
    if cpu is None or cpu.dtype != torch.uint8 or cpu.shape != torch.get_rng_state().shape:
        raise _Refused("its CPU random state is missing or malformed")
    cuda = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            value = tensors.get(f"{RNG_CUDA}{index}")
            if value is None:
                continue  # saved on a machine with fewer GPUs: that device keeps its own state
            if value.dtype != torch.uint8 or value.shape != torch.cuda.get_rng_state(index).shape:
                raise _Refused(f"its CUDA random state {index} is malformed")
            cuda.append((index, value))
    return cpu, cuda
