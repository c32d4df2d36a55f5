"""Run configuration: nested typed dataclasses, loaded from YAML, strictly checked.

Long because everything a config may hold is defined here, once: the sections with their
checks (the eval section included), which method reads which field, and the strict YAML/--set loader that builds them.

Unknown keys fail with the closest valid key suggested; wrong types and
impossible values fail in ``__post_init__`` with one clear line (UserError),
before any model is loaded. The resolved config is saved with every run.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from peftlab.errors import UserError

TASKS = ("instruction", "classification", "causal_lm")
CAUSAL_TASKS = ("instruction", "causal_lm")  # the tasks a causal LM head predicts tokens for
METHODS = ("lora", "adapter", "partial", "full")
PLACEMENTS = ("all_linear", "attention_only", "mlp_only", "qv_only")
SCHEDULES = ("uniform", "linear_decay", "attention_heavy", "empirical", "custom", "budget")
SCHEDULERS = ("cosine", "linear", "constant")
BASE_DTYPES = ("auto", "fp32", "bf16", "fp16")
PRECISIONS = ("auto", "fp32", "bf16")
QUANTIZATIONS = ("nf4", "int8")  # method.quantize_base, besides null
GENERATION_METRICS = ("exact_match", "rougeL", "contains")  # eval.generate.metrics (peftlab.run.generation)
TRACKERS = ("tensorboard", "wandb", "mlflow")  # train.report_to (peftlab.run.trackers)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def _require_finite(section: Any, prefix: str) -> None:
    """Every float of a config section (lists included) is a finite number: inf and nan pass ``> 0``
    checks and then break training (inf epochs, an inf lr) or a split (an inf eval_size), so they
    are refused first, whatever the field."""
    for item in dataclasses.fields(section):
        value = getattr(section, item.name)
        for index, number in enumerate(value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(number, float) and not math.isfinite(number):
                where = f"{prefix}{item.name}" + (f"[{index}]" if isinstance(value, (list, tuple)) else "")
                raise UserError(f"{where} must be a finite number, got {number}")


# shuffled: one permutation seeded by data.seed, eval taken first; contiguous: rows in source order,
# train = the first train_size, eval = the next eval_size (a slice split like alpaca train[:100]).
SPLIT_MODES = ("shuffled", "contiguous")
# Instruction data: how records are laid out (auto = told by the first record's keys), and the template
# that turns them into text (auto = the tokenizer's chat template for conversational data when the
# tokenizer has one, else alpaca). See peftlab.inputs.data.conversations and .templates.
DATA_FORMATS = ("auto", "alpaca", "messages", "sharegpt")
TEMPLATES = ("auto", "alpaca", "chat", "none")


@dataclass
class DataConfig:
    source: str = "chatterbot"  # alias (chatterbot | rotten_tomatoes | hamlet), local file, or hub id
    split: str = "train"  # hub datasets: which split to read
    subset: str | None = None  # hub datasets: configuration name
    # Field mapping: instruction/input/output for instruction data, text/label for classification.
    fields: dict[str, str] = field(default_factory=dict)
    train_size: int | None = None  # cap on training examples (None = all that remain)
    eval_size: float = 128  # an int count, or a fraction in (0, 1)
    max_length: int = 256  # truncate longer examples (never pad up to it)
    chunk_length: int = 128  # causal_lm: tokens per chunk
    response_only: bool = True  # instruction: loss on response tokens only
    labels: list[str] | None = None  # classification: label names in id order (default: sorted)
    seed: int = 0  # train/eval split seed, kept apart from the training seed
    split_mode: str = "shuffled"  # shuffled | contiguous (see SPLIT_MODES)
    # instruction: auto | alpaca | messages | sharegpt. The defaults keep old runs' configs and token ids:
    # alpaca-format data under auto is the Alpaca prompt, as before these keys existed.
    format: str = "auto"
    template: str = "auto"  # instruction: auto | alpaca | chat | none (see TEMPLATES)

    def __post_init__(self) -> None:
        _require_finite(self, "data.")
        _require(self.format in DATA_FORMATS, _choice_message("data.format", self.format, DATA_FORMATS))
        _require(self.template in TEMPLATES, _choice_message("data.template", self.template, TEMPLATES))
        _require(self.eval_size > 0, "data.eval_size must be > 0 (a count, or a fraction below 1)")
        _require(self.eval_size < 1 or float(self.eval_size).is_integer(),
                 f"data.eval_size={self.eval_size}: use a whole count or a fraction below 1")
        _require(self.train_size is None or self.train_size > 0, "data.train_size must be > 0")
        _require(self.max_length >= 8, "data.max_length must be at least 8")
        _require(self.chunk_length >= 8, "data.chunk_length must be at least 8")
        _require(self.split_mode in SPLIT_MODES, _choice_message("data.split_mode", self.split_mode, SPLIT_MODES))
        if self.split_mode == "contiguous":  # a slice split has no "all that remain" and no fraction
            _require(self.train_size is not None,
                     "data.split_mode=contiguous needs data.train_size (train = the first train_size rows)")
            _require(float(self.eval_size).is_integer(),
                     f"data.split_mode=contiguous needs a whole data.eval_size count, got {self.eval_size}")


@dataclass
class RankConfig:
    """Per-layer rank allocation; see peftlab.core.ranks for each schedule's definition."""

    schedule: str = "uniform"
    r: int = 8  # uniform rank; base rank for `empirical`
    start: int = 16  # linear_decay: rank of layer 0
    end: int = 4  # linear_decay: rank of the last layer
    attention_r: int = 16  # attention_heavy
    mlp_r: int = 8  # attention_heavy
    multipliers: list[float] = field(default_factory=lambda: [0.6, 1.2, 1.0])  # empirical: early/middle/late
    layer_ranks: list[int] | None = None  # custom: one rank per layer
    file: str | None = None  # custom: JSON {"strategy_name": ..., "layer_ranks": [...]}
    budget: int | None = None  # budget: target number of trainable parameters

    def __post_init__(self) -> None:
        _require_finite(self, "method.ranks.")
        _require(self.schedule in SCHEDULES, _choice_message("method.ranks.schedule", self.schedule, SCHEDULES))
        for name in ("r", "start", "end", "attention_r", "mlp_r"):
            _require(getattr(self, name) >= 1, f"method.ranks.{name} must be >= 1, got {getattr(self, name)}")
        _require(len(self.multipliers) == 3 and all(m > 0 for m in self.multipliers),
                 "method.ranks.multipliers must be three positive numbers (early, middle, late)")
        if self.schedule == "custom":
            _require((self.layer_ranks is None) != (self.file is None),
                     "method.ranks: the custom schedule needs exactly one of layer_ranks or file")
        if self.layer_ranks is not None:
            _require(all(isinstance(r, int) and r >= 0 for r in self.layer_ranks),
                     "method.ranks.layer_ranks must be whole numbers >= 0 (0 leaves a layer unadapted)")
        if self.schedule == "budget":
            _require(self.budget is not None and self.budget > 0,
                     "method.ranks: the budget schedule needs budget: <number of trainable parameters>")


