"""Sweeps: a base config plus axes (grid, named strategies, seeds) -> one trial per combination.

Long because a trial's identity is one concept: its id, its resolved config, its alias and its
reference must be derived together, or a resumed sweep could mix runs made from different configs.

Sweep file (YAML)::

    name: selective_placement            # optional; default: the file's stem
    base: {model: smollm2-135m, ...}     # an inline run config, or a path to a run config YAML
    strategies:                          # named bundles of dotted overrides (default: one, "base")
      all_linear: {method.placement: all_linear}
      attention_only: {method.placement: attention_only}
    grid: {method.ranks.r: [8, 16]}      # optional: every combination of these values
    seeds: [42, 43, 44]                  # sets train.seed (default: the base config's seed)
    baseline: all_linear                 # relative changes are against it (default: the first strategy)

Each trial gets a stable id (strategy, grid values, seed and a short hash of everything that makes its
config in the sweep file: base, strategy overrides, grid values, seed) and lives in ``DIR/runs/<id>/``;
editing the sweep file gives the changed trials new ids, so a resumed sweep never mixes old and new
runs. ``DIR/sweep.json`` lists the trials of the current sweep file: the report covers those and no
other folder under ``DIR/runs``.
Two strategies whose resolved configs are identical are trained once: the later one is an alias of the
earlier (``alias_of``) and is reported under both names. Every sweep also evaluates the untrained base
model once (a reference trial, ``base_model__<hash>``) on the same eval set: the step-0 row of the report,
and the yardstick for a collapsed run. ``--set`` overrides apply to every trial, after the strategy and grid.
Relative paths (``base``, ``model``, ``data.source``, ``method.ranks.file``) are read relative to the
sweep file when such a file exists there, else relative to the current folder, and stored absolute.

Resume rules (what a trial folder holds, what still runs): ``peftlab.study.resume``.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.config import (
    METHOD_FIELDS,
    RunConfig,
    TrainConfig,
    apply_overrides,
    config_to_dict,
    data_identity,
    did_you_mean,
    from_dict,
    load_yaml,
    result_keys,
    unused_field_message,
    unused_method_fields,
)
from peftlab.diskio import write_atomic
from peftlab.errors import UserError
from peftlab.study.stats import group_label

SWEEP_KEYS = ("name", "description", "base", "strategies", "grid", "seeds", "baseline")
DONE_STATUSES = ("completed", "diverged", "collapsed")  # results: rerunning would end the same way
SWEEP_FILE = "sweep.json"  # DIR/sweep.json: the resolved sweep, read back by `peftlab report`
PATH_KEYS = ("model", "data.source", "method.ranks.file")


@dataclass
class SweepSpec:
    name: str
    base: dict[str, Any]  # raw run config (validated per trial)
    strategies: dict[str, dict[str, Any]]  # name -> flat {dotted.key: value}
    grid: dict[str, list[Any]]
    seeds: list[int]
    baseline: str
    overrides: list[str] = field(default_factory=list)  # --set key=value, for every trial
    directory: Path = Path(".")  # the sweep file's folder: relative paths are read from here

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "base": self.base, "strategies": self.strategies, "grid": self.grid,
                "seeds": self.seeds, "baseline": self.baseline, "overrides": self.overrides}


REFERENCE = "base_model"  # the strategy name of the untrained base model's evaluation


@dataclass
class Trial:
    run_id: str
    strategy: str
    strategy_index: int  # position in the sweep file: reports keep this order
    grid: dict[str, Any]  # this trial's grid values
    seed: int
    config: RunConfig
    out_dir: Path
    alias_of: str | None = None  # run id of an earlier trial with an identical config: trained once
    reference: str | None = None  # run id of the base-model evaluation on this trial's eval set
    sweep: str = ""  # the sweep's name: the group its runs are reported under (train.report_to)

    @property
    def is_reference(self) -> bool:
        return self.strategy == REFERENCE

    def info(self) -> dict[str, Any]:
        """What the report needs to group this trial, stored beside its results and in sweep.json."""
        return {"run_id": self.run_id, "strategy": self.strategy, "strategy_index": self.strategy_index,
                "grid": self.grid, "seed": self.seed, "alias_of": self.alias_of, "reference": self.reference}


# --- loading -----------------------------------------------------------------------------------


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SweepSpec:
    """Read and check a sweep file; every trial's config is validated by ``expand``."""
    path = Path(path)
    raw = load_yaml(path)
    return parse_sweep(raw, name=path.stem, directory=path.parent, overrides=list(overrides))


