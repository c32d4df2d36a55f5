"""One run on many processes (torchrun): which rank this is, its share of each batch, and the sums.

Data parallel over torch.distributed, as DDP does it, with one difference in where the gradients
are summed. DDP's hooks need every forward to go through the wrapper's ``forward``; peftlab's loss
(run/losses.py) runs the backbone and then the LM head on the labelled positions alone, which a DDP
wrapper would never see. So each rank computes the gradient of its rows' share of the step's loss
(every piece's loss sum is divided by the label units of the whole *global* step, summed over ranks),
and ``sum_gradients`` adds them up with one all_reduce per optimizer step. The update is then exactly the
one-process update at the same global batch, up to float summation order, on every rank; no rank
ever holds a different copy of the weights.

Batches stay what one process would draw (``train.batch_size`` is the global batch); each rank takes
the rows ``rank, rank + size, ...`` of every batch. Batches are length-grouped, so strided rows give
every rank similar lengths. A rank whose share of a batch is empty runs no forward for it: there are
no wrapper hooks to keep in step, only the collectives below, which every rank calls the same number
of times.

Rank 0 alone writes (logs, checkpoints, summary, adapter; see run/experiment.py). Under torchrun the
environment says RANK, LOCAL_RANK and WORLD_SIZE; without it a run is one process, world size 1, and
every function here is a no-op.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from peftlab.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """Where this process stands in a run: its rank, the number of ranks, its local (per-node) rank."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    # train.fsdp over several ranks: the blocks are sharded (run/sharding.py), so every rank must run the
    # same forward and backward passes in lockstep
    sharded: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run folder."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1


SINGLE = World()


def world_from_env() -> World:
    """The world torchrun describes in the environment; one process when it says nothing."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as error:
        raise UserError(f"WORLD_SIZE / RANK / LOCAL_RANK must be whole numbers (as torchrun sets them): {error}") \
            from None
    if size < 1 or not 0 <= rank < size:
        raise UserError(f"RANK={rank} is not within WORLD_SIZE={size}")
    return World(rank, size, local_rank)


def join_world(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun set up (once per process); the world and this rank's device.

    NCCL on CUDA (one GPU per local rank), gloo on CPU. One process: nothing to join.
    """
    world = world_from_env()
    if not world.parallel:
        return world, device
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {world.local_rank} has no GPU: this machine has "
                            f"{torch.cuda.device_count()}; start at most that many processes per node")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(f"multi-process runs need CUDA (NCCL) or the CPU (gloo), not {device.type}")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return world, device


def torchrun_command(nproc: int, run_args: list[str]) -> list[str]:
    """``peftlab run RUN_ARGS`` as a one-node torchrun job of ``nproc`` processes (a free port of its own,
    so several such jobs can share a machine)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "peftlab", "run", *run_args]


def leave_world() -> None:
    """Tear the process group down at the end of a run (torchrun warns about one left open)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(batch: dict[str, torch.Tensor], world: World) -> dict[str, torch.Tensor] | None:
    """This rank's rows of ``batch`` (rows rank, rank + size, ...); None where it gets none."""
    if not world.parallel:
        return batch
    rows = next(iter(batch.values())).shape[0]
    if world.rank >= rows:
        return None
    return {key: value[world.rank::world.size] for key, value in batch.items()}


def sum_across(values: list[float], world: World, device: torch.device) -> list[float]:
    """Each value summed over the ranks (float64, so counts stay exact)."""
    if not world.parallel:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def max_across(value: float, world: World, device: torch.device) -> float:
    """The largest ``value`` of any rank (peak memory, load average)."""
    if not world.parallel:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def any_across(flag: bool, world: World, device: torch.device) -> bool:
    """True on every rank when it is True on any: a stop signal reaches the ranks at different steps,
    and they must all stop after the same one."""
    return max_across(1.0 if flag else 0.0, world, device) > 0


def gather_objects(items: list, world: World) -> list:
    """Every rank's ``items`` concatenated in rank order (classification predictions)."""
    if not world.parallel:
        return list(items)
    gathered: list = [None] * world.size
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def sum_gradients(parameters: list[tuple[str, nn.Parameter]], world: World) -> None:
    """Add up every trainable parameter's gradient over the ranks, in one all_reduce.

    A rank that saw no rows for a parameter (an empty share) contributes zeros.
    """
    if not world.parallel or not parameters:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for _, p in parameters]
    flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for (_, parameter), grad in zip(parameters, grads, strict=True):
        count = grad.numel()
        parameter.grad = flat[offset:offset + count].view_as(grad).to(parameter.dtype)
        offset += count


def decided_by_main(world: World, decide: Callable[[], T]) -> T:
    """Rank 0 runs ``decide`` (a check of the run folder) and every rank gets its answer.

    Only rank 0 may look at the folder it is about to write: another rank looking a moment later
    would find rank 0's first files there. A UserError on rank 0 is raised on every rank, so none
    goes on alone to wait forever at the first collective.
    """
    if not world.parallel:
        return decide()
    box: list = [None]
    error: UserError | None = None
    if world.is_main:
        try:
            box = [("ok", decide())]
        except UserError as raised:
            error, box = raised, [("error", str(raised))]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if error is not None:
        raise error
    if kind == "error":
        raise UserError(value)
    return value

