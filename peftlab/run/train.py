"""The one training loop, for every method: methods differ only in their prepare step.

Long because the step is one concept from batch to update: pieces, token-weighted accumulation,
the ranks' sums (and a sharded run's lockstep), clipping and the divergence checks must be read together.

The optimizer and schedule of run/optimizer.py, gradient accumulation with exact token weighting,
clipping, checkpoints and exact resume, and divergence detection: a non-finite
loss or gradient stops the run and names the step and the parameters, and so does
a non-finite loss at any evaluation, the final one included. Every evaluation goes to a
``BestTracker`` (run/best.py): train.keep_best restores the best weights at the end, and
train.early_stopping ends the loop early, as a completed run.

Public measurement points, so a benchmark measures the real step and patches nothing: ``optimizer_step``
and ``accumulate_gradients`` (its forward and backward) take the loss and batch splitter as ``StepOptions``;
``TrainOutcome`` counts padded tokens and evaluation seconds.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from peftlab.config import TrainConfig
from peftlab.inputs.data import batches, split_by_tokens
from peftlab.run.best import BestTracker, EarlyStop, EvalPoint
from peftlab.run.checkpoint import TrainState, has_checkpoint, load_checkpoint, save_checkpoint
from peftlab.run.distributed import SINGLE, World, any_across, shard, sum_across, sum_gradients
from peftlab.run.evaluate import EvalResult, evaluate
from peftlab.run.losses import LossFn, label_units, loss_sum
from peftlab.run.optimizer import build_optimizer, build_scheduler, total_steps_for, trainable_named_parameters
from peftlab.run.precision import autocast_for
from peftlab.run.resources import load_average, max_batch_tokens_for, resolved_split
from peftlab.run.sharding import FILLER, clip_sharded_gradients, filler, is_sharded
from peftlab.run.sharding import fillers as sharded_fillers
from peftlab.run.stopping import GracefulStop
from peftlab.run.tracking import MetricsLog

# (batch, max_batch_tokens) -> pieces run one after another in one step; a run uses split_by_tokens.
SplitFn = Callable[[dict[str, torch.Tensor], int | None], list[dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class StepOptions:
    """What a step calls, passed in rather than read from module globals: bench/levers.py swaps them."""

    loss: LossFn = loss_sum  # (model, batch, task) -> (summed loss, label units); evaluation uses it too
    split: SplitFn = split_by_tokens  # (batch, cfg.max_batch_tokens) -> pieces of one step


@dataclass
class StepResult:
    """What one optimizer step trained on: its log record's loss and units, and what a benchmark counts."""

    loss: float  # mean over ``units``: token-weighted across micro-batches and pieces
    units: int  # label tokens (examples for classification) the loss is averaged over
    tokens: int  # non-padding tokens
    padded_tokens: int  # positions the model ran on, padding included: rows x width of every piece
    grad_norm: float | None = None  # L2 norm of the step's gradient before clipping (set by optimizer_step)


@dataclass
class TrainOutcome:
    status: str  # "completed" | "diverged"
    state: TrainState
    total_steps: int
    final_eval: EvalResult | None = None  # what the run reports: keep_best's best evaluation, else the last
    divergence: dict | None = None  # {"step", "reason", "parameters"}
    train_eval: EvalResult | None = None  # the final model on a subset of its training examples
    history: list[dict] = field(default_factory=list)
    load_avg_max: float | None = None  # highest 1-minute load average seen; None where the OS has none
    best: EvalPoint | None = None  # keep_best: the evaluation whose weights the model holds at the end
    last_eval: EvalPoint | None = None  # the last evaluation: the final one, or the one training stopped early at
    early_stop: EarlyStop | None = None
    # Measurements of this call (a resumed run counts from the resume), for benchmarks; not in the summary.
    padded_tokens: int = 0  # positions the training steps ran on, padding included
    eval_seconds: float = 0.0  # wall seconds of the evaluations during and at the end of training
    eval_cpu_seconds: float = 0.0  # their CPU seconds

    def note_eval(self, result: EvalResult) -> None:
        """Add an evaluation's cost: a benchmark subtracts it to time training alone."""
        self.eval_seconds += result.seconds
        self.eval_cpu_seconds += result.cpu_seconds

    def note_load(self) -> None:
        """Sample the load average: a busy machine explains slow tokens/s (os.getloadavg is one syscall)."""
        load = load_average()
        if load is not None:
            self.load_avg_max = load if self.load_avg_max is None else max(self.load_avg_max, load)

    @property
    def tokens_per_s(self) -> float:
        return self.state.train_tokens / self.state.train_seconds if self.state.train_seconds else 0.0


