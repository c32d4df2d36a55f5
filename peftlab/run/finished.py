"""A finished run's trained model, rebuilt from what its folder holds: the one loader of saved runs.

Every method comes back the way it was saved (run/artifacts.py): a LoRA ``adapter/`` is imported onto
the base model with peftlab's own peft-format reader; ``trainable.safetensors`` (fused-slice LoRA,
Houlsby/Pfeiffer adapters, partial runs) is loaded strictly into the base model after the saved
config's ``prepare`` step has been applied again, so every module it trained exists again with its
shape; a full fine-tuning's ``model/`` is loaded by transformers as it is.

Only a completed training run is loaded. A diverged, collapsed or failed run saved no model, an
interrupted one has no summary yet, and a reference evaluation trained nothing: each is one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from peftlab.config import RunConfig, from_dict, load_yaml
from peftlab.core.export import import_peft_adapter
from peftlab.core.methods import prepare
from peftlab.core.modelmap import build_model_map
from peftlab.errors import UserError
from peftlab.inputs.data import load_task_data
from peftlab.inputs.models import load_model, load_tokenizer, prepare_tokenizer
from peftlab.run.artifacts import MODEL_DIR
from peftlab.run.checkpoint import has_checkpoint
from peftlab.run.experiment import reinitialize
from peftlab.run.precision import keep_trainable_fp32, resolve_base_dtype
from peftlab.run.resources import resolve_device, seed_everything
from peftlab.run.summary import SUMMARY_FILE, Artifact, RunSummary, read_summary

CONFIG_FILE = "config.yaml"


@dataclass
class FinishedRun:
    """A completed run's folder, config and summary, and its trained model (eval mode, on ``device``)."""

    run_dir: Path
    config: RunConfig
    summary: RunSummary
    model: Any  # a transformers PreTrainedModel, carrying the run's LoRA / adapter modules where it had them
    tokenizer: Any
    device: torch.device
    label_names: list[str] | None = None  # classification: the run's label names in id order


