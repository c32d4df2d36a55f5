"""Task data: records -> a seeded train/eval split -> tokenized examples -> length-grouped batches.

A tokenized example is ``{"input_ids": list[int], "labels": list[int]}`` for instruction and
causal_lm (labels are -100 where no loss is taken, NOT shifted: the loss code shifts), or
``{"input_ids": list[int], "label": int}`` for classification. Nothing is padded here: padding
happens per batch in ``batches`` (to the longest example of the batch, never to max_length).
"""

from __future__ import annotations

import codecs
import math
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftlab.inputs import assets
from peftlab.config import SPLIT_MODES, DataConfig
from peftlab.errors import UserError

IGNORE_INDEX = -100  # label of positions that take no loss (torch cross_entropy's ignore_index)
MEGABATCH_FACTOR = 50  # length grouping sorts windows of 50 batches (as HF's group_by_length)

# The Stanford Alpaca templates, verbatim (tatsu-lab/stanford_alpaca train.py, PROMPT_DICT).
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

# task -> (required fields, optional fields); data.fields maps these names to the source's columns.
TASK_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "instruction": (("instruction", "output"), ("input",)),
    "classification": (("text", "label"), ()),
    "causal_lm": (("text",), ()),
}
FILE_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


@dataclass
class TaskData:
    train: list[dict]
    eval: list[dict]
    num_labels: int | None
    label_names: list[str] | None
    eval_prompts: list[tuple[str, str]]  # instruction: (prompt text, reference output) of eval records
    dropped: int = 0  # records left out: a missing value, or no response token fits in max_length
    # Data that trains, but maybe not as meant (a label only in eval, a class with no example, empty
    # prompts): one line each, with counts, for the run to log and put in summary.json.
    warnings: list[str] = field(default_factory=list)


def load_task_data(cfg: DataConfig, task: str, tokenizer: Any) -> TaskData:
    """Load ``cfg.source`` for ``task``, split it (``cfg.split_mode``, ``cfg.seed``) and tokenize it."""
    if task not in TASK_FIELDS:
        raise UserError(f"task={task!r} is not one of {', '.join(TASK_FIELDS)}")
    rows, class_names = load_rows(cfg)
    records, dropped = select_fields(rows, cfg, task)
    if not records:
        raise UserError(f"data {cfg.source!r}: every record lacks a value for a required field")
    if task == "causal_lm":
        data = _causal_lm(records, cfg, tokenizer)
    elif task == "classification":
        data = _classification(records, cfg, tokenizer, class_names)
    else:
        data = _instruction(records, cfg, tokenizer)
    data.dropped += dropped
    if data.dropped:
        print(f"peftlab: {data.dropped} of {len(rows)} records of {cfg.source!r} left out "
              f"(a missing value, or a prompt that fills data.max_length={cfg.max_length})", file=sys.stderr)
    return data


# --- sources ------------------------------------------------------------------------------------


def load_rows(cfg: DataConfig) -> tuple[list[dict], list[str] | None]:
    """Raw rows of an embedded alias, a local file or a hub dataset, and ClassLabel names if any."""
    if cfg.source in assets.DATA_ALIASES:
        rows, names = assets.load_data_alias(cfg.source), None
    else:
        path = Path(cfg.source).expanduser()
        dataset = _load_file(path) if _is_local(cfg.source, path) else _load_hub(cfg)
        rows, names = _dataset_rows(dataset, cfg.fields.get("label", "label"))
    if not rows:
        raise UserError(f"data source {cfg.source!r} has no records")
    return rows, names


def _is_local(source: str, path: Path) -> bool:
    if path.is_dir():
        raise UserError(f"data.source {source} is a folder; point it at a {'/'.join(FILE_TYPES)} file")
    if path.is_file():
        return True
    if path.suffix.lower() in FILE_TYPES or source.startswith(("/", "./", "../", "~")):
        raise UserError(f"data file not found: {source}")
    return False  # a hub dataset id such as tatsu-lab/alpaca