@dataclass
class MethodConfig:
    name: str = "lora"  # lora | adapter | partial | full
    # Where (lora, adapter): a named placement, a layer selection, or explicit targets.
    placement: str = "all_linear"  # all_linear | attention_only | mlp_only | qv_only
    layers: Any = "all"  # all | [0, 3] | "0-11" | first_half | last_half | every_other | last_N
    targets: list[str] | None = None  # exact names, dotted suffixes, or "re:<regex>"; overrides placement
    # LoRA (Hu et al. 2021, arXiv:2106.09685)
    ranks: RankConfig = field(default_factory=RankConfig)
    alpha: float = 16.0  # scaling = alpha / r
    alpha_policy: str = "fixed"  # fixed (alpha as given) | two_r (alpha = 2 * r for each module)
    rslora: bool = False  # scaling = alpha / sqrt(r) (Kalajdzievski 2023, arXiv:2312.03732)
    dora: bool = False  # weight-decomposed LoRA (Liu et al. 2024, arXiv:2402.09353)
    dropout: float = 0.0  # on the LoRA input only
    # Bottleneck adapters (Houlsby et al. 2019, arXiv:1902.00751; Pfeiffer et al. 2020)
    adapter_variant: str = "houlsby"  # houlsby (after attention and MLP) | pfeiffer (after MLP only)
    bottleneck: int = 64
    activation: str = "gelu"  # gelu | relu | silu | tanh
    # Partial fine-tuning (seed 001's "simple fine-tuning")
    last_n: int = 0  # train the last N transformer blocks
    bitfit: bool = False  # train biases only (Ben Zaken et al. 2021)
    # QLoRA (Dettmers et al. 2023, arXiv:2305.14314): load the frozen base through bitsandbytes, nf4
    # (4-bit NormalFloat, double quantization, bf16 compute) or int8, and train fp32 LoRA on top.
    # Needs a CUDA GPU and `pip install 'peftlab[qlora]'`; no DoRA, no fused-slice placements.
    quantize_base: str | None = None  # null | nf4 | int8
    # The head: always trained for classification (it is new); None elsewhere means frozen, since a
    # causal LM's head is usually tied to the token embeddings (True trains it, embeddings included).
    train_head: bool | None = None

    def __post_init__(self) -> None:
        _require_finite(self, "method.")
        _require(self.name in METHODS, _choice_message("method.name", self.name, METHODS))
        _require(self.placement in PLACEMENTS, _choice_message("method.placement", self.placement, PLACEMENTS))
        _require(self.alpha > 0, f"method.alpha must be > 0, got {self.alpha}")
        _require(self.alpha_policy in ("fixed", "two_r"),
                 _choice_message("method.alpha_policy", self.alpha_policy, ("fixed", "two_r")))
        _require(0 <= self.dropout < 1, f"method.dropout must be in [0, 1), got {self.dropout}")
        _require(self.adapter_variant in ("houlsby", "pfeiffer"),
                 _choice_message("method.adapter_variant", self.adapter_variant, ("houlsby", "pfeiffer")))
        _require(self.bottleneck >= 1, f"method.bottleneck must be >= 1, got {self.bottleneck}")
        _require(self.activation in ("gelu", "relu", "silu", "tanh"),
                 _choice_message("method.activation", self.activation, ("gelu", "relu", "silu", "tanh")))
        _require(self.last_n >= 0, f"method.last_n must be >= 0, got {self.last_n}")
        _require(self.quantize_base is None or self.quantize_base in QUANTIZATIONS,
                 _choice_message("method.quantize_base", self.quantize_base, ("null", *QUANTIZATIONS)))
        # DoRA's magnitude needs the base weight's row norms at every step: not on a packed weight.
        _require(not (self.dora and self.quantize_base), f"method.dora=True with method.quantize_base="
                 f"{self.quantize_base!r}: DoRA on a quantized base is not supported; drop one of the two")


