"""One experiment end to end: config -> model + data -> prepare -> train -> evaluate -> summary.

Output directory:
  config.yaml      the resolved config
  metrics.jsonl    a line per logged step (train_loss, lr, tokens_per_s) and per evaluation
  summary.json     status, metrics, parameters, resources, placement and per-module ranks
  adapter/         LoRA runs: the adapter in HF peft format
  trainable.safetensors  other methods (and fused-slice LoRA): the trained parameters
                   (neither for a diverged or collapsed run: its weights are not worth keeping)
  train.log        messages, including the placement map
  checkpoint.safetensors  the latest checkpoint (removed once training has run to its end)
  .lock            flock'd while a process works in the folder (locking.py); holds that process's pid

Nothing but .lock is written before the data, the model and the method are ready (a mistake found while
loading leaves the folder reusable), and a full or read-only disk stops the run with one line (diskio.py).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from peftlab.run.checkpoint import CHECKPOINT_FILE, has_checkpoint
from peftlab.config import RunConfig, config_to_dict, from_dict, load_yaml
from peftlab.inputs.data import TaskData, load_task_data
from peftlab.diskio import DiskError, remove_quietly, temporary_path, write_atomic, writing
from peftlab.errors import UserError
from peftlab.run.evaluate import EvalResult, generate_samples
from peftlab.core.export import export_peft_adapter
from peftlab.core.methods import Prepared, prepare
from peftlab.core.modelmap import build_model_map
from peftlab.inputs.model_cache import BaseModelCache
from peftlab.inputs.models import CAUSAL_TASKS, LoadedModel, load_model, load_tokenizer
from peftlab.core.params import count_params
from peftlab.core.placement import format_placement_map
from peftlab.run.resources import (data_sha256, environment, load_average, model_sha256, peak_memory, reset_peak_memory,
                        resolve_device, seed_everything)
from peftlab.locking import LOCK_FILE, folder_lock
from peftlab.study.sweep import TRIAL_FILE
from peftlab.run.tracking import MetricsLog, finite_only, read_records
from peftlab.run.train import TrainOutcome, eval_divergence, evaluate_on, train

SMALL_EVAL_WARNING = 100  # fewer eval examples than this cannot separate close strategies
COLLAPSE_MARGIN = 1.0  # nats worse than the untrained base model on the same eval set: collapsed
UNIFORM_SLACK = 1e-3  # nats: float32 sums of a uniform model's losses land a hair off ln(V)
FINISHED = ("completed", "collapsed")  # training ran to its end: --resume returns the summary
# what a run (or a sweep, for its runs) writes before training: with no trained step, such a folder is reusable
RUN_FILES = frozenset({"config.yaml", "metrics.jsonl", "train.log", LOCK_FILE, TRIAL_FILE})


def run_experiment(config: RunConfig, out_dir: str | Path, *, resume: bool = False, echo: bool = True,
                   on_step: Any = None, model_cache: BaseModelCache | None = None,
                   reference_eval_loss: float | None = None) -> dict[str, Any]:
    """Run one experiment into ``out_dir`` and return its summary (also written to summary.json).

    ``model_cache`` (sweeps) hands out copies of a base model loaded once; results are the same
    as loading from disk, because everything random after loading is seeded here.
    ``reference_eval_loss``: the untrained base model's eval loss (``evaluate_reference``), so a
    run that ends far worse than where it started is reported as collapsed (see ``check_collapse``).
    """
    out_dir, started = Path(out_dir), time.time()
    previous = _check_out_dir(config, out_dir, resume)  # before the lock: a finished run on read-only media
    if previous is not None:
        return previous
    with folder_lock(out_dir, "run"):  # one process per run folder, held to the end
        previous = _check_out_dir(config, out_dir, resume)  # again: another process may have run meanwhile
        if previous is not None:
            return previous
        return _run_locked(config, out_dir, resume, echo, on_step, model_cache, reference_eval_loss, started)


def _run_locked(config: RunConfig, out_dir: Path, resume: bool, echo: bool, on_step: Any,
                model_cache: BaseModelCache | None, reference_eval_loss: float | None,
                started: float) -> dict[str, Any]:
    """run_experiment's work, under the folder lock; nothing is written until data, model and method are ready."""
    device = resolve_device(config.train.device)
    tokenizer, data, loaded = load_inputs(config, model_cache)
    model = loaded.model
    # the head is what the loader newly initialised (exactly, where it reports it), else found structurally
    model_map = build_model_map(model, strict=config.method.targets is None, new_weights=loaded.new_weights)
    prepared = prepare(model, config.method, model_map, train_head=config.task == "classification")
    # the run is known to start: only now is the folder written (an attempt that trained nothing is cleared)
    log = _start(config, out_dir, echo, stale=() if holds_training(out_dir) else ("metrics.jsonl", "train.log"))
    _log_data_warnings(data, log)
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
    collapse = _mark_collapse(outcome, config.task, model, reference_eval_loss, log)
    if outcome.status == "completed" and config.train.train_eval_size:
        outcome.train_eval = evaluate_on(model, data.train[: config.train.train_eval_size], config.task,
                                         config.train, tokenizer.pad_token_id, device)
    samples = []
    if outcome.status == "completed" and config.task == "instruction" and config.train.num_samples:
        samples = generate_samples(model, tokenizer, data.eval_prompts[: config.train.num_samples],
                                   max_new_tokens=config.train.max_new_tokens, device=device)
    # a diverged or collapsed model is not worth its disk space, nor safe to pick up by mistake
    artifacts = (_save_trained(model, prepared, out_dir, loaded.source, config.task) if outcome.status == "completed"
                 else {"format": "none", "path": None, "bytes": 0, "note": f"not exported: {outcome.status}"})
    summary = _summary(config, out_dir, data, prepared, outcome, samples, artifacts, device, started,
                       _environment(device, loaded.source, data))
    if collapse is not None:
        summary["collapse"] = collapse
    summary = _write_json_atomic(out_dir / "summary.json", summary)
    if outcome.status in FINISHED and has_checkpoint(out_dir):
        (out_dir / CHECKPOINT_FILE).unlink()
    log.message(f"{summary['status']}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in summary["metrics"].items()))
    return summary


def check_collapse(task: str, eval_loss: float, vocab_size: int | None,
                   reference_eval_loss: float | None = None) -> dict[str, Any] | None:
    """Why a finished causal-task run counts as collapsed, or None: {"reason", "eval_loss", "threshold"}.

    A model that predicts every token with probability 1/V scores ln(V): a final eval loss at or
    above that has learned nothing a uniform guess does not know, whatever training reported, and
    a run that ends COLLAPSE_MARGIN nats worse than the untrained base model (the sweep's reference)
    has destroyed what the base model knew. Such runs must not be averaged in as results.
    Classification is not judged here: a classifier stuck at the majority class shows against
    the report's majority-class floor instead.
    """
    if task not in CAUSAL_TASKS:
        return None
    if vocab_size:
        uniform = math.log(vocab_size)
        if eval_loss >= uniform - UNIFORM_SLACK:
            return {"reason": f"eval loss {eval_loss:.4f} is at or above uniform prediction, ln({vocab_size}) = "
                              f"{uniform:.4f}", "eval_loss": eval_loss, "threshold": uniform}
    if reference_eval_loss is not None and eval_loss > reference_eval_loss + COLLAPSE_MARGIN:
        return {"reason": f"eval loss {eval_loss:.4f} is more than {COLLAPSE_MARGIN:g} nats above the untrained "
                          f"base model's {reference_eval_loss:.4f}", "eval_loss": eval_loss,
                "threshold": reference_eval_loss + COLLAPSE_MARGIN}
    return None


def _mark_collapse(outcome: TrainOutcome, task: str, model: torch.nn.Module, reference_eval_loss: float | None,
                   log: MetricsLog) -> dict[str, Any] | None:
    """Mark a completed outcome collapsed when ``check_collapse`` says so; return its collapse record."""
    if outcome.status != "completed":
        return None
    collapse = check_collapse(task, outcome.final_eval.loss, output_vocab_size(model), reference_eval_loss)
    if collapse is not None:
        outcome.status = "collapsed"
        log.message(f"collapsed: {collapse['reason']}")
    return collapse


def output_vocab_size(model: torch.nn.Module) -> int | None:
    """How many tokens the model chooses between: its lm head's outputs (config.vocab_size otherwise)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(getattr(head, "out_features", None), int):
        return head.out_features
    return getattr(getattr(model, "config", None), "vocab_size", None)


def evaluate_reference(config: RunConfig, out_dir: str | Path, *, echo: bool = True,
                       model_cache: BaseModelCache | None = None) -> dict[str, Any]:
    """Evaluate the untrained base model on the run's eval set: the reference every strategy starts from.

    Loaded exactly as ``run_experiment`` loads it (same data split, same seeded classification
    head), but neither prepared nor trained. Writes summary.json (method "none", role "reference"),
    config.yaml, metrics.jsonl (one eval record at step 0) and train.log. A finished reference of
    the same config in ``out_dir`` is returned as it is, so a resumed sweep does not redo it.
    """
    out_dir, started = Path(out_dir), time.time()
    previous = _check_reference_dir(config, out_dir)
    if previous is not None:
        return previous
    with folder_lock(out_dir, "reference evaluation"):
        previous = _check_reference_dir(config, out_dir)
        if previous is not None:
            return previous
        device = resolve_device(config.train.device)
        tokenizer, data, loaded = load_inputs(config, model_cache)
        log = _start(config, out_dir, echo, stale=("metrics.jsonl", "train.log"))
        _log_data_warnings(data, log)
        return _evaluate_reference(config, out_dir, log, device, started, tokenizer, data, loaded)


def _check_reference_dir(config: RunConfig, out_dir: Path) -> dict[str, Any] | None:
    previous = _check_out_dir(config, out_dir, resume=True)
    if previous is not None and previous.get("role") != "reference":
        raise UserError(f"{out_dir} holds a training run, not a reference evaluation; choose another folder")
    return previous


def _evaluate_reference(config: RunConfig, out_dir: Path, log: MetricsLog, device: torch.device, started: float,
                        tokenizer: Any, data: TaskData, loaded: LoadedModel) -> dict[str, Any]:
    model = loaded.model.to(device)
    gc.collect()
    reset_peak_memory(device)
    result = evaluate_on(model, data.eval, config.task, config.train, tokenizer.pad_token_id, device)
    reason = eval_divergence(result)
    log.write({"step": 0, **result.as_metrics()})
    summary = _reference_summary(config, out_dir, data, model, result, reason, device, started,
                                 _environment(device, loaded.source, data))
    summary = _write_json_atomic(out_dir / "summary.json", summary)
    log.message(f"reference {summary['status']}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in summary["metrics"].items()))
    return summary


def load_inputs(config: RunConfig, model_cache: BaseModelCache | None = None) -> tuple[Any, TaskData, LoadedModel]:
    """Tokenizer, task data and base model as a run sees them, with any new head drawn from the run's seed."""
    tokenizer = load_tokenizer(config.model)
    data = load_task_data(config.data, config.task, tokenizer)
    load = model_cache.get if model_cache is not None else load_model
    loaded = load(config.model, config.task, num_labels=data.num_labels, label_names=data.label_names)
    seed_everything(config.train.seed)  # the new head's and (after this returns) the adapters' initial weights
    reinitialize(loaded.model, loaded.new_weights)
    return tokenizer, data, loaded


def _start(config: RunConfig, out_dir: Path, echo: bool, stale: tuple[str, ...] = ()) -> MetricsLog:
    """Write config.yaml and open the logs; ``stale``: files of an earlier attempt to clear first."""
    for name in stale:  # an earlier attempt's lines must not mix with this one's
        with writing(out_dir / name):
            (out_dir / name).unlink(missing_ok=True)
    write_atomic(out_dir / "config.yaml", yaml.safe_dump(config_to_dict(config), sort_keys=False))
    return MetricsLog(out_dir, echo=echo)


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
    """Refuse to overwrite a run; on resume, return a finished summary or check the config matches.

    A folder that holds no trained step (``holds_training``) and only files a run writes is as good
    as an empty one, so a command corrected after a mistake (a run that stopped before training)
    runs into the same --out, with or without --resume.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a folder")
    if not out_dir.exists():
        return None
    if not holds_training(out_dir):
        others = sorted(p.name for p in out_dir.iterdir() if p.name not in RUN_FILES and not p.name.endswith(".tmp"))
        if others and not resume:
            raise UserError(f"{out_dir} already holds other files ({', '.join(others[:3])}); choose another --out")
        return None
    if not resume:
        raise UserError(f"{out_dir} already holds a run; pass --resume to continue it, or choose another --out")
    saved_path = out_dir / "config.yaml"
    if saved_path.exists():
        saved = from_dict(RunConfig, load_yaml(saved_path))
        if config_to_dict(saved) != config_to_dict(config):
            changed = _changed_keys(config_to_dict(saved), config_to_dict(config))
            raise UserError(f"--resume with a different config than the run in {out_dir} (changed: {', '.join(changed)})")
    summary = read_summary(out_dir / "summary.json")
    if summary is not None and summary.get("status") in FINISHED:
        return summary
    return None


def holds_training(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds a trained step: a checkpoint, a summary, or a metric line at step >= 1."""
    if has_checkpoint(out_dir) or (out_dir / "summary.json").exists():
        return True
    return any(isinstance(r.get("step"), int) and r["step"] >= 1 for r in read_records(out_dir / "metrics.jsonl"))


def read_summary(path: Path) -> dict[str, Any] | None:
    """A run's summary.json, None when there is none; a damaged one is a one-line UserError."""
    if not path.exists():
        return None
    try:
        summary = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as error:  # a truncated copy, a bad sector: never a traceback
        summary = error
    if not isinstance(summary, dict):
        why = (str(summary).strip().splitlines() or [""])[0] if isinstance(summary, Exception) else "not a JSON object"
        raise UserError(f"{path} is damaged ({why}); move it away, and --resume redoes the run from its last "
                        f"checkpoint (or from the start)")
    return summary


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
            with _removed_on_failure(out_dir / "adapter"), writing(out_dir / "adapter"):
                path = export_peft_adapter(model, out_dir / "adapter", base_model_name_or_path=source,
                                           task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM",
                                           modules_to_save=heads)
            return {"format": "peft", "path": "adapter", "bytes": _dir_bytes(Path(path))}
        except DiskError:
            raise
        except UserError as error:  # fused-slice placements have no peft form
            note = str(error)
    else:
        note = ""
    if prepared.method == "full":  # the whole model: report its size, do not write a copy per run
        size = sum(p.numel() * p.element_size() for _, p in model.named_parameters())
        return {"format": "none", "path": None, "bytes": size, "note": "full fine-tuning: size of all weights"}
    tensors = {name: p.detach().float().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    target = out_dir / "trainable.safetensors"
    temporary = temporary_path(target)
    with writing(target):
        try:
            save_file(tensors, str(temporary))
            os.replace(temporary, target)
        except BaseException:
            remove_quietly(temporary)
            raise
    artifact = {"format": "safetensors", "path": "trainable.safetensors", "bytes": (out_dir / "trainable.safetensors").stat().st_size}
    if note:
        artifact["note"] = note
    return artifact


def _summary(config: RunConfig, out_dir: Path, data: TaskData, prepared: Prepared, outcome: TrainOutcome,
             samples: list[dict], artifacts: dict, device: torch.device, started: float,
             env: dict[str, Any]) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    if outcome.final_eval is not None:
        metrics.update(outcome.final_eval.as_metrics())
    if outcome.train_eval is not None:  # the same measures on training examples: train_eval_loss, train_accuracy...
        metrics.update({"train_" + k: v for k, v in outcome.train_eval.as_metrics().items()})
    train_losses = [r["train_loss"] for r in outcome.history if "train_loss" in r]
    if train_losses:
        metrics["train_loss"] = train_losses[-1]
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
                      **peak_memory(device), **_load(outcome.load_avg_max)},
        "divergence": outcome.divergence,
        "placement": [{"module": t.name, "layer": t.layer, "role": t.role,
                       "slices": list(t.slices) if t.slices else None,
                       "rank": prepared.ranks.get(t.name)} for t in prepared.targets],
        "artifacts": artifacts,
        "samples": samples,
        **_common(config, data, env, started),
    }


