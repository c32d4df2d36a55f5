"""The benchmark harness end to end on a tiny model, and loss equality with and without every speed lever.

Seconds on a CPU; nothing here asserts on speed (speed is measured by bench/, never by a test).
"""

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, where bench/ lives

from conftest import tiny_gpt2, tiny_llama  # noqa: E402

from bench import levers, run_bench, systems  # noqa: E402
from peftlab.config import MethodConfig, RankConfig  # noqa: E402
from peftlab.core.methods import prepare  # noqa: E402
from peftlab.core.modelmap import build_model_map  # noqa: E402
from peftlab.run.losses import full_logits_loss_sum, linear_cross_entropy_sum, loss_sum  # noqa: E402
from peftlab.run.resources import max_batch_tokens_for  # noqa: E402

pytest.importorskip("peft")


# --- the harness ----------------------------------------------------------------------------------


def _bench(tiny_llama_dir, out, *extra):
    return run_bench.main(["--model", str(tiny_llama_dir), "--examples", "6", "--eval-examples", "3",
                           "--batch-size", "2", "--reps", "1", "--threads", "1", "--gemm-sizes", "64",
                           "--out", str(out), *extra])


def test_benchmark_runs_every_system_and_writes_sane_results(tiny_llama_dir, tmp_path):
    results = _bench(tiny_llama_dir, tmp_path, "--in-process")
    written = list(tmp_path.glob("*.json"))
    assert len(written) == 1 and written[0].with_suffix(".md").is_file()
    saved = json.loads(written[0].read_text())
    assert saved["summary"].keys() == {"peftlab", "hf_seeds", "hf_tuned", "hf_bounded"}
    assert saved["machine"]["cpu"] and saved["machine"]["cores"] >= 1 and saved["machine"]["torch"]
    assert saved["gemm"]["peak_flops"] > 0 and saved["same_data_for_all"]
    rows = saved["summary"]
    for row in rows.values():
        assert row["tokens_per_s_median"] > 0 and row["train_seconds_median"] > 0
        assert row["peak_memory_mb_median"] > 0 and 0 < row["mfu_median"] < 1
        assert math.isfinite(row["eval_loss_median"]) and row["eval_loss_median"] > 0
        assert row["statuses"] == ["completed"]
    # Same examples, one epoch each: the same non-padding tokens; only the padding differs.
    assert len({row["tokens"] for row in rows.values()}) == 1
    assert rows["hf_seeds"]["padded_tokens"] == 6 * 256
    assert rows["hf_seeds"]["padding_fraction_median"] > rows["hf_tuned"]["padding_fraction_median"]
    assert rows["hf_bounded"]["padding_fraction_median"] == 0  # micro-batches of one row pad nothing
    # hf_bounded: batch 1 x accumulation 2, the same optimizer steps as peftlab's and hf_tuned's batch 2
    assert rows["hf_bounded"]["steps"] == rows["hf_tuned"]["steps"] == rows["peftlab"]["steps"] == 3
    # The same LoRA (r=16 on all seven projections of both layers) in peftlab and in peft.
    assert len({row["trainable_params"] for row in rows.values()}) == 1
    q_k_v_o_gate_up_down = [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)]  # (in, out)
    assert rows["peftlab"]["trainable_params"] == 2 * 16 * sum(i + o for i, o in q_k_v_o_gate_up_down)
    assert saved["ratios"]["peftlab/hf_seeds"]["target_tokens_per_s"] == 3.0
    assert saved["ratios"]["peftlab/hf_tuned"]["target_tokens_per_s"] == 1.5
    assert set(saved["ratios"]) == {"peftlab/hf_seeds", "peftlab/hf_tuned", "peftlab/hf_bounded"}
    bounded = saved["ratios"]["peftlab/hf_bounded"]
    assert bounded["target_tokens_per_s"] is None and "speed_met" not in bounded  # a memory peer, no speed target
    assert bounded["target_met"] == (bounded["memory_met"] and bounded["eval_loss_met"])
    # peftlab as shipped: no bench-only setting; its split is what `peftlab run` resolves on this device
    assert saved["settings"]["max_batch_tokens"] == "shipped" and saved["settings"]["peftlab_as_shipped"]
    assert saved["settings"]["peftlab_max_batch_tokens"] == 256 == max_batch_tokens_for("auto", torch.device("cpu"))
    assert "--max-batch-tokens" not in saved["command"]
    table = written[0].with_suffix(".md").read_text()
    assert ("| peftlab | as shipped (no flags): batch 2, length-grouped dynamic padding, "
            "max_batch_tokens auto = 256 on cpu") in table
    assert "| hf_bounded | batch 1 x accum 2, group_by_length, dynamic padding |" in table
    assert "| hf_tuned | batch 2 x accum 1, group_by_length, dynamic padding |" in table
    assert "| hf_seeds | batch 1 x accum 4, random order, padded to 256 |" in table
    assert results["summary"] == saved["summary"]