def check_finished(run_dir: str | Path) -> tuple[RunConfig, RunSummary, Artifact]:
    """The config, summary and artifact record of a completed training run; anything else is one UserError."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder not found: {run_dir}")
    summary = read_summary(run_dir / SUMMARY_FILE)
    if summary is None:
        what = ("an unfinished run (a checkpoint, no summary.json): finish it with `peftlab run ... --resume`"
                if has_checkpoint(run_dir) else "no summary.json: not a finished peftlab run (interrupted or running?)")
        raise UserError(f"{run_dir} holds {what}")
    if summary.role == "reference":
        raise UserError(f"{run_dir} is a base-model reference evaluation: it trained nothing to load")
    if summary.status != "completed":
        raise UserError(f"{run_dir} did not complete ({summary.status}: {_why_not(summary)}), so it saved no model")
    artifact = summary.artifacts
    if artifact is None or artifact.format == "none" or artifact.path is None:
        note = artifact.note if artifact is not None and artifact.note else "no artifact recorded"
        raise UserError(f"{run_dir} saved no model ({note}): nothing to load (a full fine-tuning run made before "
                        f"runs kept {MODEL_DIR}/ must be rerun)")
    if not (run_dir / artifact.path).exists():
        raise UserError(f"{run_dir / artifact.path} is missing, though summary.json records it: the run folder is "
                        "incomplete")
    if not (run_dir / CONFIG_FILE).is_file():
        raise UserError(f"{run_dir} has no {CONFIG_FILE}: the run's config is needed to rebuild its model")
    return from_dict(RunConfig, load_yaml(run_dir / CONFIG_FILE)), summary, artifact


def _why_not(summary: RunSummary) -> str:
    if summary.divergence is not None:
        return f"step {summary.divergence.step}, {summary.divergence.reason}"
    if summary.collapse is not None:
        return summary.collapse.reason
    return summary.error or "no reason recorded"


def load_finished(run_dir: str | Path, *, device: str | torch.device | None = None,
                  quantized: bool = True) -> FinishedRun:
    """Rebuild the trained model of the completed run in ``run_dir``.

    ``device``: where the model goes (default: the run's ``train.device``). ``quantized=False`` loads a
    QLoRA run's base unquantized (what a merge needs); otherwise the base loads as the run loaded it.
    """
    run_dir = Path(run_dir)
    config, summary, artifact = check_finished(run_dir)
    device = torch.device(device) if device is not None else resolve_device(config.train.device)
    if artifact.format == "transformers":
        model, tokenizer, labels = _whole_model(run_dir / artifact.path, config, device)
    else:
        model, tokenizer, labels = _base_with_trained(run_dir, config, artifact, device, quantized)
    if config.method.quantize_base is None or not quantized:  # bitsandbytes placed a quantized base already
        model.to(device)
    model.eval()
    return FinishedRun(run_dir, config, summary, model, tokenizer, device, labels)


def _whole_model(folder: Path, config: RunConfig, device: torch.device) -> tuple[Any, Any, list[str] | None]:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if config.task == "classification" else AutoModelForCausalLM
    # every weight trained, and the run kept what trains in fp32 (keep_trainable_fp32): that is what was saved
    model = auto.from_pretrained(folder, dtype=torch.float32).requires_grad_(False)
    tokenizer = load_tokenizer(str(folder))
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)] \
        if config.task == "classification" else None
    return model, tokenizer, labels


def _base_with_trained(run_dir: Path, config: RunConfig, artifact: Artifact, device: torch.device,
                       quantized: bool) -> tuple[Any, Any, list[str] | None]:
    """The base model loaded as the run loaded it, with the saved adapter or trained tensors put back."""
    tokenizer = load_tokenizer(config.model)
    labels = run_label_names(config, tokenizer)
    quantize = config.method.quantize_base if quantized else None
    loaded = load_model(config.model, config.task, label_names=labels, tokenizer=tokenizer,
                        dtype=resolve_base_dtype(config.train, device, config.method.name), quantize=quantize)
    model = loaded.model
    seed_everything(config.train.seed)  # a new head the run drew, drawn again (then overwritten where it trained)
    reinitialize(model, loaded.new_weights)
    if artifact.format == "peft":
        import_peft_adapter(model, run_dir / artifact.path)
    else:
        model_map = build_model_map(model, strict=config.method.targets is None, new_weights=loaded.new_weights)
        prepare(model, config.method, model_map, train_head=config.task == "classification")
        keep_trainable_fp32(model)
        load_trained_tensors(model, run_dir / artifact.path)
    model.requires_grad_(False)
    return model, prepare_tokenizer(tokenizer), labels


def run_label_names(config: RunConfig, tokenizer: Any) -> list[str] | None:
    """A classification run's label names in id order (data.labels, else as its data gave them); None otherwise."""
    if config.task != "classification":
        return None
    if config.data.labels:
        return list(config.data.labels)
    return load_task_data(config.data, config.task, tokenizer).label_names  # the order the run's data fixed


def load_trained_tensors(model: nn.Module, path: Path) -> None:
    """Copy ``path``'s tensors into the model's trainable parameters: every one present, shapes equal, nothing extra."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise UserError(f"{path} is not a readable safetensors file: {error}") from None
    expected = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    shapes = [f"{name} {tuple(tensors[name].shape)} vs {tuple(p.shape)}" for name, p in expected.items()
              if name in tensors and tuple(tensors[name].shape) != tuple(p.shape)]
    problems = [f"{label}: {_few(items)}" for label, items in
                (("missing", missing), ("not in the model", extra), ("shape saved vs rebuilt", shapes)) if items]
    if problems:
        raise UserError(f"{path} does not fit the model the run's config.yaml rebuilds ({'; '.join(problems)}); "
                        "was config.yaml or the base model changed?")
    with torch.no_grad():
        for name, parameter in expected.items():
            parameter.copy_(tensors[name])


def _few(items: list[str], limit: int = 3) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")