class Diverged(Exception):
    """``step``: the step the divergence belongs to, when not the one being taken (an evaluation's)."""

    def __init__(self, reason: str, parameters: list[str], step: int | None = None):
        super().__init__(reason)
        self.reason, self.parameters, self.step = reason, parameters, step


class Interrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint at a step boundary."""

    def __init__(self, step: int):
        super().__init__(f"interrupted after step {step}; checkpoint saved")
        self.step = step


def micro_batches(examples: list[dict], cfg: TrainConfig, pad_id: int,
                  state: TrainState) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
    """Endless (epoch, index-after, batch) stream starting at the state's data position.

    Batch order is a pure function of (seed, epoch), so skipping the first
    ``batch_in_epoch`` batches of the saved epoch reproduces an uninterrupted run.
    """
    if not examples:  # load_task_data refuses such data; without examples the loop below would never yield
        raise ValueError("no training examples")
    epoch, skip = state.epoch, state.batch_in_epoch
    while True:
        for index, batch in enumerate(batches(examples, cfg.batch_size, pad_id=pad_id, seed=cfg.seed, epoch=epoch)):
            if index >= skip:
                yield epoch, index + 1, batch
        epoch, skip = epoch + 1, 0


def train(model: nn.Module, train_examples: list[dict], eval_examples: list[dict], task: str,
          cfg: TrainConfig, *, pad_id: int, device: torch.device, log: MetricsLog,
          checkpoint_dir: Path | None = None, resume: bool = False,
          on_step: Callable[[int], None] | None = None, options: StepOptions = StepOptions(),
          world: World = SINGLE) -> TrainOutcome:
    """Train ``model`` (already prepared and on ``device``) and evaluate it at the end.

    SIGINT/SIGTERM stop after the current step, save a checkpoint (when ``checkpoint_dir`` is
    given) and raise ``Interrupted``; ``resume`` continues from the latest checkpoint.
    ``options``: the loss (of every step and evaluation) and the batch splitter; the defaults are peftlab's.
    ``world``: the ranks of a multi-process run (run/distributed.py); each trains on its share of every
    batch, gradients and metrics are summed over all, and only rank 0 writes checkpoints.
    """
    cfg = resolved_split(cfg, device, log)  # train.max_batch_tokens auto -> this device's value, in train.log
    parameters = trainable_named_parameters(model)
    optimizer = build_optimizer(model, cfg)
    total_steps = total_steps_for(cfg, len(train_examples))
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    state, history, tracker = TrainState(), [], BestTracker(cfg, parameters)
    torch.manual_seed(cfg.seed)  # dropout draws; a resumed run restores the saved RNG state instead
    if resume and checkpoint_dir is not None:
        if has_checkpoint(checkpoint_dir):
            restored = load_checkpoint(checkpoint_dir, model, optimizer, scheduler)
            state, history = restored.state, restored.history
            tracker = BestTracker(cfg, parameters, restored.best)
            log.message(f"resumed from step {state.step} of {total_steps}")
        # the log as it was at the checkpoint (empty without one): no step, no evaluation, logged twice
        log.truncate_after(state.step, history)
    outcome = TrainOutcome("completed", state, total_steps, history=history)
    outcome.note_load()

    def run_eval() -> EvalResult:
        result = evaluate_on(model, eval_examples, task, cfg, pad_id, device, loss=options.loss, world=world)
        outcome.note_eval(result)
        reason = eval_divergence(result)
        if reason:  # a NaN eval loss is a divergence like a NaN training loss, never a metric
            raise Diverged(reason, [], step=state.step)
        record = {"step": state.step, **result.as_metrics()}
        history.append(record)
        log.write(record)
        return result

    def checkpoint() -> None:
        # sharded blocks are gathered whole for the file: every rank takes part, rank 0 writes
        if checkpoint_dir is not None and (world.is_main or world.sharded):
            save_checkpoint(checkpoint_dir, model, optimizer, scheduler, state, history, tracker.state,
                            write=world.is_main)

    stream = micro_batches(train_examples, cfg, pad_id, state)
    model.train()
    bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True, leave=False,
               disable=not world.is_main)
    try:
        with GracefulStop() as stop:
            # a run resumed from the checkpoint of its early stop trains no further; under torchrun every rank
            # stops after the same step, since its tracker saw the same reduced evaluation (run/best.py)
            while state.step < total_steps and tracker.stopped is None:
                # checked before each step: also catches a signal sent while the model loaded; every rank
                # stops after the same step, whichever of them the signal reached first
                if any_across(stop.requested, world, device):
                    _stop_here(state.step, checkpoint, log)
                record, step = _timed_step(model, parameters, optimizer, scheduler, stream, state, task, cfg,
                                           device, options, world)
                outcome.padded_tokens += step.padded_tokens
                history.append(record)
                if state.step % cfg.log_every == 0 or state.step == total_steps:
                    log.write(record)
                    outcome.note_load()
                bar.update(1)
                bar.set_postfix(loss=f"{record['train_loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < total_steps:
                    tracker.observe(state.step, run_eval(), periodic=True)
                if (cfg.save_every and state.step % cfg.save_every == 0) or tracker.stopped is not None:
                    checkpoint()  # on an early stop too: killed before its summary, a resume trains no further
                if on_step is not None:
                    on_step(state.step)
        bar.close()
        if tracker.stopped is None:  # stopped early, the last periodic evaluation is the final one
            tracker.observe(state.step, run_eval(), periodic=False)
        _finish(tracker, outcome, log)
    except Diverged as error:
        step = error.step if error.step is not None else state.step + 1
        outcome.status = "diverged"
        outcome.divergence = {"step": step, "reason": error.reason, "parameters": error.parameters}
        log.message(f"diverged at step {step}: {error.reason}; parameters: {', '.join(error.parameters) or 'none'}")
    finally:
        bar.close()
        outcome.note_load()
    return outcome


def evaluate_on(model: nn.Module, examples: list[dict], task: str, cfg: TrainConfig, pad_id: int,
                device: torch.device, *, loss: LossFn = loss_sum, world: World = SINGLE) -> EvalResult:
    """The one way a run evaluates: fixed-order batches under the run's autocast (each rank its share)."""
    return evaluate(model, eval_batches(examples, cfg, pad_id, device, world), task,
                    autocast_for(device, cfg), loss=loss, world=world, device=device)