# What each method reads from MethodConfig, besides ``name`` and ``train_head`` (every method reads
# those). Anything else set away from its default is refused for that method (``unused_method_fields``)
# instead of silently ignored: an adapter run with ``placement: attention_only`` adapts every block.
METHOD_FIELDS: dict[str, tuple[str, ...]] = {
    "lora": ("placement", "layers", "targets", "ranks", "alpha", "alpha_policy", "rslora", "dora", "dropout",
             "quantize_base"),
    "adapter": ("layers", "adapter_variant", "bottleneck", "activation"),
    "partial": ("last_n", "bitfit"),
    "full": (),
}
SHARED_METHOD_FIELDS = ("name", "train_head")


def unused_method_fields(method: MethodConfig) -> list[str]:
    """The fields of ``method`` set away from their defaults that method ``method.name`` does not read."""
    defaults = MethodConfig(name=method.name)
    used = set(METHOD_FIELDS[method.name]) | set(SHARED_METHOD_FIELDS)
    return [item.name for item in dataclasses.fields(MethodConfig)
            if item.name not in used and getattr(method, item.name) != getattr(defaults, item.name)]


def unused_field_message(method: MethodConfig, name: str, where: str = "") -> str:
    readers = [m for m, fields in METHOD_FIELDS.items() if name in fields]
    reads = ", ".join(f"method.{f}" for f in METHOD_FIELDS[method.name]) or "none of the method-specific fields"
    key, value = f"method.{name}", getattr(method, name)
    if dataclasses.is_dataclass(value):  # ranks: name the sub-field that was set
        default = type(value)()
        changed = next(f.name for f in dataclasses.fields(value) if getattr(value, f.name) != getattr(default, f.name))
        key, value = f"{key}.{changed}", getattr(value, changed)
    return (f"{where}{key}={value!r} is not used by method {method.name} (only by "
            f"{' and '.join(readers)}); remove it, or choose a method that reads it. {method.name} reads {reads}")


