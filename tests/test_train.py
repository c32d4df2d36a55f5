import json
import math

import pytest
import torch
from conftest import tiny_llama

from peftlab.config import MethodConfig, RankConfig, TrainConfig
from peftlab.core.methods import prepare
from peftlab.core.modelmap import build_model_map
from peftlab.inputs.data import batches, split_by_tokens
from peftlab.run.optimizer import build_optimizer, build_scheduler, trainable_named_parameters
from peftlab.run.tracking import MetricsLog
from peftlab.run.train import StepOptions, accumulate_gradients, optimizer_step, train


def _examples(n: int, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        length = 6 + (i * 7) % 11
        ids = torch.randint(3, 100, (length,), generator=generator).tolist()
        labels = [-100] * 3 + ids[3:]  # a 3-token prompt carries no loss
        examples.append({"input_ids": ids, "labels": labels})
    return examples


def _lora_model(dropout: float = 0.1):
    torch.manual_seed(0)
    model = tiny_llama()
    method = MethodConfig(name="lora", ranks=RankConfig(r=4), alpha=8, dropout=dropout)
    prepare(model, method, build_model_map(model), train_head=False)
    return model


def _train(model, cfg, tmp_path=None, resume=False, on_step=None, options=None):
    return train(model, _examples(24), _examples(8, seed=1), "instruction", cfg, pad_id=0,
                 device=torch.device("cpu"), log=MetricsLog(tmp_path, echo=False),
                 checkpoint_dir=tmp_path, resume=resume, on_step=on_step, options=options or StepOptions())


def _trainable_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_same_config_twice_gives_identical_results():
    cfg = TrainConfig(max_steps=5, batch_size=4, lr=1e-2, seed=3)
    first, second = _lora_model(), _lora_model()
    a, b = _train(first, cfg), _train(second, cfg)
    assert a.status == b.status == "completed"
    assert a.final_eval.loss == b.final_eval.loss
    for name, value in _trainable_state(first).items():
        assert torch.equal(value, _trainable_state(second)[name])


def test_training_changes_only_trainable_parameters_and_lowers_loss():
    model = _lora_model(dropout=0.0)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    outcome = _train(model, TrainConfig(max_steps=15, batch_size=4, lr=2e-2, seed=0))
    losses = [r["train_loss"] for r in outcome.history if "train_loss" in r]
    assert losses[-1] < losses[0]
    for name, parameter in model.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), name


def test_kill_and_resume_gives_the_uninterrupted_result(tmp_path):
    cfg = TrainConfig(max_steps=6, batch_size=4, lr=1e-2, seed=1, save_every=2, eval_every=3)
    reference_model = _lora_model()
    reference = _train(reference_model, cfg, tmp_path / "straight")

    class Killed(Exception):
        pass

    def kill_at_five(step: int) -> None:
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        _train(_lora_model(), cfg, tmp_path / "killed", on_step=kill_at_five)
    resumed_model = _lora_model()
    resumed = _train(resumed_model, cfg, tmp_path / "killed", resume=True)
    assert resumed.final_eval.loss == reference.final_eval.loss
    for name, value in _trainable_state(reference_model).items():
        assert torch.equal(value, _trainable_state(resumed_model)[name]), name
    # metrics.jsonl holds each step once, as an uninterrupted run's does
    straight = (tmp_path / "straight" / "metrics.jsonl").read_text()
    killed = (tmp_path / "killed" / "metrics.jsonl").read_text()
    def without_lr(text):
        return [line.split('"lr"')[0] for line in text.splitlines()]

    assert without_lr(straight) == without_lr(killed)


def test_non_finite_gradient_stops_the_run_and_names_the_parameter():
    model = _lora_model(dropout=0.0)
    poisoned = "model.layers.1.self_attn.v_proj.lora_A"
    parameter = dict(model.named_parameters())[poisoned]
    parameter.register_hook(lambda grad: grad * float("nan"))
    outcome = _train(model, TrainConfig(max_steps=5, batch_size=4, seed=0))
    assert outcome.status == "diverged"
    assert outcome.divergence["step"] == 1
    assert poisoned in outcome.divergence["parameters"]
    assert outcome.final_eval is None  # no NaN is ever reported as a metric
    assert all(math.isfinite(r["train_loss"]) for r in outcome.history if "train_loss" in r)


def test_optimizer_decays_matrices_only_and_lora_plus_scales_b():
    model = _lora_model()
    optimizer = build_optimizer(model, TrainConfig(lr=1e-3, weight_decay=0.1, lora_plus_ratio=16))
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            assert group["weight_decay"] == (0.1 if parameter.dim() >= 2 else 0.0)
            expected_lr = 1e-3 * 16 if names[id(parameter)].endswith("lora_B") else 1e-3
            assert group["lr"] == pytest.approx(expected_lr)
    trainable = sum(len(g["params"]) for g in optimizer.param_groups)
    assert trainable == sum(1 for p in model.parameters() if p.requires_grad)


