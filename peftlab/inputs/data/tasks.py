"""Task data: records -> a seeded split -> tokenized examples, one builder per task.

Owns ``TaskData`` and ``load_task_data``, and what each task makes of its records: instruction
examples (alpaca, none or chat template; labels on the response or on every assistant turn),
classification label ids (with the warnings a label layout earns), causal-LM chunks split by
chunk rather than by record.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from peftlab.config import DataConfig
from peftlab.errors import UserError
from peftlab.inputs.data.conversations import (
    Conversation,
    as_conversation,
    as_exchange,
    detect_format,
    read_conversations,
)
from peftlab.inputs.data.formats import (
    PROMPTS,
    causal_chunks,
    encode_prompt,
    end_of_text_id,
    instruction_example,
    special_affixes,
)
from peftlab.inputs.data.sources import TASK_FIELDS, load_rows, select_fields
from peftlab.inputs.data.split import split_indices
from peftlab.inputs.data.templates import choose_template, encode_chat

_log = logging.getLogger(__name__)  # under "peftlab": the CLI or the run decides where it goes (peftlab.messages)


@dataclass(frozen=True)
class EvalPrompt:
    """An eval record's prompt for a generated sample: its text, the ids training gave it, the reference answer."""

    prompt: str  # the template's text (chat: the conversation up to its last assistant turn, generation prompt on)
    reference: str
    prompt_ids: list[int]  # the example's own prompt ids, so generation starts where training's response did


@dataclass
class TaskData:
    train: list[dict]
    eval: list[dict]
    num_labels: int | None
    label_names: list[str] | None
    eval_prompts: list[EvalPrompt]  # instruction: one per eval example, same template as training
    template: str | None = None  # instruction: the template data.template resolved to (alpaca | chat | none)
    dropped: int = 0  # records left out: a missing value, or no response token fits in max_length
    # Data that trains, but maybe not as meant (a label only in eval, a class with no example, empty
    # prompts): one line each, with counts, for the run to log and put in summary.json.
    warnings: list[str] = field(default_factory=list)


def load_task_data(cfg: DataConfig, task: str, tokenizer: Any) -> TaskData:
    """Load ``cfg.source`` for ``task``, split it (``cfg.split_mode``, ``cfg.seed``) and tokenize it."""
    if task not in TASK_FIELDS:
        raise UserError(f"task={task!r} is not one of {', '.join(TASK_FIELDS)}")
    rows, class_names = load_rows(cfg)
    if task == "instruction":
        data = _instruction(rows, cfg, tokenizer)
    else:
        records, dropped = _required_fields(rows, cfg, task)
        data = (_causal_lm(records, cfg, tokenizer) if task == "causal_lm"
                else _classification(records, cfg, tokenizer, class_names))
        data.dropped += dropped
    if data.dropped:
        _log.info("%d of %d records of %r left out (a missing value, or a prompt that fills data.max_length=%s)",
                  data.dropped, len(rows), cfg.source, cfg.max_length)
    _check_both_sides(data, len(rows), cfg)
    return data


def _check_both_sides(data: TaskData, n_rows: int, cfg: DataConfig) -> None:
    """Refuse data that left nothing to train on or to evaluate: the loop would wait forever for a batch."""
    for side, examples in (("training", data.train), ("eval", data.eval)):
        if not examples:
            raise UserError(f"data {cfg.source!r}: no {side} example is left ({data.dropped} of {n_rows} records "
                            f"left out: a missing value, or a prompt that fills data.max_length={cfg.max_length}); "
                            f"raise data.max_length or check the data")


def _required_fields(rows: list[dict], cfg: DataConfig, task: str) -> tuple[list[dict], int]:
    records, dropped = select_fields(rows, cfg, task)
    if not records:
        raise UserError(f"data {cfg.source!r}: every record lacks a value for a required field")
    return records, dropped


# --- instruction --------------------------------------------------------------------------------

Item = dict | Conversation  # an alpaca record (alpaca and none templates) or a conversation (chat)


