"""One experiment end to end: config -> model + data -> prepare -> train -> evaluate -> summary.

Output directory:
  config.yaml      the resolved config
  metrics.jsonl    a line per logged step (train_loss, lr, tokens_per_s) and per evaluation
  summary.json     a RunSummary (run/summary.py): status, metrics, parameters, resources, placement, warnings
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
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from peftlab import messages
from peftlab.config import CAUSAL_TASKS, RunConfig, config_to_dict
from peftlab.core.export import export_peft_adapter
from peftlab.core.methods import Prepared, prepare
from peftlab.core.modelmap import build_model_map
from peftlab.core.placement_map import format_placement_map
from peftlab.diskio import DiskError, write_atomic, write_atomic_by, writing
from peftlab.errors import UserError
from peftlab.inputs.data import TaskData, load_task_data
from peftlab.inputs.model_cache import BaseModelCache
from peftlab.inputs.models import LoadedModel, load_model, load_tokenizer
from peftlab.locking import folder_lock
from peftlab.run.checkpoint import CHECKPOINT_FILE, has_checkpoint
from peftlab.run.evaluate import generate_samples
from peftlab.run.folder import FINISHED, check_out_dir, check_reference_dir, holds_training
from peftlab.run.resources import reset_peak_memory, resolve_device, seed_everything
from peftlab.run.summarize import reference_summary, run_environment, run_summary
from peftlab.run.summary import SUMMARY_FILE, Artifact, Collapse, RunSummary, write_summary
from peftlab.run.tracking import MetricsLog
from peftlab.run.train import TrainOutcome, eval_divergence, evaluate_on, train

COLLAPSE_MARGIN = 1.0  # nats worse than the untrained base model on the same eval set: collapsed
UNIFORM_SLACK = 1e-3  # nats: float32 sums of a uniform model's losses land a hair off ln(V)


def run_experiment(config: RunConfig, out_dir: str | Path, *, resume: bool = False, echo: bool = True,
                   on_step: Any = None, model_cache: BaseModelCache | None = None,
                   reference_eval_loss: float | None = None) -> RunSummary:
    """Run one experiment into ``out_dir`` and return its summary (also written to summary.json).

    ``model_cache`` (sweeps) hands out copies of a base model loaded once; results are the same
    as loading from disk, because everything random after loading is seeded here.
    ``reference_eval_loss``: the untrained base model's eval loss (``evaluate_reference``), so a
    run that ends far worse than where it started is reported as collapsed (see ``check_collapse``).
    """
    out_dir, started = Path(out_dir), time.time()
    previous = check_out_dir(config, out_dir, resume)  # before the lock: a finished run on read-only media
    if previous is not None:
        return previous
    with folder_lock(out_dir, "run"):  # one process per run folder, held to the end
        previous = check_out_dir(config, out_dir, resume)  # again: another process may have run meanwhile
        if previous is not None:
            return previous
        with messages.routed(echo=echo) as route:  # what loading says goes to this run's log, or nowhere
            return _run_locked(config, out_dir, resume, route, on_step, model_cache, reference_eval_loss, started)


def _run_locked(config: RunConfig, out_dir: Path, resume: bool, route: messages.Route, on_step: Any,
                model_cache: BaseModelCache | None, reference_eval_loss: float | None,
                started: float) -> RunSummary:
    """run_experiment's work, under the folder lock; nothing is written until data, model and method are ready."""
    device = resolve_device(config.train.device)
    tokenizer, data, loaded = load_inputs(config, model_cache)
    model = loaded.model
    # the head is what the loader newly initialised (exactly, where it reports it), else found structurally
    model_map = build_model_map(model, strict=config.method.targets is None, new_weights=loaded.new_weights)
    prepared = prepare(model, config.method, model_map, train_head=config.task == "classification")
    # the run is known to start: only now is the folder written (an attempt that trained nothing is cleared)
    log = _start(config, out_dir, route, stale=() if holds_training(out_dir) else ("metrics.jsonl", "train.log"))
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
    artifact = (_save_trained(model, prepared, out_dir, loaded.source, config.task) if outcome.status == "completed"
                else Artifact("none", None, 0, f"not exported: {outcome.status}"))
    summary = run_summary(config, out_dir, data, prepared, outcome, samples, artifact, device, started,
                          run_environment(device, loaded.source, data))
    summary.collapse = collapse
    summary = write_summary(out_dir / SUMMARY_FILE, summary)
    if outcome.status in FINISHED and has_checkpoint(out_dir):
        (out_dir / CHECKPOINT_FILE).unlink()
    log.message(f"{summary.status}: " + _metrics_line(summary))
    return summary


def check_collapse(task: str, eval_loss: float, vocab_size: int | None,
                   reference_eval_loss: float | None = None) -> Collapse | None:
    """Why a finished causal-task run counts as collapsed, or None.

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
            return Collapse(f"eval loss {eval_loss:.4f} is at or above uniform prediction, ln({vocab_size}) = "
                            f"{uniform:.4f}", eval_loss, uniform)
    if reference_eval_loss is not None and eval_loss > reference_eval_loss + COLLAPSE_MARGIN:
        return Collapse(f"eval loss {eval_loss:.4f} is more than {COLLAPSE_MARGIN:g} nats above the untrained "
                        f"base model's {reference_eval_loss:.4f}", eval_loss, reference_eval_loss + COLLAPSE_MARGIN)
    return None


def _mark_collapse(outcome: TrainOutcome, task: str, model: torch.nn.Module, reference_eval_loss: float | None,
                   log: MetricsLog) -> Collapse | None:
    """Mark a completed outcome collapsed when ``check_collapse`` says so; return its collapse record."""
    if outcome.status != "completed":
        return None
    collapse = check_collapse(task, outcome.final_eval.loss, output_vocab_size(model), reference_eval_loss)
    if collapse is not None:
        outcome.status = "collapsed"
        log.message(f"collapsed: {collapse.reason}")
    return collapse


def output_vocab_size(model: torch.nn.Module) -> int | None:
    """How many tokens the model chooses between: its lm head's outputs (config.vocab_size otherwise)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(getattr(head, "out_features", None), int):
        return head.out_features
    return getattr(getattr(model, "config", None), "vocab_size", None)


