r"""LoRA adapters in Hugging Face peft's format, in and out, and merged-weight export.

Long because the format is one concept both ways: export and import share its key layout and
must stay each other's inverse (tests/test_export.py round-trips them), so they are read side by side.

The peft format facts this module relies on were read from peft 0.21's source:

- ``adapter_model.safetensors`` keys are ``base_model.model.<module>.lora_A.weight`` [r, in],
  ``...lora_B.weight`` [out, r] and, for DoRA, ``...lora_magnitude_vector`` [out]: no adapter name and
  no ``.weight`` on the magnitude (``peft/tuners/tuners_utils.py`` ``_remove_adapter_name_from_state_dict_key``,
  ``peft/tuners/lora/model.py`` ``LoraModel._get_adapter_state_dict``). The shapes are the same for
  GPT-2 ``Conv1D``: ``fan_in_fan_out`` transposes only the base weight, never A or B.
- A ``modules_to_save`` module is stored as ``base_model.model.<module>.<its state_dict key>``
  (``peft/utils/other.py`` ``ModulesToSaveWrapper.adapter_state_dict``).
- A list ``target_modules`` targets a module whose name equals an entry or ends with ``"." + entry``
  (``peft/tuners/tuners_utils.py`` ``check_target_module_exists``), so full names target exactly those.
- ``rank_pattern`` / ``alpha_pattern`` keys are regexes, tried in order with
  ``re.match(rf"(.*\.)?({key})$", module_name)`` (``peft/utils/other.py`` ``get_pattern_key``). Keys
  written here are full names passed through ``re.escape``, so a key matches its own module only:
  ``model\.layers\.1\.mlp\.up_proj`` needs a literal "." right after "layers.1", which layer 11 lacks.
- ``modules_to_save`` entries are matched by plain ``str.endswith`` when wrapping (``peft/utils/other.py``
  ``_set_trainable``) and, as ``(^|.*\.)name($|\..*)``, keep LoRA out of those modules; for task_type
  SEQ_CLS peft itself appends "classifier" and "score" (``peft/peft_model.py``).
- peft sets ``fan_in_fan_out`` per module from its type (``peft/tuners/lora/layer.py`` ``dispatch_default``),
  so the config value is informative; we write True when any base is a Conv1D.
"""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from peftlab.core.methods.lora import (
    LoRALinear,
    apply_lora,
    linear_features,
    lora_modules,
    quantized_kind,
    unload_lora,
)
from peftlab.core.modelmap import LinearSite, build_model_map
from peftlab.core.placement import Target
from peftlab.errors import UserError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # peft's PeftModel wraps the transformers model twice
_LORA_SUFFIXES = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_magnitude_vector": "magnitude"}
# peft adds these to modules_to_save for task_type SEQ_CLS (peft/peft_model.py
# PeftModelForSequenceClassification), so they are what a peft user expects the head to be called.
_PEFT_CLASSIFIER_NAMES = ("classifier", "score")


# --- export ----------------------------------------------------------------------------------


