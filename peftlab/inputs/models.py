"""Model + tokenizer from an embedded alias, a local folder or a Hugging Face hub id.

``load_model`` loads weights for training; ``load_model_skeleton`` builds the same architecture
on the meta device from the config alone, so ``peftlab inspect`` can map a 70B model without
downloading (or having) its weights.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peftlab.config import CAUSAL_TASKS, TASKS
from peftlab.core.methods.lora import QUANTIZED_LINEARS, require_quantization_support
from peftlab.core.modelmap import split_new_weights
from peftlab.errors import UserError
from peftlab.inputs import assets

_log = logging.getLogger(__name__)  # under "peftlab": the CLI or the run decides where it goes (peftlab.messages)


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers tokenizer, with a pad token and right padding
    # What from_pretrained loaded: a local folder (an embedded alias's folder too) or a hub id, so it
    # can be written as an adapter's base_model_name_or_path.
    source: str
    new_weights: tuple[str, ...] = ()  # parameters initialised fresh, e.g. a classification head


def load_model(name: str, task: str, *, num_labels: int | None = None, label_names: list[str] | None = None,
               dtype: torch.dtype = torch.float32, tokenizer: Any = None, quantize: str | None = None) -> LoadedModel:
    """Load model + tokenizer for ``task`` (instruction | causal_lm | classification).

    Classification needs ``num_labels`` or ``label_names`` (names fix id2label/label2id).
    ``tokenizer``: this model's, already loaded (a run loads it first, to tokenize the data that
    decides the label count); it is used instead of reading it again.
    ``dtype``: of the weights (peftlab.run.precision.resolve_base_dtype). ``quantize`` (QLoRA's
    method.quantize_base, nf4 | int8): linears load quantized by bitsandbytes straight onto the current
    CUDA GPU (the model is then already on its device); no GPU or no bitsandbytes is a UserError raised
    before anything is read.
    """
    quantization = _quantization_kwargs(quantize)
    auto = _auto_class(task)
    location, kind = _resolve(name)
    tokenizer = prepare_tokenizer(tokenizer) if tokenizer is not None else _load_tokenizer(name, location, kind)
    if task in CAUSAL_TASKS:
        with _user_errors(name, kind):
            model = auto.from_pretrained(location, dtype=dtype, **quantization)
        return LoadedModel(model, tokenizer, location)
    model, new = _load_classifier(name, location, kind, _label_kwargs(num_labels, label_names), dtype, quantization)
    # Decoder classifiers pool the last token that is not config.pad_token_id; batches are padded
    # with the tokenizer's pad id, so the two must agree (a config may carry another or none).
    model.config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model, tokenizer, location, new)


def _quantization_kwargs(quantize: str | None) -> dict[str, Any]:
    """from_pretrained's bitsandbytes arguments for QLoRA (Dettmers et al. 2023); {} for no quantization.

    nf4: 4-bit NormalFloat with double quantization (the quantization constants quantized too) and
    bf16 compute, the paper's setting; int8: LLM.int8. Refused (one line) where this machine lacks a
    CUDA GPU or bitsandbytes, before any weights are read.
    """
    if quantize is None:
        return {}
    if quantize not in QUANTIZED_LINEARS:
        raise UserError(f"quantize={quantize!r} is not one of {', '.join(QUANTIZED_LINEARS)}")
    require_quantization_support(quantize)
    from transformers import BitsAndBytesConfig

    if quantize == "nf4":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    # bitsandbytes quantizes while it places weights on the GPU: the whole model goes to the current one.
    return {"quantization_config": config, "device_map": {"": torch.cuda.current_device()}}


def load_tokenizer(name: str) -> Any:
    """Just the tokenizer of a model (alias, local dir or hub id), ready for padding."""
    location, kind = _resolve(name)
    return _load_tokenizer(name, location, kind)


def load_model_skeleton(name: str, task: str = "instruction") -> tuple[Any, Any | None]:
    """(model on the meta device built from the config alone, tokenizer or None)."""
    config, tokenizer = _skeleton_config(name)
    with torch.device("meta"):
        model = _auto_class(task).from_config(config)
    return model, tokenizer


# --- where a name points ------------------------------------------------------------------------


def _resolve(name: str) -> tuple[str, str]:
    """(what to pass to from_pretrained, its kind: "embedded <alias>", "local" or "hub")."""
    if name in assets.MODEL_ALIASES:
        folder = assets.embedded_model_dir(name)
        return str(folder), f"embedded {name}"
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {path} has no config.json (is it a Hugging Face model folder?)")
        return str(path), "local"
    if path.exists():
        raise UserError(f"model {name!r} is a file; give the folder that holds config.json and the weights")
    if name.startswith(("/", "./", "../", "~")):  # clearly meant as a path, and hub ids never look so
        raise UserError(f"model folder {name} does not exist")
    return name, "hub"


def _not_found(name: str) -> str:
    return (f"could not load model {name!r}: not an embedded alias ({', '.join(assets.MODEL_ALIASES)}), "
            "not a local directory, and the hub is unreachable or has no such model")


@contextmanager
def _user_errors(name: str, kind: str) -> Iterator[None]:
    """Turn transformers' loading failures into one-line UserErrors."""
    try:
        yield
    except OSError as error:  # transformers' "not found / cannot connect" errors are OSErrors
        if kind == "hub":
            raise UserError(_not_found(name)) from error
        raise UserError(f"could not load model {name!r}: {_first_line(error)}") from error
    except ValueError as error:  # unknown model_type, custom code required, bad config
        raise UserError(f"could not load model {name!r}: {_first_line(error)}") from error
    except pickle.UnpicklingError as error:  # a pytorch_model.bin that torch.load(weights_only=True) refuses
        raise UserError(f"could not load model {name!r}: its weights are a pickle file that torch refuses to load "
                        f"as plain tensors ({_unpickling_reason(error)}); peftlab never runs code from a model "
                        f"file: use a copy saved as safetensors (model.safetensors)") from None