def _reference_summary(config: RunConfig, out_dir: Path, data: TaskData, model: torch.nn.Module,
                       result: EvalResult, divergence: str | None, device: torch.device, started: float,
                       env: dict[str, Any]) -> dict[str, Any]:
    """The reference's summary, shaped as a run's so reports read both the same way."""
    total = count_params(model)[1]
    return {
        "status": "diverged" if divergence else "completed",
        "role": "reference",
        "name": config.name or out_dir.name,
        "model": config.model,
        "task": config.task,
        "method": "none",
        "metrics": result.as_metrics(),
        "params": {"trainable": 0, "total": total, "percent": 0.0},
        "resources": {"train_seconds": 0.0, "train_tokens": 0, "tokens_per_s": 0.0, "steps": 0, "total_steps": 0,
                      "adapter_bytes": 0, **peak_memory(device), **_load(load_average())},
        "divergence": {"step": 0, "reason": divergence, "parameters": []} if divergence else None,
        "placement": [],
        "artifacts": {"format": "none", "path": None, "bytes": 0, "note": "reference: the untrained base model"},
        "samples": [],
        **_common(config, data, env, started),
    }


def _log_data_warnings(data: TaskData, log: MetricsLog) -> None:
    """What the data loader found suspicious (labels only in eval, label gaps, empty texts), in train.log."""
    for warning in data.warnings:
        log.message(f"warning: {warning}")