@pytest.mark.slow  # three fresh Python processes, each importing torch and transformers (~15 s)
def test_benchmark_default_mode_runs_each_system_in_a_fresh_process(tiny_llama_dir, tmp_path):
    results = _bench(tiny_llama_dir, tmp_path, "--systems", "peftlab")
    assert results["settings"]["isolated"] and results["runs"][0]["system"] == "peftlab"
    assert results["runs"][0]["tokens"] > 0 and results["ratios"] == {}


def test_each_repetition_has_its_own_seed_and_the_loss_check_uses_their_spread(tiny_llama_dir, tmp_path):
    results = run_bench.main(["--model", str(tiny_llama_dir), "--examples", "6", "--eval-examples", "3",
                              "--batch-size", "2", "--reps", "2", "--threads", "1", "--gemm-sizes", "64",
                              "--out", str(tmp_path), "--in-process", "--systems", "peftlab,hf_tuned"])
    assert [(r["system"], r["spec"]["seed"]) for r in results["runs"]] == [
        ("peftlab", 42), ("hf_tuned", 42), ("peftlab", 43), ("hf_tuned", 43)]
    losses = {s: [r["eval_loss"] for r in results["runs"] if r["system"] == s] for s in ("peftlab", "hf_tuned")}
    ratio = results["ratios"]["peftlab/hf_tuned"]
    assert ratio["eval_loss_seed_spread"] == pytest.approx(max(max(v) - min(v) for v in losses.values()))
    assert ratio["eval_loss_met"] == (ratio["eval_loss_delta"] <= ratio["eval_loss_seed_spread"])


def test_benchmark_max_batch_tokens_cuts_what_peftlab_pads_not_what_it_trains_on(tiny_llama_dir, tmp_path):
    one_system = ("--in-process", "--systems", "peftlab", "--max-batch-tokens")
    whole = _bench(tiny_llama_dir, tmp_path / "whole", *one_system, "0")
    split = _bench(tiny_llama_dir, tmp_path / "split", *one_system, "64")
    assert whole["settings"]["max_batch_tokens"] is None and split["settings"]["max_batch_tokens"] == 64
    assert not split["settings"]["peftlab_as_shipped"] and "--max-batch-tokens 64" in split["command"]
    assert "| peftlab | NOT as shipped: --max-batch-tokens 64 (a lever" in run_bench.render_markdown(split)
    whole_row, split_row = whole["summary"]["peftlab"], split["summary"]["peftlab"]
    assert split_row["tokens"] == whole_row["tokens"] and split_row["steps"] == whole_row["steps"]
    assert split_row["padded_tokens"] < whole_row["padded_tokens"]  # pieces are trimmed to their own longest row


class _Stop(Exception):
    pass


@pytest.mark.parametrize("system", systems.SYSTEMS)
def test_every_worker_imports_every_library_before_it_loads_or_trains(system, monkeypatch):
    """On the CPU the peak is the resident set, which holds what was imported: every system starts alike."""
    events = []

    def training(*args):
        events.append("train")  # each runner resets the peak memory first thing it measures
        raise _Stop

    monkeypatch.setattr(systems, "import_every_library", lambda: events.append("imports"))
    monkeypatch.setattr(systems, "load_data", lambda spec: events.append("data") or (None, None))
    monkeypatch.setitem(systems.RUNNERS, system, training)
    with pytest.raises(_Stop):
        systems.run_system(system, systems.Spec())
    assert events == ["imports", "data", "train"]


