"""Forgetting: how much training worsened the model's causal-LM loss on general text (eval.reference).

The reference text is an embedded alias, a local file or a hub dataset, as data.source takes them,
cut into causal-LM chunks of data.chunk_length tokens; the first eval.reference_size chunks are used.
Their token-weighted mean loss is measured on the model before its first training step and on the
trained model; ``forgetting`` = after - before, in nats per token (positive: worse at general text).

Where "before" is measured, and why there: in the run itself, after the method is applied and the
model is on its device, just before training (and before a resumed run reloads its checkpoint). Every
method starts as a no-op on the base model (LoRA's B and the adapters' up-projections are zero; partial
and full fine-tuning change nothing until they train), so this is the base model's loss, measured in
the run's own dtype, device and batches: a single ``peftlab run`` has no base-model reference trial
to borrow it from, a sweep's reference trial leaves the eval section out of its config, and measuring
before the method is applied would mean moving the model to its device before the adapters are drawn,
which draws them from another random generator on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.config import DataConfig, RunConfig, did_you_mean
from peftlab.errors import UserError
from peftlab.inputs.assets import DATA_ALIASES
from peftlab.inputs.data import causal_chunks, load_rows
from peftlab.run.distributed import SINGLE, World
from peftlab.run.train import evaluate_on

_ROWS_PER_GROUP = 256  # rows tokenized at a time, so a large source stops being read once it has enough chunks


@dataclass
class Forgetting:
    source: str
    chunks: int  # how many chunks of data.chunk_length tokens the losses are means over
    before: float  # nats per token, the model before training
    after: float  # the same, after training

    def as_metrics(self) -> dict[str, float]:
        """summary.json's keys: both losses and their difference."""
        return {"reference_loss_before": self.before, "reference_loss_after": self.after,
                "forgetting": self.after - self.before}

    def line(self) -> str:
        return (f"forgetting on {self.source} ({self.chunks} chunks): loss {self.before:.4f} before training, "
                f"{self.after:.4f} after ({self.after - self.before:+.4f} nats per token)")


def load_reference(config: RunConfig, tokenizer: Any) -> list[dict] | None:
    """The reference chunks of ``config.eval.reference`` (None when it is off); a bad source is a UserError."""
    source = config.eval.reference
    if source is None:
        return None
    _check_source(source)
    try:
        rows, _ = load_rows(DataConfig(source=source))
    except UserError as error:
        raise UserError(f"eval.reference: {error}") from None
    texts = [_text(row) for row in rows]
    texts = [text for text in texts if text]
    size, length = config.eval.reference_size, config.data.chunk_length
    chunks: list[dict] = []
    # By groups of rows, not row by row (tokenizers batch lists); a chunk never spans two groups.
    for start in range(0, len(texts), _ROWS_PER_GROUP):
        chunks += causal_chunks(texts[start:start + _ROWS_PER_GROUP], tokenizer, length)
        if len(chunks) >= size:
            break
    if not chunks:
        raise UserError(f"eval.reference={source!r} has fewer tokens than data.chunk_length={length}")
    return chunks[:size]


def _check_source(source: str) -> None:
    """A bare name that is neither an embedded data set nor a file, but close to one, is a typo: say so
    now instead of asking the hub for it."""
    if source in DATA_ALIASES or "/" in source or Path(source).expanduser().exists():
        return
    hint = did_you_mean(source, list(DATA_ALIASES))
    if hint:
        raise UserError(f"eval.reference={source!r} is not an embedded data set ({', '.join(DATA_ALIASES)}) "
                        f"nor a local file{hint}")


def _text(row: dict) -> str:
    """A row's text column, else its text fields joined (an instruction corpus read as plain text)."""
    if isinstance(row.get("text"), str):
        return row["text"]
    return "\n".join(value for value in row.values() if isinstance(value, str) and value.strip())


def reference_loss(model: nn.Module, chunks: list[dict], config: RunConfig, pad_id: int, device: torch.device,
                   world: World = SINGLE) -> float:
    """The token-weighted mean causal-LM loss on ``chunks`` (each rank its share, combined)."""
    return evaluate_on(model, chunks, "causal_lm", config.train, pad_id, device, world=world).loss