def _load_file(path: Path) -> Any:
    """A datasets.Dataset, or a list of rows for plain text."""
    kind = FILE_TYPES.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"data file {path} has an unsupported type; use one of {', '.join(FILE_TYPES)}")
    if kind != "parquet":  # a text format: datasets and pandas would fail on other bytes with a traceback
        check_utf8(path)
    if kind == "text":  # one record: causal-LM chunks then run over contiguous text
        return [{"text": path.read_text(encoding="utf-8")}]
    import datasets

    if path.stat().st_size == 0:
        raise UserError(f"data file {path} has no records")
    try:
        dataset = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as error:  # datasets raises many types for unreadable files
        if "corresponds to no data" in str(error):  # a header-only CSV, an empty JSON list
            raise UserError(f"data file {path} has no records") from error
        raise UserError(f"could not read data file {path}: {_first_line(error)}") from error
    return dataset


def check_utf8(path: Path, chunk_size: int = 1 << 20) -> None:
    """Refuse, in one line naming the line and byte, a data file that is not UTF-8 text (read in chunks)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0  # line number and file offset where the decoder's input starts
    try:
        with path.open("rb") as handle:
            while True:
                chunk = handle.read(chunk_size)
                pending = decoder.getstate()[0]  # an incomplete character carried over from the last chunk
                try:
                    decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as error:
                    data = pending + chunk
                    at = offset - len(pending) + error.start
                    line += data[: error.start].count(b"\n")
                    raise UserError(f"data file {path} is not UTF-8 text (byte 0x{data[error.start]:02x} on line "
                                    f"{line}, offset {at}); save it as UTF-8") from None
                if not chunk:
                    return
                line += chunk.count(b"\n")
                offset += len(chunk)
    except OSError as error:
        raise UserError(f"cannot read data file {path}: {error.strerror or error}") from None


def _load_hub(cfg: DataConfig) -> Any:
    import datasets

    try:
        dataset = datasets.load_dataset(cfg.source, cfg.subset, split=cfg.split)
    except Exception as error:  # offline, unknown id, unknown split or subset: all the user's to fix
        raise UserError(
            f"could not load data {cfg.source!r}: not an embedded data set ({', '.join(assets.DATA_ALIASES)}), "
            f"not a local file, and the hub could not provide it ({_first_line(error)})") from error
    return dataset


def _dataset_rows(dataset: Any, label_column: str) -> tuple[list[dict], list[str] | None]:
    """Rows as dicts, and the label column's class names when it is a datasets ClassLabel."""
    if isinstance(dataset, list):
        return dataset, None
    import datasets

    feature = dataset.features.get(label_column)
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    return dataset.to_list(), names


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def select_fields(rows: list[dict], cfg: DataConfig, task: str) -> tuple[list[dict], int]:
    """Rows -> records with our field names (read through cfg.fields); count rows missing a value."""
    required, optional = TASK_FIELDS[task]
    unknown = sorted(set(cfg.fields) - set(required) - set(optional))
    if unknown:
        raise UserError(f"data.fields: {', '.join(unknown)} is not a {task} field "
                        f"(fields: {', '.join(required + optional)})")
    columns = set().union(*(row.keys() for row in rows[:100]))
    missing = [name for name in required if cfg.fields.get(name, name) not in columns]
    if missing:
        wanted = ", ".join(f"{name} (column {cfg.fields.get(name, name)!r})" for name in missing)
        raise UserError(f"data {cfg.source!r} lacks {wanted}; its columns are {', '.join(sorted(columns))}; "
                        f"map them with data.fields, e.g. {{{missing[0]}: <column>}}")
    records = []
    for row in rows:
        record = {name: row.get(cfg.fields.get(name, name)) for name in required + optional}
        if all(record[name] is not None for name in required):
            records.append(record)
    return records, len(rows) - len(records)


