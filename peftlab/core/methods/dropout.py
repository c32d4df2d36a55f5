"""LoRA's input dropout, with a cheaper mask on the CPU.

Inverted dropout: each element of ``x`` is dropped with probability ``p`` and the rest scaled by
``1 / (1 - p)``, as ``nn.Dropout`` does. On the CPU ``nn.Dropout`` draws its mask with ``bernoulli_``: one
serial generator call and a float comparison per element, and then two more passes over ``x`` (the
scale and the product). One SmolLM2 decoder block with LoRA on every linear took 66.3 ms per forward +
backward with it, 41.7 ms without dropout, and 52.5 ms with this module (bench/block.py, 256 tokens, medians
of 9 rounds, 2026-11-30). Here, on the CPU:

* the mask takes 16 bits per element: ``keep_mask`` cuts each 64-bit draw into four 16-bit uniform
  fields, so one draw per four elements instead of one per element, and one int16 comparison. The drop
  probability is ``p' = round(p * 2^16) / 2^16`` (0.1 -> 0.100006), within 2^-17 of ``p``, and the scale is
  ``1 / (1 - p')``, so the dropped input's expectation is exactly ``x``;
* LoRA applies the mask with ``where`` and the scale to ``x A^T`` (``r`` wide) instead of to ``x``
  (``dropped_input``): one pass less over ``[tokens, in]`` forward and one backward. The mask is saved
  as bools, one byte per element, as ``nn.Dropout`` saves its own.

bench/levers.py measures what this buys (the ``dropout_bernoulli`` lever puts nn.Dropout back).
Elsewhere (CUDA, other devices) ``nn.Dropout``'s fused kernel is already the fast path and runs as is.
Both draw from torch's generator, so ``torch.manual_seed`` makes runs repeat and gradient
checkpointing (which restores the generator before recomputing) redraws the same mask. The draws are
not nn.Dropout's: a run made before this module repeats bit for bit only on the version that made it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

FIELD_BITS = 16  # four 16-bit uniform fields per 64-bit draw: p resolved to 2^-16
_INT64_MIN = torch.iinfo(torch.int64).min


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[Tensor, float]:
    """(bool mask of ``shape``, each entry True with probability ``1 - p'``, independently; ``p'``).

    ``p' = round(p * 2^16) / 2^16``, within 2^-17 of ``p`` (and at most ``1 - 2^-16``, so the scale stays
    finite for any ``p < 1``). ``random_(int64 min, None)`` draws uniform 64-bit integers (torch's
    full-range case); viewed as int16, each draw is four independent uniform integers on [-2^15, 2^15),
    and an entry is dropped when its field is below ``round(p * 2^16) - 2^15``.
    """
    threshold = min(round(p * (1 << FIELD_BITS)), (1 << FIELD_BITS) - 1)
    count = math.prod(shape)
    draws = torch.empty(-(-count // 4), dtype=torch.int64, device=device).random_(_INT64_MIN, None)
    keep = draws.view(torch.int16)[:count] >= threshold - (1 << (FIELD_BITS - 1))
    return keep.view(shape), threshold / (1 << FIELD_BITS)


def dropped_input(dropout: nn.Module, x: Tensor) -> tuple[Tensor, float]:
    """(``x`` with ``dropout``'s mask applied but not its ``1 / (1 - p)`` scale, that scale).

    ``dropout(x) == dropped * scale`` in distribution; LoRA puts the scale on ``x A^T`` (the module
    docstring says why). Any other dropout module (``nn.Identity``, an ``nn.Dropout``, a LoRADropout in
    eval mode or off the CPU) runs as is, with scale 1.
    """
    if isinstance(dropout, LoRADropout) and dropout.draws_own_mask(x):
        keep, dropped_share = keep_mask(x.shape, dropout.p, x.device)
        return torch.where(keep, x, 0.0), 1.0 / (1.0 - dropped_share)
    return dropout(x), 1.0


class LoRADropout(nn.Dropout):
    """``nn.Dropout(p)`` whose CPU training mask comes from ``keep_mask`` (see the module docstring).

    A subclass, so code that reads ``.p`` or checks for ``nn.Dropout`` (the peft export) sees a dropout.
    LoRALinear calls ``dropped_input`` instead, to scale after its first matmul.
    """

    def draws_own_mask(self, x: Tensor) -> bool:
        """Whether ``x`` gets ``keep_mask``'s mask: in training, p > 0, on the CPU (else nn.Dropout runs)."""
        return self.training and self.p > 0 and x.device.type == "cpu"

    def forward(self, x: Tensor) -> Tensor:
        if not self.draws_own_mask(x):
            return super().forward(x)
        dropped, scale = dropped_input(self, x)
        return dropped * scale
