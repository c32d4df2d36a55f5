"""Data formats (alpaca, messages, sharegpt) and templates (alpaca, chat, none): ids, labels, eval prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_tiny_tokenizer

from peftlab import messages as peftlab_messages
from peftlab.config import DataConfig, RunConfig, changed_keys, config_to_dict, data_identity, from_dict, load_yaml
from peftlab.errors import UserError
from peftlab.inputs.data import (
    IGNORE_INDEX,
    EvalPrompt,
    encode_prompt,
    encode_response,
    format_prompt,
    load_task_data,
    prompt_for,
)
from peftlab.inputs.data.conversations import Conversation, Turn, detect_format
from peftlab.inputs.data.formats import special_affixes
from peftlab.inputs.data.templates import choose_template, encode_chat

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
# ChatML-like, with a default system turn as SmolLM2's: the end-of-turn marker is the tokenizer's <eos>.
CHAT = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|system|>\nbe brief<eos>\n{% endif %}"
        "<|{{ m['role'] }}|>\n{{ m['content'] }}<eos>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
DIALOGUE = [{"role": "user", "content": "the quick brown fox"}, {"role": "assistant", "content": "jumps over"},
            {"role": "user", "content": "what is the capital"}, {"role": "assistant", "content": "paris is"}]


def tokenizer(template: str | None = CHAT):
    tok = build_tiny_tokenizer()
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def chat_tok():
    return tokenizer()


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def dialogues(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"the quick fox {i}"},
                          {"role": "assistant", "content": f"paris is {i}"},
                          {"role": "user", "content": "to be or not"},
                          {"role": "assistant", "content": "that is the question" * (1 + i % 2)}]}
            for i in range(n)]


def alpaca_rows(n: int) -> list[dict]:
    return [{"instruction": f"what is the capital {i}", "input": "the quick fox" if i % 2 else "",
             "output": f"paris is the capital {i}"} for i in range(n)]


def labelled_spans(example: dict) -> list[list[int]]:
    """The runs of consecutive positions that carry a label, as their token ids."""
    spans, current = [], []
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return spans + ([current] if current else [])


# --- the default keeps what runs made before these keys existed --------------------------------


def test_alpaca_data_under_the_default_config_keeps_its_ids_even_with_a_chat_template(chat_tok, tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(20))
    default = load_task_data(DataConfig(source=source, eval_size=5), "instruction", chat_tok)
    explicit = load_task_data(DataConfig(source=source, eval_size=5, template="alpaca", format="alpaca"),
                              "instruction", chat_tok)
    assert default.train == explicit.train and default.eval == explicit.eval
    for prompt, example in zip(default.eval_prompts, default.eval, strict=True):
        # the Alpaca prompt, BOS-prefixed, then the response and EOS: the encoding before data.template
        assert example["input_ids"] == encode_prompt(chat_tok, prompt.prompt) + encode_response(chat_tok,
                                                                                                prompt.reference)
        assert prompt.prompt == format_prompt(next(r for r in alpaca_rows(20) if r["output"] == prompt.reference))


def test_a_saved_config_without_the_new_keys_reads_as_the_default():
    saved = sorted(RESULTS.glob("*/runs/*/config.yaml"))
    assert saved
    for path in saved:
        raw = load_yaml(path)
        assert "template" not in raw["data"] and "format" not in raw["data"]
        config = from_dict(RunConfig, raw)
        assert config.data.template == "auto" and config.data.format == "auto"
        # what names the data set (a sweep's base-model evaluation id) is what it was before these keys
        assert data_identity(config.data) == raw["data"], path
        assert changed_keys(config_to_dict(config), config_to_dict(from_dict(RunConfig, raw))) == []
    assert "template" in data_identity(DataConfig(template="chat"))


def test_committed_study_configs_are_unchanged_for_resume():
    from peftlab.study.resume import _check_same_config
    from peftlab.study.sweep import expand, load_sweep

    # selective_placement's example has since turned on the eval section: its trials have new ids
    checked, trials = 0, 0
    for study in ("lora_vs_full", "adaptive_ranks", "methods_classification"):
        for trial in expand(load_sweep(REPO / "examples" / f"{study}.yaml"), RESULTS / study):
            trials += not trial.is_reference and trial.alias_of is None
            if not trial.is_reference and (trial.out_dir / "config.yaml").is_file():
                _check_same_config(trial, resumes=False)  # raises on any changed key
                checked += 1
    assert checked == trials > 30


@pytest.mark.slow  # reads the embedded SmolLM2 tokenizer (converts the GGUF on a fresh cache)
@pytest.mark.integration
def test_committed_studies_tokenize_exactly_as_they_did():
    """The data_sha256 in the committed summaries hashes the examples those runs trained on."""
    from peftlab.inputs.models import load_tokenizer
    from peftlab.run.resources import data_sha256

    for study in ("lora_vs_full", "adaptive_ranks", "selective_placement"):
        run = next((RESULTS / study / "runs").glob("base_model__*"))
        config = from_dict(RunConfig, load_yaml(run / "config.yaml"))
        data = load_task_data(config.data, config.task, load_tokenizer(config.model))
        summary = json.loads((run / "summary.json").read_text())
        assert data_sha256(data.train, data.eval) == summary["environment"]["data_sha256"], study


# --- formats -------------------------------------------------------------------------------------


@pytest.mark.parametrize("row, fmt", [({"messages": []}, "messages"), ({"conversations": []}, "sharegpt"),
                                      ({"instruction": "a", "output": "b"}, "alpaca"), ({"prompt": "a"}, "alpaca")])
def test_the_format_is_told_by_the_first_record(row, fmt):
    assert detect_format([row], DataConfig()) == fmt
    assert detect_format([row], DataConfig(format="sharegpt")) == "sharegpt"


def test_sharegpt_reads_as_the_same_conversation_as_messages(chat_tok, tmp_path):
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    rows = dialogues(12)
    rows[3]["messages"].insert(0, {"role": "system", "content": "be brief"})
    shared = [{"conversations": [{"from": names[t["role"]], "value": t["content"]} for t in r["messages"]]}
              for r in rows]
    as_messages = load_task_data(DataConfig(source=write_jsonl(tmp_path / "m.jsonl", rows), eval_size=3),
                                 "instruction", chat_tok)
    as_sharegpt = load_task_data(DataConfig(source=write_jsonl(tmp_path / "s.jsonl", shared), eval_size=3),
                                 "instruction", chat_tok)
    assert as_messages.train == as_sharegpt.train and as_messages.eval == as_sharegpt.eval
    assert len(as_messages.train) == 9


# --- choosing the template --------------------------------------------------------------------


def test_auto_is_chat_only_for_conversational_data_and_a_chat_template(chat_tok):
    plain = tokenizer(None)
    assert choose_template(DataConfig(), "alpaca", chat_tok)[0] == "alpaca"
    assert choose_template(DataConfig(), "messages", chat_tok)[0] == "chat"
    assert choose_template(DataConfig(), "sharegpt", plain)[0] == "alpaca"
    assert "no chat template" in choose_template(DataConfig(), "messages", plain)[1]
    assert choose_template(DataConfig(template="chat"), "alpaca", chat_tok)[0] == "chat"
    with pytest.raises(UserError, match="data.template=chat, but the tokenizer of .* has no chat template"):
        choose_template(DataConfig(template="chat"), "messages", plain)


def test_the_choice_and_why_go_to_the_run_log(chat_tok, tmp_path):
    written = []
    with peftlab_messages.routed(echo=False) as route:
        route.connect(written.append)
        load_task_data(DataConfig(source=write_jsonl(tmp_path / "d.jsonl", dialogues(8)), eval_size=2),
                       "instruction", chat_tok)
    assert written == ["instruction data: messages format, chat template: data.template=auto, the data is "
                       f"conversational and {chat_tok.name_or_path or 'the model'} has a chat template"]


@pytest.mark.parametrize("key", ["template", "format"])
def test_the_new_keys_are_checked(key):
    with pytest.raises(UserError, match=rf"data.{key}='chatml' is not one of .*"):
        DataConfig(**{key: "chatml"})
    with pytest.raises(UserError, match=rf"data.{key}='alpaca' is for task instruction only"):
        RunConfig(task="causal_lm", data=DataConfig(**{key: "alpaca"}))


# --- the chat template --------------------------------------------------------------------------


def test_chat_labels_are_exactly_every_assistant_turn(chat_tok):
    conversation = Conversation(1, tuple(Turn(**m) for m in DIALOGUE))
    encoded = encode_chat(conversation, chat_tok, max_length=256, response_only=True)
    whole = chat_tok.apply_chat_template(DIALOGUE, tokenize=False)
    assert encoded.example["input_ids"] == chat_tok(whole, add_special_tokens=False)["input_ids"]
    spans = [chat_tok.decode(span) for span in labelled_spans(encoded.example)]
    assert spans == ["jumps over<eos>\n", "paris is<eos>\n"]  # the content and its end-of-turn marker
    # the eval prompt: the conversation up to its last answer, with the generation prompt, as training saw it
    assert encoded.prompt.endswith("what is the capital<eos>\n<|assistant|>\n") and encoded.reference == "paris is"
    assert encoded.example["input_ids"][: len(encoded.prompt_ids)] == encoded.prompt_ids
    assert chat_tok.decode(encoded.prompt_ids) == encoded.prompt
    every = encode_chat(conversation, chat_tok, max_length=256, response_only=False)
    assert every.example["labels"] == every.example["input_ids"]


def test_chat_is_cut_at_max_length_and_a_conversation_with_no_answer_left_is_dropped(chat_tok):
    conversation = Conversation(1, tuple(Turn(**m) for m in DIALOGUE))
    full = encode_chat(conversation, chat_tok, 256, True).example
    first_answer = full["labels"].index(next(label for label in full["labels"] if label != IGNORE_INDEX))
    cut = encode_chat(conversation, chat_tok, first_answer + 1, True).example
    assert cut["input_ids"] == full["input_ids"][: first_answer + 1] and len(labelled_spans(cut)) == 1
    assert encode_chat(conversation, chat_tok, first_answer, True).example is None


def test_chat_data_tokenizes_and_its_eval_prompts_match(chat_tok, tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", dialogues(12))
    task = load_task_data(DataConfig(source=source, eval_size=4), "instruction", chat_tok)
    assert len(task.train) == 8 and len(task.eval) == len(task.eval_prompts) == 4
    for prompt, example in zip(task.eval_prompts, task.eval, strict=True):
        assert prompt.prompt.endswith("<|assistant|>\n") and "<|user|>" in prompt.prompt
        assert example["input_ids"][: len(prompt.prompt_ids)] == prompt.prompt_ids
        assert chat_tok.decode(labelled_spans(example)[-1]) == prompt.reference + "<eos>\n"


def test_alpaca_records_under_the_chat_template_are_one_user_turn(chat_tok, tmp_path):
    rows = alpaca_rows(4)  # a contiguous split: rows 1 and 2 are the eval records
    task = load_task_data(DataConfig(source=write_jsonl(tmp_path / "d.jsonl", rows), split_mode="contiguous",
                                     train_size=1, eval_size=2, template="chat"),
                          "instruction", chat_tok)
    prompts = {p.reference: p.prompt for p in task.eval_prompts}
    assert prompts["paris is the capital 1"].endswith("<|user|>\nwhat is the capital 1\n\nthe quick fox<eos>\n"
                                                      "<|assistant|>\n")
    assert prompts["paris is the capital 2"].endswith("<|user|>\nwhat is the capital 2<eos>\n<|assistant|>\n")


def test_a_template_that_is_not_prefix_stable_is_refused(tmp_path):
    unstable = tokenizer("{{ messages | length }}" + CHAT)  # the turn count changes every earlier token
    conversation = Conversation(7, tuple(Turn(**m) for m in DIALOGUE))
    with pytest.raises(UserError, match=r"record 7: the chat template of .* is not prefix-stable .*assistant turn 1"):
        encode_chat(conversation, unstable, 256, True)


def test_a_template_that_raises_is_one_line_naming_the_record():
    strict = tokenizer("{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system turn comes first') }}"
                       "{% endif %}" + CHAT)
    with pytest.raises(UserError, match=r"record 3: the chat template refused the conversation "
                                        r"\(a system turn comes first\)"):
        encode_chat(Conversation(3, tuple(Turn(**m) for m in DIALOGUE)), strict, 256, True)


# --- the alpaca and none templates on conversations ----------------------------------------------


def test_a_one_exchange_conversation_under_alpaca_is_the_alpaca_record(tmp_path):
    plain = tokenizer(None)
    rows = [{"instruction": r["instruction"], "input": "", "output": r["output"]} for r in alpaca_rows(10)]
    chats = [{"messages": [{"role": "user", "content": r["instruction"]},
                           {"role": "assistant", "content": r["output"]}]} for r in rows]
    as_alpaca = load_task_data(DataConfig(source=write_jsonl(tmp_path / "a.jsonl", rows), eval_size=3),
                               "instruction", plain)
    as_chats = load_task_data(DataConfig(source=write_jsonl(tmp_path / "c.jsonl", chats), eval_size=3),
                              "instruction", plain)  # auto: no chat template, so alpaca
    assert as_alpaca.train == as_chats.train and as_alpaca.eval == as_chats.eval
    with pytest.raises(UserError, match=r"record 1: data.template=alpaca takes one user turn then one assistant "
                                        r"turn, but this conversation is user -> assistant -> user -> assistant"):
        load_task_data(DataConfig(source=write_jsonl(tmp_path / "d.jsonl", dialogues(5)), eval_size=2),
                       "instruction", plain)


def test_the_none_template_is_prompt_then_response(chat_tok, tmp_path):
    rows = alpaca_rows(7)
    task = load_task_data(DataConfig(source=write_jsonl(tmp_path / "d.jsonl", rows), eval_size=6, template="none"),
                          "instruction", chat_tok)
    prefix, _ = special_affixes(chat_tok)
    for prompt, example in zip(task.eval_prompts, task.eval, strict=True):
        row = next(r for r in rows if r["output"] == prompt.reference)
        text = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        assert prompt.prompt == text
        ids = prefix + chat_tok(text, add_special_tokens=False)["input_ids"]
        assert example["input_ids"] == ids + chat_tok(row["output"], add_special_tokens=False)["input_ids"] + [
            chat_tok.eos_token_id]
        assert example["labels"][: len(ids)] == [IGNORE_INDEX] * len(ids)


# --- generation starts from the ids training used ------------------------------------------------


def test_generated_samples_start_from_the_prompt_ids(monkeypatch):
    from conftest import tiny_llama

    from peftlab.run.generation import generate

    model = tiny_llama()
    seen = []
    original = model.generate
    monkeypatch.setattr(model, "generate", lambda input_ids, **kw: seen.append(input_ids) or original(
        input_ids=input_ids, **kw))
    prompt = EvalPrompt("shown text", "ref", [5, 6, 7])
    (sample,) = generate(model, tokenizer(), [prompt], max_new_tokens=2, batch_size=4, device=torch.device("cpu"))
    assert seen[0].tolist() == [[5, 6, 7]]
    assert sample.prompt == "shown text" and sample.reference == "ref"


# --- the embedded SmolLM2-135M-Instruct with its own template ---------------------------------------


@pytest.mark.slow  # SmolLM2-135M on the CPU, and the GGUF conversion on a fresh cache
@pytest.mark.integration
def test_smollm2_trains_on_messages_with_its_own_chat_template(tmp_path, capsys):
    from peftlab.cli import main
    from peftlab.inputs.models import load_tokenizer

    rows = dialogues(10)
    source = write_jsonl(tmp_path / "chats.jsonl", rows)
    config = tmp_path / "chat.yaml"
    config.write_text(yaml.safe_dump({
        "model": "smollm2-135m", "task": "instruction",
        "data": {"source": source, "eval_size": 2, "max_length": 96, "template": "chat", "format": "messages"},
        "method": {"name": "lora", "placement": "attention_only", "ranks": {"r": 4}},
        "train": {"max_steps": 2, "batch_size": 2, "num_samples": 1, "max_new_tokens": 4, "save_every": None}}))
    tok = load_tokenizer("smollm2-135m")
    task = load_task_data(from_dict(RunConfig, yaml.safe_load(config.read_text())).data, "instruction", tok)
    for example in task.train + task.eval:  # the mask covers the assistant turns and nothing else
        spans = [tok.decode(span) for span in labelled_spans(example)]
        contents = next(r for r in rows if tok.decode(example["input_ids"]).count(r["messages"][0]["content"] + "<"))
        assert spans == [f"{m['content']}<|im_end|>\n" for m in contents["messages"] if m["role"] == "assistant"]
    out = tmp_path / "run"
    assert main(["run", str(config), "--out", str(out)]) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["samples"][0]["prompt"].endswith("<|im_start|>assistant\n")
    assert "messages format, chat template: data.template=chat is set" in (out / "train.log").read_text()


@pytest.mark.parametrize("template", ["chat", "alpaca", "none"])
def test_a_new_prompt_is_encoded_as_the_run_encoded_its_eval_prompts(chat_tok, tmp_path, template):
    """`peftlab generate` feeds a finished run prompts through ``prompt_for``: the same ids that the run's
    template gave the same record as an eval prompt (chat: the user turn and the generation prompt)."""
    rows = [{"instruction": f"name the number {i}", "input": "in words" if i % 2 else "", "output": f"{i}"}
            for i in range(10)]
    data = load_task_data(DataConfig(source=write_jsonl(tmp_path / "a.jsonl", rows), eval_size=4,
                                     template=template), "instruction", chat_tok)
    assert data.template == template
    by_text = {row["output"]: row for row in rows}
    for prompt in data.eval_prompts:
        fresh = prompt_for(by_text[prompt.reference], template, chat_tok)
        assert fresh.prompt_ids == prompt.prompt_ids and fresh.prompt == prompt.prompt
