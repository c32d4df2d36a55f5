"""What a finished run keeps of its model: the adapter in HF peft's format, or the trained parameters.

LoRA runs write ``adapter/`` (peft loads it on the base model); fused-slice LoRA, adapters and partial
runs write ``trainable.safetensors``; full fine-tuning writes nothing per run (its size is reported).
A half-written adapter is removed, never left to pass for a saved one.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from peftlab.core.export import export_peft_adapter
from peftlab.core.methods import Prepared
from peftlab.diskio import DiskError, write_atomic_by, writing
from peftlab.errors import UserError
from peftlab.run.summary import Artifact


def save_trained(model: torch.nn.Module, prepared: Prepared, out_dir: Path, source: str, task: str) -> Artifact:
    """Write the trained parameters; return where and how many bytes they take on disk."""
    if prepared.method == "lora":
        try:
            heads = None  # classification heads are saved by export as modules_to_save
            with _removed_on_failure(out_dir / "adapter"), writing(out_dir / "adapter"):
                path = export_peft_adapter(model, out_dir / "adapter", base_model_name_or_path=source,
                                           task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM",
                                           modules_to_save=heads)
            return Artifact("peft", "adapter", _dir_bytes(Path(path)))
        except DiskError:
            raise
        except UserError as error:  # fused-slice placements have no peft form
            note = str(error)
    else:
        note = ""
    if prepared.method == "full":  # the whole model: report its size, do not write a copy per run
        size = sum(p.numel() * p.element_size() for _, p in model.named_parameters())
        return Artifact("none", None, size, "full fine-tuning: size of all weights")
    tensors = {name: p.detach().float().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    target = out_dir / "trainable.safetensors"
    write_atomic_by(target, lambda temporary: save_file(tensors, str(temporary)))
    return Artifact("safetensors", "trainable.safetensors", target.stat().st_size, note or None)


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
