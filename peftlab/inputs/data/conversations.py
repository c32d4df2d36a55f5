"""Instruction data formats: how records are laid out, and reading them into checked turns.

Owns ``data.format``: alpaca records (instruction / input / output), conversational ``messages``
(a list of {role, content}, as TRL reads them) and ShareGPT ``conversations`` (a list of
{from, value}, from in human / gpt / system), the detection of the format from the first record's
keys, and the checks that make a malformed conversation one line naming its record. Records are
counted from 1, as the lines of a JSONL file are. Which template renders the turns is
``templates``' concern; this module only says what the turns are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peftlab.config import DataConfig, did_you_mean
from peftlab.errors import UserError

ROLES = ("system", "user", "assistant")  # the roles chat templates know (TRL's conversational format)
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
# format -> (the column holding a conversation, a turn's role key, its text key)
CONVERSATION_KEYS = {"messages": ("messages", "role", "content"), "sharegpt": ("conversations", "from", "value")}


@dataclass(frozen=True)
class Turn:
    role: str  # system | user | assistant (ShareGPT's names already mapped)
    content: str


@dataclass(frozen=True)
class Conversation:
    number: int  # the record's place in the source, from 1: what an error about it names
    turns: tuple[Turn, ...]

    def as_messages(self) -> list[dict[str, str]]:
        """The turns as chat templates take them: [{"role": ..., "content": ...}]."""
        return [{"role": turn.role, "content": turn.content} for turn in self.turns]


def detect_format(rows: list[dict], cfg: DataConfig) -> str:
    """``cfg.format``, or when it is auto the format the first record's keys show (alpaca | messages | sharegpt).

    A record with neither conversational column is read as alpaca: its missing alpaca columns are
    then refused by ``sources.select_fields``, whose line names the columns found and data.fields.
    """
    if cfg.format != "auto":
        return cfg.format
    for name, (column, _, _) in CONVERSATION_KEYS.items():
        if column in rows[0]:
            return name
    return "alpaca"


def read_conversations(rows: list[dict], fmt: str, cfg: DataConfig) -> list[Conversation]:
    """Every row's conversation, checked; a malformed one is a UserError naming its record."""
    column, role_key, text_key = CONVERSATION_KEYS[fmt]
    if cfg.fields:
        raise UserError(f"data.fields maps alpaca columns, but data {cfg.source!r} is {fmt} data (turns in column "
                        f"{column!r}); remove data.fields")
    if column not in rows[0]:
        raise UserError(f"data {cfg.source!r} is read as {fmt} (data.format) but its first record has no "
                        f"{column!r} column; its keys are {', '.join(sorted(map(str, rows[0])))}")
    return [Conversation(number, _turns(row.get(column), number, fmt, role_key, text_key))
            for number, row in enumerate(rows, start=1)]


def _turns(value: Any, number: int, fmt: str, role_key: str, text_key: str) -> tuple[Turn, ...]:
    where = f"record {number}"
    if not isinstance(value, list) or not value:
        what = "is empty" if value in (None, []) else f"is a {type(value).__name__}, not a list of turns"
        raise UserError(f"{where}: the conversation {what}")
    turns = tuple(_turn(item, f"{where}, turn {index}", fmt, role_key, text_key)
                  for index, item in enumerate(value, start=1))
    if not any(turn.role == "assistant" for turn in turns):
        raise UserError(f"{where}: the conversation has no assistant turn, so nothing in it would be learned "
                        f"(roles: {', '.join(turn.role for turn in turns)})")
    return turns


def _turn(item: Any, where: str, fmt: str, role_key: str, text_key: str) -> Turn:
    if not isinstance(item, dict):
        raise UserError(f"{where} is a {type(item).__name__}, not a {{{role_key}, {text_key}}} mapping")
    # datasets gives every turn the union of all turns' keys, a missing one as None: None is missing too
    for key in (role_key, text_key):
        if item.get(key) is None:
            raise UserError(f"{where} has no {key!r} (a {fmt} turn is {{{role_key}, {text_key}}})")
    role, content = item[role_key], item[text_key]
    known = SHAREGPT_ROLES if fmt == "sharegpt" else {role: role for role in ROLES}
    if role not in known:
        raise UserError(f"{where}: unknown {role_key} {role!r}{did_you_mean(role, list(known))} "
                        f"({fmt} {role_key} values: {', '.join(known)})")
    if not isinstance(content, str):
        raise UserError(f"{where}: {text_key} must be text, got {type(content).__name__} {content!r}")
    return Turn(known[role], content)


def as_exchange(conversation: Conversation, template: str) -> dict[str, str]:
    """A one-exchange conversation (one user turn, then one assistant turn) as an alpaca record.

    The alpaca and none templates have one prompt and one response, so a longer conversation (or a
    system turn) has no faithful rendering under them: refused, naming the record.
    """
    roles = [turn.role for turn in conversation.turns]
    if roles != ["user", "assistant"]:
        raise UserError(f"record {conversation.number}: data.template={template} takes one user turn then one "
                        f"assistant turn, but this conversation is {' -> '.join(roles)}; use data.template: chat "
                        f"with a model whose tokenizer has a chat template")
    user, assistant = conversation.turns
    return {"instruction": user.content, "input": "", "output": assistant.content}


def as_conversation(record: dict, number: int) -> Conversation:
    """An alpaca record as one user turn (the instruction, then the input after a blank line) and one answer."""
    text_input = str(record.get("input") or "").strip()
    user = str(record["instruction"]).strip() + (f"\n\n{text_input}" if text_input else "")
    return Conversation(number, (Turn("user", user), Turn("assistant", str(record["output"]))))
