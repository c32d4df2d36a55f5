"""LoRA (Hu et al. 2021, arXiv:2106.09685) and DoRA (Liu et al. 2024, arXiv:2402.09353), from scratch.

Long because LoRA on a quantized base (QLoRA) is the same wrapper reading its base weight another way:
the bitsandbytes helpers (which layers are quantized, their dense weight, what QLoRA needs) sit beside it.

A ``LoRALinear`` wraps one frozen ``nn.Linear`` or GPT-2 ``Conv1D`` and adds a trainable low-rank
update ``delta_W = scaling * B @ A`` to (some of) its output rows:

    y = base(x) + scaling * B @ A @ dropout(x)        (only on the rows in ``out_index``)

It is swapped into the model with ``setattr`` on the parent module and keeps the wrapped module's
name, so ``transformer.h.0.attn.c_attn`` becomes a ``LoRALinear`` whose ``.base`` is the original.

Fused-slice LoRA: for a fused projection (GPT-2 ``c_attn`` = [q | k | v]) a ``Target`` may adapt only
some slices. ``out_index`` then lists the adapted output rows (in ``Target.out_runs()`` order, which is
also the row order of ``lora_B``); the other rows get exactly zero update and cost no parameters.
Strided layouts (GPT-NeoX per-head interleaving) are just a non-contiguous ``out_index``.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314): the wrapped module may be a bitsandbytes ``Linear4bit``
(nf4) or ``Linear8bitLt`` (int8). Its weight is packed, so shapes come from ``in_features`` /
``out_features``, ``base(x)`` computes the base output, and the dense weight is read by dequantizing
(``dequantized_weight``). A and B stay fp32 and export as usual; merging in place would requantize the
base (lossy, not undoable), so it is refused, and so are DoRA and fused slices on a quantized base.
bitsandbytes is optional: layers are recognised by class name and it is imported only to dequantize.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from importlib import metadata

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from peftlab.core.methods.dropout import LoRADropout, dropped_input
from peftlab.core.placement import Target
from peftlab.errors import UserError

# bitsandbytes' quantized linears, by the method.quantize_base value that loads a base with them.
QUANTIZED_LINEARS = {"nf4": "Linear4bit", "int8": "Linear8bitLt"}
BNB_MIN_VERSION = (0, 43)


def quantized_kind(module: nn.Module) -> str | None:
    """"Linear4bit" or "Linear8bitLt" for a bitsandbytes quantized linear (or a subclass), else None.

    By class name and defining module, so that core never imports bitsandbytes (optional, CUDA only).
    """
    for klass in type(module).__mro__:
        if klass.__module__.startswith("bitsandbytes") and klass.__name__ in QUANTIZED_LINEARS.values():
            return klass.__name__
    return None


def weight_as_out_in(module: nn.Module) -> Tensor:
    """The weight of ``module`` as [out_features, in_features]: the one fan_in_fan_out helper.

    ``nn.Linear`` stores [out, in]; GPT-2's ``Conv1D`` stores [in, out] (y = x @ W + b), so it is
    transposed. The result is a view: in-place writes to it write the module's weight. A bitsandbytes
    layer (an nn.Linear subclass) has no such view: its weight is packed (see ``dequantized_weight``).
    """
    kind = quantized_kind(module)
    if kind is not None:
        raise TypeError(f"a bitsandbytes {kind} packs its weight; read it with dequantized_weight")
    if isinstance(module, Conv1D):
        return module.weight.T
    if isinstance(module, nn.Linear):
        return module.weight
    raise TypeError(f"LoRA wraps nn.Linear or transformers Conv1D, not {type(module).__name__}")


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, Conv1D or bitsandbytes quantized linear."""
    if quantized_kind(module) is not None:  # the packed weight's shape is not [out, in]
        return module.in_features, module.out_features
    out_features, in_features = weight_as_out_in(module).shape
    return in_features, out_features


def dequantized_weight(module: nn.Module) -> Tensor:
    """A bitsandbytes linear's weight as a dense [out, in] tensor (a new tensor, not a view).

    4-bit: bitsandbytes' ``dequantize_4bit`` with the weight's quant_state (nf4 blocks, double
    quantization included). 8-bit (LLM.int8, row-wise absmax): each int8 row times its scale SCB / 127,
    as peft does (``int8_vectorwise_dequant`` in bitsandbytes >= 0.45). A weight not quantized yet (still
    on the CPU, before bitsandbytes moved it to the GPU) is returned as it is.
    """
    import bitsandbytes.functional as bnb_functional

    weight = module.weight
    if quantized_kind(module) == "Linear4bit":
        state = getattr(weight, "quant_state", None)
        return weight.data if state is None else bnb_functional.dequantize_4bit(weight.data, state)
    if weight.dtype != torch.int8:
        return weight.data
    scale = module.state.SCB if module.state.SCB is not None else weight.SCB  # [out]
    if hasattr(bnb_functional, "int8_vectorwise_dequant"):
        return bnb_functional.int8_vectorwise_dequant(weight.data, scale.to(weight.device))
    return weight.data * scale.to(weight.device).view(-1, 1) / 127


def require_quantization_support(quantize: str) -> None:
    """What QLoRA needs on this machine, a CUDA GPU and bitsandbytes >= 0.43; what is missing is one UserError.

    Called before any weights load (inputs.models.load_model) and again by ``prepare``.
    """
    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (torch sees none on this machine)")
    version = _installed_version("bitsandbytes")
    if version is None:
        missing.append("bitsandbytes (not installed: pip install 'peftlab[qlora]')")
    elif tuple(int(part) for part in re.findall(r"\d+", version)[:2]) < BNB_MIN_VERSION:
        missing.append(f"bitsandbytes>=0.43 (found {version}: pip install -U 'peftlab[qlora]')")
    if missing:
        raise UserError(f"method.quantize_base={quantize!r} (QLoRA) needs {' and '.join(missing)}; "
                        "set method.quantize_base: null to train the unquantized base")


