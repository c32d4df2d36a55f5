"""One experiment end to end: config -> model + data -> prepare -> train -> evaluate -> summary.

Output directory:
  config.yaml      the resolved config
  metrics.jsonl    a line per logged step (train_loss, lr, grad_norm, tokens_per_s) and per evaluation
  summary.json     a RunSummary (run/summary.py): status, metrics, parameters, resources, placement, warnings
  adapter/         LoRA runs: the adapter in HF peft format
  trainable.safetensors  other methods (and fused-slice LoRA): the trained parameters
  model/           full and partial runs: the whole trained model + tokenizer (save_pretrained), for transformers
                   (none of these for a diverged or collapsed run: its weights are not worth keeping)
  train.log        messages, including the placement map
  trackers.json    train.report_to: the tracker run ids, so a resume continues them (run/trackers.py); a run
                   alone also keeps its tensorboard/, mlruns/ (no MLFLOW_TRACKING_URI) and wandb/ here
  checkpoint.safetensors  the latest checkpoint (removed once training has run to its end)
  .lock            flock'd while a process works in the folder (locking.py); holds that process's pid

Nothing but .lock is written before the data, the model and the method are ready (a mistake found while
loading leaves the folder reusable), and a full or read-only disk stops the run with one line (diskio.py).

Under torchrun (run/distributed.py) every rank runs this function; rank 0 alone checks, locks and
writes the folder, the others train their share of each batch and write nothing.
"""

from __future__ import annotations

import contextlib
import gc
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from peftlab import messages
from peftlab.config import RunConfig, config_to_dict
from peftlab.core.methods import Prepared, prepare
from peftlab.core.modelmap import build_model_map
from peftlab.core.placement_map import format_placement_map
from peftlab.diskio import write_atomic, writing
from peftlab.inputs.data import TaskData, load_task_data
from peftlab.inputs.model_cache import BaseModelCache
from peftlab.inputs.models import LoadedModel, load_model, load_tokenizer
from peftlab.locking import folder_lock
from peftlab.run.artifacts import save_trained
from peftlab.run.checkpoint import CHECKPOINT_FILE, has_checkpoint
from peftlab.run.collapse import mark_collapse
from peftlab.run.distributed import World, decided_by_main, join_world, leave_world, max_across
from peftlab.run.folder import FINISHED, check_out_dir, check_reference_dir, holds_training
from peftlab.run.forgetting import Forgetting, load_reference, reference_loss
from peftlab.run.generation import generate_for_run
from peftlab.run.precision import (
    autocast_for,
    enable_gradient_checkpointing,
    keep_trainable_fp32,
    resolve_base_dtype,
)
from peftlab.run.resources import peak_memory, reset_peak_memory, resolve_device, seed_everything, with_resolved_split
from peftlab.run.sharding import gather_parameters, shard_if_asked
from peftlab.run.summarize import reference_summary, run_environment, run_summary
from peftlab.run.summary import SUMMARY_FILE, Artifact, Collapse, RunSummary, write_summary
from peftlab.run.trackers import Scope, open_trackers, require_installed, run_scope
from peftlab.run.tracking import MetricsLog
from peftlab.run.train import TrainOutcome, eval_divergence, evaluate_on, train


def run_experiment(config: RunConfig, out_dir: str | Path, *, resume: bool = False, echo: bool = True,
                   on_step: Any = None, model_cache: BaseModelCache | None = None,
                   reference_eval_loss: float | None = None, scope: Scope | None = None) -> RunSummary:
    """Run one experiment into ``out_dir`` and return its summary (also written to summary.json).

    ``model_cache`` (sweeps) hands out copies of a base model loaded once; results are the same
    as loading from disk, because everything random after loading is seeded here.
    ``reference_eval_loss``: the untrained base model's eval loss (``evaluate_reference``), so a
    run that ends far worse than where it started is reported as collapsed (see run/collapse.py).
    ``scope``: where ``train.report_to``'s trackers put this run (a sweep groups its runs); default: alone.
    """
    out_dir, started = Path(out_dir), time.time()
    world, device = join_world(resolve_device(config.train.device))

    def check_first() -> RunSummary | None:
        require_installed(config.train.report_to)  # a missing tracker client stops the run before it writes
        return check_out_dir(config, out_dir, resume)

    try:
        previous = decided_by_main(world, check_first)  # before the lock: a finished run on read-only media
        if previous is not None:
            return previous
        with _main_lock(world, out_dir):  # one process per run folder, held to the end
            # again: another process may have run meanwhile
            previous = decided_by_main(world, lambda: check_out_dir(config, out_dir, resume))
            if previous is not None:
                return previous
            # loading's messages: this run's log; the trackers (rank 0's), once opened, are closed however the
            # run ends: finished, diverged, interrupted or failed
            with messages.routed(echo=echo and world.is_main) as route, contextlib.ExitStack() as closing:
                return _run_locked(config, out_dir, resume, route, on_step, model_cache, reference_eval_loss,
                                   started, world, device, scope or run_scope(config, out_dir), closing)
    finally:
        if world.parallel:
            leave_world()


