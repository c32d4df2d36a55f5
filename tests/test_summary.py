"""summary.json as a RunSummary: round trip, older files, damaged files, strict JSON, and warning kinds."""

import json
import math
from pathlib import Path

import pytest
from summaries import failed_summary, make_summary, resources

from peftlab.errors import UserError
from peftlab.run.summary import (
    DATA,
    SMALL_EVAL,
    SMALL_EVAL_EXAMPLES,
    Artifact,
    Collapse,
    DataInfo,
    Divergence,
    PlacedModule,
    RunSummary,
    RunWarning,
    data_warnings,
    read_summary,
    small_eval_warning,
    write_summary,
)

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"


def _strict(text):
    def refuse(constant):
        raise ValueError(f"non-finite constant {constant} in JSON")
    return json.loads(text, parse_constant=refuse)


def _full_summary():
    return make_summary(
        "collapsed", name="lora__seed1", metrics={"eval_loss": 4.6, "eval_units": 120, "perplexity": 99.5},
        resources=resources(load_avg_max=2.5, cpu_count=2),
        placement=[PlacedModule("model.layers.0.self_attn.qkv_proj", 0, "attn_qkv", ["q", "v"], 8)],
        artifacts=Artifact("safetensors", "trainable.safetensors", 1234, "fused slices have no peft form"),
        samples=[{"prompt": "Say hi", "output": "hi"}], data=DataInfo(100, 20, "pos", 0.55),
        warnings=[RunWarning(DATA, "2 of 120 records have an empty prompt"), small_eval_warning(20)],
        environment={"device": "cpu", "torch": "2.13.0"}, config={"model": "tiny", "train": {"seed": 1}},
        collapse=Collapse("eval loss 4.6 is at or above uniform prediction", 4.6, 4.6),
        sweep={"run_id": "lora__seed1", "strategy": "lora", "strategy_index": 0, "grid": {}, "seed": 1})


@pytest.mark.parametrize("summary", [
    _full_summary(),
    make_summary("diverged", divergence=Divergence(3, "non-finite gradient", ["w"])),
    make_summary(role="reference", method="none", placement=[]),
    failed_summary("a__seed1", "RuntimeError: out of memory"),
], ids=["collapsed", "diverged", "reference", "failed"])
def test_to_json_and_from_json_round_trip(tmp_path, summary):
    assert RunSummary.from_json(summary.to_json()) == summary
    assert write_summary(tmp_path / "summary.json", summary) == summary == read_summary(tmp_path / "summary.json")


def test_the_json_keeps_the_keys_peftlab_has_always_written():
    written = _full_summary().to_json()
    assert list(written) == ["status", "name", "model", "task", "method", "metrics", "params", "resources",
                             "divergence", "placement", "artifacts", "samples", "data", "warnings", "environment",
                             "started", "wall_seconds", "config", "collapse", "sweep"]
    assert written["warnings"][1] == {"kind": SMALL_EVAL, "message": "only 20 eval examples: differences between "
                                                                     "strategies may be noise"}
    failed = failed_summary("a", "RuntimeError: boom").to_json()
    assert failed["params"] == failed["resources"] == failed["data"] == {} and failed["divergence"] is None
    assert "artifacts" not in failed and "samples" not in failed and "collapse" not in failed
    assert "load_avg_max" not in make_summary().to_json()["resources"]  # left out where the OS has none


def test_committed_results_read_and_write_back_unchanged():
    paths = sorted(RESULTS.glob("*/runs/*/summary.json"))
    assert paths
    for path in paths:
        raw = json.loads(path.read_text())
        assert RunSummary.from_json(raw).to_json() == raw, path


def test_an_older_file_with_string_warnings_reads():
    raw = make_summary().to_json()
    raw["warnings"] = ["1 of 6 eval examples have a label that no training example has (meh): it can never be "
                       "predicted", "only 6 eval examples: differences between strategies may be noise"]
    summary = RunSummary.from_json(raw)
    # "eval examples" alone does not make the small-eval warning: the data loader's sentence has those words too
    assert [w.kind for w in summary.warnings] == [DATA, SMALL_EVAL]
    assert summary.warning_messages(leave_out=(SMALL_EVAL,)) == [raw["warnings"][0]]
    assert summary.to_json()["warnings"][0] == {"kind": DATA, "message": raw["warnings"][0]}


@pytest.mark.parametrize("content, why", [
    ('{"status": "completed", "metrics": {"eval_lo', "Unterminated string"),
    ("[1, 2]", "not a JSON object"),
    ('{"status": "completed"}', "no 'name'"),
    (json.dumps({**make_summary().to_json(), "warnings": [{"text": "x"}]}), "no 'kind'"),
    (json.dumps({**make_summary().to_json(), "params": {"trainable": 1}}), "total"),
], ids=["truncated", "list", "no-name", "bad-warning", "bad-params"])
def test_a_damaged_file_is_a_one_line_user_error(tmp_path, content, why):
    path = tmp_path / "summary.json"
    path.write_text(content)
    with pytest.raises(UserError) as raised:
        read_summary(path)
    message = str(raised.value)
    assert "\n" not in message and f"{path} is damaged (" in message and why in message and "--resume" in message


def test_a_missing_file_is_none(tmp_path):
    assert read_summary(tmp_path / "summary.json") is None


def test_non_finite_values_are_never_written(tmp_path):
    summary = make_summary(metrics={"eval_loss": math.nan, "train_loss": 2.0, "perplexity": math.inf},
                           resources=resources(tokens_per_s=math.inf, load_avg_max=-math.inf),
                           environment={"values": [1.0, math.nan]})
    returned = write_summary(tmp_path / "summary.json", summary)
    written = _strict((tmp_path / "summary.json").read_text())
    assert written["metrics"] == {"train_loss": 2.0}
    assert "tokens_per_s" not in written["resources"] and "load_avg_max" not in written["resources"]
    assert written["environment"] == {"values": [1.0, None]}
    assert returned.metrics == {"train_loss": 2.0}  # what was written, not what was asked for
    assert returned.resources.tokens_per_s is None and returned.resources.steps == 4
    assert not list(tmp_path.glob("*.tmp"))


def test_warning_kinds():
    assert small_eval_warning(SMALL_EVAL_EXAMPLES) is None
    assert small_eval_warning(SMALL_EVAL_EXAMPLES - 1).kind == SMALL_EVAL
    assert data_warnings(["a", "b"]) == [RunWarning(DATA, "a"), RunWarning(DATA, "b")]
