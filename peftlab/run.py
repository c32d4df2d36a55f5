"""One experiment end to end: config -> model + data -> prepare -> train -> evaluate -> summary.

Output directory:
  config.yaml      the resolved config
  metrics.jsonl    a line per logged step (train_loss, lr, tokens_per_s) and per evaluation
  summary.json     status, metrics, parameters, resources, placement and per-module ranks
  adapter/         LoRA runs: the adapter in HF peft format
  trainable.safetensors  other methods (and fused-slice LoRA): the trained parameters
  train.log        messages, including the placement map
  checkpoint.pt    the latest checkpoint (removed once the run completes)
"""

from __future__ import annotations

import gc
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from .checkpoint import CHECKPOINT_FILE, has_checkpoint
from .config import RunConfig, config_to_dict, from_dict
from .data import TaskData, load_task_data
from .errors import UserError
from .evaluate import evaluate, generate_samples
from .export import export_peft_adapter
from .methods import Prepared, prepare
from .modelmap import build_model_map
from .model_cache import BaseModelCache
from .models import load_model, load_tokenizer
from .placement import format_placement_map
from .resources import environment, peak_memory, reset_peak_memory, resolve_device, seed_everything
from .tracking import MetricsLog
from .train import TrainOutcome, autocast_for, eval_batches, train

SMALL_EVAL_WARNING = 100  # fewer eval examples than this cannot separate close strategies


def run_experiment(config: RunConfig, out_dir: str | Path, *, resume: bool = False, echo: bool = True,
                   on_step: Any = None, model_cache: BaseModelCache | None = None) -> dict[str, Any]:
    """Run one experiment into ``out_dir`` and return its summary (also written to summary.json).

    ``model_cache`` (sweeps) hands out copies of a base model loaded once; results are the same
    as loading from disk, because everything random after loading is seeded here.
    """
    out_dir = Path(out_dir)
    previous = _check_out_dir(config, out_dir, resume)
    if previous is not None:
        return previous
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    log = MetricsLog(out_dir, echo=echo)
    device = resolve_device(config.train.device)
    started = time.time()

    tokenizer = load_tokenizer(config.model)
    data = load_task_data(config.data, config.task, tokenizer)
    load = model_cache.get if model_cache is not None else load_model
    loaded = load(config.model, config.task, num_labels=data.num_labels, label_names=data.label_names)
    model = loaded.model
    seed_everything(config.train.seed)  # the new head's and the adapters' initial weights
    reinitialize(model, loaded.new_weights)
    model_map = build_model_map(model, strict=config.method.targets is None)
    prepared = prepare(model, config.method, model_map, train_head=config.task == "classification")
    log.message(f"{config.method.name} on {config.model}: {prepared.trainable_params:,} trainable of "
                f"{prepared.total_params:,} parameters ({prepared.percent_trainable:.3f}%)")
    if prepared.targets:
        log.message("placement map:\n" + format_placement_map(
            model_map, prepared.targets, prepared.ranks or None,
            trainable_params=prepared.trainable_params, total_params=prepared.total_params))
    model.to(device)
    gc.collect()  # a sweep's previous run may still hold memory; this run's peak starts clean
    reset_peak_memory(device)
    outcome = train(model, data.train, data.eval, config.task, config.train, pad_id=tokenizer.pad_token_id,
                    device=device, log=log, checkpoint_dir=out_dir, resume=resume, on_step=on_step)
    if outcome.status == "completed" and config.train.train_eval_size:
        outcome.train_eval = evaluate(model, eval_batches(data.train[: config.train.train_eval_size], config.train,
                                                          tokenizer.pad_token_id, device),
                                      config.task, autocast_for(device, config.train.precision))
    samples = []
    if outcome.status == "completed" and config.task == "instruction" and config.train.num_samples:
        samples = generate_samples(model, tokenizer, data.eval_prompts[: config.train.num_samples],
                                   max_new_tokens=config.train.max_new_tokens, device=device)
    artifacts = _save_trained(model, prepared, out_dir, loaded.source, config.task)
    summary = _summary(config, out_dir, data, prepared, outcome, samples, artifacts, device, started)
    _write_json_atomic(out_dir / "summary.json", summary)
    if outcome.status == "completed" and has_checkpoint(out_dir):
        (out_dir / CHECKPOINT_FILE).unlink()
    log.message(f"{summary['status']}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in summary["metrics"].items()))
    return summary


def reinitialize(model: torch.nn.Module, names: tuple[str, ...]) -> None:
    """Draw freshly initialised weights (a new classification head) from the run's seed.

    The loader's own initialisation depends on how the model was loaded (from disk, or copied
    from a cache); drawing them again here makes the run's result independent of that.
    Matrices ~ N(0, initializer_range) as BERT/Llama heads are initialised; biases zero.
    """
    std = getattr(model.config, "initializer_range", 0.02)
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            if name not in parameters:
                continue
            if parameters[name].dim() >= 2:
                parameters[name].normal_(0.0, std)
            else:
                parameters[name].zero_()


def _check_out_dir(config: RunConfig, out_dir: Path, resume: bool) -> dict[str, Any] | None:
    """Refuse to overwrite a run; on resume, return a finished summary or check the config matches."""
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return None
    if not resume:
        raise UserError(f"{out_dir} already holds a run; pass --resume to continue it, or choose another --out")
    saved_path = out_dir / "config.yaml"
    if saved_path.exists():
        saved = from_dict(RunConfig, yaml.safe_load(saved_path.read_text()) or {})
        if config_to_dict(saved) != config_to_dict(config):
            changed = _changed_keys(config_to_dict(saved), config_to_dict(config))
            raise UserError(f"--resume with a different config than the run in {out_dir} (changed: {', '.join(changed)})")
    summary_path = out_dir / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        if summary.get("status") == "completed":
            return summary
    return None


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}")
    return changed


