"""The systems under test, each one LoRA fine-tune of the same examples, measured the same way.

* ``peftlab``    : peftlab's own loop (methods.prepare + train.train) with its shipped defaults:
                   length-grouped dynamic padding, ``train.max_batch_tokens: auto`` (256 on the CPU,
                   off on GPUs: peftlab.run.resources.AUTO_MAX_BATCH_TOKENS), the shipped dropout mask.
                   No bench-only setting unless the command sets one (then the table says so).
* ``hf_seeds``   : HF Trainer + peft, the seed studies' recipe: every example padded to max_length,
                   batch 1, gradient accumulation 4, the default random sampler.
* ``hf_tuned``   : HF Trainer + peft with the levers HF offers: padding to the longest in the batch,
                   peftlab's batch size, ``train_sampling_strategy="group_by_length"``.
* ``hf_bounded`` : hf_tuned with its memory bounded the way HF can: micro-batches of 1 row and
                   gradient accumulation up to peftlab's batch (1 x 4), dynamic padding, group_by_length;
                   the like-for-like memory peer of peftlab's split batches.

All get the same tokenized examples (peftlab.inputs.data, loss on response tokens only), the same
hyperparameters, the same imported libraries before the peak-memory reset (``import_every_library``),
and are evaluated by the same function (peftlab.run.evaluate.evaluate, token-weighted) on the same eval
batches, so the only differences are the system and the recipe.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn

from peftlab.config import DataConfig, MethodConfig, RankConfig, TrainConfig
from peftlab.core.methods import prepare
from peftlab.core.modelmap import build_model_map
from peftlab.core.params import count_params
from peftlab.inputs.data import IGNORE_INDEX, TaskData, batches, collate, load_task_data
from peftlab.inputs.models import load_model, load_tokenizer
from peftlab.run.evaluate import evaluate
from peftlab.run.precision import autocast_for
from peftlab.run.resources import max_batch_tokens_for, peak_memory, reset_peak_memory
from peftlab.run.tracking import MetricsLog
from peftlab.run.train import train

SYSTEMS = ("peftlab", "hf_seeds", "hf_tuned", "hf_bounded")
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Spec:
    """One benchmark setting; every system reads the same one."""

    model: str = "smollm2-135m"  # embedded alias or local dir
    examples: int = 64  # training examples
    eval_examples: int = 64
    epochs: float = 1.0
    batch_size: int = 4  # peftlab and hf_tuned (4 = the seeds' 1 x accumulation 4)
    seeds_batch_size: int = 1  # hf_seeds: per-device batch 1 ...
    seeds_grad_accum: int = 4  # ... accumulated over 4 (effective batch 4)
    bounded_batch_size: int = 1  # hf_bounded: micro-batches of 1, accumulated up to batch_size
    max_length: int = 256  # truncation for all; hf_seeds also pads every example to it
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.1
    lr: float = 2e-4
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    seed: int = 42
    data_seed: int = 0  # the train/eval split (peftlab's DataConfig.seed)
    device: str = "cpu"  # cpu | cuda (cuda: bf16 autocast for every system)
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    # peftlab's train.max_batch_tokens: SHIPPED = not set, peftlab's own default (auto) decides; anything
    # else (a lever, measured in levers.py, never in the headline table) is passed and marked in the table.
    max_batch_tokens: int | str | None = "shipped"


SHIPPED = "shipped"


def import_every_library() -> None:
    """What any system imports, imported by every worker before its peak-memory reset: on the CPU the
    peak is the process's resident set, which holds the imported libraries' code and data, so a worker
    that imported less would look lighter for a reason that is no part of training."""
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from transformers import Trainer, TrainingArguments  # noqa: F401

    import peftlab.run.train  # noqa: F401


def peftlab_overrides(spec: Spec) -> dict[str, Any]:
    """The TrainConfig fields the command set for peftlab beyond its shipped defaults (empty: as shipped)."""
    return {} if spec.max_batch_tokens == SHIPPED else {"max_batch_tokens": spec.max_batch_tokens}


def peftlab_max_batch_tokens(spec: Spec) -> int | None:
    """The split peftlab's steps ran with on ``spec.device``: its shipped default resolved, or the override."""
    setting = peftlab_overrides(spec).get("max_batch_tokens", TrainConfig().max_batch_tokens)
    return max_batch_tokens_for(setting, torch.device(spec.device))


