"""Using a finished run (run/finished.py loads it): generate with it, evaluate it on other data, merge it.

Each reuses what the run itself used, so nothing is defined twice: prompts go through the run's
template (``prompt_for``: the one summary.json records, else what data.template names) and ``generate``
(run/generation.py), the run's samples' own function; evaluation is ``evaluate_on`` (run/train.py), the
loop the run's eval loss, perplexity and accuracy came from; merging is ``export_merged`` (core/export.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftlab.config import CAUSAL_TASKS, RunConfig, apply_overrides, config_to_dict, from_dict, read_utf8
from peftlab.core.export import export_merged
from peftlab.errors import UserError
from peftlab.inputs.data import EvalPrompt, encode_prompt, load_task_data, prompt_for
from peftlab.run.finished import FinishedRun, check_finished, load_finished
from peftlab.run.generation import generate as generate_greedy
from peftlab.run.precision import autocast_for
from peftlab.run.train import evaluate_on

PROMPT_FILE_TYPES = (".txt", ".jsonl")
EVAL_SPLITS = ("all", "eval")  # every example of the data, or the eval split the run's data.* settings cut


# --- generate ----------------------------------------------------------------------------------


def read_prompts(prompts: list[str], file: str | Path | None, task: str) -> list[dict[str, str]]:
    """The prompts to complete, as records: {"instruction", "input"} for instruction runs, {"text"} for causal_lm.

    ``prompts`` (--prompt) are instructions (instruction runs) or text to continue (causal_lm); ``file`` is a
    .txt file (one prompt a line, blank lines skipped) or a .jsonl file of such records.
    """
    if task not in CAUSAL_TASKS:
        raise UserError(f"generate needs a run that learned to generate (task {' or '.join(CAUSAL_TASKS)}); "
                        f"this run's task is {task}: use peftlab eval")
    key = "instruction" if task == "instruction" else "text"
    records = [{key: text} for text in prompts]
    if file is not None:
        records += _prompt_file(Path(file), key)
    if not records:
        raise UserError("no prompt given: pass --prompt TEXT (repeatable) or --file prompts.txt|prompts.jsonl")
    return records


def _prompt_file(path: Path, key: str) -> list[dict[str, str]]:
    if path.suffix.lower() not in PROMPT_FILE_TYPES:
        raise UserError(f"--file {path}: use a {' or '.join(PROMPT_FILE_TYPES)} file")
    if not path.is_file():
        raise UserError(f"prompt file not found: {path}")
    lines = [line for line in read_utf8(path, "prompt file").splitlines() if line.strip()]
    if path.suffix.lower() == ".txt":
        return [{key: line} for line in lines]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path} line {number} is not JSON: {error.msg}") from None
        if not isinstance(record, dict) or not isinstance(record.get(key), str):
            raise UserError(f"{path} line {number}: expected an object with a {key!r} string")
        records.append({k: str(v) for k, v in record.items() if k in (key, "input") and v is not None})
    return records


def generate(run: FinishedRun, records: list[dict[str, str]], max_new_tokens: int | None = None) -> list[dict]:
    """Greedy completions of ``records`` (read_prompts), each {"prompt", "generated"}, as the run made its samples."""
    config = run.config
    if config.task == "instruction":
        prompts = [prompt_for(r, run_template(run), run.tokenizer) for r in records]
    else:
        prompts = [EvalPrompt(r["text"], "", encode_prompt(run.tokenizer, r["text"])) for r in records]
    with autocast_for(run.device, config.train):  # a half base meets fp32 trained layers only under autocast
        made = generate_greedy(run.model, run.tokenizer, prompts, batch_size=config.train.batch_size,
                               max_new_tokens=max_new_tokens or config.train.max_new_tokens, device=run.device)
    return [{"prompt": g.prompt, "generated": g.generated} for g in made]


def run_template(run: FinishedRun) -> str:
    """The prompt template the run trained with: summary.json says (runs since templates came); an older
    run's data.template auto meant alpaca."""
    recorded = run.summary.data.template if run.summary.data is not None else None
    configured = run.config.data.template
    return recorded or (configured if configured != "auto" else "alpaca")


# --- eval on other data ------------------------------------------------------------------------


@dataclass
class Reevaluation:
    """A finished run evaluated on other data: what data, how many examples, and the run's own metrics."""

    run: str
    source: str
    split: str
    examples: int
    dropped: int  # records left out (a missing value, or too long for data.max_length)
    metrics: dict[str, float]  # EvalResult.as_metrics: eval_loss, eval_units, perplexity or accuracy, macro_f1

    def to_json(self) -> dict[str, Any]:
        return {"run": self.run, "source": self.source, "split": self.split, "examples": self.examples,
                "dropped": self.dropped, "metrics": self.metrics}


def eval_config(config: RunConfig, source: str, overrides: list[str], split: str) -> RunConfig:
    """The run's config with data.source replaced and ``--set data.*`` applied; split "all" takes every record."""
    if split not in EVAL_SPLITS:
        raise UserError(f"--split {split!r} is not one of {', '.join(EVAL_SPLITS)}")
    outside = [text for text in overrides if not text.strip().startswith("data.")]
    if outside:
        raise UserError(f"--set {outside[0]}: eval changes data.* keys only (the model and its training are the run's)")
    data = config_to_dict(config)
    data["data"]["source"] = source
    if split == "all":  # one eval example cut off, then train + eval is every record
        data["data"].update(split_mode="shuffled", train_size=None, eval_size=1)
    return from_dict(RunConfig, apply_overrides(data, list(overrides)))


def evaluate_run(run_dir: str | Path, source: str, overrides: list[str] = (), split: str = "all") -> Reevaluation:
    """Evaluate the finished run in ``run_dir`` on ``source`` (same task), as the run evaluated itself."""
    run_config, _, _ = check_finished(run_dir)
    config = eval_config(run_config, source, list(overrides), split)  # a mistake here costs no model load
    run = load_finished(run_dir)
    if config.task == "classification":  # label ids as the run's head knows them, whatever this data holds
        config.data.labels = run.label_names
    data = load_task_data(config.data, config.task, run.tokenizer)
    examples = data.train + data.eval if split == "all" else data.eval
    result = evaluate_on(run.model, examples, config.task, config.train, run.tokenizer.pad_token_id, run.device)
    return Reevaluation(str(run_dir), source, split, len(examples), data.dropped, result.as_metrics())


# --- merge -------------------------------------------------------------------------------------


def merge_run(run_dir: str | Path, out: str | Path) -> Path:
    """Save the finished run as a standalone transformers model (+ tokenizer) in ``out``.

    LoRA (fused-slice LoRA included) is merged into the base weights; partial and full runs are
    saved as they are. Bottleneck adapters are refused: their extra layers are no part of any
    transformers architecture, so no plain model folder can hold them.
    """
    config, _, _ = check_finished(run_dir)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not an empty folder; choose another")
    if config.method.name == "adapter":
        raise UserError(f"{run_dir} trained {config.method.adapter_variant} bottleneck adapters: layers that no "
                        "transformers architecture has, so they cannot be saved as a plain transformers model; use "
                        "the run as it is (peftlab generate / eval, or peftlab.run.finished.load_finished)")
    run = load_finished(run_dir, device="cpu", quantized=False)  # merged into unquantized weights, never requantized
    return export_merged(run.model, out, run.tokenizer, in_place=True)