# --- the seeded split ---------------------------------------------------------------------------


def eval_count(n: int, eval_size: float) -> int:
    """eval_size as a count (>= 1) or a fraction in (0, 1) of ``n``; at least one example."""
    count = int(eval_size) if eval_size >= 1 else max(1, round(eval_size * n))
    if count >= n:
        shown = int(eval_size) if float(eval_size).is_integer() else eval_size
        raise UserError(f"data.eval_size={shown} takes {count} eval examples but there are only {n} "
                        f"in all, leaving none to train on; lower it")
    return count


def split_indices(n: int, cfg: DataConfig) -> tuple[list[int], list[int]]:
    """(train, eval) indices. shuffled: one permutation seeded by cfg.seed, eval taken first.

    Taking eval first keeps the eval set fixed when train_size changes, so runs that differ only
    in how much they train on are measured on the same examples. contiguous: see contiguous_split.
    """
    if cfg.split_mode not in SPLIT_MODES:  # DataConfig checks this too; a config edited after it may not be
        raise UserError(f"data.split_mode={cfg.split_mode!r} is not one of {', '.join(SPLIT_MODES)}")
    if cfg.split_mode == "contiguous":
        return contiguous_split(n, cfg)
    n_eval = eval_count(n, cfg.eval_size)
    order = np.random.default_rng(cfg.seed).permutation(n).tolist()
    train = order[n_eval:]
    return (train[:cfg.train_size] if cfg.train_size is not None else train), order[:n_eval]


def contiguous_split(n: int, cfg: DataConfig) -> tuple[list[int], list[int]]:
    """Rows in source order: train = the first train_size, eval = the next eval_size.

    Reproduces slice splits such as alpaca train[:100] / train[100:120]. Those are whatever
    the source's first rows happen to be, so prefer shuffled for anything but a reproduction.
    """
    if cfg.train_size is None or not float(cfg.eval_size).is_integer():
        raise UserError("data.split_mode=contiguous needs data.train_size and a whole data.eval_size count")
    n_train, n_eval = cfg.train_size, int(cfg.eval_size)
    if n_train + n_eval > n:
        raise UserError(f"data.split_mode=contiguous takes data.train_size={n_train} + data.eval_size={n_eval} "
                        f"rows but there are only {n}; lower them")
    return list(range(n_train)), list(range(n_train, n_train + n_eval))


# --- instruction --------------------------------------------------------------------------------


