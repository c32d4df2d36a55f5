"""Batches: length-grouped example order, padding to the batch's longest example, and token-capped pieces.

``batches`` is the training loop's view of the data; ``split_by_tokens`` cuts a batch that would
exceed a token budget into pieces whose summed loss equals the batch's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from peftlab.inputs.data.formats import IGNORE_INDEX

MEGABATCH_FACTOR = 50  # length grouping sorts windows of 50 batches (as HF's group_by_length)


def num_batches(n_examples: int, batch_size: int) -> int:
    return math.ceil(n_examples / batch_size)


def batch_indices(lengths: Sequence[int], batch_size: int, *, seed: int, epoch: int,
                  shuffle: bool = True) -> list[list[int]]:
    """Example indices per batch; every index appears exactly once.

    With shuffle: a permutation seeded by (seed, epoch), cut into windows of 50 batches, each
    window sorted by length (longest first) and cut into batches; then the batch order is
    shuffled. Batches hold similar lengths, so little compute goes to padding.
    """
    n = len(lengths)
    if not shuffle:
        return [list(range(start, min(start + batch_size, n))) for start in range(0, n, batch_size)]
    # (seed, epoch) as one entropy tuple: seed 1 epoch 0 must not repeat seed 0 epoch 1's order.
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n).tolist()
    window = MEGABATCH_FACTOR * batch_size
    groups: list[list[int]] = []
    for start in range(0, n, window):
        block = sorted(order[start:start + window], key=lambda i: -lengths[i])
        groups += [block[i:i + batch_size] for i in range(0, len(block), batch_size)]
    groups = [groups[k] for k in rng.permutation(len(groups)).tolist()]
    if groups:  # the longest batch first: an out-of-memory error shows at step 1, not hours in
        longest = max(range(len(groups)), key=lambda k: lengths[groups[k][0]])
        groups[0], groups[longest] = groups[longest], groups[0]
    return groups


def collate(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest example: input_ids, attention_mask [B, T]; labels [B, T] or label [B]."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        input_ids[row, :length] = torch.tensor(example["input_ids"], dtype=torch.long)
        attention_mask[row, :length] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "label" in examples[0]:
        batch["label"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)
    else:
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        for row, example in enumerate(examples):
            labels[row, :len(example["labels"])] = torch.tensor(example["labels"], dtype=torch.long)
        batch["labels"] = labels
    return batch


def batches(examples: Sequence[dict], batch_size: int, *, pad_id: int, seed: int, epoch: int,
            shuffle: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Length-grouped, dynamically padded batches (see batch_indices and collate)."""
    lengths = [len(e["input_ids"]) for e in examples]
    for indices in batch_indices(lengths, batch_size, seed=seed, epoch=epoch, shuffle=shuffle):
        yield collate([examples[i] for i in indices], pad_id)


def split_by_tokens(batch: dict[str, torch.Tensor], max_tokens: int | None) -> list[dict[str, torch.Tensor]]:
    """Cut a right-padded batch into pieces of at most ``max_tokens`` padded tokens (rows x longest).

    Rows go longest first; each piece is trimmed to its own longest row, so it also carries less
    padding. A row longer than ``max_tokens`` gets a piece of its own. Every row lands in exactly
    one piece, so summing a per-token loss over the pieces gives the batch's sum.
    """
    if max_tokens is None:  # the default: nothing to compute on the training hot path
        return [batch]
    lengths = batch["attention_mask"].sum(dim=1)
    if len(lengths) * int(lengths.max()) <= max_tokens:
        return [batch]
    order = torch.argsort(lengths, descending=True, stable=True).tolist()
    pieces, start = [], 0
    while start < len(order):
        width = int(lengths[order[start]])  # the longest row left sets this piece's width
        rows = max(1, max_tokens // width)
        chosen = torch.tensor(order[start:start + rows])
        pieces.append({key: _take(value, chosen, width) for key, value in batch.items()})
        start += rows
    return pieces


def _take(value: torch.Tensor, rows: torch.Tensor, width: int) -> torch.Tensor:
    """Rows of a batch field, trimmed to ``width`` positions when it is per-token ([B, T])."""
    picked = value.index_select(0, rows)
    return picked[:, :width].contiguous() if picked.dim() == 2 else picked