def export_peft_adapter(model: nn.Module, out_dir: str | Path, *, base_model_name_or_path: str,
                        task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None) -> Path:
    """Write the model's LoRA modules as a peft LoRA adapter (``adapter_config.json`` + safetensors).

    The result loads with ``peft.PeftModel.from_pretrained(base_model, out_dir)`` and computes what
    ``model`` computes. ``modules_to_save`` are full module names saved whole; by default, every module
    holding a trainable parameter outside LoRA (a head trained with train_head, and the embeddings
    tied to it), and with task_type ``SEQ_CLS`` also the classification head modules (e.g. BERT's
    classifier and pooler). Fused-slice LoRA (only some of a fused projection's output rows) has no
    peft equivalent: use ``export_merged``.
    """
    modules = _exportable_modules(model)
    heads = _heads_to_save(model, modules, task_type, modules_to_save)
    config = _adapter_config(modules, base_model_name_or_path, task_type, heads)
    tensors = _adapter_tensors(model, modules, heads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    return out


def _exportable_modules(model: nn.Module) -> dict[str, LoRALinear]:
    modules = lora_modules(model)
    if not modules:
        raise UserError("the model has no LoRA modules to export as a peft adapter")
    for name, module in modules.items():
        if module.out_index is not None:
            raise UserError(f"{name} has fused-slice LoRA (only some output rows of a fused projection), which "
                            "peft's adapter format cannot express; save merged weights with export_merged instead")
    for flag, label in (("rslora", "rsLoRA"), ("dora", "DoRA")):
        values = {name: _flag(module, flag) for name, module in modules.items()}
        if len(set(values.values())) > 1:
            on = sorted(name for name, value in values.items() if value)
            raise UserError(f"{label} is on for only some LoRA modules ({', '.join(on)}); peft's use_"
                            f"{flag} is one switch for the whole adapter")
    return modules


def _flag(module: LoRALinear, flag: str) -> bool:
    return module.rslora if flag == "rslora" else module.magnitude is not None


def _heads_to_save(model: nn.Module, modules: Mapping[str, LoRALinear], task_type: str,
                   modules_to_save: list[str] | None) -> list[str]:
    if modules_to_save is None:
        classifier = _classifier_heads(model) if task_type == "SEQ_CLS" else []
        modules_to_save = _outermost([*classifier, *_trained_modules(model, modules)])
    names = dict(model.named_modules())
    for head in modules_to_save:
        if head not in names:
            raise UserError(f"modules_to_save names {head!r}, which is not a module of the model")
    # peft never puts LoRA inside a modules_to_save module (check_target_module_exists excludes it),
    # including the classifier names it adds itself for SEQ_CLS, so such an adapter would load wrong.
    guarded = set(modules_to_save) | (set(_PEFT_CLASSIFIER_NAMES) if task_type == "SEQ_CLS" else set())
    for name in modules:
        clash = [h for h in guarded if re.match(rf"(^|.*\.){re.escape(h)}($|\..*)", name)]
        if clash:
            raise UserError(f"LoRA module {name} lies inside modules_to_save {clash[0]!r} (saved whole because "
                            "it is the head or its parameters train); peft cannot load LoRA inside a saved "
                            "module: freeze what is not trained (methods.prepare does) or name modules_to_save")
    return list(modules_to_save)


def _trained_modules(model: nn.Module, modules: Mapping[str, LoRALinear]) -> list[str]:
    """The modules owning a trainable parameter outside LoRA, under every name the parameter has.

    A head trained with train_head must travel with the adapter, or the adapter reproduces another
    model than the one trained and evaluated. Tied weights (GPT-2's lm_head is wte's weight) are one
    parameter under two modules: both are saved, or peft would load one trained and one not.
    """
    owners = []
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if not parameter.requires_grad or any(name.startswith(m + ".") for m in modules):
            continue
        owner = name.rpartition(".")[0]
        if not owner:
            raise UserError(f"parameter {name} trains but belongs to no submodule, so peft cannot save it")
        owners.append(owner)
    return owners


def _outermost(names: Iterable[str]) -> list[str]:
    """Distinct names, dropping any inside another (RoBERTa's "classifier" holds "classifier.dense")."""
    found = list(dict.fromkeys(names))
    return [name for name in found if not any(name.startswith(other + ".") for other in found)]


def _classifier_heads(model: nn.Module) -> list[str]:
    """The head modules a classification run trains: the model map's head modules (the set ``prepare``
    keeps trainable with train_head, e.g. BERT's classifier and pooler) plus peft's own classifier names."""
    mapped = build_model_map(model, strict=False).head_modules  # strict=False: LoRA wrappers are unmapped
    named = [name for name, _ in model.named_modules() if name.rpartition(".")[2] in _PEFT_CLASSIFIER_NAMES]
    heads = _outermost([*named, *mapped])
    if not heads:
        raise UserError("task_type SEQ_CLS but the model has no classification head ('classifier' or 'score'); "
                        "name it in modules_to_save")
    return heads


def _adapter_config(modules: Mapping[str, LoRALinear], base_model_name_or_path: str, task_type: str,
                    heads: list[str]) -> dict[str, Any]:
    ranks = {name: module.r for name, module in modules.items()}
    alphas = {name: _json_number(module.alpha) for name, module in modules.items()}
    r, alpha = _most_common(ranks.values()), _most_common(alphas.values())
    first = next(iter(modules.values()))
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(modules),
        "rank_pattern": {_pattern_key(name): rank for name, rank in ranks.items() if rank != r},
        "alpha_pattern": {_pattern_key(name): a for name, a in alphas.items() if a != alpha},
        "use_rslora": first.rslora,
        "use_dora": first.magnitude is not None,
        "lora_dropout": dropout,
        "fan_in_fan_out": any(isinstance(m.base, Conv1D) for m in modules.values()),
        "bias": "none",
        "modules_to_save": heads or None,
        "init_lora_weights": True,  # peft fills every field left out with its default
    }