def evaluate_reference(config: RunConfig, out_dir: str | Path, *, echo: bool = True,
                       model_cache: BaseModelCache | None = None) -> RunSummary:
    """Evaluate the untrained base model on the run's eval set: the reference every strategy starts from.

    Loaded exactly as ``run_experiment`` loads it (same data split, same seeded classification
    head), but neither prepared nor trained. Writes summary.json (method "none", role "reference"),
    config.yaml, metrics.jsonl (one eval record at step 0) and train.log. A finished reference of
    the same config in ``out_dir`` is returned as it is, so a resumed sweep does not redo it.
    """
    out_dir, started = Path(out_dir), time.time()
    previous = check_reference_dir(config, out_dir)
    if previous is not None:
        return previous
    with folder_lock(out_dir, "reference evaluation"):
        previous = check_reference_dir(config, out_dir)
        if previous is not None:
            return previous
        with messages.routed(echo=echo) as route:
            device = resolve_device(config.train.device)
            tokenizer, data, loaded = load_inputs(config, model_cache)
            log = _start(config, out_dir, route, stale=("metrics.jsonl", "train.log"))
            _log_data_warnings(data, log)
            return _evaluate_reference(config, out_dir, log, device, started, tokenizer, data, loaded)


def _evaluate_reference(config: RunConfig, out_dir: Path, log: MetricsLog, device: torch.device, started: float,
                        tokenizer: Any, data: TaskData, loaded: LoadedModel) -> RunSummary:
    model = loaded.model.to(device)
    gc.collect()
    reset_peak_memory(device)
    result = evaluate_on(model, data.eval, config.task, config.train, tokenizer.pad_token_id, device)
    reason = eval_divergence(result)
    log.write({"step": 0, **result.as_metrics()})
    summary = reference_summary(config, out_dir, data, model, result, reason, device, started,
                                run_environment(device, loaded.source, data))
    summary = write_summary(out_dir / SUMMARY_FILE, summary)
    log.message(f"reference {summary.status}: " + _metrics_line(summary))
    return summary


def load_inputs(config: RunConfig, model_cache: BaseModelCache | None = None) -> tuple[Any, TaskData, LoadedModel]:
    """Tokenizer, task data and base model as a run sees them, with any new head drawn from the run's seed."""
    tokenizer = load_tokenizer(config.model)
    data = load_task_data(config.data, config.task, tokenizer)
    load = model_cache.get if model_cache is not None else load_model
    loaded = load(config.model, config.task, num_labels=data.num_labels, label_names=data.label_names,
                  tokenizer=tokenizer)  # the one tokenizer of the run: read from disk once
    seed_everything(config.train.seed)  # the new head's and (after this returns) the adapters' initial weights
    reinitialize(loaded.model, loaded.new_weights)
    return tokenizer, data, loaded


def _log_data_warnings(data: TaskData, log: MetricsLog) -> None:
    """What the data loader found suspicious (labels only in eval, label gaps, empty texts), in train.log."""
    for warning in data.warnings:
        log.message(f"warning: {warning}")


def _start(config: RunConfig, out_dir: Path, route: messages.Route, stale: tuple[str, ...] = ()) -> MetricsLog:
    """Write config.yaml and open the logs; ``stale``: files of an earlier attempt to clear first.

    The messages that loading logged (held by ``route``) go into train.log first, in order."""
    for name in stale:  # an earlier attempt's lines must not mix with this one's
        with writing(out_dir / name):
            (out_dir / name).unlink(missing_ok=True)
    write_atomic(out_dir / "config.yaml", yaml.safe_dump(config_to_dict(config), sort_keys=False))
    log = MetricsLog(out_dir, echo=route.echo)
    route.connect(log.to_file)  # the route already echoed them: the log only writes them down
    return log


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


def _save_trained(model: torch.nn.Module, prepared: Prepared, out_dir: Path, source: str, task: str) -> Artifact:
    """Write the trained parameters; return where and how many bytes they take on disk."""
    if prepared.method == "lora":
        try:
            heads = None  # classification heads are saved by export as modules_to_save
            with _removed_on_failure(out_dir / "adapter"), writing(out_dir / "adapter"):
                path = export_peft_adapter(model, out_dir / "adapter", base_model_name_or_path=source,
                                           task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM",
                                           modules_to_save=heads)
            return Artifact("peft", "adapter", _dir_bytes(Path(path)))
        except DiskError:
            raise
        except UserError as error:  # fused-slice placements have no peft form
            note = str(error)
    else:
        note = ""
    if prepared.method == "full":  # the whole model: report its size, do not write a copy per run
        size = sum(p.numel() * p.element_size() for _, p in model.named_parameters())
        return Artifact("none", None, size, "full fine-tuning: size of all weights")
    tensors = {name: p.detach().float().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    target = out_dir / "trainable.safetensors"
    write_atomic_by(target, lambda temporary: save_file(tensors, str(temporary)))
    return Artifact("safetensors", "trainable.safetensors", target.stat().st_size, note or None)


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


def _metrics_line(summary: RunSummary) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in summary.metrics.items())


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
