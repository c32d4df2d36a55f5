"""LoRA (Hu et al. 2021, arXiv:2106.09685) and DoRA (Liu et al. 2024, arXiv:2402.09353), from scratch.

A ``LoRALinear`` wraps one frozen ``nn.Linear`` or GPT-2 ``Conv1D`` and adds a trainable low-rank
update ``delta_W = scaling * B @ A`` to (some of) its output rows:

    y = base(x) + scaling * B @ A @ dropout(x)        (only on the rows in ``out_index``)

It is swapped into the model with ``setattr`` on the parent module and keeps the wrapped module's
name, so ``transformer.h.0.attn.c_attn`` becomes a ``LoRALinear`` whose ``.base`` is the original.

Fused-slice LoRA: for a fused projection (GPT-2 ``c_attn`` = [q | k | v]) a ``Target`` may adapt only
some slices. ``out_index`` then lists the adapted output rows (in ``Target.out_runs()`` order, which is
also the row order of ``lora_B``); the other rows get exactly zero update and cost no parameters.
Strided layouts (GPT-NeoX per-head interleaving) are just a non-contiguous ``out_index``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from peftlab.core.placement import Target
from peftlab.errors import UserError


def weight_as_out_in(module: nn.Module) -> Tensor:
    """The weight of ``module`` as [out_features, in_features]: the one fan_in_fan_out helper.

    ``nn.Linear`` stores [out, in]; GPT-2's ``Conv1D`` stores [in, out] (y = x @ W + b), so it is
    transposed. The result is a view: in-place writes to it write the module's weight.
    """
    if isinstance(module, Conv1D):
        return module.weight.T
    if isinstance(module, nn.Linear):
        return module.weight
    raise TypeError(f"LoRA wraps nn.Linear or transformers Conv1D, not {type(module).__name__}")


def _features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or Conv1D."""
    out_features, in_features = weight_as_out_in(module).shape
    return in_features, out_features


def _rows_from_runs(runs: Sequence[tuple[int, int]], out_features: int, device: torch.device) -> Tensor | None:
    """LongTensor of the output rows covered by ``runs``; None when they are all rows in order."""
    rows = [row for start, length in runs for row in range(start, start + length)]
    if len(set(rows)) != len(rows) or any(not 0 <= row < out_features for row in rows):
        raise ValueError(f"output runs {runs} overlap or fall outside 0..{out_features - 1}")
    if rows == list(range(out_features)):
        return None
    return torch.tensor(rows, dtype=torch.long, device=device)