def format_prompt(record: dict) -> str:
    """The Alpaca prompt for a record (the variant with "### Input:" only when input is non-empty)."""
    text_input = str(record.get("input") or "").strip()
    if text_input:
        return ALPACA_PROMPT.format(instruction=str(record["instruction"]).strip(), input=text_input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=str(record["instruction"]).strip())


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Prompt token ids with the tokenizer's leading special tokens (e.g. BOS) but no closing ones.

    Use this for generation too, so a prompt is tokenized exactly as in training.
    """
    prefix, _ = _special_affixes(tokenizer)
    return prefix + tokenizer(prompt, add_special_tokens=False)["input_ids"]


def encode_response(tokenizer: Any, response: str) -> list[int]:
    """Response token ids closed by EOS, so the model learns where to stop."""
    return tokenizer(str(response), add_special_tokens=False)["input_ids"] + [end_of_text_id(tokenizer)]


def end_of_text_id(tokenizer: Any) -> int:
    """EOS, or SEP for encoder tokenizers (BERT) that have no EOS."""
    token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if token_id is None:
        raise UserError("the tokenizer has no eos (or sep) token to end responses and documents with")
    return token_id


def _special_affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (BOS; BERT's [CLS] ... [SEP])."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    return [], []


def instruction_example(prompt_ids: list[int], response_ids: list[int], max_length: int,
                        response_only: bool = True) -> dict | None:
    """One training example; None when not a single response token fits in max_length.

    The prompt is kept whole (cutting it would lose "### Response:") and the response is cut at
    the end; with response_only the prompt positions carry IGNORE_INDEX labels.
    """
    room = max_length - len(prompt_ids)
    if room < 1:
        return None
    response_ids = response_ids[:room]
    prompt_labels = [IGNORE_INDEX] * len(prompt_ids) if response_only else list(prompt_ids)
    return {"input_ids": prompt_ids + response_ids, "labels": prompt_labels + response_ids}


def _instruction(records: list[dict], cfg: DataConfig, tokenizer: Any) -> TaskData:
    train_idx, eval_idx = split_indices(len(records), cfg)
    train, dropped_train = _encode_instructions([records[i] for i in train_idx], cfg, tokenizer)
    eval_pairs, dropped_eval = _encode_instructions([records[i] for i in eval_idx], cfg, tokenizer)
    return TaskData(train=[example for example, _ in train], eval=[example for example, _ in eval_pairs],
                    num_labels=None, label_names=None,
                    eval_prompts=[(format_prompt(record), str(record["output"])) for _, record in eval_pairs],
                    dropped=dropped_train + dropped_eval, warnings=_empty_text_warnings(records))


def _empty_text_warnings(records: list[dict]) -> list[str]:
    """One warning per instruction field that is empty (or blank) in some records, with the count."""
    effects = {"instruction": "their prompt is the template alone",
               "output": "their response is the end-of-text token alone"}
    warnings = []
    for name, effect in effects.items():
        empty = sum(1 for record in records if not str(record[name]).strip())
        if empty:
            warnings.append(f"{empty} of {len(records)} records have an empty {name}: {effect}")
    return warnings


def _encode_instructions(records: list[dict], cfg: DataConfig,
                         tokenizer: Any) -> tuple[list[tuple[dict, dict]], int]:
    """[(example, its record)] for the records that fit, and how many did not."""
    if not records:
        return [], 0
    # One batched call per side: tokenizers parallelise lists, item-by-item calls are ~5x slower.
    prefix, _ = _special_affixes(tokenizer)
    eos = end_of_text_id(tokenizer)
    prompts = tokenizer([format_prompt(r) for r in records], add_special_tokens=False)["input_ids"]
    responses = tokenizer([str(r["output"]) for r in records], add_special_tokens=False)["input_ids"]
    kept = []
    for record, prompt_ids, response_ids in zip(records, prompts, responses):
        example = instruction_example(prefix + prompt_ids, response_ids + [eos], cfg.max_length, cfg.response_only)
        if example is not None:
            kept.append((example, record))
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
        return [{"input_ids": ids_, "label": ids[i]} for ids_, i in zip(encoded, indices)]

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


# --- causal LM ----------------------------------------------------------------------------------


def causal_chunks(texts: list[str], tokenizer: Any, chunk_length: int) -> list[dict]:
    """Texts joined with EOS, tokenized, and cut into chunks of chunk_length (the tail is dropped)."""
    eos = end_of_text_id(tokenizer)
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream += ids + [eos]
    return [{"input_ids": stream[i:i + chunk_length], "labels": stream[i:i + chunk_length]}
            for i in range(0, len(stream) - chunk_length + 1, chunk_length)]


def _causal_lm(records: list[dict], cfg: DataConfig, tokenizer: Any) -> TaskData:
    # Split chunks, not records: each eval chunk is contiguous text, and a single-document
    # source (hamlet, a .txt file) still yields an eval set.
    chunks = causal_chunks([str(r["text"]) for r in records], tokenizer, cfg.chunk_length)
    if not chunks:
        raise UserError(f"data {cfg.source!r} has fewer tokens than data.chunk_length={cfg.chunk_length}")
    train_idx, eval_idx = split_indices(len(chunks), cfg)
    return TaskData(train=[chunks[i] for i in train_idx], eval=[chunks[i] for i in eval_idx],
                    num_labels=None, label_names=None, eval_prompts=[])


# --- batches ------------------------------------------------------------------------------------


def num_batches(n_examples: int, batch_size: int) -> int:
    return math.ceil(n_examples / batch_size)


def batch_indices(lengths: Sequence[int], batch_size: int, *, seed: int, epoch: int,
                  shuffle: bool = True) -> list[list[int]]:
    """Example indices per batch; every index appears exactly once.

    With shuffle: a permutation seeded by (seed, epoch), cut into windows of 50 batches, each
    window sorted by length (longest first) and cut into batches; then the batch order is
    shuffled. Batches hold similar lengths, so little compute goes to padding.
    """
    n = len(lengths)
    if not shuffle:
        return [list(range(start, min(start + batch_size, n))) for start in range(0, n, batch_size)]
    # (seed, epoch) as one entropy tuple: seed 1 epoch 0 must not repeat seed 0 epoch 1's order.
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n).tolist()
    window = MEGABATCH_FACTOR * batch_size
    groups: list[list[int]] = []
    for start in range(0, n, window):
        block = sorted(order[start:start + window], key=lambda i: -lengths[i])
        groups += [block[i:i + batch_size] for i in range(0, len(block), batch_size)]
    groups = [groups[k] for k in rng.permutation(len(groups)).tolist()]
    if groups:  # the longest batch first: an out-of-memory error shows at step 1, not hours in
        longest = max(range(len(groups)), key=lambda k: lengths[groups[k][0]])
        groups[0], groups[longest] = groups[longest], groups[0]
    return groups


def collate(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest example: input_ids, attention_mask [B, T]; labels [B, T] or label [B]."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        input_ids[row, :length] = torch.tensor(example["input_ids"], dtype=torch.long)
        attention_mask[row, :length] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "label" in examples[0]:
        batch["label"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)
    else:
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        for row, example in enumerate(examples):
            labels[row, :len(example["labels"])] = torch.tensor(example["labels"], dtype=torch.long)
        batch["labels"] = labels
    return batch


def batches(examples: Sequence[dict], batch_size: int, *, pad_id: int, seed: int, epoch: int,
            shuffle: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Length-grouped, dynamically padded batches (see batch_indices and collate)."""
    lengths = [len(e["input_ids"]) for e in examples]
    for indices in batch_indices(lengths, batch_size, seed=seed, epoch=epoch, shuffle=shuffle):
        yield collate([examples[i] for i in indices], pad_id)