def _pattern_key(name: str) -> str:
    """A rank/alpha_pattern key that peft's get_pattern_key matches to module ``name`` only."""
    return re.escape(name)


def _most_common(values: Iterable[Any]) -> Any:
    # Counter keeps first-seen order among ties, so the choice is deterministic (module order).
    return Counter(values).most_common(1)[0][0]


def _json_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _adapter_tensors(model: nn.Module, modules: Mapping[str, LoRALinear], heads: list[str]) -> dict[str, Tensor]:
    tensors: dict[str, Tensor] = {}
    for name, module in modules.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = _fp32(module.lora_A)  # [r, in]
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = _fp32(module.lora_B)  # [out, r]
        if module.magnitude is not None:
            tensors[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = _fp32(module.magnitude)  # [out]
    for head in heads:
        for key, value in model.get_submodule(head).state_dict().items():
            tensors[f"{PEFT_PREFIX}{head}.{key}"] = _fp32(value)
    return tensors


def _fp32(tensor: Tensor) -> Tensor:
    # clone: safetensors refuses tensors that share storage (tied heads) or are views
    return tensor.detach().to(device="cpu", dtype=torch.float32).clone().contiguous()


# --- import ----------------------------------------------------------------------------------

# Fields whose non-default value changes the forward pass or the base weights in a way LoRALinear
# does not model. A value counts as "off" when it is falsy (None, False, [], {}).
_UNSUPPORTED_FIELDS = (
    "lora_bias", "use_qalora", "layer_replication", "target_parameters", "trainable_token_indices",
    "alora_invocation_tokens", "use_bdlora", "arrow_config", "kasa_config", "velora_config",
    "monteclora_config", "megatron_config", "ensure_weight_tying",
)
# Fields that only select modules (the saved keys already name them), describe the run, or matter only
# at initialisation (the saved weights replace the initial values).
_IGNORED_FIELDS = frozenset({
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
    "fan_in_fan_out", "modules_to_save", "megatron_core", "qalora_group_size", "loftq_config", "eva_config",
    "corda_config", "lora_ga_config", "runtime_config",
})
_HANDLED_FIELDS = frozenset({"r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "rank_pattern",
                             "alpha_pattern", "bias", "init_lora_weights"})
# Initialisations that leave the base weights as they are (pissa, olora, corda, loftq, lora_ga rewrite
# them, and mica is a different forward), so the saved A and B mean the same as plain LoRA's.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


def import_peft_adapter(model: nn.Module, adapter_dir: str | Path) -> dict[str, LoRALinear]:
    """Load a peft LoRA adapter directory into ``model`` (which must not have LoRA yet) as LoRALinear modules.

    The adapted modules are exactly those named by the saved keys; per-module rank and alpha follow
    peft's own r / rank_pattern / lora_alpha / alpha_pattern resolution. Saved ``modules_to_save``
    weights (a classification head) are copied into the model. Returns {module name: LoRALinear}.
    """
    config, tensors = _read_adapter(Path(adapter_dir))
    _check_supported(config)
    lora, heads = _split_keys(tensors, bool(config.get("use_dora")))
    if lora_modules(model):
        raise UserError("the model already has LoRA modules; import a peft adapter into a fresh base model")
    ranks, alphas = _resolve_ranks(config, lora)
    # Everything is checked before the model is touched, so a bad adapter leaves it as it was.
    targets = _targets(model, lora, ranks)
    head_slots = _head_slots(model, heads)
    wrapped = apply_lora(model, targets, ranks, alphas, dropout=float(config.get("lora_dropout", 0.0)),
                         rslora=bool(config.get("use_rslora")), dora=bool(config.get("use_dora")))
    with torch.no_grad():
        for name, parts in lora.items():
            for attr, value in parts.items():
                getattr(wrapped[name], attr).copy_(value)
        for key, value in heads.items():
            head_slots[key].copy_(value)  # state_dict tensors share storage with the parameters
    return wrapped


def _read_adapter(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    config_path, weights_path = adapter_dir / CONFIG_FILE, adapter_dir / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise UserError(f"{path} not found: a peft adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{config_path} is not valid JSON: {error}") from None
    try:
        tensors = load_file(str(weights_path))
    except SafetensorError as error:
        raise UserError(f"{weights_path} is not a readable safetensors file: {error}") from None
    # peft.save_pretrained writes the prefix; transformers' own adapter saving does not
    return config, {key.removeprefix(PEFT_PREFIX): value for key, value in tensors.items()}


def _check_supported(config: dict[str, Any]) -> None:
    if config.get("peft_type") != "LORA":
        raise UserError(f"adapter_config.json peft_type={config.get('peft_type')!r}: only LORA adapters can be "
                        "imported")
    if config.get("bias", "none") != "none":
        raise UserError(f"adapter_config.json bias={config['bias']!r}: only bias='none' adapters can be imported")
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise UserError(f"adapter_config.json init_lora_weights={init!r} changes the base weights or the "
                        "forward pass; peftlab imports plain LoRA / DoRA adapters only")
    for key, value in config.items():
        if key in _HANDLED_FIELDS or key in _IGNORED_FIELDS or not value:
            continue
        kind = "is not supported by peftlab" if key in _UNSUPPORTED_FIELDS else "is unknown to peftlab"
        raise UserError(f"adapter_config.json field {key}={value!r} {kind}; it changes what the adapter computes")


def _split_keys(tensors: Mapping[str, Tensor], dora: bool) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """Saved tensors -> ({module: {"lora_A"|"lora_B"|"magnitude": tensor}}, {other key: tensor})."""
    lora: dict[str, dict[str, Tensor]] = {}
    heads: dict[str, Tensor] = {}
    for key, value in tensors.items():
        suffix = next((s for s in _LORA_SUFFIXES if key.endswith("." + s)), None)
        if suffix is not None:
            lora.setdefault(key[: -len(suffix) - 1], {})[_LORA_SUFFIXES[suffix]] = value
        elif "lora_" in key:
            raise UserError(f"adapter weight {key} is not a LoRA-on-linear weight peftlab can import")
        else:
            heads[key] = value
    if not lora:
        raise UserError("the adapter holds no lora_A / lora_B weights")
    needed = {"lora_A", "lora_B"} | ({"magnitude"} if dora else set())
    for name, parts in lora.items():
        if set(parts) != needed:
            raise UserError(f"adapter weights for {name} are {sorted(parts)}, expected {sorted(needed)} "
                            f"(use_dora={dora})")
    return lora, heads


def _resolve_ranks(config: Mapping[str, Any], lora: Mapping[str, Mapping[str, Tensor]]
                   ) -> tuple[dict[str, int], dict[str, float]]:
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for name, parts in lora.items():
        ranks[name] = int(_pattern_value(config.get("rank_pattern") or {}, name, config.get("r", 8)))
        alphas[name] = float(_pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8)))
        saved = parts["lora_A"].shape[0]
        if saved != ranks[name]:
            raise UserError(f"adapter_config.json gives {name} rank {ranks[name]} but its saved lora_A has rank "
                            f"{saved}")
    return ranks, alphas


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern lookup (peft/utils/other.py get_pattern_key): first key wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _targets(model: nn.Module, lora: Mapping[str, Mapping[str, Tensor]], ranks: Mapping[str, int]) -> list[Target]:
    sites = build_model_map(model, strict=False).by_name()  # peft names modules exactly: no roles needed
    modules = dict(model.named_modules())
    targets = []
    for name, parts in lora.items():
        if name not in modules:
            raise UserError(f"the adapter adapts {name}, which is not a module of this model (wrong base model?)")
        site = sites.get(name) or _unmapped_site(name, modules[name])
        r, out_features = ranks[name], site.out_features
        expected = {"lora_A": (r, site.in_features), "lora_B": (out_features, r), "magnitude": (out_features,)}
        for part, value in parts.items():
            _check_shape(value, expected[part], f"{name} {part}")
        targets.append(Target(site))
    return targets


