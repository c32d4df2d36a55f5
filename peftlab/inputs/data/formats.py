"""Prompt templates and encoding: what one example's token ids and labels are.

Owns the Alpaca templates and the untemplated prompt (data.template none), how a prompt and a
response are tokenized (the tokenizer's leading special tokens, EOS closing a response), the
response-only labels of an instruction example, and causal-LM chunks. The chat template's
encoding is ``templates``'; eval prompts carry the ids training used, so generation matches it.
"""

from __future__ import annotations

from typing import Any

from peftlab.errors import UserError

IGNORE_INDEX = -100  # label of positions that take no loss (torch cross_entropy's ignore_index)

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


def format_prompt(record: dict) -> str:
    """The Alpaca prompt for a record (the variant with "### Input:" only when input is non-empty)."""
    text_input = str(record.get("input") or "").strip()
    if text_input:
        return ALPACA_PROMPT.format(instruction=str(record["instruction"]).strip(), input=text_input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=str(record["instruction"]).strip())


def plain_prompt(record: dict) -> str:
    """data.template none: the instruction as it is, then the input after a blank line when there is one.

    Nothing is added between prompt and response: a separator the data wants is the data's to hold.
    """
    text_input = str(record.get("input") or "").strip()
    return str(record["instruction"]) + (f"\n\n{text_input}" if text_input else "")


PROMPTS = {"alpaca": format_prompt, "none": plain_prompt}  # data.template -> its prompt text (chat: templates)


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Prompt token ids with the tokenizer's leading special tokens (e.g. BOS) but no closing ones.

    Use this for generation too, so a prompt is tokenized exactly as in training.
    """
    prefix, _ = special_affixes(tokenizer)
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


def special_affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
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


def causal_chunks(texts: list[str], tokenizer: Any, chunk_length: int) -> list[dict]:
    """Texts joined with EOS, tokenized, and cut into chunks of chunk_length (the tail is dropped)."""
    eos = end_of_text_id(tokenizer)
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream += ids + [eos]
    return [{"input_ids": stream[i:i + chunk_length], "labels": stream[i:i + chunk_length]}
            for i in range(0, len(stream) - chunk_length + 1, chunk_length)]