def _main_lock(world: World, out_dir: Path) -> contextlib.AbstractContextManager:
    """The folder lock, held by rank 0 (the one writer) for the whole run."""
    return folder_lock(out_dir, "run") if world.is_main else contextlib.nullcontext()


def _run_locked(config: RunConfig, out_dir: Path, resume: bool, route: messages.Route, on_step: Any,
                model_cache: BaseModelCache | None, reference_eval_loss: float | None,
                started: float, world: World, device: torch.device, scope: Scope,
                closing: contextlib.ExitStack) -> RunSummary:
    """run_experiment's work, under the folder lock; nothing is written until data, model and method are ready."""
    config = with_resolved_split(config, device)  # config.yaml and the summary record the split used
    tokenizer, data, loaded = load_inputs(config, model_cache, device)
    reference = load_reference(config, tokenizer)  # eval.reference's chunks (None: off); a bad source stops here
    model = loaded.model
    # the head is what the loader newly initialised (exactly, where it reports it), else found structurally
    model_map = build_model_map(model, strict=config.method.targets is None, new_weights=loaded.new_weights)
    prepared = prepare(model, config.method, model_map, train_head=config.task == "classification")
    keep_trainable_fp32(model)  # a half-precision base must not pull what trains down with it
    if config.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    # the run is known to start: only now is the folder written (an attempt that trained nothing is cleared)
    trained = holds_training(out_dir)
    log = (_start(config, out_dir, route, stale=() if trained else ("metrics.jsonl", "train.log"), scope=scope,
                  closing=closing, continuing=trained)
           if world.is_main else MetricsLog(None, echo=False))
    _log_data_warnings(data, log)
    if world.parallel:
        log.message(f"data parallel over {world.size} processes: each takes every {world.size}th row of a batch "
                    f"of {config.train.batch_size}")
    log.message(f"{config.method.name} on {config.model}: {prepared.trainable_params:,} trainable of "
                f"{prepared.total_params:,} parameters ({prepared.percent_trainable:.3f}%)")
    if prepared.targets:
        log.message("placement map:\n" + format_placement_map(
            model_map, prepared.targets, prepared.ranks or None,
            trainable_params=prepared.trainable_params, total_params=prepared.total_params))
    if config.method.quantize_base is None:  # bitsandbytes placed a quantized base on its GPU as it loaded
        model.to(device)
    # forgetting's "before": the untrained model computes the base model's function (run/forgetting.py says why here)
    before = reference_loss(model, reference, config, tokenizer.pad_token_id, device, world) if reference else None
    world = shard_if_asked(config.train.fsdp, model, model_map, world, device, log.message)
    gc.collect()  # a sweep's previous run may still hold memory; this run's peak starts clean
    reset_peak_memory(device)
    outcome = train(model, data.train, data.eval, config.task, config.train, pad_id=tokenizer.pad_token_id,
                    device=device, log=log, checkpoint_dir=out_dir, resume=resume, on_step=on_step, world=world)
    collapse = mark_collapse(outcome, config.task, model, reference_eval_loss, log)
    if outcome.status == "completed" and config.train.train_eval_size:
        outcome.train_eval = evaluate_on(model, data.train[: config.train.train_eval_size], config.task,
                                         config.train, tokenizer.pad_token_id, device, world=world)
    extra = {}  # forgetting and generation scores, for summary.json's metrics
    if outcome.status == "completed" and reference:
        forgetting = Forgetting(config.eval.reference, len(reference), before,
                                reference_loss(model, reference, config, tokenizer.pad_token_id, device, world))
        extra.update(forgetting.as_metrics())
        log.message(forgetting.line())
    peak_mb = max_across(peak_memory(device)["peak_memory_mb"], world, device)  # training's, the largest rank's
    samples = []
    # sharded blocks: every rank runs the same greedy decoding (each forward gathers every block)
    if (world.is_main or world.sharded) and outcome.status == "completed" and config.task == "instruction":
        # autocast: a half base meets fp32 trained layers only under autocast
        samples, scores = generate_for_run(model, tokenizer, data.eval_prompts, config, device,
                                           autocast_for(device, config.train))
        extra.update(scores.as_metrics() if scores else {})
    if world.sharded and outcome.status == "completed":  # whole weights on rank 0 for the export
        gather_parameters(model, keep=world.is_main)
    if not world.is_main:  # the others' share is done: rank 0 alone saves and writes
        return _summary_of(config, out_dir, data, prepared, outcome, [], Artifact("none", None, 0, None), device,
                           started, loaded, collapse, world, peak_mb)
    # a diverged or collapsed model is not worth its disk space, nor safe to pick up by mistake
    artifact = (save_trained(model, prepared, out_dir, loaded.source, config.task, tokenizer)
                if outcome.status == "completed" else Artifact("none", None, 0, f"not exported: {outcome.status}"))
    summary = _summary_of(config, out_dir, data, prepared, outcome, samples, artifact, device, started, loaded,
                          collapse, world, peak_mb, extra)
    summary = write_summary(out_dir / SUMMARY_FILE, summary)
    if outcome.status in FINISHED and has_checkpoint(out_dir):
        (out_dir / CHECKPOINT_FILE).unlink()
    log.message(f"{summary.status}: " + _metrics_line(summary))
    log.trackers.finish(summary)
    return summary