def _unmapped_site(name: str, module: nn.Module) -> LinearSite:
    """A site for a linear the model map leaves out (e.g. BERT's pooler): peft may adapt any linear."""
    try:
        in_features, out_features = linear_features(module)
    except TypeError:
        raise UserError(f"the adapter adapts {name}, a {type(module).__name__}; peftlab LoRA wraps linear "
                        "layers only") from None
    return LinearSite(name=name, layer=None, role="head", in_features=in_features, out_features=out_features,
                      is_conv1d=isinstance(module, Conv1D))


def _check_shape(value: Tensor, expected: tuple[int, ...], label: str) -> None:
    if tuple(value.shape) != expected:
        raise UserError(f"adapter weight {label} has shape {tuple(value.shape)}, this model needs {expected} "
                        "(wrong base model?)")


def _head_slots(model: nn.Module, heads: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The model tensors that saved modules_to_save entries (a trained head) go into, by exact name."""
    state = model.state_dict()
    for key, value in heads.items():
        if key not in state:
            raise UserError(f"the adapter saves {key}, which this model does not have (wrong base model?)")
        _check_shape(value, tuple(state[key].shape), key)
    return {key: state[key] for key in heads}


# --- merged export ---------------------------------------------------------------------------


def export_merged(model: nn.Module, out_dir: str | Path, tokenizer: Any = None, *, in_place: bool = False) -> Path:
    """Save the model with every LoRA update merged in, loadable with plain ``AutoModel*.from_pretrained``.

    Works on a deep copy by default, so ``model`` keeps its (unmerged) LoRA modules at the cost of a
    second copy in memory; ``in_place=True`` merges and unloads ``model`` itself instead. This is the
    export for anything peft cannot express, such as fused-slice LoRA. A quantized base (QLoRA) is
    refused: merging would requantize it; export the adapter and merge it into the unquantized base.
    """
    quantized = sorted({kind for module in model.modules() if (kind := quantized_kind(module)) is not None})
    if quantized:
        raise UserError(f"the base model is quantized ({', '.join(quantized)}), so merged weights would be "
                        "requantized (lossy); export the adapter (export_peft_adapter), then load the base "
                        "unquantized, import_peft_adapter and export_merged there")
    # Checked before anything is touched: bottleneck adapters add layers that no base weight can absorb.
    leftovers = sorted({type(m).__name__ for m in model.modules()
                        if type(m).__module__.startswith("peftlab.") and not isinstance(m, LoRALinear)})
    if leftovers:
        raise UserError(f"the model holds {', '.join(leftovers)} modules that cannot be merged into the base "
                        "weights; only LoRA exports as merged weights")
    target = model if in_place else copy.deepcopy(model)
    unload_lora(target, merge=True)
    out = Path(out_dir)
    target.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