def split_by_tokens(batch: dict[str, torch.Tensor], max_tokens: int | None) -> list[dict[str, torch.Tensor]]:
    """Cut a right-padded batch into pieces of at most ``max_tokens`` padded tokens (rows x longest).

    Rows go longest first; each piece is trimmed to its own longest row, so it also carries less
    padding. A row longer than ``max_tokens`` gets a piece of its own. Every row lands in exactly
    one piece, so summing a per-token loss over the pieces gives the batch's sum.
    """
    if max_tokens is None:  # the default: nothing to compute on the training hot path
        return [batch]
    lengths = batch["attention_mask"].sum(dim=1)
    if len(lengths) * int(lengths.max()) <= max_tokens:
        return [batch]
    order = torch.argsort(lengths, descending=True, stable=True).tolist()
    pieces, start = [], 0
    while start < len(order):
        width = int(lengths[order[start]])  # the longest row left sets this piece's width
        rows = max(1, max_tokens // width)
        chosen = torch.tensor(order[start:start + rows])
        pieces.append({key: _take(value, chosen, width) for key, value in batch.items()})
        start += rows
    return pieces


def _take(value: torch.Tensor, rows: torch.Tensor, width: int) -> torch.Tensor:
    """Rows of a batch field, trimmed to ``width`` positions when it is per-token ([B, T])."""
    picked = value.index_select(0, rows)
    return picked[:, :width].contiguous() if picked.dim() == 2 else picked