def test_scheduler_warms_up_then_decays_to_zero():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=1.0)
    scheduler = build_scheduler(optimizer, TrainConfig(warmup_ratio=0.1, scheduler="cosine"), total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(0.5) and lrs[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:], strict=False))
    assert scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


def test_ctrl_c_saves_a_checkpoint_at_the_step_boundary_and_resume_matches(tmp_path):
    import signal

    from peftlab.run.train import Interrupted

    cfg = TrainConfig(max_steps=5, batch_size=4, lr=1e-2, seed=2, save_every=None)
    reference = _train(_lora_model(), cfg, tmp_path / "straight")

    def press_ctrl_c(step: int) -> None:
        if step == 2:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(Interrupted) as stopped:
        _train(_lora_model(), cfg, tmp_path / "stopped", on_step=press_ctrl_c)
    assert stopped.value.step == 2  # the signal came after step 2: no further step starts, step 2 is saved
    resumed = _train(_lora_model(), cfg, tmp_path / "stopped", resume=True)
    assert resumed.final_eval.loss == reference.final_eval.loss


def test_stop_requested_before_training_starts_stops_at_step_zero(tmp_path):
    import signal

    from peftlab.run.stopping import GracefulStop
    from peftlab.run.train import Interrupted

    cfg = TrainConfig(max_steps=3, batch_size=4, lr=1e-2, seed=2, save_every=None)
    with GracefulStop() as sweep_scope:  # e.g. a sweep, whose run was still loading its model
        signal.raise_signal(signal.SIGINT)
        assert sweep_scope.requested
        with pytest.raises(Interrupted) as stopped:
            _train(_lora_model(), cfg, tmp_path / "run")
    assert stopped.value.step == 0
    assert not GracefulStop().requested  # cleared when the outermost scope ends
    assert _train(_lora_model(), cfg, tmp_path / "again").final_eval is not None


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_max_batch_tokens_splits_the_step_but_not_the_update(grad_accum):
    """Pieces of one batch are summed in the same optimizer step: same losses and weights as unsplit."""
    plain = TrainConfig(max_steps=4, batch_size=6, grad_accum=grad_accum, lr=1e-2, seed=5, save_every=None,
                        max_batch_tokens=None)  # off, whatever the default
    split = TrainConfig(**{**plain.__dict__, "max_batch_tokens": 20})  # 6 rows of up to 16 tokens: 5+ pieces
    a_model, b_model = _lora_model(dropout=0.0), _lora_model(dropout=0.0)
    a = _train(a_model, plain)
    pieces_per_batch = []

    def counted_split(batch, cap):
        pieces = split_by_tokens(batch, cap)
        pieces_per_batch.append(len(pieces))
        return pieces

    b = _train(b_model, split, options=StepOptions(split=counted_split))
    assert len(pieces_per_batch) == 4 * grad_accum and min(pieces_per_batch) > 1  # the cap really split every step
    assert b.padded_tokens < a.padded_tokens  # pieces are trimmed to their own longest row
    assert [r["train_loss"] for r in a.history if "train_loss" in r] == pytest.approx(
        [r["train_loss"] for r in b.history if "train_loss" in r], rel=1e-5)
    assert a.state.train_tokens == b.state.train_tokens
    for (name, p), (_, q) in zip(_trainable_state(a_model).items(), _trainable_state(b_model).items(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
    assert b.final_eval.loss == pytest.approx(a.final_eval.loss, rel=1e-5)


def test_optimizer_step_is_the_step_a_run_takes():
    """bench/ times optimizer_step on batches it chose: one call is exactly a one-step run's step."""
    cfg = TrainConfig(max_steps=1, batch_size=4, lr=1e-2, seed=0, save_every=None, scheduler="constant")
    run_model, step_model = _lora_model(dropout=0.0), _lora_model(dropout=0.0)
    outcome = _train(run_model, cfg)
    first = next(iter(batches(_examples(24), cfg.batch_size, pad_id=0, seed=cfg.seed, epoch=0)))
    step_model.train()
    step = optimizer_step(step_model, trainable_named_parameters(step_model), build_optimizer(step_model, cfg),
                          [first], "instruction", cfg, torch.device("cpu"))
    record = outcome.history[0]
    assert (step.loss, step.units, step.tokens) == (record["train_loss"], record["train_units"],
                                                    outcome.state.train_tokens)
    assert step.padded_tokens == outcome.padded_tokens == first["input_ids"].numel()
    for name, value in _trainable_state(run_model).items():
        assert torch.equal(value, _trainable_state(step_model)[name]), name


def test_each_step_logs_its_gradient_norm_before_clipping(tmp_path):
    """grad_norm in metrics.jsonl: the L2 norm of the step's whole gradient, before clip_grad_norm_ scales it."""
    import json

    cfg = TrainConfig(max_steps=2, batch_size=4, lr=1e-2, seed=0, save_every=None, max_grad_norm=1e-3)
    outcome = _train(_lora_model(dropout=0.0), cfg, tmp_path)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    norms = [r["grad_norm"] for r in logged if "train_loss" in r]
    assert len(norms) == 2 and all(n > 1e-3 for n in norms)  # above the clip: the unclipped norm is logged
    model = _lora_model(dropout=0.0)
    model.train()
    first = next(iter(batches(_examples(24), cfg.batch_size, pad_id=0, seed=cfg.seed, epoch=0)))
    accumulate_gradients(model, [first], "instruction", cfg, torch.device("cpu"))
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for _, p in trainable_named_parameters(model)]))
    assert norms[0] == pytest.approx(float(expected), rel=1e-5)
    assert outcome.history[0]["grad_norm"] == norms[0]


