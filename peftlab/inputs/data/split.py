"""The seeded train/eval split: which examples train and which evaluate.

Shuffled (one permutation seeded by ``data.seed``, eval taken first) or contiguous (source order,
for reproducing slice splits). Indices only: the task builders apply them to records or chunks.
"""

from __future__ import annotations

import numpy as np

from peftlab.config import SPLIT_MODES, DataConfig
from peftlab.errors import UserError


def eval_count(n: int, eval_size: float) -> int:
    """eval_size as a count (>= 1) or a fraction in (0, 1) of ``n``; at least one example."""
    count = int(eval_size) if eval_size >= 1 else max(1, round(eval_size * n))
    if count >= n:
        shown = int(eval_size) if float(eval_size).is_integer() else eval_size
        raise UserError(f"data.eval_size={shown} takes {count} eval examples but there are only {n} "
                        f"in all, leaving none to train on; lower it")
    return count


def split_indices(n: int, cfg: DataConfig) -> tuple[list[int], list[int]]:
    """(train, eval) indices. shuffled: one permutation seeded by cfg.seed, eval taken first.

    Taking eval first keeps the eval set fixed when train_size changes, so runs that differ only
    in how much they train on are measured on the same examples. contiguous: see contiguous_split.
    """
    if cfg.split_mode not in SPLIT_MODES:  # DataConfig checks this too; a config edited after it may not be
        raise UserError(f"data.split_mode={cfg.split_mode!r} is not one of {', '.join(SPLIT_MODES)}")
    if cfg.split_mode == "contiguous":
        return contiguous_split(n, cfg)
    n_eval = eval_count(n, cfg.eval_size)
    order = np.random.default_rng(cfg.seed).permutation(n).tolist()
    train = order[n_eval:]
    return (train[:cfg.train_size] if cfg.train_size is not None else train), order[:n_eval]


def contiguous_split(n: int, cfg: DataConfig) -> tuple[list[int], list[int]]:
    """Rows in source order: train = the first train_size, eval = the next eval_size.

    Reproduces slice splits such as alpaca train[:100] / train[100:120]. Those are whatever
    the source's first rows happen to be, so prefer shuffled for anything but a reproduction.
    """
    if cfg.train_size is None or not float(cfg.eval_size).is_integer():
        raise UserError("data.split_mode=contiguous needs data.train_size and a whole data.eval_size count")
    n_train, n_eval = cfg.train_size, int(cfg.eval_size)
    if n_train + n_eval > n:
        raise UserError(f"data.split_mode=contiguous takes data.train_size={n_train} + data.eval_size={n_eval} "
                        f"rows but there are only {n}; lower them")
    return list(range(n_train)), list(range(n_train, n_train + n_eval))