def test_import_every_library_imports_peft_transformers_and_trainer():
    systems.import_every_library()
    assert {"peft", "transformers", "transformers.trainer", "peftlab.run.train"} <= set(sys.modules)


# --- levers: each must leave the loss and gradients unchanged (float noise) -------------------------


def _batch(vocab: int = 100):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab, (3, 14), generator=generator)
    labels = input_ids.clone()
    labels[:, :6] = -100  # prompt
    labels[2, 10:] = -100  # padding
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 10:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("chunk_rows", [1, 5, None])
def test_fused_chunked_cross_entropy_equals_full_logits_loss_and_gradients(build, chunk_rows, monkeypatch):
    # Full fine-tuning: the tied head/embedding weight takes the fused path's weight gradient too.
    fused_model, plain_model = build(), build()  # eval mode: no dropout in the base model, grads still on
    if chunk_rows is not None:
        monkeypatch.setattr("peftlab.run.losses.CHUNK_ELEMENTS", chunk_rows * 100)  # vocab 100 -> chunk_rows rows
    batch = _batch()
    fused, fused_units = loss_sum(fused_model, batch, "instruction")
    plain, plain_units = full_logits_loss_sum(plain_model, batch)
    fused.backward()
    plain.backward()
    assert fused_units == plain_units
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-5)
    fused_grads, plain_grads = _grads(fused_model), _grads(plain_model)
    assert fused_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_cross_entropy_without_grad_equals_plain():
    generator = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(37, 16, generator=generator), torch.randn(50, 16, generator=generator)
    targets = torch.randint(0, 50, (37,), generator=generator)
    plain = F.cross_entropy(F.linear(hidden, weight), targets, reduction="sum")
    with torch.no_grad():
        for rows in (1, 8, 100):
            torch.testing.assert_close(linear_cross_entropy_sum(hidden, weight, targets, rows), plain)