def eval_divergence(result: EvalResult) -> str | None:
    """Why an evaluation counts as a divergence (a NaN or inf loss), or None when it does not."""
    return None if math.isfinite(result.loss) else f"non-finite eval loss ({result.loss})"


def _finish(tracker: BestTracker, outcome: TrainOutcome, log: MetricsLog) -> None:
    """Restore keep_best's weights (before the caller exports the model) and record what the run reports."""
    outcome.last_eval, outcome.early_stop = tracker.state.last, tracker.stopped
    if outcome.early_stop is not None:
        log.message(f"stopped early after step {outcome.early_stop.step}: {outcome.early_stop.reason}")
    reported = tracker.restore()
    outcome.final_eval = reported.result if reported is not None else None
    outcome.best = tracker.state.best
    if outcome.best is not None and outcome.last_eval is not None:
        log.message(f"best {tracker.keep} at step {outcome.best.step} of {outcome.last_eval.step}: its weights are "
                    "exported and its metrics reported")


def _stop_here(step: int, checkpoint: Callable[[], None], log: MetricsLog) -> None:
    checkpoint()
    log.message(f"interrupted after step {step}; rerun with --resume to continue")
    raise Interrupted(step)


def _timed_step(model: nn.Module, parameters: list[tuple[str, nn.Parameter]], optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LambdaLR, stream: Iterator, state: TrainState, task: str,
                cfg: TrainConfig, device: torch.device, options: StepOptions,
                world: World) -> tuple[dict, StepResult]:
    """One optimizer step on the stream's next batches, the state advanced; the step's log record and result."""
    started = time.perf_counter()
    step = optimizer_step(model, parameters, optimizer, _draw(stream, state, cfg.grad_accum), task, cfg, device,
                          options, world=world)
    scheduler.step()
    state.step += 1
    state.train_seconds += time.perf_counter() - started
    state.train_tokens += step.tokens
    # train_units: what the step's loss is averaged over, so a report can weight a running loss by it
    record = {"step": state.step, "train_loss": step.loss, "lr": scheduler.get_last_lr()[0],
              "grad_norm": step.grad_norm, "tokens_per_s": state.train_tokens / state.train_seconds,
              "train_units": step.units}
    return record, step


def _draw(stream: Iterator, state: TrainState, count: int) -> list[dict[str, torch.Tensor]]:
    """The next ``count`` batches; the state's data position follows, so a checkpoint resumes after them."""
    drawn = []
    for _ in range(count):
        state.epoch, state.batch_in_epoch, batch = next(stream)
        drawn.append(batch)
    return drawn


