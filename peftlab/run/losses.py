"""How a batch's loss is computed, for every task: shared by training and evaluation.

Losses are returned as *sums* with their counts, so that any mean over several
batches (gradient accumulation, a whole eval set) is token-weighted exactly:
mean = sum of losses / number of label tokens, never a mean of batch means.

Causal LMs take two speed paths, each proven equal to the plain full-logits loss by
tests (tests/test_losses.py, tests/test_bench.py) and measured by bench/:
* the LM head runs only at positions that carry a label (prompt and padding carry
  none), which skips most of the vocab projection on instruction data;
* head + cross-entropy run fused, a chunk of rows at a time, with the gradient taken
  in the same pass: the [N, V] fp32 logits are never all alive at once, and softmax
  is not re-read in backward.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

# The label that takes no loss has one definition, where labels are made (peftlab.inputs.data; inputs
# sits below run and never imports it). The run layer takes it from here, beside the loss that honours it.
from peftlab.inputs.data import IGNORE_INDEX

# Causal LMs whose logits are exactly lm_head(last_hidden_state): for these the
# head is applied only at positions that carry a label (prompt and padding
# positions carry none), which skips most of the vocab projection on
# instruction data. Other types (logit soft-capping, scaled logits) take the
# plain full-logits path.
_PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "phi3", "smollm3"})

# Logit elements per chunk of the fused head + cross-entropy: 2**24 fp32 = 64 MiB, 341 rows of a
# 49k vocabulary, so one chunk covers a typical batch's label tokens. Measured (bench/README.md):
# chunks of ~64 rows make the head's matmuls ~30% slower; larger ones only cost memory (every
# chunk size gives the same loss).
CHUNK_ELEMENTS = 2**24

# What training and evaluation call for a batch's loss: (model, batch, task) -> (summed loss, units).
# loss_sum is the one a run uses; bench/levers.py passes others to measure what loss_sum's paths buy.
LossFn = Callable[[nn.Module, dict[str, torch.Tensor], str], tuple[torch.Tensor, int]]


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], task: str, *,
             chunk_elements: int | None = None) -> tuple[torch.Tensor, int]:
    """Summed loss over the batch's labelled units and their count (``label_units``).

    causal tasks: units are label tokens (labels != IGNORE_INDEX after the shift);
    classification: units are examples. ``chunk_elements``: logit elements per chunk of the fused
    head + cross-entropy (None: CHUNK_ELEMENTS); any size gives the same loss, only speed and memory differ.
    """
    if task == "classification":
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [B, C]
        return classification_loss_sum(logits, batch["label"]), label_units(batch, task)
    head = plain_head(model)
    if head is not None:
        hidden, targets = labelled_hidden(model, batch)  # [N, H], [N]
        rows = max(1, chunk_elements // head.weight.shape[0]) if chunk_elements else None
        return linear_cross_entropy_sum(hidden, head.weight, targets, rows), int(targets.numel())
    logits, targets = labelled_logits(model, batch)  # [N, V], [N]
    return F.cross_entropy(logits.float(), targets, reduction="sum"), int(targets.numel())


def classification_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of class logits [B, C] against labels [B], in fp32 (logits may be bf16)."""
    return F.cross_entropy(logits.float(), labels, reduction="sum")


def label_units(batch: dict[str, torch.Tensor], task: str) -> int:
    """What a batch's loss is averaged over: examples (classification) or label tokens after the shift."""
    if task == "classification":
        return int(batch["label"].numel())
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def plain_head(model: nn.Module) -> nn.Linear | None:
    """The LM head when logits are exactly ``hidden @ head.weight.T`` (a bias-free nn.Linear), else None.

    A wrapped head (LoRA on lm_head) or a head with a bias takes the module-call path instead.
    """
    head = separate_head(model)
    if type(head) is not nn.Linear or head.bias is not None:
        return None
    return head


def separate_head(model: nn.Module) -> nn.Module | None:
    """The LM head of a family whose logits are ``head(base_model(...).last_hidden_state)`` and nothing
    more (_PLAIN_HEAD_TYPES), so it can run on the labelled positions alone; None for any other model."""
    if getattr(getattr(model, "config", None), "model_type", None) not in _PLAIN_HEAD_TYPES:
        return None
    return model.get_output_embeddings()


def labelled_hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states at the positions that predict a label token, and those labels: [N, H], [N].

    Position t predicts token t+1, so labels are shifted left by one.
    """
    labels = batch["labels"][:, 1:]  # [B, T-1]
    keep = labels != IGNORE_INDEX  # [B, T-1]
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return hidden[:, :-1][keep], labels[keep]


def labelled_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict a label token, and those labels.

    Position t predicts token t+1, so labels are shifted left by one. Returns
    logits [N, V] and targets [N], N = number of label tokens in the batch.
    """
    labels = batch["labels"][:, 1:]  # [B, T-1]
    keep = labels != IGNORE_INDEX  # [B, T-1]
    head = separate_head(model)
    if head is not None:
        body = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = head(body.last_hidden_state[:, :-1][keep])  # [N, V]
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


# --- fused, chunked head + cross-entropy --------------------------------------------------------


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             chunk_rows: int | None = None) -> torch.Tensor:
    """sum_i cross_entropy(hidden[i] @ weight.T, targets[i]) in fp32, a chunk of rows at a time.

    hidden [N, H], weight [V, H], targets [N] (no ignore_index: pass labelled rows only). Equal to
    ``F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")`` up to float
    summation order, with the same autocast behaviour (the matmuls follow the ambient autocast).
    """
    rows = chunk_rows or max(1, CHUNK_ELEMENTS // weight.shape[0])
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, rows)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], rows):
        logits = F.linear(hidden[start:start + rows], weight).float()  # [c, V]
        total += _chunk_loss(logits, targets[start:start + rows])
    return total


def _chunk_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed CE of one chunk from fp32 logits [c, V]."""
    return F.cross_entropy(logits, targets, reduction="sum")


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and, chunk by chunk, its gradients; backward only scales them.

    Per chunk: logits = h @ W.T, log-softmax (the loss), exp in place and minus one at the target
    (= dL/dlogits: one pass fewer than autograd's log_softmax backward, and no [N, V] kept), then
    dL/dh = g @ W and (only when W trains) dL/dW += g.T @ h. Only [N, H] (and [V, H]) are kept.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                rows: int) -> torch.Tensor:
        need_hidden, need_weight = hidden.requires_grad, weight.requires_grad
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            chunk, chunk_targets = hidden[start:start + rows], targets[start:start + rows]
            raw = F.linear(chunk, weight)  # [c, V], bf16 under CUDA autocast
            log_probs = torch.log_softmax(raw.float(), dim=-1)  # [c, V] fp32
            total -= log_probs.gather(1, chunk_targets[:, None]).sum()
            # dL/dlogits = softmax - one_hot(target), written over log_probs in place.
            grad = log_probs.exp_()
            grad.scatter_add_(1, chunk_targets[:, None], grad.new_full((grad.shape[0], 1), -1.0))
            grad = grad.to(raw.dtype)  # as autograd casts it back through .float()
            if need_hidden:
                grad_hidden[start:start + rows] = grad @ weight.to(grad.dtype)
            if need_weight:
                grad_weight += (grad.T @ chunk.to(grad.dtype)).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_output.float()
        d_hidden = (grad_hidden * scale).to(grad_hidden.dtype) if grad_hidden is not None else None
        d_weight = (grad_weight * scale).to(ctx.weight_dtype) if grad_weight is not None else None
        return d_hidden, d_weight, None, None