def load_data(spec: Spec) -> tuple[TaskData, Any]:
    tokenizer = load_tokenizer(spec.model)
    cfg = DataConfig(source="chatterbot", train_size=spec.examples, eval_size=spec.eval_examples,
                     max_length=spec.max_length, seed=spec.data_seed)
    return load_task_data(cfg, "instruction", tokenizer), tokenizer


def examples_digest(examples: list[dict]) -> str:
    """A short hash of the tokenized examples: the results prove every system trained on the same."""
    return hashlib.sha256(json.dumps(examples, sort_keys=True).encode()).hexdigest()[:16]


def eval_loss(model: nn.Module, data: TaskData, spec: Spec, pad_id: int, device: torch.device) -> float:
    """The one eval: peftlab.run.evaluate (token-weighted) on the same unshuffled batches for every system."""
    stream = ({k: v.to(device) for k, v in b.items()}
              for b in batches(data.eval, spec.batch_size, pad_id=pad_id, seed=spec.seed, epoch=0, shuffle=False))
    return evaluate(model, stream, "instruction", autocast_for(device, TrainConfig())).loss


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- peftlab --------------------------------------------------------------------------------------


def run_peftlab(spec: Spec, data: TaskData, tokenizer: Any, device: torch.device) -> dict[str, Any]:
    from peftlab.run.resources import seed_everything

    seed_everything(spec.seed)
    model = load_model(spec.model, "instruction").model
    method = MethodConfig(name="lora", placement="all_linear", ranks=RankConfig(r=spec.r), alpha=spec.alpha,
                          dropout=spec.dropout, train_head=False)
    prepared = prepare(model, method, build_model_map(model), train_head=False)
    model.to(device)
    # The benchmark's recipe (the same for every system) plus bookkeeping; every speed setting is left
    # at peftlab's shipped default unless the command set one (peftlab_overrides).
    cfg = TrainConfig(epochs=spec.epochs, batch_size=spec.batch_size, lr=spec.lr, scheduler="cosine",
                      warmup_ratio=spec.warmup_ratio, weight_decay=spec.weight_decay, seed=spec.seed,
                      device=device.type, num_samples=0, log_every=10**9, **peftlab_overrides(spec))
    reset_peak_memory(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    outcome = train(model, data.train, data.eval, "instruction", cfg, pad_id=tokenizer.pad_token_id,
                    device=device, log=MetricsLog(None, echo=False))
    _sync(device)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    peak = peak_memory(device)
    # The loop ends with an evaluation; the outcome says what it (and any other) cost, so it is subtracted.
    return {"train_seconds": wall - outcome.eval_seconds, "train_cpu_seconds": cpu - outcome.eval_cpu_seconds,
            "loop_seconds": outcome.state.train_seconds, "eval_seconds": outcome.eval_seconds,
            "tokens": outcome.state.train_tokens, "padded_tokens": outcome.padded_tokens,
            "steps": outcome.state.step, "status": outcome.status, "max_batch_tokens": peftlab_max_batch_tokens(spec),
            "trainable_params": prepared.trainable_params, "model": model, **peak}


# --- HF Trainer + peft ----------------------------------------------------------------------------


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, examples: list[dict]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]


class CountingCollator:
    """Pads a batch (to ``pad_to`` or to its longest example) and counts real and padded tokens."""

    def __init__(self, pad_id: int, pad_to: int | None = None) -> None:
        self.pad_id, self.pad_to = pad_id, pad_to
        self.tokens = self.padded_tokens = 0

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = collate(examples, self.pad_id)
        if self.pad_to is not None:
            batch = _pad_to(batch, self.pad_to, self.pad_id)
        self.tokens += int(batch["attention_mask"].sum())
        self.padded_tokens += batch["input_ids"].numel()
        return batch


def _pad_to(batch: dict[str, torch.Tensor], width: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad every [B, T] tensor to [B, width], as tokenizer(padding="max_length") does."""
    extra = width - batch["input_ids"].shape[1]
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    return {k: torch.nn.functional.pad(v, (0, extra), value=fill[k]) for k, v in batch.items()}


def hf_peft_model(spec: Spec) -> nn.Module:
    """The seeds' model set-up: from_pretrained, then peft's get_peft_model with the study's LoraConfig."""
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    set_seed(spec.seed)
    base = load_model(spec.model, "instruction").model  # AutoModelForCausalLM.from_pretrained, fp32
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, bias="none",
                        target_modules=LLAMA_LINEARS, task_type="CAUSAL_LM")
    return get_peft_model(base, config)