def _unpickling_reason(error: BaseException) -> str:
    """torch's own reason (an unsupported global or opcode), without its advice to load unsafely."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        rest = [line.strip() for line in text.split(marker, 1)[1].splitlines() if line.strip()]
        if rest:
            return rest[0].split(". ")[0].rstrip(".")
    return "not a weights-only pickle"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _auto_class(task: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if task in CAUSAL_TASKS:
        return AutoModelForCausalLM
    if task == "classification":
        return AutoModelForSequenceClassification
    raise UserError(f"task={task!r} is not one of {', '.join(TASKS)}")


# --- tokenizer ----------------------------------------------------------------------------------


def _load_tokenizer(name: str, location: str, kind: str) -> Any:
    from transformers import AutoTokenizer

    folder = Path(location)
    if folder.is_dir() and not any(any(folder.glob(pattern)) for pattern in _TOKENIZER_FILES):
        raise UserError(f"model folder {folder} has no tokenizer files (tokenizer.json, vocab.*, ...)")
    with _user_errors(name, kind):
        tokenizer = AutoTokenizer.from_pretrained(location)
    return prepare_tokenizer(tokenizer)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.*", "*.model", "merges.txt")


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Give the tokenizer a pad token (its eos, else sep) and right padding.

    No new token is added: that would change the vocabulary and need resized embeddings. Padded
    positions are masked out of attention and loss, so reusing eos as pad is harmless.
    """
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or getattr(tokenizer, "sep_token", None)
        if fallback is None:
            raise UserError("the tokenizer has no pad, eos or sep token to pad batches with")
        tokenizer.pad_token = fallback
    tokenizer.padding_side = "right"
    return tokenizer


# --- classification heads -----------------------------------------------------------------------


def _label_kwargs(num_labels: int | None, label_names: list[str] | None) -> dict[str, Any]:
    if label_names is not None:
        num_labels = len(label_names)
    if num_labels is None or num_labels < 1:
        raise ValueError("classification needs num_labels or label_names")
    names = list(label_names) if label_names is not None else [f"LABEL_{i}" for i in range(num_labels)]
    return {"num_labels": num_labels, "id2label": dict(enumerate(names)),
            "label2id": {label: i for i, label in enumerate(names)}}


def _load_classifier(name: str, location: str, kind: str, labels: dict[str, Any], dtype: torch.dtype,
                     quantization: dict[str, Any]) -> tuple[Any, tuple[str, ...]]:
    """Load with transformers' multi-line load report silenced; report the new head in one line."""
    auto = _auto_class("classification")
    with _user_errors(name, kind), _quiet_load_report():
        # ignore_mismatched_sizes: a checkpoint's own head with another label count is re-initialised.
        model, info = auto.from_pretrained(location, dtype=dtype, output_loading_info=True,
                                           ignore_mismatched_sizes=True, **labels, **quantization)
    fresh = set(info["missing_keys"]) | {key for key, *_ in info["mismatched_keys"]}
    # The same split the model map makes: these head weights are what prepare trains as the head.
    head, body = split_new_weights(model, fresh)
    if head:
        _log.info("new classification head (%s) starts from random weights and is trained", ", ".join(head))
    if body:  # not a head: weights the checkpoint should have had
        shown = ", ".join(body[:5]) + (", ..." if len(body) > 5 else "")
        _log.warning("%d weights missing from %r start random: %s", len(body), name, shown)
    return model, tuple(sorted(fresh))


@contextmanager
def _quiet_load_report() -> Iterator[None]:
    """Drop transformers' load report (a multi-line table of MISSING keys) for this load only.

    A filter, not a raised log level: transformers 5 runs an extra tensor-parallel check (and
    warns about unsharded layers) whenever this logger's level is WARNING or above.
    """
    logger = logging.getLogger("transformers.modeling_utils")
    drop_report = _DropLoadReport()
    logger.addFilter(drop_report)
    try:
        yield
    finally:
        logger.removeFilter(drop_report)


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


# --- skeletons for inspect ----------------------------------------------------------------------


def _skeleton_config(name: str) -> tuple[Any, Any | None]:
    from transformers import AutoConfig

    # An embedded SmolLM2 is converted here if it was not yet: reading config and tokenizer from
    # the GGUF file takes ~25 s on every call, the one-time conversion ~40 s and then 0.7 s.
    location, kind = _resolve(name)
    with _user_errors(name, kind):
        config = AutoConfig.from_pretrained(location)
    return config, _optional_tokenizer(location)


def _optional_tokenizer(location: str) -> Any | None:
    """The tokenizer if it is on disk (a config-only folder has none); never downloads one."""
    from transformers import AutoTokenizer

    try:
        return prepare_tokenizer(AutoTokenizer.from_pretrained(location, local_files_only=True))
    except (OSError, ValueError, TypeError, UserError):
        return None