class LoRALinear(nn.Module):
    """A frozen Linear/Conv1D plus a trainable rank-``r`` update on some or all of its output rows.

    Hyperparameters (Hu et al. 2021, section 4.1): ``B`` [adapted_out, r] is zero, so the wrapped layer
    starts exactly equal to the base layer; ``A`` [r, in] is random: Kaiming-uniform (a=sqrt(5)) as in
    peft, litgpt and loralib, where the paper says Gaussian; ``scaling = alpha / r`` (``alpha / sqrt(r)``
    for rsLoRA, Kalajdzievski 2023, arXiv:2312.03732). Dropout applies to the LoRA branch's input only.

    DoRA (``dora=True``, Liu et al. 2024, eq. 5): ``W' = m * (W + dW) / ||W + dW||_row``, with the
    magnitude ``m`` initialised to the row norms of ``W`` (so W' == W at init) and the norm treated
    as a constant (detached) as the paper's section 4.3 recommends and peft does. With fused slices,
    DoRA decomposes only the adapted rows: ``magnitude`` has one entry per adapted row
    ([adapted_out_features], which is [out_features] when the whole output is adapted); the other
    rows are untouched, exactly as if their magnitude were frozen at its initial value.

    LoRA parameters are fp32 on the base weight's device (which may be ``meta``).
    """

    def __init__(self, base: nn.Module, target: Target, r: int, alpha: float, *, dropout: float = 0.0,
                 rslora: bool = False, dora: bool = False) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"{target.name}: LoRA rank must be >= 1, got {r}")
        self.in_features, self.out_features = _features(base)
        if (self.in_features, self.out_features) != (target.site.in_features, target.site.out_features):
            raise ValueError(f"{target.name}: module is {self.in_features}->{self.out_features}, the model map "
                             f"says {target.site.in_features}->{target.site.out_features}")
        weight = weight_as_out_in(base)  # [out, in]
        self.base = base.requires_grad_(False)
        self.r = r
        self.alpha = float(alpha)
        self.scaling = self.alpha / (math.sqrt(r) if rslora else r)
        self.rslora = rslora
        self.slices = target.slices
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Adapted output rows [adapted_out]; None = every row. Non-persistent: rebuilt from the target.
        self.register_buffer("out_index", _rows_from_runs(target.out_runs(), self.out_features, weight.device),
                             persistent=False)
        adapted_out = self.out_features if self.out_index is None else len(self.out_index)
        factory = {"device": weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))  # [r, in]
        self.lora_B = nn.Parameter(torch.zeros(adapted_out, r, **factory))  # [adapted_out, r]
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.magnitude: nn.Parameter | None = None
        if dora:
            # ||W + 0||_row over the input dim: [adapted_out]
            self.magnitude = nn.Parameter(self._base_rows().float().norm(dim=1))
        self.merged = False
        # The base rows as they were before merge(), so unmerge() restores them bit for bit.
        self.register_buffer("_unmerged_rows", None, persistent=False)

    @property
    def weight(self) -> Tensor:
        """The wrapped layer's weight, as peft's LoRA layers expose it: model code reads it (T5's MLP
        checks ``wo.weight.dtype`` before calling ``wo``)."""
        return self.base.weight

    # --- pieces ------------------------------------------------------------------------------

    def _base_rows(self) -> Tensor:
        """The base weight's adapted rows, [adapted_out, in] (a view when all rows are adapted)."""
        weight = weight_as_out_in(self.base)
        return weight if self.out_index is None else weight.index_select(0, self.out_index)

    def _lora_rows(self) -> Tensor:
        """scaling * B @ A on the adapted rows: [adapted_out, in], fp32."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def _scatter(self, full: Tensor, rows: Tensor) -> Tensor:
        """``full`` [..., out] plus ``rows`` [..., adapted_out] added into the adapted columns."""
        rows = rows.to(full.dtype)
        if self.out_index is None:
            return full + rows
        return full.index_add(-1, self.out_index, rows)

    def _dora_scale(self) -> Tensor:
        """m / ||W + dW||_row for the adapted rows, [adapted_out] fp32; the norm is detached (DoRA 4.3)."""
        assert self.magnitude is not None
        with torch.no_grad():
            norm = (self._base_rows().float() + self._lora_rows()).norm(dim=1)
        return self.magnitude / norm

    # --- forward -----------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        result = self.base(x)  # [..., out]
        if self.merged:  # the update already lives in base.weight
            return result
        dropped = self.dropout(x).to(self.lora_A.dtype)
        lora = dropped @ self.lora_A.T @ self.lora_B.T * self.scaling  # [..., adapted_out]
        if self.magnitude is None:
            return self._scatter(result, lora)
        return self._scatter(result, self._dora_extra(dropped, result, lora))

    def _dora_extra(self, dropped: Tensor, result: Tensor, lora: Tensor) -> Tensor:
        """What DoRA adds to base(x) on the adapted rows, [..., adapted_out].

        DoRA's output is ``scale * (W + dW) x + b`` with ``scale = m / ||W + dW||``; since base(x) is
        ``W x + b`` this is ``base(x) + (scale - 1) * W x + scale * dW x``. As in peft, with dropout
        active the two added terms see the dropped input; without it ``W x`` comes from base(x).
        """
        scale = self._dora_scale()  # [adapted_out]
        if isinstance(self.dropout, nn.Identity) or not self.training:
            plain = result if self.out_index is None else result.index_select(-1, self.out_index)
            bias = self.base.bias
            if bias is not None:
                plain = plain - (bias if self.out_index is None else bias.index_select(0, self.out_index))
            plain = plain.to(lora.dtype)  # W x on the adapted rows
        else:
            plain = F.linear(dropped, self._base_rows().to(dropped.dtype))
        return (scale - 1) * plain + scale * lora

    # --- merging -----------------------------------------------------------------------------

    def delta_weight(self) -> Tensor:
        """The LoRA update scaling * B @ A as a full [out, in] fp32 tensor, zero outside the adapted rows.

        For DoRA this is the directional update dW only; the merged weight also rescales rows by the
        magnitude (see ``merged_rows``).
        """
        rows = self._lora_rows()
        if self.out_index is None:
            return rows
        full = rows.new_zeros(self.out_features, self.in_features)
        return full.index_copy(0, self.out_index, rows)

    def merged_rows(self) -> Tensor:
        """The merged weight's adapted rows [adapted_out, in] fp32: W + dW, or DoRA's m * (W + dW) / ||W + dW||."""
        combined = self._base_rows().float() + self._lora_rows()
        if self.magnitude is None:
            return combined
        return (self.magnitude / combined.norm(dim=1)).unsqueeze(1) * combined

    @torch.no_grad()
    def merge(self) -> None:
        """Write the update into the base weight; forward then runs the base layer alone. Idempotent."""
        if self.merged:
            return
        self._unmerged_rows = self._base_rows().clone()
        self._write_rows(self.merged_rows())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight exactly as it was before merge(). Idempotent."""
        if not self.merged:
            return
        self._write_rows(self._unmerged_rows)
        self._unmerged_rows = None
        self.merged = False

    def _write_rows(self, rows: Tensor) -> None:
        """Overwrite the base weight's adapted rows with ``rows`` [adapted_out, in], in the base dtype."""
        weight = weight_as_out_in(self.base)  # a view: writes land in the module's own layout
        rows = rows.to(weight.dtype)
        if self.out_index is None:
            weight.copy_(rows)
        else:
            weight.index_copy_(0, self.out_index, rows)

    def extra_repr(self) -> str:
        parts = [f"r={self.r}", f"alpha={self.alpha:g}", f"scaling={self.scaling:g}"]
        if self.slices is not None:
            parts.append(f"slices={','.join(self.slices)}")
        if self.magnitude is not None:
            parts.append("dora=True")
        return ", ".join(parts)