# Per HF recipe: (per-device batch, gradient accumulation, sampler, pad every example to max_length).
def hf_recipe(system: str, spec: Spec) -> tuple[int, int, str, bool]:
    if system == "hf_seeds":
        return spec.seeds_batch_size, spec.seeds_grad_accum, "random", True
    if system == "hf_tuned":
        return spec.batch_size, 1, "group_by_length", False
    if system == "hf_bounded":  # the same effective batch as peftlab's, in micro-batches of bounded_batch_size
        return spec.bounded_batch_size, spec.batch_size // spec.bounded_batch_size, "group_by_length", False
    raise ValueError(system)


def hf_arguments(spec: Spec, out_dir: str, system: str, device: torch.device) -> Any:
    from transformers import TrainingArguments

    batch, accumulation, sampler, _ = hf_recipe(system, spec)
    return TrainingArguments(
        output_dir=out_dir, num_train_epochs=spec.epochs, learning_rate=spec.lr, lr_scheduler_type="cosine",
        warmup_steps=spec.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps (transformers 5)
        weight_decay=spec.weight_decay, max_grad_norm=1.0, seed=spec.seed,
        per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        train_sampling_strategy=sampler,
        bf16=device.type == "cuda", use_cpu=device.type == "cpu",
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0)


def run_hf(spec: Spec, data: TaskData, tokenizer: Any, device: torch.device, *, system: str) -> dict[str, Any]:
    from transformers import Trainer

    model = hf_peft_model(spec)
    model.to(device)
    collator = CountingCollator(tokenizer.pad_token_id, spec.max_length if hf_recipe(system, spec)[3] else None)
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = Trainer(model=model, args=hf_arguments(spec, out_dir, system, device),
                          train_dataset=_ListDataset(data.train), data_collator=collator)
        reset_peak_memory(device)
        started, cpu_started = time.perf_counter(), time.process_time()
        result = trainer.train()
        _sync(device)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        peak = peak_memory(device)
    trainable, _ = count_params(model)
    return {"train_seconds": wall, "train_cpu_seconds": cpu,
            "loop_seconds": float(result.metrics.get("train_runtime", wall)),
            "eval_seconds": 0.0, "tokens": collator.tokens, "padded_tokens": collator.padded_tokens,
            "steps": int(result.global_step), "status": "completed", "trainable_params": trainable,
            "model": model.get_base_model(), **peak}


RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {
    "peftlab": run_peftlab,
    "hf_seeds": lambda *a: run_hf(*a, system="hf_seeds"),
    "hf_tuned": lambda *a: run_hf(*a, system="hf_tuned"),
    "hf_bounded": lambda *a: run_hf(*a, system="hf_bounded"),
}


def run_system(system: str, spec: Spec) -> dict[str, Any]:
    """Load the data, train ``system`` once on a fresh model, evaluate it; a JSON-ready record."""
    if spec.threads:
        torch.set_num_threads(spec.threads)
    device = torch.device(spec.device)
    import_every_library()  # before anything is measured: the same imports in every worker
    data, tokenizer = load_data(spec)
    record = RUNNERS[system](spec, data, tokenizer, device)
    model = record.pop("model")
    started = time.perf_counter()
    record["eval_loss"] = eval_loss(model, data, spec, tokenizer.pad_token_id, device)
    record["bench_eval_seconds"] = time.perf_counter() - started
    record["base_params"] = _base_params(model)
    record.update(system=system, train_examples=len(data.train), eval_examples=len(data.eval),
                  train_digest=examples_digest(data.train), eval_digest=examples_digest(data.eval),
                  threads=torch.get_num_threads(), spec=asdict(spec))
    record["tokens_per_s"] = record["tokens"] / record["train_seconds"]
    return record


def _base_params(model: nn.Module) -> int:
    """Parameters of the frozen base model (tied weights once), LoRA parameters excluded."""
    seen = {id(p): p.numel() for name, p in model.named_parameters() if "lora_" not in name}
    return sum(seen.values())