def _instruction(rows: list[dict], cfg: DataConfig, tokenizer: Any) -> TaskData:
    fmt = detect_format(rows, cfg)
    template, why = choose_template(cfg, fmt, tokenizer)
    _log.info("instruction data: %s format, %s template: %s", fmt, template, why)
    dropped = 0
    if fmt == "alpaca":
        records, dropped = _required_fields(rows, cfg, "instruction")
        items: list[Item] = ([as_conversation(r, n) for n, r in enumerate(records, start=1)]
                             if template == "chat" else records)
    else:
        conversations = read_conversations(rows, fmt, cfg)
        items = conversations if template == "chat" else [as_exchange(c, template) for c in conversations]
    train_idx, eval_idx = split_indices(len(items), cfg)
    train, dropped_train = _encode(template, [items[i] for i in train_idx], cfg, tokenizer)
    evals, dropped_eval = _encode(template, [items[i] for i in eval_idx], cfg, tokenizer)
    return TaskData(train=[example for example, _ in train], eval=[example for example, _ in evals],
                    num_labels=None, label_names=None, eval_prompts=[prompt for _, prompt in evals],
                    dropped=dropped + dropped_train + dropped_eval, warnings=_empty_text_warnings(items),
                    template=template)


def prompt_for(record: dict, template: str, tokenizer: Any) -> EvalPrompt:
    """A new instruction record's prompt (instruction, optional input) as a run with ``template`` encodes its
    eval prompts: what ``peftlab generate`` feeds a finished run. No reference answer."""
    if template == "chat":
        user_turn = as_conversation({**record, "output": ""}, 1).as_messages()[:1]
        text = tokenizer.apply_chat_template(user_turn, tokenize=False, add_generation_prompt=True)
        return EvalPrompt(text, "", tokenizer(text, add_special_tokens=False)["input_ids"])
    text = PROMPTS[template](record)
    return EvalPrompt(text, "", encode_prompt(tokenizer, text))


def _empty_text_warnings(items: list[Item]) -> list[str]:
    """One warning per instruction field (or for assistant turns) that is empty in some records, with the count."""
    if items and isinstance(items[0], Conversation):
        empty = sum(1 for c in items if any(t.role == "assistant" and not t.content.strip() for t in c.turns))
        return [f"{empty} of {len(items)} conversations have an empty assistant turn: its loss is on the "
                f"template's end-of-turn tokens alone"] if empty else []
    effects = {"instruction": "their prompt is the template alone",
               "output": "their response is the end-of-text token alone"}
    warnings = []
    for name, effect in effects.items():
        empty = sum(1 for record in items if not str(record[name]).strip())
        if empty:
            warnings.append(f"{empty} of {len(items)} records have an empty {name}: {effect}")
    return warnings


def _encode(template: str, items: list[Item], cfg: DataConfig,
            tokenizer: Any) -> tuple[list[tuple[dict, EvalPrompt]], int]:
    """[(example, its eval prompt)] for the items that fit in max_length, and how many did not."""
    if template == "chat":
        kept = []
        for conversation in items:
            encoded = encode_chat(conversation, tokenizer, cfg.max_length, cfg.response_only)
            if encoded.example is not None:
                kept.append((encoded.example, EvalPrompt(encoded.prompt, encoded.reference, encoded.prompt_ids)))
        return kept, len(items) - len(kept)
    return _encode_exchanges(items, PROMPTS[template], cfg, tokenizer)


def _encode_exchanges(records: list[dict], prompt_of: Any, cfg: DataConfig,
                      tokenizer: Any) -> tuple[list[tuple[dict, EvalPrompt]], int]:
    """Prompt (``prompt_of(record)`` after the tokenizer's leading specials), then response and EOS."""
    if not records:
        return [], 0
    # One batched call per side: tokenizers parallelise lists, item-by-item calls are ~5x slower.
    prefix, _ = special_affixes(tokenizer)
    eos = end_of_text_id(tokenizer)
    texts = [prompt_of(r) for r in records]
    prompts = tokenizer(texts, add_special_tokens=False)["input_ids"]
    responses = tokenizer([str(r["output"]) for r in records], add_special_tokens=False)["input_ids"]
    kept = []
    for record, text, prompt_ids, response_ids in zip(records, texts, prompts, responses, strict=True):
        example = instruction_example(prefix + prompt_ids, response_ids + [eos], cfg.max_length, cfg.response_only)
        if example is not None:
            kept.append((example, EvalPrompt(text, str(record["output"]), prefix + prompt_ids)))
    return kept, len(records) - len(kept)


# --- classification -----------------------------------------------------------------------------