def optimizer_step(model: nn.Module, parameters: list[tuple[str, nn.Parameter]], optimizer: torch.optim.Optimizer,
                   batches: Sequence[dict[str, torch.Tensor]], task: str, cfg: TrainConfig, device: torch.device,
                   options: StepOptions = StepOptions(), *, world: World = SINGLE) -> StepResult:
    """One optimizer step over ``batches`` (a step's grad_accum micro-batches, on any device): the training step.

    Gradients as ``accumulate_gradients`` (summed over the ranks of ``world``), then clipping to
    cfg.max_grad_norm, AdamW's update and zeroed gradients; the scheduler is the caller's. Raises
    ``Diverged`` (naming the parameters) on a non-finite loss or gradient, before the parameters change;
    every rank sees the same summed loss and gradients, so all of them raise together.
    ``parameters``: trainable_named_parameters.
    """
    step = accumulate_gradients(model, batches, task, cfg, device, options, world=world)
    if world.parallel:  # FSDP has already summed the sharded blocks' gradients in its reduce-scatter
        sum_gradients([(name, p) for name, p in parameters if not is_sharded(p)], world)
    if not math.isfinite(step.loss):
        raise Diverged(f"non-finite training loss ({step.loss})", _non_finite_grads(parameters))
    max_norm = cfg.max_grad_norm or float("inf")
    norm = (clip_sharded_gradients([p for _, p in parameters], max_norm, device) if world.sharded
            else torch.nn.utils.clip_grad_norm_([p for _, p in parameters], max_norm))
    if not torch.isfinite(norm):
        raise Diverged("non-finite gradient", _non_finite_grads(parameters))
    step.grad_norm = float(norm)  # before clipping: a norm that climbs step after step warns of a divergence
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step


def accumulate_gradients(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], task: str, cfg: TrainConfig,
                         device: torch.device, options: StepOptions = StepOptions(), *,
                         world: World = SINGLE) -> StepResult:
    """Forward and backward over ``batches``, adding d(step loss)/d(parameter) into each ``.grad``.

    Each batch is cut by ``options.split`` (at cfg.max_batch_tokens) and moved to ``device``; every
    piece's summed loss is divided by the label units of the whole step before its backward, so
    accumulation is exactly token-weighted. Runs under the run's autocast; the model's mode is the caller's.
    With several ranks each takes its share of every batch and divides by the units of all ranks
    together; the returned loss, units and tokens are the whole step's (the gradients are this rank's
    part until ``sum_gradients``).
    """
    shares = [share for share in (shard(batch, world) for batch in batches) if share is not None]
    pieces = [{key: value.to(device, non_blocking=True) for key, value in piece.items()}
              for share in shares for piece in options.split(share, max_batch_tokens_for(cfg.max_batch_tokens, device))]
    (units,) = sum_across([sum(label_units(piece, task) for piece in pieces)], world, device)
    units = int(units)
    fillers = sharded_fillers(len(pieces), batches, world, device)  # before any piece: FSDP's gathers are collective
    total_loss = 0.0
    for piece in pieces:
        with autocast_for(device, cfg):
            piece_sum, _ = options.loss(model, piece, task)
        (piece_sum / units).backward()
        total_loss += float(piece_sum.detach())
    for piece in fillers:  # sharded blocks: every rank runs as many pieces; a filler's gradient is zero
        with autocast_for(device, cfg):
            piece_sum, _ = options.loss(model, piece, task)
        (piece_sum * 0.0).backward()
    tokens = sum(int(piece["attention_mask"].sum()) for piece in pieces)
    padded = sum(piece["input_ids"].numel() for piece in pieces)
    total_loss, tokens, padded = sum_across([total_loss, tokens, padded], world, device)
    return StepResult(loss=total_loss / units, units=units, tokens=int(tokens), padded_tokens=int(padded))


def _non_finite_grads(parameters: list[tuple[str, nn.Parameter]]) -> list[str]:
    return [name for name, p in parameters if p.grad is not None and not bool(torch.isfinite(p.grad).all())]


def eval_batches(examples: list[dict], cfg: TrainConfig, pad_id: int, device: torch.device,
                 world: World = SINGLE) -> Iterator[dict]:
    """Batches in a fixed order (no shuffling), this rank's share of each, moved to ``device``."""
    for batch in batches(examples, cfg.batch_size, pad_id=pad_id, seed=cfg.seed, epoch=0, shuffle=False):
        share = shard(batch, world)
        if share is None and world.sharded:  # run in step with the others; evaluate counts none of it
            share = {**filler(batch), FILLER: torch.ones(1)}
        if share is not None:
            yield {key: value.to(device) for key, value in share.items()}