def parse_sweep(raw: dict[str, Any], *, name: str = "sweep", directory: Path = Path("."),
                overrides: list[str] | None = None) -> SweepSpec:
    for key in raw:
        if key not in SWEEP_KEYS:
            hint = did_you_mean(key, SWEEP_KEYS, quote=False) or f" (valid: {', '.join(SWEEP_KEYS)})"
            raise UserError(f"unknown sweep key {key}{hint}")
    overrides = list(overrides or [])
    if any(text.split("=", 1)[0].strip() == "train.seed" for text in overrides):
        raise UserError("--set train.seed would give every seed the same run; list seeds under seeds: instead")
    base = _load_base(raw.get("base"), directory)
    strategies = _parse_strategies(raw.get("strategies"))
    grid = _parse_grid(raw.get("grid"))
    for strategy, bundle in strategies.items():
        clash = sorted(set(bundle) & set(grid))
        if clash:
            raise UserError(f"strategy {strategy} sets {clash[0]}, which the grid also sweeps; set it in one place")
    seeds = _parse_seeds(raw.get("seeds"), base)
    baseline = raw.get("baseline", next(iter(strategies)))
    if baseline not in strategies:
        raise UserError(_choice(f"baseline {baseline!r} is not a strategy", str(baseline), list(strategies)))
    return SweepSpec(name=safe_name(str(raw.get("name") or name), "sweep name"), base=base, strategies=strategies,
                     grid=grid,
                     seeds=seeds, baseline=baseline, overrides=overrides, directory=directory)


def safe_name(name: str, what: str) -> str:
    """A name that becomes a folder: letters, digits and _ . + -, never '.' or '..' (it must stay inside its parent)."""
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name) or set(name) == {"."}:
        raise UserError(f"{what} {name!r}: use letters, digits and _ . + - only, not only dots (it names a folder)")
    return name


def portable_base(base: Any, directory: Path) -> dict[str, Any]:
    """A sweep file's ``base`` (a mapping or a path to a run config) as a mapping whose relative paths are
    made absolute against ``directory``, the sweep file's folder: what a copy of the sweep written
    elsewhere needs (bench/sweep_wall.py writes one cut to some strategies)."""
    loaded = _load_base(base, directory)
    _resolve_paths(loaded, directory.resolve())
    return loaded


def _load_base(base: Any, directory: Path) -> dict[str, Any]:
    if base is None:
        return {}
    if isinstance(base, str):
        candidate = directory / base
        return load_yaml(candidate if candidate.is_file() else base)
    if not isinstance(base, dict):
        raise UserError("sweep base: must be a run config mapping or a path to a run config YAML")
    return base


def _parse_strategies(strategies: Any) -> dict[str, dict[str, Any]]:
    if strategies is None:
        return {"base": {}}
    if not isinstance(strategies, dict) or not strategies:
        raise UserError("sweep strategies: must map each strategy name to its overrides, e.g. "
                        "{attention_only: {method.placement: attention_only}}")
    parsed = {}
    for name, bundle in strategies.items():
        safe_name(str(name), "strategy name")
        if str(name) == REFERENCE:
            raise UserError(f"strategy name {REFERENCE!r} is reserved for the untrained base model's row; rename it")
        if bundle is not None and not isinstance(bundle, dict):
            raise UserError(f"strategy {name}: overrides must be a mapping of dotted keys to values")
        parsed[str(name)] = flatten(bundle or {})
    return parsed


def _parse_grid(grid: Any) -> dict[str, list[Any]]:
    if grid is None:
        return {}
    if not isinstance(grid, dict):
        raise UserError("sweep grid: must map dotted keys to lists of values, e.g. {method.ranks.r: [8, 16]}")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"sweep grid {key}: must be a non-empty list of values")
    return {str(k): list(v) for k, v in grid.items()}