def label_mapping(values: Sequence[Any], configured: list[str] | None,
                  class_names: list[str] | None = None) -> tuple[list[str], list[int]]:
    """(label names in id order, each value's id). Names map by cfg.labels order, else sorted;
    integer labels are kept as ids."""
    values = [int(v) if isinstance(v, float) and v.is_integer() else v for v in values]
    if all(isinstance(v, (int, np.integer)) for v in values):
        ids = [int(v) for v in values]
        names = list(configured or class_names or [str(i) for i in range(max(ids) + 1)])
        if min(ids) < 0 or max(ids) >= len(names):
            raise UserError(f"integer labels must lie in 0..{len(names) - 1} (one per name), "
                            f"found {min(ids)}..{max(ids)}")
        return names, ids
    if not all(isinstance(v, str) for v in values):
        kinds = sorted({type(v).__name__ for v in values})
        raise UserError(f"labels must be all names or all integers, found {', '.join(kinds)}")
    names = list(configured) if configured else sorted(set(values))
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise UserError(f"label {unknown[0]!r} is not in data.labels ({', '.join(names)})")
    index = {name: i for i, name in enumerate(names)}
    return names, [index[v] for v in values]


def _classification(records: list[dict], cfg: DataConfig, tokenizer: Any,
                    class_names: list[str] | None) -> TaskData:
    # Map labels over all records before splitting, so train and eval share one id order.
    names, ids = label_mapping([r["label"] for r in records], cfg.labels, class_names)
    train_idx, eval_idx = split_indices(len(records), cfg)
    _check_train_classes(names, [ids[i] for i in train_idx], cfg.split_mode)
    inferred = not cfg.labels and not class_names and all(name == str(i) for i, name in enumerate(names))

    def encode(indices: list[int]) -> list[dict]:
        texts = [str(records[i]["text"]) for i in indices]
        encoded = tokenizer(texts, truncation=True, max_length=cfg.max_length)["input_ids"]
        return [{"input_ids": ids_, "label": ids[i]} for ids_, i in zip(encoded, indices, strict=True)]

    warnings = _label_warnings(names, ids, [ids[i] for i in train_idx], [ids[i] for i in eval_idx], inferred)
    return TaskData(train=encode(train_idx), eval=encode(eval_idx), num_labels=len(names),
                    label_names=names, eval_prompts=[], warnings=warnings)


def _check_train_classes(names: list[str], train_ids: list[int], split_mode: str) -> None:
    """A classifier trained on one class learns a constant: refuse it."""
    seen = sorted(set(train_ids))
    if len(seen) == 1:  # none at all is the split's to refuse
        hint = " (a contiguous split trains on the first rows only)" if split_mode == "contiguous" else ""
        raise UserError(f"classification needs at least two classes in the training data, but all "
                        f"{len(train_ids)} training examples are {names[seen[0]]!r}{hint}")


def _label_warnings(names: list[str], ids: list[int], train_ids: list[int], eval_ids: list[int],
                    inferred: bool) -> list[str]:
    """Classes without any example, and eval labels the model never sees in training, with counts."""
    warnings = []
    present, trained = set(ids), set(train_ids)
    absent = [names[i] for i in range(len(names)) if i not in present]
    if absent:
        why = (f"integer labels are class ids, so labels up to {len(names) - 1} make {len(names)} classes; "
               "renumber them 0..K-1" if inferred else "the classifier still has an output for each")
        warnings.append(f"{len(absent)} of {len(names)} classes have no example ({_shown(absent)}): {why}")
    unseen = Counter(names[i] for i in eval_ids if i not in trained)
    if unseen:
        counts = ", ".join(f"{name!r}: {count}" for name, count in unseen.most_common())
        warnings.append(f"{sum(unseen.values())} of {len(eval_ids)} eval examples have a label that no training "
                        f"example has ({counts}): the model cannot learn to predict it")
    return warnings


def _shown(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _causal_lm(records: list[dict], cfg: DataConfig, tokenizer: Any) -> TaskData:
    # Split chunks, not records: each eval chunk is contiguous text, and a single-document
    # source (hamlet, a .txt file) still yields an eval set.
    chunks = causal_chunks([str(r["text"]) for r in records], tokenizer, cfg.chunk_length)
    if not chunks:
        raise UserError(f"data {cfg.source!r} has fewer tokens than data.chunk_length={cfg.chunk_length}")
    train_idx, eval_idx = split_indices(len(chunks), cfg)
    return TaskData(train=[chunks[i] for i in train_idx], eval=[chunks[i] for i in eval_idx],
                    num_labels=None, label_names=None, eval_prompts=[])
