"""Load each base model once per process and hand out fresh copies (for sweeps).

A sweep of many runs on one base model would otherwise re-read (or, for the
embedded GGUF, re-convert) the weights for every run. Each ``get`` returns a deep
copy of the pristine model, so a run's LoRA wrappers or updated weights never
leak into the next run. A run that loaded its tokenizer already passes it and gets it back,
so the copy and the run's data share one tokenizer.

The dtype is part of the key: a bf16 copy of an fp32 model is another model. A quantized base
(QLoRA) is never cached: bitsandbytes places it on the GPU as it loads, so a pristine copy would hold
GPU memory for the whole sweep; it is loaded afresh for each run.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch

from peftlab.inputs.models import LoadedModel, load_model


class BaseModelCache:
    def __init__(self) -> None:
        self._pristine: dict[tuple, LoadedModel] = {}

    def get(self, name: str, task: str, *, num_labels: int | None = None,
            label_names: list[str] | None = None, tokenizer: Any = None, dtype: torch.dtype = torch.float32,
            quantize: str | None = None) -> LoadedModel:
        if quantize is not None:
            return load_model(name, task, num_labels=num_labels, label_names=label_names, tokenizer=tokenizer,
                              dtype=dtype, quantize=quantize)
        key = (name, task, num_labels, tuple(label_names or ()), dtype)
        if key not in self._pristine:
            self._pristine[key] = load_model(name, task, num_labels=num_labels, label_names=label_names,
                                             tokenizer=tokenizer, dtype=dtype)
        pristine = self._pristine[key]
        tokenizer = pristine.tokenizer if tokenizer is None else tokenizer
        return dataclasses.replace(pristine, model=copy.deepcopy(pristine.model), tokenizer=tokenizer)

    def clear(self) -> None:
        self._pristine.clear()
