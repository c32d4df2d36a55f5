"""Which template renders instruction data, and how a chat template's rendering becomes ids and labels.

Owns ``data.template``: what auto resolves to (and the sentence saying why, for the run's log) and
the chat-template encoding of a conversation, with labels on every assistant turn and -100
elsewhere. The Alpaca template's text and the prompt/response encoding the alpaca and none
templates share live in ``formats``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peftlab.config import DataConfig
from peftlab.errors import UserError
from peftlab.inputs.data.conversations import Conversation
from peftlab.inputs.data.formats import IGNORE_INDEX


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def choose_template(cfg: DataConfig, fmt: str, tokenizer: Any) -> tuple[str, str]:
    """(alpaca | chat | none, why): ``cfg.template`` resolved for data of format ``fmt``.

    auto is chat only when both the data is conversational and the tokenizer has a chat template:
    alpaca-format data stays on the Alpaca prompt (the ids runs made before data.template existed).
    """
    name = getattr(tokenizer, "name_or_path", "") or "the model"
    if cfg.template == "chat" and not has_chat_template(tokenizer):
        raise UserError(f"data.template=chat, but the tokenizer of {name} has no chat template; "
                        f"use data.template: alpaca or none")
    if cfg.template != "auto":
        return cfg.template, f"data.template={cfg.template} is set"
    if fmt == "alpaca":
        return "alpaca", "data.template=auto and the data is alpaca-format, not conversational"
    if has_chat_template(tokenizer):
        return "chat", f"data.template=auto, the data is conversational and {name} has a chat template"
    return "alpaca", (f"data.template=auto and the data is conversational, but {name} has no chat template: each "
                      f"conversation must be one user turn then one assistant turn, the Alpaca prompt and response")


@dataclass(frozen=True)
class ChatEncoding:
    example: dict | None  # {"input_ids", "labels"}; None when no assistant token fits in max_length
    prompt: str  # the conversation up to its last assistant turn, with the generation prompt
    prompt_ids: list[int]  # ... tokenized as in training: what generation starts from
    reference: str  # the last assistant turn's content


def encode_chat(conversation: Conversation, tokenizer: Any, max_length: int, response_only: bool) -> ChatEncoding:
    """One conversation rendered with the tokenizer's chat template; the loss is on all assistant turns.

    Why incremental rendering rather than ``return_assistant_tokens_mask``: the mask needs
    ``{% generation %}`` markers in the template, and few templates have them (SmolLM2's, Llama 3's
    and Qwen 2.5's do not). Rendering the conversation up to each assistant turn (with the generation
    prompt) and through it works with any template that is prefix-stable: every such partial
    rendering, tokenized, must be a prefix of the whole conversation's ids. Then an assistant turn's
    tokens are those between the two, its end-of-turn marker included (the model learns to stop).
    A template that is not prefix-stable (one that rewrites earlier turns, as some drop past
    reasoning) is refused rather than mislabelled. Like TRL, the rendered text is tokenized without
    the tokenizer's own special tokens: the template writes the ones it wants.
    """
    messages = conversation.as_messages()
    answers = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    texts = []
    for i in answers:  # the text before each assistant turn and through it, then the whole conversation
        texts.append(_render(tokenizer, messages[:i], True, conversation))
        texts.append(_render(tokenizer, messages[:i + 1], False, conversation))
    texts.append(_render(tokenizer, messages, False, conversation))
    # one batched call: [before 1, through 1, ..., before k, through k, whole]
    *bounds, full = tokenizer(texts, add_special_tokens=False)["input_ids"]
    for index, ids in enumerate(bounds):
        if full[:len(ids)] != ids:
            which = "up to" if index % 2 == 0 else "through"
            raise UserError(f"record {conversation.number}: the chat template of "
                            f"{getattr(tokenizer, 'name_or_path', '') or 'the model'} is not prefix-stable (the "
                            f"conversation rendered {which} its assistant turn {index // 2 + 1} does not begin the "
                            f"whole conversation's tokens), so its assistant tokens cannot be told apart; use "
                            f"data.template: alpaca (one exchange per record) or a prefix-stable template")
    labels = [IGNORE_INDEX] * len(full)
    for before, through in zip(bounds[::2], bounds[1::2], strict=True):
        labels[len(before):len(through)] = full[len(before):len(through)]
    example = _fit(full, labels, max_length, response_only)
    return ChatEncoding(example, texts[-3], bounds[-2], messages[answers[-1]]["content"])


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool, conversation: Conversation) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as error:  # jinja's TemplateError and raise_exception(): the template refuses this conversation
        message = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"record {conversation.number}: the chat template refused the conversation "
                        f"({message})") from error


def _fit(ids: list[int], labels: list[int], max_length: int, response_only: bool) -> dict | None:
    """Cut at max_length (the end goes, as with the alpaca template's response); None if no assistant token is left."""
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": ids, "labels": labels if response_only else list(ids)}