def _parse_seeds(seeds: Any, base: dict[str, Any]) -> list[int]:
    if seeds is None:
        return [int((base.get("train") or {}).get("seed", 42))]
    whole = isinstance(seeds, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    if not seeds or not whole:
        raise UserError("sweep seeds: must be a non-empty list of whole numbers, e.g. [42, 43, 44]")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"sweep seeds: {seeds} lists a seed twice")
    return seeds


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"method": {"ranks": {"r": 8}}} -> {"method.ranks.r": 8}; dotted keys pass through."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and dotted != "data.fields":
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"{dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = copy.deepcopy(value)


def _choice(message: str, value: str, choices: list[str]) -> str:
    return message + (did_you_mean(value, choices) or f" (strategies: {', '.join(choices)})")


# --- expansion and ids -------------------------------------------------------------------------


def expand(spec: SweepSpec, out: str | Path) -> list[Trial]:
    """The reference trials, then every (strategy, grid combination, seed) in file order.

    Configs are validated here, before any run. A trial whose resolved config equals an earlier
    trial's becomes its alias (trained once, reported under both names).
    """
    out = Path(out).absolute()  # Ray workers may start in another folder
    keys = list(spec.grid)
    trials: list[Trial] = []
    by_config: dict[str, str] = {}
    for index, (strategy, bundle) in enumerate(spec.strategies.items()):
        for combination in itertools.product(*(spec.grid[k] for k in keys)):
            grid_values = dict(zip(keys, combination, strict=True))
            for seed in spec.seeds:
                # --set is left out of the id: a resume with other --set values is refused by plan()
                # where runs are reported (train.report_to) is left out too: adding a tracker keeps the ids
                run_id = trial_id(strategy, grid_values, seed, {"strategy": bundle, "base": result_keys(spec.base)})
                config = _trial_config(spec, strategy, bundle, grid_values, seed)
                alias_of = by_config.setdefault(fingerprint(config), run_id)
                trials.append(Trial(run_id, strategy, index, grid_values, seed, config, out / "runs" / run_id,
                                    alias_of=None if alias_of == run_id else alias_of, sweep=spec.name))
    _check_method_fields(spec, trials)
    return _reference_trials(trials, out) + trials


def _check_method_fields(spec: SweepSpec, trials: list[Trial]) -> None:
    """A method field a trial's method does not read is refused, except when it comes from the base
    and some other strategy reads it: the base holds what several strategies share (lora's placement
    beside a full fine-tuning strategy), while a strategy, grid or --set key is meant for its trials."""
    read_somewhere = {name for trial in trials for name in METHOD_FIELDS[trial.config.method.name]}
    explicit_keys = set(spec.grid) | {text.split("=", 1)[0].strip() for text in spec.overrides}
    for trial in trials:
        keys = explicit_keys | set(spec.strategies[trial.strategy])
        for name in unused_method_fields(trial.config.method):
            explicit = any(key == f"method.{name}" or key.startswith(f"method.{name}.") for key in keys)
            if explicit or name not in read_somewhere:
                raise UserError(unused_field_message(trial.config.method, name, where=f"strategy {trial.strategy}: "))


def fingerprint(config: RunConfig) -> str:
    """The config as it will train: a rank schedule that gives every module one rank r counts as uniform r.

    So ``budget`` that resolves to r=16 and ``uniform`` r=16 on the same placement are one config
    (seed 000's attention_only and attention_only_budget were trained twice and flagged differently).
    """
    data = config_to_dict(config)
    rank = _single_rank(config)
    if rank is not None:
        data["method"]["ranks"] = {"uniform": rank}
    return json.dumps(data, sort_keys=True, default=str)


_RESOLVED: dict[str, int | None] = {}  # budget schedules resolved once per (model, task, method)


def _single_rank(config: RunConfig) -> int | None:
    ranks = config.method.ranks
    if config.method.name != "lora":
        return None
    if ranks.schedule == "uniform":
        return ranks.r
    if ranks.schedule != "budget":
        return None
    key = json.dumps([config.model, config.task, config_to_dict(config.method)], sort_keys=True, default=str)
    if key not in _RESOLVED:
        _RESOLVED[key] = _resolve_budget(config)
    return _RESOLVED[key]


def _resolve_budget(config: RunConfig) -> int | None:
    """The one rank a budget schedule gives (placement on the meta device, no weights); None if unknown."""
    from peftlab.run.inspection import inspect_placement  # torch and transformers: only for budget schedules

    try:
        ranks = set(inspect_placement(config.model, config.method, task=config.task).prepared.ranks.values())
    except (UserError, OSError, ValueError):
        return None  # the run itself reports the problem
    return ranks.pop() if len(ranks) == 1 else None