def test_outcome_counts_padded_tokens_and_evaluation_seconds():
    """What a benchmark reads off a run instead of wrapping its functions: padding trained on, time evaluating."""
    cfg = TrainConfig(max_steps=3, batch_size=4, eval_every=2, seed=0, save_every=None)
    outcome = _train(_lora_model(), cfg)
    trained = list(batches(_examples(24), cfg.batch_size, pad_id=0, seed=cfg.seed, epoch=0))[:3]
    assert outcome.padded_tokens == sum(b["input_ids"].numel() for b in trained)  # no split: whole batches
    assert outcome.state.train_tokens == sum(int(b["attention_mask"].sum()) for b in trained)
    assert outcome.eval_seconds > 0 and outcome.eval_cpu_seconds >= 0  # the evaluations at steps 2 and 3
    assert "seconds" not in outcome.final_eval.as_metrics()  # a cost, never a logged metric


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_each_step_record_carries_its_label_units(tmp_path, grad_accum):
    """train_units: the label tokens a step's loss averages over, so a report can weight a running loss."""
    import json

    cfg = TrainConfig(max_steps=6 // grad_accum, batch_size=4, grad_accum=grad_accum, lr=1e-2, seed=0, save_every=None)
    outcome = _train(_lora_model(), cfg, tmp_path)
    steps = [r for r in outcome.history if "train_loss" in r]
    # one epoch exactly: each example once, and each counts its labels after the 3-token prompt
    assert sum(r["train_units"] for r in steps) == sum(len(e["input_ids"]) - 3 for e in _examples(24))
    assert all(isinstance(r["train_units"], int) and r["train_units"] > 0 for r in steps)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_units"] for r in logged if "train_loss" in r] == [r["train_units"] for r in steps]


def test_load_average_is_sampled_at_start_logged_steps_and_end(monkeypatch):
    import os

    samples = []

    def rising_load():
        samples.append(len(samples) + 1.0)
        return samples[-1], 0.0, 0.0

    monkeypatch.setattr(os, "getloadavg", rising_load)
    outcome = _train(_lora_model(), TrainConfig(max_steps=4, log_every=2, batch_size=4, seed=0, save_every=None))
    assert len(samples) == 1 + 2 + 1  # start, steps 2 and 4, end
    assert outcome.load_avg_max == max(samples)


def test_non_finite_eval_during_training_is_a_divergence_at_that_step(monkeypatch):
    import peftlab.run.train as train_module
    from peftlab.run.evaluate import EvalResult

    monkeypatch.setattr(train_module, "evaluate", lambda *args, **kwargs: EvalResult(float("inf"), 5))
    outcome = _train(_lora_model(), TrainConfig(max_steps=5, eval_every=2, batch_size=4, seed=0, save_every=None))
    assert outcome.status == "diverged" and outcome.final_eval is None
    assert outcome.divergence == {"step": 2, "reason": "non-finite eval loss (inf)", "parameters": []}
    assert outcome.state.step == 2  # training stopped there


def _logged(directory, kind):
    lines = (directory / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if kind in r]


def test_resume_truncates_the_log_to_what_it_held_at_the_checkpoint(tmp_path):
    records = [{"step": 1, "train_loss": 1.0}, {"step": 2, "train_loss": 0.9}, {"step": 2, "eval_loss": 0.8},
               {"step": 3, "train_loss": 0.7}, {"step": 3, "train_loss": 0.7},  # a step logged twice
               {"step": 3, "eval_loss": 0.6},  # the final eval, after the checkpoint at step 3
               {"step": 4, "train_loss": 0.5}]  # after the checkpoint
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 5, "tr')
    history = records[:4]  # what the checkpoint at step 3 recorded
    log = MetricsLog(tmp_path, echo=False)
    log.truncate_after(3, history)
    assert _logged(tmp_path, "train_loss") == [1, 2, 3] and _logged(tmp_path, "eval_loss") == [2]
    log.truncate_after(0, [])  # no checkpoint: the run starts over on an empty log
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_resume_without_a_checkpoint_starts_over_on_an_empty_log(tmp_path):
    cfg = TrainConfig(max_steps=3, batch_size=4, lr=1e-2, seed=0, save_every=None)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train_loss": 9.0}\n{"step": 2, "train_loss": 8.0}\n{"st')
    outcome = _train(_lora_model(), cfg, tmp_path, resume=True)
    assert outcome.status == "completed" and outcome.state.step == 3
    assert _logged(tmp_path, "train_loss") == [1, 2, 3] and _logged(tmp_path, "eval_loss") == [3]