def _installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def check_quantized_base(model: nn.Module, quantize: str) -> None:
    """Refuse ``quantize`` when ``model`` was not loaded quantized that way: the setting is never silently ignored.

    A meta-device skeleton (``peftlab inspect``) passes: where LoRA goes does not depend on quantization.
    """
    if any(parameter.is_meta for parameter in model.parameters()):
        return
    wanted = QUANTIZED_LINEARS[quantize]
    if any(quantized_kind(module) == wanted for module in model.modules()):
        return
    require_quantization_support(quantize)  # the usual reason, in its own words
    raise UserError(f"method.quantize_base={quantize!r} but the base model holds no bitsandbytes {wanted} layers; "
                    f"load it with load_model(..., quantize={quantize!r})")


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

    LoRA parameters are fp32 on the base weight's device (which may be ``meta``). A quantized base
    (bitsandbytes, see the module docstring) takes plain LoRA on whole modules only.
    """

    def __init__(self, base: nn.Module, target: Target, r: int, alpha: float, *, dropout: float = 0.0,
                 rslora: bool = False, dora: bool = False) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"{target.name}: LoRA rank must be >= 1, got {r}")
        self.in_features, self.out_features = linear_features(base)
        if (self.in_features, self.out_features) != (target.site.in_features, target.site.out_features):
            raise ValueError(f"{target.name}: module is {self.in_features}->{self.out_features}, the model map "
                             f"says {target.site.in_features}->{target.site.out_features}")
        self.quantized = quantized_kind(base)  # "Linear4bit" | "Linear8bitLt" | None
        device = base.weight.device
        self.base = base.requires_grad_(False)
        self.r = r
        self.alpha = float(alpha)
        self.scaling = self.alpha / (math.sqrt(r) if rslora else r)
        self.rslora = rslora
        self.slices = target.slices
        self.dropout: nn.Module = LoRADropout(dropout) if dropout > 0 else nn.Identity()
        # Adapted output rows [adapted_out]; None = every row. Non-persistent: rebuilt from the target.
        self.register_buffer("out_index", _rows_from_runs(target.out_runs(), self.out_features, device),
                             persistent=False)
        if self.quantized is not None:
            _refuse_on_quantized(target, self.quantized, dora=dora, sliced=self.out_index is not None)
        adapted_out = self.out_features if self.out_index is None else len(self.out_index)
        factory = {"device": device, "dtype": torch.float32}
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
        """The base weight's adapted rows, [adapted_out, in] (a view when all rows are adapted and the
        base is not quantized; a dequantized copy when it is)."""
        weight = dequantized_weight(self.base) if self.quantized else weight_as_out_in(self.base)
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
        # dropout(x) = dropped * drop_scale; the scale rides on LoRA's own scaling (dropout.py says why)
        dropped, drop_scale = dropped_input(self.dropout, x)
        dropped = dropped.to(self.lora_A.dtype)
        down = dropped @ self.lora_A.T  # [..., r]
        scaling = self.scaling * drop_scale
        if self.magnitude is None and self.out_index is None and result.dtype == down.dtype:
            # base(x) + scaling * down @ B^T in one addmm: no [..., out] pass to scale the update and none
            # to add it (bench/levers.py: 1.07x the step in one run; a later run could not tell, see bench/README)
            flat = torch.addmm(result.reshape(-1, result.shape[-1]), down.reshape(-1, down.shape[-1]),
                               self.lora_B.T, alpha=scaling)
            return flat.view_as(result)
        lora = down @ self.lora_B.T * scaling  # [..., adapted_out]
        if self.magnitude is None:
            return self._scatter(result, lora)
        dropped = dropped if drop_scale == 1.0 else dropped * drop_scale  # DoRA's W x term needs dropout(x)
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
        """The merged weight's adapted rows [adapted_out, in] fp32: W + dW, or DoRA's m * (W + dW) / ||W + dW||.

        On a quantized base W is the dequantized weight, so this is what a merge would compute densely.
        """
        combined = self._base_rows().float() + self._lora_rows()
        if self.magnitude is None:
            return combined
        return (self.magnitude / combined.norm(dim=1)).unsqueeze(1) * combined

    @torch.no_grad()
    def merge(self) -> None:
        """Write the update into the base weight; forward then runs the base layer alone. Idempotent."""
        if self.merged:
            return
        if self.quantized is not None:  # W + dW requantized is neither W + dW nor undoable bit for bit
            raise UserError(f"cannot merge LoRA into a quantized base ({self.quantized}) in place: it would "
                            "requantize the weight (lossy, not undoable); save the adapter (peft format) and merge "
                            "it into the unquantized base model (method.quantize_base: null)")
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


def _refuse_on_quantized(target: Target, kind: str, *, dora: bool, sliced: bool) -> None:
    """DoRA and fused slices read and rewrite the dense base weight: not supported on a packed one."""
    if dora:
        raise UserError(f"{target.name}: DoRA on a quantized base ({kind}) is not supported; set method.dora: false "
                        "or method.quantize_base: null")
    if sliced:
        raise UserError(f"{target.name}: fused-slice LoRA (slices {','.join(target.slices or ())}) on a quantized "
                        f"base ({kind}) is not supported; adapt whole modules or set method.quantize_base: null")


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