def test_fused_cross_entropy_under_bf16_autocast_matches_the_unfused_path():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(20, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator)
    targets = torch.randint(0, 50, (20,), generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = linear_cross_entropy_sum(hidden, weight, targets, 7)
        (fused_grad,) = torch.autograd.grad(fused, hidden)
        plain = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
        (plain_grad,) = torch.autograd.grad(plain, hidden)
    torch.testing.assert_close(fused, plain, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(fused_grad, plain_grad, rtol=2e-2, atol=2e-2)


def _lora_llama():
    model = tiny_llama()
    torch.manual_seed(1)
    prepare(model, MethodConfig(name="lora", ranks=RankConfig(r=4), alpha=8, dropout=0.1, train_head=False),
            build_model_map(model), train_head=False)
    with torch.no_grad():  # B starts at zero; a trained-looking B makes the update (and its test) non-trivial
        for name, parameter in model.named_parameters():
            if name.endswith("lora_B"):
                parameter.normal_(0, 0.1)
    return model


def _peftlab_namespaces():
    """Every name in the peftlab modules a step and an evaluation run through, with what it is bound to."""
    import peftlab.core.methods.lora as lora
    import peftlab.inputs.data as data
    import peftlab.run.evaluate as evaluate
    import peftlab.run.losses as losses
    import peftlab.run.train as train

    return {owner.__name__: dict(vars(owner)) for owner in (train, evaluate, losses, data, lora, lora.LoRALinear)}


NUMERICS_LEVERS = {"autocast_bf16"}  # measured for what a precision change buys; their columns show the change


@pytest.mark.parametrize("lever", [name for name in levers.LEVERS if name != "baseline"])
def test_every_lever_leaves_loss_and_gradients_unchanged_and_patches_nothing_in_peftlab(lever):
    model, batch = _lora_llama(), _batch()
    before = _peftlab_namespaces()
    with levers.LEVERS["baseline"][1](model) as options:
        reference = levers.loss_and_grads(model, batch, options)
    with levers.LEVERS[lever][1](model) as options:
        assert _peftlab_namespaces() == before  # a lever passes functions in or changes the model, never peftlab
        changed = levers.loss_and_grads(model, batch, options)
    difference = levers.max_difference(reference, changed)
    if lever in NUMERICS_LEVERS:  # bf16: a real difference, shown in the table, yet still the same model
        assert 0 < difference["loss_rel_diff"] < 1e-2, difference
        return
    assert difference["loss_rel_diff"] < 1e-6 and difference["grad_max_rel_diff"] < 1e-5, difference


def test_split_batch_lever_really_splits_and_leaves_loss_and_gradients_unchanged():
    model, batch = _lora_llama(), _batch()  # 3 rows of up to 14 tokens: a 16-token cap makes 3 pieces
    reference = levers.loss_and_grads(model, batch)
    pieces = []
    with levers._split_batches(16) as options:

        def recorded(b, cap):
            pieces.extend(options.split(b, cap))
            return pieces

        changed = levers.loss_and_grads(model, batch, replace(options, split=recorded))
    assert len(pieces) == 3
    difference = levers.max_difference(reference, changed)
    assert difference["loss_rel_diff"] < 1e-6 and difference["grad_max_rel_diff"] < 1e-5, difference


def test_the_shipped_addmm_forward_equals_the_unfused_one_in_training_with_dropout():
    model, batch = _lora_llama(), _batch()
    outputs = []
    for lever in ("baseline", "lora_unfused"):
        with levers.LEVERS[lever][1](model):
            assert any("forward" in vars(m) for m in model.modules()) == (lever == "lora_unfused")
            torch.manual_seed(3)  # the same dropout masks
            model.train()
            total, _ = loss_sum(model, batch, "instruction")
            total.backward()
            outputs.append((total.detach(), _grads(model)))
            model.zero_grad(set_to_none=True)
    assert not any("forward" in vars(m) for m in model.modules())  # the instances' forwards are restored
    torch.testing.assert_close(outputs[0][0], outputs[1][0])
    for name, grad in outputs[0][1].items():
        # the shipped forward scales the dropout after x A^T, the unfused one before: rounding differs
        torch.testing.assert_close(outputs[1][1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_max_batch_tokens_off_lever_runs_batches_whole():
    batch = _batch()
    with levers.LEVERS["max_batch_tokens_off"][1](None) as options:
        assert options.split(batch, 16) == [batch]


@pytest.mark.slow  # four fresh `peftlab run` processes on a tiny model (~30 s)
def test_memory_settings_benchmark_runs_every_setting_and_checkpointing_keeps_the_loss(tiny_llama_dir, tmp_path):
    import argparse
    import json

    from bench import memory_settings

    args = argparse.Namespace(steps=2, reps=1, device="cpu", model=str(tiny_llama_dir), out=str(tmp_path))
    assert memory_settings.measure(args) == 0
    (result,) = tmp_path.glob("memory-settings-cpu-*.json")
    runs = {run["setting"]: run for run in json.loads(result.read_text())["runs"]}
    assert set(runs) == set(memory_settings.SETTINGS)
    # checkpointing recomputes, it never changes what is learned
    assert runs["fp32 + checkpointing"]["eval_loss"] == runs["fp32"]["eval_loss"]
    assert runs["bf16 base + checkpointing"]["eval_loss"] == runs["bf16 base"]["eval_loss"]
    assert all(run["peak_memory_mb"] > 0 and run["tokens_per_s"] > 0 for run in runs.values())
    assert "| bf16 base + checkpointing |" in next(tmp_path.glob("memory-settings-cpu-*.md")).read_text()


def test_block_bench_times_every_variant_and_writes_its_table(tiny_llama_dir, tmp_path):
    from bench import block

    results = block.main(["--model", str(tiny_llama_dir), "--layer", "0", "--tokens", "16", "--rounds", "2",
                          "--calls", "1", "--out", str(tmp_path)])
    assert set(results["median_ms"]) == {"shipped", "nn_dropout", "no_dropout"}
    assert all(len(v) == 2 and min(v) > 0 for v in results["samples_ms"].values())
    assert results["profile"] and 0 < sum(o["share"] for o in results["profile"]) <= 1 + 1e-9
    written = list(tmp_path.glob("block-*.md"))
    assert len(written) == 1 and "| nn_dropout |" in written[0].read_text()