def check_method_fields(method: MethodConfig) -> None:
    """Refuse a field the chosen method would silently ignore (see METHOD_FIELDS)."""
    unused = unused_method_fields(method)
    if unused:
        raise UserError(unused_field_message(method, unused[0]))


KEEP_BEST = ("eval_loss", "accuracy")  # train.keep_best, besides null (run/best.py)


@dataclass
class EarlyStoppingConfig:
    """Stop when the monitored metric (keep_best's, else eval_loss) has not beaten its best value by more
    than ``min_delta`` in ``patience`` periodic evaluations in a row (run/best.py)."""

    patience: int = 3  # periodic evaluations (every train.eval_every steps)
    min_delta: float = 0.0  # in the metric's units (nats for eval_loss, a fraction for accuracy)

    def __post_init__(self) -> None:
        _require_finite(self, "train.early_stopping.")
        _require(self.patience >= 1, f"train.early_stopping.patience must be >= 1, got {self.patience}")
        _require(self.min_delta >= 0, f"train.early_stopping.min_delta must be >= 0, got {self.min_delta}")


@dataclass
class TrainConfig:
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    # Split a batch whose padded size (rows x longest) exceeds this many tokens into pieces run one
    # after another in the same optimizer step: the update is the same (up to float rounding and
    # dropout draws), peak activation memory is bounded and pieces carry less padding. auto: chosen
    # per device (peftlab.run.resources.max_batch_tokens_for: 256 on the CPU, off on GPUs);
    # null or 0: no split. Execution only: a changed value is not a changed config (EXECUTION_ONLY_KEYS).
    max_batch_tokens: int | str | None = "auto"
    lr: float = 2e-4
    lora_plus_ratio: float | None = None  # LoRA+ (Hayou et al. 2024): lr(B) = ratio * lr(A)
    scheduler: str = "cosine"  # cosine | linear | constant
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0  # applied to parameters with dim >= 2 only
    max_grad_norm: float | None = 1.0
    seed: int = 42
    eval_every: int | None = None  # steps; evaluation always runs at the end
    # Keep the trainable weights of the best evaluation (eval_loss: lowest, accuracy: highest, classification
    # only), the final one included, and export and report those; needs eval_every. None: the last weights.
    keep_best: str | None = None  # null | eval_loss | accuracy
    early_stopping: EarlyStoppingConfig | None = None  # {patience, min_delta}; needs eval_every
    log_every: int = 1
    save_every: int | None = 50  # checkpoint every N steps (and on Ctrl-C); None: only on Ctrl-C
    device: str = "auto"  # auto | cpu | cuda | mps
    # The dtype the base weights load in (peftlab.run.precision): auto = bf16 on a CUDA GPU that supports
    # it for methods that keep the base frozen (lora, adapter; fp32 when precision is fp32), fp32 for full
    # and partial fine-tuning and on other devices. Trained parameters stay fp32 whatever this says.
    # fp16 has no loss scaling here: an overflow stops the run as diverged; prefer bf16.
    base_dtype: str = "auto"  # auto | fp32 | bf16 | fp16
    # Autocast: auto = the base dtype when it is bf16/fp16, else bf16 on CUDA and none elsewhere;
    # fp32 = none (refused on a bf16/fp16 base); bf16 = bf16 autocast.
    precision: str = "auto"  # auto | fp32 | bf16
    # Recompute each block's activations in backward instead of keeping them: less memory, more compute.
    gradient_checkpointing: bool = False
    # Under torchrun / --nproc: shard every transformer block's weights, gradients and AdamW state over the
    # processes (FSDP2, run/sharding.py) instead of a whole copy per process: for bases too large for one device.
    fsdp: bool = False
    train_eval_size: int = 0  # also evaluate the final model on this many training examples (train accuracy)
    num_samples: int = 3  # instruction runs: generated samples to record
    max_new_tokens: int = 48
    # Experiment trackers to report to besides metrics.jsonl (README "Experiment trackers"); each is an
    # optional dependency: pip install 'peftlab[tensorboard]' / [wandb] / [mlflow].
    report_to: list[str] = field(default_factory=list)  # tensorboard | wandb | mlflow

    def __post_init__(self) -> None:
        _require_finite(self, "train.")
        for name in self.report_to:
            _require(name in TRACKERS, f"train.report_to: {name!r} is not one of {', '.join(TRACKERS)}"
                                       f"{did_you_mean(name, TRACKERS)}")
        _require(len(set(self.report_to)) == len(self.report_to),
                 f"train.report_to names a tracker twice: {self.report_to}; name each once")
        _require(self.max_steps is None or self.max_steps >= 1, "train.max_steps must be >= 1")
        _require(self.epochs > 0, "train.epochs must be > 0")
        _require(self.batch_size >= 1, "train.batch_size must be >= 1")
        _require(self.grad_accum >= 1, "train.grad_accum must be >= 1")
        if self.max_batch_tokens == 0:  # 0 reads as off, like null (and bench/run_bench.py's --max-batch-tokens 0)
            self.max_batch_tokens = None
        _require(self.max_batch_tokens in (None, "auto") or (isinstance(self.max_batch_tokens, int)
                                                             and self.max_batch_tokens >= 8),
                 f"train.max_batch_tokens must be auto, null or 0 (no split), or an integer >= 8, "
                 f"got {self.max_batch_tokens!r}")
        _require(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _require(self.lora_plus_ratio is None or self.lora_plus_ratio > 0, "train.lora_plus_ratio must be > 0")
        _require(self.scheduler in SCHEDULERS, _choice_message("train.scheduler", self.scheduler, SCHEDULERS))
        _require(0 <= self.warmup_ratio < 1, "train.warmup_ratio must be in [0, 1)")
        _require(self.weight_decay >= 0, "train.weight_decay must be >= 0")
        _require(self.max_grad_norm is None or self.max_grad_norm > 0, "train.max_grad_norm must be > 0")
        _require(self.eval_every is None or self.eval_every >= 1, "train.eval_every must be >= 1")
        _require(self.save_every is None or self.save_every >= 1, "train.save_every must be >= 1")
        _require(self.keep_best is None or self.keep_best in KEEP_BEST,
                 _choice_message("train.keep_best", self.keep_best, ("null", *KEEP_BEST)))
        for key in ("keep_best", "early_stopping"):  # both act at the periodic evaluations
            _require(getattr(self, key) is None or self.eval_every is not None,
                     f"train.{key} needs train.eval_every (the steps between the evaluations it watches)")
        _require(self.log_every >= 1, "train.log_every must be >= 1")
        _require(self.train_eval_size >= 0, "train.train_eval_size must be >= 0")
        _require(self.device in ("auto", "cpu", "cuda", "mps"),
                 _choice_message("train.device", self.device, ("auto", "cpu", "cuda", "mps")))
        _require(self.precision in PRECISIONS, _choice_message("train.precision", self.precision, PRECISIONS))
        _require(self.base_dtype in BASE_DTYPES, _choice_message("train.base_dtype", self.base_dtype, BASE_DTYPES))
        half = self.base_dtype in ("bf16", "fp16")
        # fp32 compute on a half base would feed bf16/fp16 activations into the fp32 trained layers.
        _require(not (half and self.precision == "fp32"),
                 f"train.precision=fp32 with train.base_dtype={self.base_dtype}: fp32 compute on a half-precision "
                 f"base mixes dtypes in the fp32 trained layers; use precision: auto (autocast in "
                 f"{self.base_dtype}) or base_dtype: fp32")
        _require(not (self.base_dtype == "fp16" and self.precision == "bf16"),
                 "train.precision=bf16 with train.base_dtype=fp16: autocast must match the base dtype; use "
                 "precision: auto (fp16 autocast) or base_dtype: bf16")


@dataclass
class GenerateConfig:
    """Greedy generation on the first ``num_examples`` eval examples, scored against their reference outputs."""

    metrics: list[str] = field(default_factory=lambda: list(GENERATION_METRICS))
    max_new_tokens: int = 48
    num_examples: int = 32  # 0: off

    def __post_init__(self) -> None:
        _require(bool(self.metrics), "eval.generate.metrics must name at least one of "
                                     + ", ".join(GENERATION_METRICS))
        for index, name in enumerate(self.metrics):
            _require(name in GENERATION_METRICS,
                     _choice_message(f"eval.generate.metrics[{index}]", name, GENERATION_METRICS))
        _require(len(set(self.metrics)) == len(self.metrics), "eval.generate.metrics names a metric twice")
        _require(self.max_new_tokens >= 1, f"eval.generate.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _require(self.num_examples >= 0, f"eval.generate.num_examples must be >= 0 (0: off), got {self.num_examples}")


@dataclass
class EvalConfig:
    """What a run measures besides its eval loss (peftlab.run.generation, peftlab.run.forgetting).

    The defaults measure nothing more, so a config saved before this section existed resumes unchanged."""

    generate: GenerateConfig | None = None  # instruction only; null (or num_examples 0): no generation metrics
    # Forgetting: the causal-LM loss on general text (an alias, local file or hub id, as data.source takes),
    # in reference_size chunks of data.chunk_length tokens, before training and after.
    reference: str | None = None
    reference_size: int = 64

    def __post_init__(self) -> None:
        _require(self.reference is None or bool(self.reference.strip()),
                 "eval.reference must name a text source (e.g. hamlet) or be null")
        _require(self.reference_size >= 1, f"eval.reference_size must be >= 1, got {self.reference_size}")

    @property
    def generation_on(self) -> bool:
        return self.generate is not None and self.generate.num_examples > 0


@dataclass
class RunConfig:
    model: str = "smollm2-135m"  # embedded alias, hub id, or local dir
    task: str = "instruction"  # instruction | classification | causal_lm
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str | None = None  # a label for reports; defaults to the output dir's name
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        _require(self.task in TASKS, _choice_message("task", self.task, TASKS))
        _require(bool(self.model), "model must name an alias, a hub id or a local dir")
        for key in ("format", "template"):  # only instruction data has a layout and a template to choose
            value = getattr(self.data, key)
            _require(self.task == "instruction" or value == "auto",
                     f"data.{key}={value!r} is for task instruction only (task is {self.task}); remove it")
        # Static only: whether this machine has a GPU and bitsandbytes is checked where the model loads
        # (a sweep may be planned on one machine and run on GPU workers).
        _require(self.train.keep_best != "accuracy" or self.task == "classification",
                 f"train.keep_best=accuracy needs task classification (task {self.task} has no accuracy); "
                 "use keep_best: eval_loss")
        quantize = self.method.quantize_base
        _require(quantize is None or self.train.device in ("auto", "cuda"),
                 f"method.quantize_base={quantize!r} (QLoRA) needs a CUDA GPU, but train.device={self.train.device}; "
                 "use train.device: auto or cuda, or method.quantize_base: null")
        _require(not (quantize and self.train.fsdp),
                 f"method.quantize_base={quantize!r} with train.fsdp=True: sharding a bitsandbytes-quantized base "
                 "is not supported; QLoRA fits a 7B base on one GPU (drop train.fsdp), or use fsdp on a bf16 base")
        _require(not self.eval.generation_on or self.task == "instruction",
                 f"eval.generate needs task instruction (it scores generated answers against reference outputs), "
                 f"but task={self.task}; set eval.generate: null")
        _require(self.eval.reference is None or self.task in CAUSAL_TASKS,
                 f"eval.reference measures a causal LM's loss on text, but task={self.task} trains a classifier; "
                 f"set eval.reference: null")


def did_you_mean(value: object, choices: Sequence[str], *, quote: bool = True, prefix: str = "") -> str:
    """" (did you mean 'x'?)" for the closest of ``choices``, or "": the one spelling-hint helper."""
    close = difflib.get_close_matches(str(value), list(choices), n=1)
    if not close:
        return ""
    return f" (did you mean {prefix + close[0]!r}?)" if quote else f" (did you mean {prefix}{close[0]}?)"


def _choice_message(key: str, value: object, choices: Sequence[str]) -> str:
    return f"{key}={value!r} is not one of {', '.join(choices)}{did_you_mean(value, choices)}"


# --- building dataclasses from plain dicts, strictly -------------------------------------------


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise UserError."""
    if not isinstance(data, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            hint = did_you_mean(key, names, quote=False, prefix=prefix) or f" (valid: {', '.join(names)})"
            raise UserError(f"unknown config key {prefix}{key}{hint}")
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    """Check ``value`` against type ``hint``; allow int -> float; recurse into dataclasses."""
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value if value is not None else {}, path + ".")
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, path)
            except UserError as error:
                errors.append(str(error))
        raise UserError(errors[0] if errors else f"{path} has the wrong type")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise UserError(f"{path} must be a list, got {value!r}")
        return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(hint)
        if not isinstance(value, dict):
            raise UserError(f"{path} must be a mapping, got {value!r}")
        return {str(k): _coerce(item, v, f"{path}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML reads "2e-4" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise UserError(f"{path} must be {hint.__name__}, got {value!r}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value`` (value read as YAML, so 5, 2e-4, true, [1, 2] work)."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected key=value, e.g. train.max_steps=5")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted ``--set`` overrides to a raw config dict (validated later by from_dict)."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"--set {text}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice in one mapping (YAML would silently keep the last one); "
                    f"give each key once (line {key_node.start_mark.line + 1})", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.load(read_utf8(path, "config file"), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as error:
        raise UserError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of config keys")
    return data


def read_utf8(path: Path, what: str) -> str:
    """The text of ``path``; a file that is not UTF-8 (or cannot be read) is a one-line UserError."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise UserError(f"cannot read {what} {path}: {error.strerror or error}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise UserError(f"{what} {path} is not UTF-8 text (byte 0x{raw[error.start]:02x} on line {line}); "
                        f"save it as UTF-8") from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """A run config from YAML plus ``--set`` overrides, checked, including that its method reads every
    method field it sets (a sweep checks this per strategy instead: see peftlab.study.sweep)."""
    data = load_yaml(path) if path is not None else {}
    config = from_dict(RunConfig, apply_overrides(data, list(overrides)))
    check_method_fields(config.method)
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


# Data keys added after runs were committed, with the default that leaves their examples as they were.
# What names a data set (a sweep's base-model evaluation id hashes it) leaves these out at that default,
# so the committed studies keep their folder names.
DATA_KEYS_ADDED_LATER = {"format": "auto", "template": "auto"}


def data_identity(data: DataConfig) -> dict[str, Any]:
    """The data config as a dict without the later keys at their neutral defaults (see DATA_KEYS_ADDED_LATER)."""
    return {key: value for key, value in config_to_dict(data).items()
            if key not in DATA_KEYS_ADDED_LATER or value != DATA_KEYS_ADDED_LATER[key]}


# Keys that change how a run executes, or where it is reported, but not what it computes: a run folder or a
# committed study made with another value resumes as the same config (peftlab.run.folder,
# peftlab.study.resume), and a sweep's run ids leave them out. train.report_to names trackers. The split
# runs a batch's pieces in one optimizer step and weights their losses by tokens, so the update is the
# batch's, up to float rounding and dropout draws, whatever the cap: the studies under docs/results,
# made with max_batch_tokens null, still resume now that the default is auto. A key that changes the
# update (batch_size, grad_accum, lr, ...) never belongs here.
EXECUTION_ONLY_KEYS = frozenset({"train.max_batch_tokens", "train.report_to"})


def result_keys(config: dict[str, Any]) -> dict[str, Any]:
    """A (possibly partial) config dict without the EXECUTION_ONLY_KEYS: what a sweep's run id hashes."""
    kept = {section: dict(value) if isinstance(value, dict) else value for section, value in config.items()}
    for dotted in EXECUTION_ONLY_KEYS:
        section, _, key = dotted.partition(".")
        if isinstance(kept.get(section), dict):
            kept[section].pop(key, None)
    return kept


def changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two config dicts (what a refused --resume names),
    execution-only keys (``EXECUTION_ONLY_KEYS``) left out: an empty list means the same config."""
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b and f"{prefix}{key}" not in EXECUTION_ONLY_KEYS:
            changed.append(f"{prefix}{key}")
    return changed
