"""Prototypes of speed/memory changes recommended for files the benchmark does not own.

Each is applied by patching, only inside a ``with`` block, so the benchmark can run peftlab as
shipped and peftlab with the recommended changes side by side (system ``peftlab_proto``). None is
part of peftlab until the owner of the file applies it; bench/README.md gives the exact change.

* ``token_capped_batches`` (data.py / train.py): a batch closes when its padded size
  (examples x longest) would pass ``max_tokens``, besides ``batch_size``. Length grouping leaves a
  long tail (chatterbot: p99 ~ 200 tokens, median 47) in one batch padded to its longest example:
  8 x 256 positions, most of them padding, and the whole run's peak memory.

(``bench.levers.lora_forward_addmm``, one addmm for the LoRA update, was measured too and showed no
gain; it is not among the recommendations.)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import peftlab.train as peftlab_train
from peftlab.data import batch_indices, collate


def split_by_tokens(group: list[int], lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Cut one batch into consecutive pieces whose padded size (count x longest) stays <= max_tokens.

    An example longer than max_tokens still gets a batch of its own (it was already truncated to
    data.max_length).
    """
    pieces: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index in group:
        wider = max(longest, lengths[index])
        if current and (len(current) + 1) * wider > max_tokens:
            pieces.append(current)
            current, wider = [], lengths[index]
        current.append(index)
        longest = wider
    if current:
        pieces.append(current)
    return pieces


def token_capped_indices(lengths: Sequence[int], batch_size: int, max_tokens: int, *, seed: int, epoch: int,
                         shuffle: bool = True) -> list[list[int]]:
    """peftlab.data.batch_indices, with every batch further cut to at most max_tokens padded tokens."""
    groups = batch_indices(lengths, batch_size, seed=seed, epoch=epoch, shuffle=shuffle)
    return [piece for group in groups for piece in split_by_tokens(group, lengths, max_tokens)]


def token_capped_batches(max_tokens: int):
    """A drop-in for peftlab.data.batches with the token cap bound in."""

    def capped(examples: Sequence[dict], batch_size: int, *, pad_id: int, seed: int, epoch: int,
               shuffle: bool = True) -> Iterator[dict]:
        lengths = [len(e["input_ids"]) for e in examples]
        for indices in token_capped_indices(lengths, batch_size, max_tokens, seed=seed, epoch=epoch, shuffle=shuffle):
            yield collate([examples[i] for i in indices], pad_id)

    return capped


@contextlib.contextmanager
def capped_batching(train_examples: list[dict], max_tokens: int) -> Iterator[None]:
    """peftlab.train with token-capped batches; total steps follow the capped batch count."""
    lengths = [len(e["input_ids"]) for e in train_examples]
    saved = peftlab_train.batches, peftlab_train.total_steps_for

    def total_steps_for(cfg, n_train: int) -> int:
        if cfg.max_steps is not None:
            return cfg.max_steps
        per_epoch = len(token_capped_indices(lengths, cfg.batch_size, max_tokens, seed=cfg.seed, epoch=0))
        return max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))

    peftlab_train.batches, peftlab_train.total_steps_for = token_capped_batches(max_tokens), total_steps_for
    try:
        yield
    finally:
        peftlab_train.batches, peftlab_train.total_steps_for = saved


@contextlib.contextmanager
def recommended(train_examples: list[dict], max_tokens: int | None) -> Iterator[None]:
    """Every recommended prototype at once (the ``peftlab_proto`` system)."""
    with contextlib.ExitStack() as stack:
        if max_tokens:
            stack.enter_context(capped_batching(train_examples, max_tokens))
        yield