def _reference_trials(trials: list[Trial], out: Path) -> list[Trial]:
    """One untrained base-model evaluation per distinct (model, task, data); each trial points at its own.

    Its config keeps only what the evaluation depends on (model, task, data, and the first trial's
    seed, batch size, precision and device: the seed draws a new classification head the way that
    seed's runs draw theirs), so editing a strategy leaves the reference as it is.
    """
    references: dict[str, Trial] = {}
    for trial in trials:
        key = json.dumps({"model": trial.config.model, "task": trial.config.task,
                          # keys added later leave out their neutral defaults: the committed studies keep their ids
                          "data": data_identity(trial.config.data)}, sort_keys=True, default=str)
        if key not in references:
            run_id = f"{REFERENCE}__{hashlib.sha256(key.encode()).hexdigest()[:8]}"
            references[key] = Trial(run_id, REFERENCE, -1, {}, trial.seed, reference_config(trial.config),
                                    out / "runs" / run_id, sweep=trial.sweep)
        trial.reference = references[key].run_id
    return list(references.values())


def reference_config(config: RunConfig) -> RunConfig:
    """The part of a run's config that its untrained base model's evaluation depends on."""
    train = TrainConfig(seed=config.train.seed, batch_size=config.train.batch_size,
                        precision=config.train.precision, device=config.train.device,
                        base_dtype=config.train.base_dtype, report_to=list(config.train.report_to))
    return RunConfig(model=config.model, task=config.task, data=config.data, train=train)


def _trial_config(spec: SweepSpec, strategy: str, bundle: dict[str, Any], grid_values: dict[str, Any],
                  seed: int) -> RunConfig:
    data = copy.deepcopy(spec.base)
    for key, value in {**bundle, **grid_values, "train.seed": seed}.items():
        set_dotted(data, key, value)
    apply_overrides(data, spec.overrides)
    _resolve_paths(data, spec.directory)
    try:
        return from_dict(RunConfig, data)
    except UserError as error:
        raise UserError(f"strategy {group_label(strategy, grid_values)}: {error}") from None


def _resolve_paths(data: dict[str, Any], directory: Path) -> None:
    """Relative paths that exist beside the sweep file, else in the current folder, become absolute.

    Absolute, because Ray workers need not share the driver's folder; aliases and hub ids stay as written.
    """
    for dotted in PATH_KEYS:
        node: Any = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        value = node.get(parts[-1]) if isinstance(node, dict) else None
        if not isinstance(value, str) or not value or os.path.isabs(value):
            continue
        for candidate in (directory / value, Path(value)):
            if candidate.exists():
                node[parts[-1]] = str(candidate.resolve())
                break


def trial_id(strategy: str, grid_values: dict[str, Any], seed: int, bundle: dict[str, Any]) -> str:
    """Readable and stable: ``<strategy>[__<key>-<value>...]__seed<N>__<hash8>``.

    The hash covers ``bundle`` (what the sweep file says: the strategy's overrides and the base config),
    the grid values and the seed (sha256 of sorted JSON, never Python's salted hash), so editing
    any of them gives the trials new ids, while a moved checkout keeps them.
    """
    parts = [strategy] + [f"{key.rsplit('.', 1)[-1]}-{_slug(value)}" for key, value in grid_values.items()]
    parts.append(f"seed{seed}")
    payload = json.dumps({"strategy": strategy, "overrides": bundle, "grid": grid_values, "seed": seed},
                         sort_keys=True, default=str)
    digest = hashlib.sha256(payload.encode()).hexdigest()[:8]
    return "__".join(parts + [digest])


def _slug(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_")[:40] or "x"


def write_json_atomic(path: Path, payload: Any) -> None:
    """Temp file + os.replace: a reader (or a kill) never sees half a file."""
    write_atomic(path, json.dumps(payload, indent=2, default=str))


def write_sweep_file(spec: SweepSpec, trials: list[Trial], out: Path) -> None:
    """The resolved sweep and its trial list: what ``peftlab report`` covers, and nothing else."""
    write_json_atomic(out / SWEEP_FILE, {**spec.as_json(), "trials": [t.info() for t in trials]})
