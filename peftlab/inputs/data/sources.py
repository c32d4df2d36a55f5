"""Where records come from: an embedded alias, a local file or a hub dataset, read into plain rows.

Owns the file types peftlab reads (and the UTF-8 check that keeps a bad byte a one-line error),
each task's fields and their mapping onto the source's columns (``data.fields``), and which
rows lack a required value.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Any

from peftlab.config import DataConfig
from peftlab.errors import UserError
from peftlab.inputs import assets

# task -> (required fields, optional fields); data.fields maps these names to the source's columns.
TASK_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "instruction": (("instruction", "output"), ("input",)),
    "classification": (("text", "label"), ()),
    "causal_lm": (("text",), ()),
}
FILE_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


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
        conversational = (" (or, for conversations, a 'messages' or 'conversations' column)"
                          if task == "instruction" else "")
        raise UserError(f"data {cfg.source!r} lacks {wanted}{conversational}; its columns are "
                        f"{', '.join(sorted(columns))}; map them with data.fields, e.g. {{{missing[0]}: <column>}}")
    records = []
    for row in rows:
        record = {name: row.get(cfg.fields.get(name, name)) for name in required + optional}
        if all(record[name] is not None for name in required):
            records.append(record)
    return records, len(rows) - len(records)
