"""`peftlab inspect` on config-only directories (meta device): the map, the JSON, the errors."""

import json

import pytest
from transformers import GPT2Config, LlamaConfig

from peftlab.cli import main, parse_rank_spec
from peftlab.errors import UserError


@pytest.fixture
def gpt2_config_dir(tmp_path):
    GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=1000).save_pretrained(tmp_path / "gpt2")
    return tmp_path / "gpt2"


@pytest.fixture
def big_llama_config_dir(tmp_path):
    # Llama-2-70B's shape: inspecting it must not allocate its weights (meta device).
    LlamaConfig(num_hidden_layers=80, hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=32000).save_pretrained(tmp_path / "llama70b")
    return tmp_path / "llama70b"


def _inspect_json(capsys, *args):
    assert main(["inspect", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_gpt2_attention_only_never_touches_mlp_c_proj(gpt2_config_dir, capsys):
    report = _inspect_json(capsys, "--model", str(gpt2_config_dir), "--placement", "attention_only",
                           "--ranks", "uniform:8")
    modules = {t["module"] for t in report["targets"]}
    assert "transformer.h.0.attn.c_proj" in modules and "transformer.h.0.attn.c_attn" in modules
    assert not any(".mlp." in m for m in modules)
    assert len(modules) == 4 * 2
    # closed form r * (d_in + d_out): c_attn 64 -> 192, c_proj 64 -> 64
    assert report["trainable_params"] == 4 * (8 * (64 + 192) + 8 * (64 + 64))
    assert sum(t["params"] for t in report["targets"]) == report["trainable_params"]


def test_qv_only_on_fused_gpt2_counts_only_q_and_v(gpt2_config_dir, capsys):
    report = _inspect_json(capsys, "--model", str(gpt2_config_dir), "--placement", "qv_only", "--ranks", "uniform:4")
    assert {tuple(t["slices"]) for t in report["targets"]} == {("q", "v")}
    assert report["trainable_params"] == 4 * 4 * (64 + 2 * 64)


def test_seventy_billion_config_is_inspected_without_weights(big_llama_config_dir, capsys):
    report = _inspect_json(capsys, "--model", str(big_llama_config_dir), "--layers", "last_4", "--ranks", "uniform:16")
    assert {t["layer"] for t in report["targets"]} == {76, 77, 78, 79}
    assert report["total_params"] > 60e9


def test_text_map_lists_layers_and_totals(gpt2_config_dir, capsys):
    assert main(["inspect", "--model", str(gpt2_config_dir), "--ranks", "linear_decay:16:4"]) == 0
    out = capsys.readouterr().out
    assert "16" in out and "4" in out and "trainable" in out


@pytest.mark.parametrize("args,message", [
    (["--placement", "attn"], "placement"),
    (["--ranks", "uniform:1000"], "rank"),
    (["--ranks", "zigzag:3"], "unknown schedule"),
    (["--targets", "c_proj"], "attn.c_proj"),
    (["--targets", "nothing_here"], "nothing_here"),
    (["--layers", "7-9"], "layer"),
])
def test_bad_input_is_one_line_and_exit_2(gpt2_config_dir, capsys, args, message):
    code = main(["inspect", "--model", str(gpt2_config_dir), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_rank_spec_shorthand():
    assert parse_rank_spec("uniform:16").r == 16
    decay = parse_rank_spec("linear_decay:16:4")
    assert (decay.schedule, decay.start, decay.end) == ("linear_decay", 16, 4)
    assert parse_rank_spec("empirical:16:0.5,1,2").multipliers == [0.5, 1.0, 2.0]
    assert parse_rank_spec("custom:4,8").layer_ranks == [4, 8]
    assert parse_rank_spec("budget:1e6").budget == 1_000_000
    with pytest.raises(UserError):
        parse_rank_spec("linear_decay:16")