def _save_trained(model: torch.nn.Module, prepared: Prepared, out_dir: Path, source: str, task: str) -> dict[str, Any]:
    """Write the trained parameters; return where and how many bytes they take on disk."""
    if prepared.method == "lora":
        try:
            heads = None  # classification heads are saved by export as modules_to_save
            path = export_peft_adapter(model, out_dir / "adapter", base_model_name_or_path=source,
                                       task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM",
                                       modules_to_save=heads)
            return {"format": "peft", "path": "adapter", "bytes": _dir_bytes(Path(path))}
        except UserError as error:  # fused-slice placements have no peft form
            note = str(error)
    else:
        note = ""
    if prepared.method == "full":  # the whole model: report its size, do not write a copy per run
        size = sum(p.numel() * p.element_size() for _, p in model.named_parameters())
        return {"format": "none", "path": None, "bytes": size, "note": "full fine-tuning: size of all weights"}
    tensors = {name: p.detach().float().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, str(out_dir / "trainable.safetensors"))
    artifact = {"format": "safetensors", "path": "trainable.safetensors", "bytes": (out_dir / "trainable.safetensors").stat().st_size}
    if note:
        artifact["note"] = note
    return artifact


def _summary(config: RunConfig, out_dir: Path, data: TaskData, prepared: Prepared, outcome: TrainOutcome,
             samples: list[dict], artifacts: dict, device: torch.device, started: float) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    if outcome.final_eval is not None:
        metrics.update(outcome.final_eval.as_metrics())
    if outcome.train_eval is not None:  # the same measures on training examples: train_eval_loss, train_accuracy...
        metrics.update({"train_" + k: v for k, v in outcome.train_eval.as_metrics().items()})
    train_losses = [r["train_loss"] for r in outcome.history if "train_loss" in r]
    if train_losses:
        metrics["train_loss"] = train_losses[-1]
    warnings = []
    if len(data.eval) < SMALL_EVAL_WARNING:
        warnings.append(f"only {len(data.eval)} eval examples: differences between strategies may be noise")
    return {
        "status": outcome.status,
        "name": config.name or out_dir.name,
        "model": config.model,
        "task": config.task,
        "method": config.method.name,
        "metrics": metrics,
        "params": {"trainable": prepared.trainable_params, "total": prepared.total_params,
                   "percent": prepared.percent_trainable},
        "resources": {"train_seconds": outcome.state.train_seconds, "train_tokens": outcome.state.train_tokens,
                      "tokens_per_s": outcome.tokens_per_s, "steps": outcome.state.step,
                      "total_steps": outcome.total_steps, "adapter_bytes": artifacts["bytes"],
                      **peak_memory(device)},
        "divergence": outcome.divergence,
        "data": {"train_examples": len(data.train), "eval_examples": len(data.eval),
                 **majority_class(data.eval, data.label_names)},
        "placement": [{"module": t.name, "layer": t.layer, "role": t.role,
                       "slices": list(t.slices) if t.slices else None,
                       "rank": prepared.ranks.get(t.name)} for t in prepared.targets],
        "artifacts": artifacts,
        "samples": samples,
        "warnings": warnings,
        "environment": environment(device),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "wall_seconds": time.time() - started,
        "config": config_to_dict(config),
    }


def majority_class(examples: list[dict], label_names: list[str] | None) -> dict[str, Any]:
    """The accuracy of always answering the eval set's most frequent class: the floor a classifier must beat."""
    if not examples or "label" not in examples[0]:
        return {}
    counts = Counter(int(e["label"]) for e in examples)
    label, count = counts.most_common(1)[0]
    name = label_names[label] if label_names and label < len(label_names) else str(label)
    return {"eval_majority_label": name, "eval_majority_accuracy": count / len(examples)}


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(temporary, path)


def _dir_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
