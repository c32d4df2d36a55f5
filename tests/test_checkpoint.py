"""Checkpoints are data only: exact round trips, and anything else refused without unpickling."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from peftlab.errors import UserError
from peftlab.run.checkpoint import (
    CHECKPOINT_FILE,
    LEGACY_CHECKPOINT_FILE,
    TrainState,
    has_checkpoint,
    load_checkpoint,
    save_checkpoint,
)


def _setup(seed: int = 0, out_features: int = 3):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, out_features)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def _steps(model, optimizer, scheduler, n: int) -> None:
    # Inputs and dropout come from the global RNG, so a resume that lost the RNG state would differ.
    for _ in range(n):
        x = torch.nn.functional.dropout(torch.randn(5, 4), p=0.5)
        model(x).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def _refusal(tmp_path, name=CHECKPOINT_FILE, model=None) -> str:
    model, optimizer, scheduler = _setup() if model is None else model
    with pytest.raises(UserError) as error:
        load_checkpoint(tmp_path, model, optimizer, scheduler)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"checkpoint {tmp_path / name} cannot be loaded safely: ")
    assert message.endswith("; delete it to restart the run")
    return message


def test_round_trip_continues_exactly_like_an_uninterrupted_run(tmp_path):
    model, optimizer, scheduler = _setup()
    _steps(model, optimizer, scheduler, 2)
    state = TrainState(step=2, epoch=1, batch_in_epoch=3, train_seconds=1.5, train_tokens=40)
    history = [{"step": 1, "train_loss": 0.5}, {"step": 2, "eval_loss": float("nan")}]
    path = save_checkpoint(tmp_path, model, optimizer, scheduler, state, history)
    assert path == tmp_path / CHECKPOINT_FILE and has_checkpoint(tmp_path)
    _steps(model, optimizer, scheduler, 2)  # the uninterrupted reference
    reference_rng = torch.get_rng_state()

    resumed, resumed_optimizer, resumed_scheduler = _setup(seed=1)  # other weights, other RNG state
    restored = load_checkpoint(tmp_path, resumed, resumed_optimizer, resumed_scheduler)
    loaded_state, loaded_history = restored.state, restored.history
    assert loaded_state == state
    assert loaded_history[0] == history[0] and loaded_history[1]["eval_loss"] != loaded_history[1]["eval_loss"]
    _steps(resumed, resumed_optimizer, resumed_scheduler, 2)

    for name, value in model.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    reference, restored = optimizer.state_dict(), resumed_optimizer.state_dict()
    assert reference["param_groups"] == restored["param_groups"]  # betas come back as a tuple too
    for param_id, entries in reference["state"].items():
        for key, value in entries.items():
            assert torch.equal(value, restored["state"][param_id][key]), (param_id, key)
    assert scheduler.state_dict() == resumed_scheduler.state_dict()
    assert torch.equal(torch.get_rng_state(), reference_rng)


def test_rng_state_is_restored(tmp_path):
    model, optimizer, scheduler = _setup()
    save_checkpoint(tmp_path, model, optimizer, scheduler, TrainState(), [])
    expected = torch.rand(3)
    torch.manual_seed(99)
    load_checkpoint(tmp_path, *_setup(seed=5))
    assert torch.equal(torch.rand(3), expected)


class _Payload:
    """Unpickling this creates a directory: the stand-in for arbitrary code in a received checkpoint."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("name", [CHECKPOINT_FILE, LEGACY_CHECKPOINT_FILE])
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_pickle_checkpoint_is_refused_without_being_unpickled(tmp_path, zip_format, name):
    armed = tmp_path / "armed"
    torch.save({"x": _Payload(str(armed))}, tmp_path / "probe.pt", _use_new_zipfile_serialization=zip_format)
    torch.load(tmp_path / "probe.pt", weights_only=False)  # the payload is live: the old loader ran it
    assert armed.exists()

    run = tmp_path / "run"
    run.mkdir()
    marker = tmp_path / "MARKER"
    torch.save({"trainable": {}, "x": _Payload(str(marker))}, run / name,
               _use_new_zipfile_serialization=zip_format)
    assert has_checkpoint(run)  # reported, so that --resume refuses it instead of starting over
    assert "old pickle-format checkpoint" in _refusal(run, name)
    assert not marker.exists()


