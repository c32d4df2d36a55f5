"""How a batch's loss is computed, for every task: shared by training and evaluation.

Losses are returned as *sums* with their counts, so that any mean over several
batches (gradient accumulation, a whole eval set) is token-weighted exactly:
mean = sum of losses / number of label tokens, never a mean of batch means.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100

# Causal LMs whose logits are exactly lm_head(last_hidden_state): for these the
# head is applied only at positions that carry a label (prompt and padding
# positions carry none), which skips most of the vocab projection on
# instruction data. Other types (logit soft-capping, scaled logits) take the
# plain full-logits path.
_PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "phi3", "smollm3"})


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], task: str) -> tuple[torch.Tensor, int]:
    """Summed loss over the batch's labelled units and their count.

    causal tasks: units are label tokens (labels != -100 after the shift);
    classification: units are examples.
    """
    if task == "classification":
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [B, C]
        return F.cross_entropy(logits.float(), batch["label"], reduction="sum"), int(batch["label"].numel())
    logits, targets = labelled_logits(model, batch)  # [N, V], [N]
    return F.cross_entropy(logits.float(), targets, reduction="sum"), int(targets.numel())


def labelled_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict a label token, and those labels.

    Position t predicts token t+1, so labels are shifted left by one. Returns
    logits [N, V] and targets [N], N = number of label tokens in the batch.
    """
    labels = batch["labels"][:, 1:]  # [B, T-1]
    keep = labels != IGNORE_INDEX  # [B, T-1]
    if getattr(model.config, "model_type", None) in _PLAIN_HEAD_TYPES and model.get_output_embeddings() is not None:
        hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = model.get_output_embeddings()(hidden[:, :-1][keep])  # [N, V]
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][keep]
    return logits, labels[keep]


def full_logits_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Reference path: full logits at every position, then mask. Used by tests to prove equality."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total, int((labels != IGNORE_INDEX).sum())
