"""What a finished run keeps of its model: the adapter in HF peft's format, the trained parameters, a whole model.

LoRA runs write ``adapter/`` (peft loads it on the base model); fused-slice LoRA, adapters and partial
runs write ``trainable.safetensors`` (peftlab rebuilds the model from it: run/finished.py); full and
partial runs also write ``model/``, the whole trained model and its tokenizer as ``save_pretrained``
writes them, so plain ``transformers`` loads it. A half-written artifact is removed, never left to pass
for a saved one.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from peftlab.core.export import export_peft_adapter
from peftlab.core.methods import Prepared
from peftlab.diskio import DiskError, write_atomic_by, writing
from peftlab.errors import UserError
from peftlab.run.summary import Artifact

ADAPTER_DIR = "adapter"
TRAINABLE_FILE = "trainable.safetensors"
MODEL_DIR = "model"
WHOLE_MODEL_METHODS = ("partial", "full")  # cheap to keep beside what trained, and transformers loads them as is


def save_trained(model: torch.nn.Module, prepared: Prepared, out_dir: Path, source: str, task: str,
                 tokenizer: Any = None) -> Artifact:
    """Write the trained parameters (and, for full and partial runs, the whole model); return where and how big."""
    if prepared.method == "lora":
        try:
            heads = None  # classification heads are saved by export as modules_to_save
            with _removed_on_failure(out_dir / ADAPTER_DIR), writing(out_dir / ADAPTER_DIR):
                path = export_peft_adapter(model, out_dir / ADAPTER_DIR, base_model_name_or_path=source,
                                           task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM",
                                           modules_to_save=heads)
            return Artifact("peft", ADAPTER_DIR, _dir_bytes(Path(path)))
        except DiskError:
            raise
        except UserError as error:  # fused-slice placements have no peft form
            note = str(error)
    else:
        note = ""
    model_bytes = save_whole_model(model, out_dir / MODEL_DIR, tokenizer) if prepared.method in WHOLE_MODEL_METHODS \
        else None
    if prepared.method == "full":  # every weight trained: the model folder is the artifact, no second copy
        return Artifact("transformers", MODEL_DIR, model_bytes, None, MODEL_DIR, model_bytes)
    tensors = {name: p.detach().float().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    target = out_dir / TRAINABLE_FILE
    write_atomic_by(target, lambda temporary: save_file(tensors, str(temporary)))
    return Artifact("safetensors", TRAINABLE_FILE, target.stat().st_size, note or None,
                    MODEL_DIR if model_bytes is not None else None, model_bytes)


def save_whole_model(model: torch.nn.Module, folder: Path, tokenizer: Any = None) -> int:
    """``save_pretrained`` (safetensors) of the model and its tokenizer into ``folder``; its size in bytes."""
    with _removed_on_failure(folder), writing(folder):
        model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
    return _dir_bytes(folder)


@contextlib.contextmanager
def _removed_on_failure(folder: Path) -> Iterator[None]:
    """Remove ``folder`` when the block fails: a half-written adapter must not pass for a saved one."""
    try:
        yield
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _dir_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
