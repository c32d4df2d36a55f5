"""Fully sharded data parallel (``train.fsdp``): each transformer block's weights split over the ranks.

For bases whose weights do not fit on one device. Data parallelism stays what run/distributed.py
does (each rank its rows of every batch, the step's loss divided by the units of all ranks); FSDP2's
``fully_shard`` is applied to every transformer block, so a block's parameters, gradients and AdamW
moments live as shards (DTensors, ``Shard(0)``) and are gathered only for that block's forward and
backward. Four consequences shape this module and its callers:

- Only the blocks are sharded, never the root. peftlab's loss runs the backbone and then the LM head on
  the labelled positions alone (run/losses.py), bypassing the root's ``forward``, so a sharded root
  would never gather its embedding and head. They stay whole on every rank (about 3% of a 7B model) and
  their gradients are summed by ``sum_gradients`` like DDP's; the blocks' gradients are summed by FSDP's
  reduce-scatter, with its division by the world size turned off (the loss is already the global mean).
- Every rank must run the same number of forward and backward passes, since each block's gather is a
  collective. A rank whose share of a batch is empty, or that cut its share into fewer pieces than
  another rank (``train.max_batch_tokens``), runs ``filler`` pieces: a real row whose loss is multiplied
  by zero. Evaluation marks its fillers with ``FILLER`` and leaves them out of every sum.
- Generation runs on every rank (greedy decoding of the same prompts takes the same steps everywhere);
  rank 0 keeps the samples.
- Checkpoints and exports need whole tensors: ``full`` gathers one (on every rank: a collective),
  ``shard_like`` cuts a saved whole tensor back into this rank's shard on resume, and
  ``gather_parameters`` replaces the shards by whole tensors once training is over, for the export.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from peftlab.core.modelmap import ModelMap
from peftlab.errors import UserError
from peftlab.run.distributed import World, max_across

FILLER = "_filler"  # key of an evaluation batch that a rank runs only to keep in step with the others


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (a shard of a block's weight, gradient or AdamW moment)."""
    return isinstance(tensor, DTensor)


def shard_blocks(model: nn.Module, block_names: list[str], world: World, device: torch.device) -> int:
    """``fully_shard`` every transformer block of ``model`` (already on ``device``); the number sharded.

    Gradients are summed, not averaged, over the ranks: each rank's loss is already divided by the
    label units of the whole global step (run/train.py), exactly as for one process.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not block_names:
        raise UserError("train.fsdp: this model has no transformer blocks peftlab recognises to shard; "
                        "use data parallel without fsdp")
    mesh = init_device_mesh(device.type, (world.size,))
    for name in block_names:
        # each block is its own FSDP root (the root model is not sharded), and FSDP keeps a root's weights
        # gathered after forward unless told otherwise: that would hold every block whole at once
        block = fully_shard(model.get_submodule(name), mesh=mesh, reshard_after_forward=True)
        block.set_gradient_divide_factor(1.0)
        block.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM
    return len(block_names)


def shard_if_asked(fsdp: bool, model: nn.Module, model_map: ModelMap, world: World, device: torch.device,
                   say: Callable[[str], None]) -> World:
    """Shard the blocks over the ranks under train.fsdp; the world, marked sharded (lockstep from here on)."""
    if not fsdp:
        return world
    if not world.parallel:
        say("train.fsdp: one process, nothing to shard; every block stays whole on this device")
        return world
    blocks = shard_blocks(model, [model_map.block_name(i) for i in range(model_map.n_layers)], world, device)
    say(f"fsdp: {blocks} transformer blocks sharded over {world.size} processes; embeddings and head whole on each")
    return dataclasses.replace(world, sharded=True)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a shard is gathered from every rank (all ranks must call this together)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor read from a checkpoint) laid out as ``like``: this rank's shard of it."""
    if not is_sharded(like):
        return value
    local = value.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(local, like.device_mesh, like.placements)


def gather_parameters(model: nn.Module, keep: bool) -> None:
    """Replace every sharded parameter by its whole tensor, on the CPU, where ``keep`` (rank 0).

    For the export at the end of a run: FSDP's hooks are left behind, so the model must not run
    forward again on any rank. Every rank takes part in each gather; the others drop the result.
    The CPU, because a base sharded for want of room does not fit whole on one GPU; the unsharded
    embeddings and head stay where they are (the export copies every tensor to the CPU to write it).
    """
    for module in list(model.modules()):
        for name, parameter in list(module.named_parameters(recurse=False)):
            if not is_sharded(parameter):
                continue
            whole = parameter.full_tensor().detach().cpu()
            if keep:
                setattr(module, name, nn.Parameter(whole, requires_grad=parameter.requires_grad))


@torch.no_grad()
def clip_sharded_gradients(parameters: list[nn.Parameter], max_norm: float, device: torch.device) -> torch.Tensor:
    """``clip_grad_norm_`` over a mix of sharded and whole gradients; the norm before clipping.

    torch's own refuses to mix DTensors with plain tensors. The squared norms of the shards are summed
    over the ranks; the whole (replicated) gradients are the same on every rank and count once. The
    clipping coefficient is torch's: max_norm / (norm + 1e-6), at most 1.
    """
    import torch.distributed as dist

    grads = [p.grad for p in parameters if p.grad is not None]
    shards = [g.to_local() for g in grads if is_sharded(g)]
    wholes = [g for g in grads if not is_sharded(g)]
    sharded_sq = torch.zeros((), dtype=torch.float32, device=device)
    for local in shards:
        sharded_sq += local.float().pow(2).sum()
    dist.all_reduce(sharded_sq, op=dist.ReduceOp.SUM)
    whole_sq = sum((g.float().pow(2).sum() for g in wholes), torch.zeros((), device=device))
    norm = (sharded_sq + whole_sq).sqrt()
    coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for gradient in shards + wholes:
        gradient.mul_(coefficient.to(gradient.dtype))
    return norm


def fillers(own: int, batches: Sequence[dict[str, torch.Tensor]], world: World,
            device: torch.device) -> list[dict[str, torch.Tensor]]:
    """The zero-weight pieces a sharded rank runs so that it runs as many pieces as the busiest rank
    (``own``: its own count). A collective: every rank calls it before running any piece of the step."""
    if not world.sharded:
        return []
    busiest = max_across(float(own), world, device)
    piece = {key: value.to(device) for key, value in filler(batches[0]).items()}
    return [piece] * (int(busiest) - own)


def filler(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One real row of ``batch``: what a rank with nothing of its own runs to keep in step."""
    return {key: value[:1] for key, value in batch.items()}