def _common(config: RunConfig, data: TaskData, env: dict[str, Any], started: float) -> dict[str, Any]:
    """The part of a summary every kind of run shares: data, warnings, environment, timing, config."""
    warnings = list(data.warnings)
    if len(data.eval) < SMALL_EVAL_WARNING:
        warnings.append(f"only {len(data.eval)} eval examples: differences between strategies may be noise")
    return {
        "data": {"train_examples": len(data.train), "eval_examples": len(data.eval),
                 **majority_class(data.eval, data.label_names)},
        "warnings": warnings,
        "environment": env,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "wall_seconds": time.time() - started,
        "config": config_to_dict(config),
    }


def _load(load_avg_max: float | None) -> dict[str, Any]:
    """Highest 1-minute load average seen and the CPU count: other work on the machine slows a run."""
    return {**({"load_avg_max": load_avg_max} if load_avg_max is not None else {}), "cpu_count": os.cpu_count()}


def _environment(device: torch.device, source: str, data: TaskData) -> dict[str, Any]:
    """Device and software, plus hashes of what the numbers came from: model weights and examples."""
    env = environment(device)
    digest = model_sha256(source)
    if digest is not None:
        env["model_sha256"] = digest
    env["data_sha256"] = data_sha256(data.train, data.eval)
    return env


def majority_class(examples: list[dict], label_names: list[str] | None) -> dict[str, Any]:
    """The accuracy of always answering the eval set's most frequent class: the floor a classifier must beat."""
    if not examples or "label" not in examples[0]:
        return {}
    counts = Counter(int(e["label"]) for e in examples)
    label, count = counts.most_common(1)[0]
    name = label_names[label] if label_names and label < len(label_names) else str(label)
    return {"eval_majority_label": name, "eval_majority_accuracy": count / len(examples)}


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> dict[str, Any]:
    """Write ``payload`` without NaN or inf (strict JSON); return what was written, to hand on as is."""
    payload = finite_only(payload)
    write_atomic(path, json.dumps(payload, indent=2, default=str, allow_nan=False))
    return payload


@contextlib.contextmanager
def _removed_on_failure(folder: Path) -> Iterator[None]:
    """Remove ``folder`` when the block fails: a half-written adapter must not pass for a saved one."""
    try:
        yield
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _dir_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