def _summary_of(config: RunConfig, out_dir: Path, data: TaskData, prepared: Prepared, outcome: TrainOutcome,
                samples: list, artifact: Artifact, device: torch.device, started: float, loaded: LoadedModel,
                collapse: Collapse | None, world: World, peak_mb: float,
                extra: dict[str, float] | None = None) -> RunSummary:
    """The run's summary; with several ranks, the peak memory is the largest rank's and the world is recorded.

    ``extra``: metrics measured after training besides the evaluation (forgetting, generation scores)."""
    # only rank 0's summary is written: the others skip hashing the weights and data
    env = run_environment(device, loaded.source, data) if world.is_main else {}
    summary = run_summary(config, out_dir, data, prepared, outcome, samples, artifact, device, started, env,
                          extra_metrics=extra)
    summary.collapse = collapse
    if world.parallel and summary.resources is not None:
        env["world_size"] = world.size
        summary.resources.peak_memory_mb = peak_mb
        summary.resources.memory_kind = f"{summary.resources.memory_kind}, largest of {world.size} processes"
    return summary


def evaluate_reference(config: RunConfig, out_dir: str | Path, *, echo: bool = True,
                       model_cache: BaseModelCache | None = None, scope: Scope | None = None) -> RunSummary:
    """Evaluate the untrained base model on the run's eval set: the reference every strategy starts from.

    Loaded exactly as ``run_experiment`` loads it (same data split, same seeded classification
    head), but neither prepared nor trained. Writes summary.json (method "none", role "reference"),
    config.yaml, metrics.jsonl (one eval record at step 0) and train.log. A finished reference of
    the same config in ``out_dir`` is returned as it is, so a resumed sweep does not redo it.
    ``train.report_to``'s trackers get its evaluation too (in a sweep, beside the runs it is the reference of).
    """
    out_dir, started = Path(out_dir), time.time()
    require_installed(config.train.report_to)
    previous = check_reference_dir(config, out_dir)
    if previous is not None:
        return previous
    with folder_lock(out_dir, "reference evaluation"):
        previous = check_reference_dir(config, out_dir)
        if previous is not None:
            return previous
        with messages.routed(echo=echo) as route, contextlib.ExitStack() as closing:  # closing: the trackers
            device = resolve_device(config.train.device)
            tokenizer, data, loaded = load_inputs(config, model_cache, device)
            log = _start(config, out_dir, route, stale=("metrics.jsonl", "train.log"),
                         scope=scope or run_scope(config, out_dir), closing=closing)
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
    log.trackers.finish(summary)
    return summary


def load_inputs(config: RunConfig, model_cache: BaseModelCache | None = None,
                device: torch.device | None = None) -> tuple[Any, TaskData, LoadedModel]:
    """Tokenizer, task data and base model as a run sees them, with any new head drawn from the run's seed.

    The base loads in ``train.base_dtype`` for ``device`` (quantized for QLoRA, onto the current GPU)."""
    dtype = resolve_base_dtype(config.train, device or resolve_device(config.train.device), config.method.name)
    tokenizer = load_tokenizer(config.model)
    data = load_task_data(config.data, config.task, tokenizer)
    load = model_cache.get if model_cache is not None else load_model
    loaded = load(config.model, config.task, num_labels=data.num_labels, label_names=data.label_names,
                  tokenizer=tokenizer, dtype=dtype,  # the one tokenizer of the run: read from disk once
                  quantize=config.method.quantize_base)
    seed_everything(config.train.seed)  # the new head's and (after this returns) the adapters' initial weights
    reinitialize(loaded.model, loaded.new_weights)
    return tokenizer, data, loaded


def _log_data_warnings(data: TaskData, log: MetricsLog) -> None:
    """What the data loader found suspicious (labels only in eval, label gaps, empty texts), in train.log."""
    for warning in data.warnings:
        log.message(f"warning: {warning}")


def _start(config: RunConfig, out_dir: Path, route: messages.Route, stale: tuple[str, ...] = (), *,
           scope: Scope, closing: contextlib.ExitStack, continuing: bool = False) -> MetricsLog:
    """Write config.yaml and open the logs and trackers; ``stale``: files of an earlier attempt to clear first.

    The messages that loading logged (held by ``route``) go into train.log first, in order.
    ``continuing``: the folder holds a trained run to resume, whose tracker runs are continued.
    ``closing`` closes the trackers when the run ends, however it ends (a finished run's summary is
    handed to them first: ``Trackers.finish``)."""
    for name in stale:  # an earlier attempt's lines must not mix with this one's
        with writing(out_dir / name):
            (out_dir / name).unlink(missing_ok=True)
    write_atomic(out_dir / "config.yaml", yaml.safe_dump(config_to_dict(config), sort_keys=False))
    trackers = closing.enter_context(open_trackers(config, scope, continuing=continuing))
    log = MetricsLog(out_dir, echo=route.echo, trackers=trackers)
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


def _metrics_line(summary: RunSummary) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in summary.metrics.items())


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