@pytest.mark.parametrize("keep", [0.5, 0.01, 4 / 1e9], ids=["half", "header", "four-bytes"])
def test_a_truncated_checkpoint_is_refused(tmp_path, keep):
    model, optimizer, scheduler = _setup()
    _steps(model, optimizer, scheduler, 1)
    path = save_checkpoint(tmp_path, model, optimizer, scheduler, TrainState(), [])
    data = path.read_bytes()
    path.write_bytes(data[:max(4, int(len(data) * keep))])
    assert "not a complete safetensors file" in _refusal(tmp_path)


@pytest.mark.parametrize("spoil, fragment", [
    (lambda t, d: (t, None), "it has no peftlab metadata"),
    (lambda t, d: (t, "{not json"), "its metadata is not valid JSON"),
    (lambda t, d: (t, {**d, "format": "peftlab-checkpoint/1"}), "not in the peftlab-checkpoint/2 format"),
    (lambda t, d: ({**t, "param/extra": torch.zeros(2)}, d), "the model has no parameter 'extra'"),
    (lambda t, d: ({**t, "param/weight": torch.zeros(2, 4)}, d), "'weight' has shape [2, 4], the model's is [3, 4]"),
    (lambda t, d: ({k: v for k, v in t.items() if k != "param/bias"}, d), "lacks the trainable parameter 'bias'"),
    (lambda t, d: ({**t, "optim/0/exp_avg": torch.zeros(3)}, d), "optimizer state 'exp_avg' has shape [3]"),
    (lambda t, d: ({**t, "optim/7/exp_avg": torch.zeros(3)}, d), "names parameter '7'"),
    (lambda t, d: (t, {**d, "state": {"step": "2"}}), "its training state is malformed"),
    (lambda t, d: (t, {**d, "history": {"step": 1}}), "its metric history is malformed"),
    (lambda t, d: (t, {**d, "scheduler": {**d["scheduler"], "optimizer": 1}}), "its scheduler state does not match"),
    (lambda t, d: ({k: v for k, v in t.items() if k != "rng/cpu"}, d), "CPU random state is missing"),
], ids=["no-metadata", "bad-json", "old-format-tag", "unknown-name", "shape", "missing-name",
        "optimizer-shape", "optimizer-id", "state", "history", "scheduler", "rng"])
def test_a_checkpoint_that_does_not_fit_is_refused_and_changes_nothing(tmp_path, spoil, fragment):
    from safetensors import safe_open

    source = _setup()
    _steps(*source, 1)
    path = save_checkpoint(tmp_path, *source, TrainState(step=1), [{"step": 1, "train_loss": 1.0}])
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        document = json.loads(handle.metadata()["peftlab"])
    tensors, spoiled = spoil(tensors, document)
    metadata = None if spoiled is None else {"peftlab": spoiled if isinstance(spoiled, str) else json.dumps(spoiled)}
    save_file(tensors, str(path), metadata=metadata)

    target = _setup(seed=3)
    before = {name: value.clone() for name, value in target[0].state_dict().items()}
    assert fragment in _refusal(tmp_path, model=target)
    for name, value in target[0].state_dict().items():
        assert torch.equal(value, before[name]), name
    assert target[1].state_dict()["state"] == {}


def test_a_full_disk_keeps_the_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    """safetensors reports ENOSPC as its own error type, after writing part of the temp file."""
    import peftlab.run.checkpoint as checkpoint_module

    model, optimizer, scheduler = _setup()
    _steps(model, optimizer, scheduler, 1)
    path = save_checkpoint(tmp_path, model, optimizer, scheduler, TrainState(step=1), [])
    before = path.read_bytes()

    def disk_fills_up(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint_module, "save_file", disk_fills_up)
    _steps(model, optimizer, scheduler, 1)
    with pytest.raises(UserError) as error:
        save_checkpoint(tmp_path, model, optimizer, scheduler, TrainState(step=2), [])
    assert str(error.value) == f"cannot write {path}: No space left on device (ENOSPC)"
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE]