# --- model-level operations -------------------------------------------------------------------


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` (setattr on its parent; ModuleList indices work)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_lora(model: nn.Module, targets: Sequence[Target], ranks: Mapping[str, int],
               alphas: Mapping[str, float], *, dropout: float = 0.0, rslora: bool = False,
               dora: bool = False) -> dict[str, LoRALinear]:
    """Wrap each target named in ``ranks`` in a LoRALinear (targets absent from ``ranks`` had rank 0).

    Returns {module name: wrapper}. Does not touch requires_grad outside the wrapped modules; the
    caller (``methods.prepare``) freezes the model first.
    """
    wrapped: dict[str, LoRALinear] = {}
    for target in targets:
        if target.name not in ranks:
            continue
        if target.name in wrapped:
            raise ValueError(f"{target.name} appears twice in the LoRA targets")
        base = model.get_submodule(target.name)
        if isinstance(base, LoRALinear):
            raise UserError(f"{target.name} already has LoRA applied")
        wrapper = LoRALinear(base, target, ranks[target.name], alphas[target.name],
                             dropout=dropout, rslora=rslora, dora=dora)
        replace_module(model, target.name, wrapper)
        wrapped[target.name] = wrapper
    return wrapped


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear in ``model``, by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def merge_lora(model: nn.Module) -> None:
    for module in lora_modules(model).values():
        module.merge()


def unmerge_lora(model: nn.Module) -> None:
    for module in lora_modules(model).values():
        module.unmerge()


def unload_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put the base modules back in place of their wrappers, merging the updates in first if ``merge``.

    With ``merge=False`` the base weights are restored (unmerged) and the LoRA update is dropped.
    """
    for name, module in lora_modules(model).items():
        if merge:
            module.merge()
        else:
            module.unmerge()
        replace_module(model, name, module.base)
    return model
