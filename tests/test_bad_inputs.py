"""The catalogue of bad inputs: each one is one line on stderr and exit code 2, never a traceback.

Every case drives the real command line (``peftlab.cli.main``). A case is (id, how to build the
input, the fragment the error line must hold); add a row to CASES for each new kind of mistake.

Faults of the disk are real where the machine allows: a full disk is a small tmpfs filled up, a
read-only one a tmpfs remounted read-only (``mount`` needs root). Where mounting is refused, the
``Disk`` fixture falls back to monkeypatching the write calls (os.open, os.pwrite, open,
safetensors' save_file) to raise the same OSError for paths in the folder; ``Disk.real`` says which.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from test_report import _write_run
from test_run import _alpaca, _config, _reviews
from test_sweep import _tiny_sweep

from peftlab.cli import main
from peftlab.study.sweep import expand, load_sweep

REPO = Path(__file__).resolve().parents[1]
# QLoRA needs a CUDA GPU and bitsandbytes: where either is missing, a QLoRA run is a bad input too.
QLORA_RUNS_HERE = torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None
HOLDER = """
import sys
from peftlab.locking import folder_lock
with folder_lock(sys.argv[1], sys.argv[2]):
    print("locked", flush=True)
    sys.stdin.read()  # held until the test closes stdin (or kills this process)
"""


# --- disk faults ---------------------------------------------------------------------------------


def _mount(folder: Path, options: str) -> bool:
    if os.environ.get("PEFTLAB_TEST_NO_MOUNT") or shutil.which("mount") is None:
        return False
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


class Disk:
    """A folder on a full or read-only file system: a real tmpfs where mount works, else patched writes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.monkeypatch, self.mounts, self.real = monkeypatch, [], None

    def full(self, folder: Path, room: int = 0, failing: str = "") -> Path:
        """``folder`` on a disk with ``room`` bytes free (0: full).

        Patched: writes to names holding ``failing`` fail."""
        if _mount(folder, "size=512k"):
            self.mounts.append(folder)
            self.real = True
            filler = folder / "filler"
            with contextlib.suppress(OSError), open(filler, "wb") as handle:
                while True:
                    handle.write(b"\0" * 65536)
                    handle.flush()
            os.truncate(filler, max(0, filler.stat().st_size - room))
            return folder
        self.real = False
        folder.mkdir(parents=True, exist_ok=True)
        self._patch(folder, errno.ENOSPC, failing)
        return folder

    def read_only(self, folder: Path, fill: Callable[[Path], None] = lambda _: None) -> Path:
        """``folder`` on a read-only disk, after ``fill(folder)`` has written what it should hold."""
        if _mount(folder, "size=4m"):
            self.mounts.append(folder)
            self.real = True
            fill(folder)
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
            return folder
        self.real = False
        folder.mkdir(parents=True, exist_ok=True)
        fill(folder)
        self._patch(folder, errno.EROFS, "")
        return folder

    def _patch(self, folder: Path, code: int, failing: str) -> None:
        import builtins

        import safetensors.torch

        import peftlab.run.checkpoint
        import peftlab.run.experiment

        def refused(path) -> bool:
            path = Path(path).absolute()
            return (path == folder.absolute() or folder.absolute() in path.parents) and failing in path.name

        def fail(path):
            raise OSError(code, os.strerror(code), str(path))

        real_open, real_os_open, real_pwrite, real_save = builtins.open, os.open, os.pwrite, safetensors.torch.save_file

        def patched_open(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, Path)) and set(mode) & set("wax+") and refused(file):
                fail(file)
            return real_open(file, mode, *args, **kwargs)

        def patched_os_open(path, flags, *args, **kwargs):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and refused(path) and code == errno.EROFS:
                fail(path)
            return real_os_open(path, flags, *args, **kwargs)

        def patched_pwrite(fd, data, offset):  # only peftlab's lock file uses pwrite
            if code == errno.ENOSPC and not failing:
                raise OSError(code, os.strerror(code))
            return real_pwrite(fd, data, offset)

        def patched_save(tensors, filename, *args, **kwargs):
            if refused(filename):
                raise RuntimeError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")
            return real_save(tensors, filename, *args, **kwargs)

        self.monkeypatch.setattr(builtins, "open", patched_open)
        self.monkeypatch.setattr(os, "open", patched_os_open)
        self.monkeypatch.setattr(os, "pwrite", patched_pwrite)
        for module in (peftlab.run.checkpoint, peftlab.run.experiment):
            self.monkeypatch.setattr(module, "save_file", patched_save)

    def close(self) -> None:
        for folder in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


# --- the environment a case builds its input in ---------------------------------------------------


@dataclass
class Env:
    tmp: Path
    model: Path
    disk: Disk
    holders: list
    fragments: list  # more fragments the error line must hold, known only once the case is built (a pid)

    def config(self, **sections) -> Path:
        """test_run's tiny instruction config, its sections updated from ``sections``."""
        path = _config(self.tmp, self.model, _alpaca(self.tmp / "alpaca.jsonl"))
        config = yaml.safe_load(path.read_text())
        for key, value in sections.items():
            merge = isinstance(value, dict) and key != "method"  # a method section is whole: fields differ per method
            config[key] = {**config[key], **value} if merge else value
        path.write_text(yaml.safe_dump(config))
        return path

    def hold_lock(self, folder: Path, what: str) -> int:
        """Another process holding ``folder``'s lock (a real second process); returns its pid."""
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), what], cwd=REPO,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.holders.append(holder)
        assert holder.stdout.readline().strip() == b"locked"
        self.fragments.append(f"pid {holder.pid}, a {what}")
        return holder.pid


@pytest.fixture
def env(tmp_path, tiny_llama_dir, monkeypatch):
    disk = Disk(monkeypatch)
    environment = Env(tmp_path, tiny_llama_dir, disk, [], [])
    yield environment
    for holder in environment.holders:
        holder.stdin.close()
        holder.wait(30)
    monkeypatch.undo()
    disk.close()


# --- the cases -----------------------------------------------------------------------------------


def _latin1(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("latin-1"))
    return path


def _config_not_utf8(env: Env) -> list[str]:
    path = _latin1(env.tmp / "caf\u00e9.yaml", f"name: caf\u00e9\nmodel: {env.model}\n")
    return ["run", str(path), "--out", str(env.tmp / "out")]


def _sweep_not_utf8(env: Env) -> list[str]:
    path = _latin1(env.tmp / "sweep.yaml", "name: caf\u00e9\nstrategies: {a: {}}\n")
    return ["sweep", str(path), "--out", str(env.tmp / "out")]


def _data_not_utf8(suffix: str, task: str) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        good = {".jsonl": _alpaca, ".csv": _reviews}.get(suffix)
        data = env.tmp / f"data{suffix}"
        if good is not None:
            good(data)
            data.write_bytes(data.read_bytes() + "caf\u00e9 \u00e0 la cr\u00e8me\n".encode("latin-1"))
        else:
            _latin1(data, "to be or not to be, caf\u00e9 " * 40)
        config = _config(env.tmp, env.model, data, task=task)
        return ["run", str(config), "--out", str(env.tmp / "out")]
    return build


def _set(*overrides: str) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        argv = ["run", str(env.config()), "--out", str(env.tmp / "out")]
        for override in overrides:
            argv += ["--set", override]
        return argv
    return build


def _tracker_missing(backend: str) -> Callable[[Env], list[str]]:
    """train.report_to names a tracker whose package is not installed (find_spec sees None in sys.modules)."""
    def build(env: Env) -> list[str]:
        env.disk.monkeypatch.setitem(sys.modules, backend, None)
        return _set(f"train.report_to=[{backend}]")(env)
    return build


def _method(method: dict) -> Callable[[Env], list[str]]:
    """A run config whose method section is exactly ``method``."""
    def build(env: Env) -> list[str]:
        path = env.config()
        config = yaml.safe_load(path.read_text())
        config["method"] = method
        path.write_text(yaml.safe_dump(config))
        return ["run", str(path), "--out", str(env.tmp / "out")]
    return build


def _sweep_with(strategies: dict) -> Callable[[Env], list[str]]:
    return lambda env: ["sweep", str(_tiny_sweep(env.tmp, env.model, strategies)), "--out", str(env.tmp / "out")]


def _inspect_ranks(spec: str) -> Callable[[Env], list[str]]:
    return lambda env: ["inspect", "--model", str(env.model), "--ranks", spec]


def _pickle_model(env: Env) -> list[str]:
    """A model folder whose only weights are a pytorch_model.bin pickle that runs code when unpickled."""
    import torch
    from safetensors.torch import load_file

    folder = env.tmp / "pickled"
    shutil.copytree(env.model, folder)
    weights = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    weights["payload"] = _Payload()
    torch.save(weights, folder / "pytorch_model.bin")
    return ["run", str(_config(env.tmp, folder, _alpaca(env.tmp / "alpaca.jsonl"))), "--out", str(env.tmp / "out")]


class _Payload:
    def __reduce__(self):  # what a malicious pickle does: call something on load
        return (print, ("this must never run",))


def _full_disk(env: Env) -> list[str]:
    out = env.disk.full(env.tmp / "disk") / "run"
    return ["run", str(env.config()), "--out", str(out)]


def _full_disk_at(room_pages: int, name: str, **sections) -> Callable[[Env], list[str]]:
    """Room (in 4 KiB tmpfs pages) for the files a run writes before ``name``: the lock file, config.yaml,
    train.log, metrics.jsonl, in that order, each one page; patched writes fail on ``name`` only."""
    def build(env: Env) -> list[str]:
        out = env.disk.full(env.tmp / "disk", room=room_pages * 4096, failing=name) / "run"
        return ["run", str(env.config(**sections)), "--out", str(out)]
    return build


def _full_disk_at_checkpoint(env: Env) -> list[str]:
    """Room for config.yaml and the logs, not for a checkpoint (saved after every step)."""
    out = env.disk.full(env.tmp / "disk", room=24 * 1024, failing="checkpoint") / "run"
    return ["run", str(env.config(train={"save_every": 1, "num_samples": 0})), "--out", str(out)]


def _read_only_run(env: Env) -> list[str]:
    out = env.disk.read_only(env.tmp / "disk") / "run"
    return ["run", str(env.config()), "--out", str(out)]


def _read_only_sweep(env: Env) -> list[str]:
    sweep = _tiny_sweep(env.tmp, env.model)
    return ["sweep", str(sweep), "--out", str(env.disk.read_only(env.tmp / "disk"))]


def _read_only_report(env: Env) -> list[str]:
    def fill(folder: Path) -> None:
        _write_run(folder, "a__seed1", "a", 0, 1, loss=2.0)
        _write_run(folder, "a__seed2", "a", 0, 2, loss=2.1)
    return ["report", str(env.disk.read_only(env.tmp / "disk", fill))]


def _truncated_summary_on_resume(env: Env) -> list[str]:
    out = env.tmp / "out"
    out.mkdir()
    config = env.config()
    (out / "config.yaml").write_text(_resolved(config))
    (out / "summary.json").write_text('{"status": "completed", "metrics": {"eval_lo')
    return ["run", str(config), "--out", str(out), "--resume"]


def _resolved(config: Path) -> str:
    from peftlab.config import config_to_dict, load_config

    return yaml.safe_dump(config_to_dict(load_config(config)))


def _truncated_summary_on_sweep_resume(env: Env) -> list[str]:
    sweep = _tiny_sweep(env.tmp, env.model)
    out = env.tmp / "out"
    trial = next(t for t in expand(load_sweep(sweep), out) if not t.is_reference)
    trial.out_dir.mkdir(parents=True)
    (trial.out_dir / "summary.json").write_text('{"status": "comp')
    return ["sweep", str(sweep), "--out", str(out), "--resume"]


def _run_folder_in_use(env: Env) -> list[str]:
    out = env.tmp / "out"
    env.hold_lock(out, "run")
    return ["run", str(env.config()), "--out", str(out)]


def _sweep_folder_in_use(env: Env) -> list[str]:
    out = env.tmp / "out"
    env.hold_lock(out, "sweep")
    return ["sweep", str(_tiny_sweep(env.tmp, env.model)), "--out", str(out)]


def _chats(edit: Callable[[list[dict]], object], *overrides: str,
           template: str | None = None) -> Callable[[Env], list[str]]:
    """A run on 12 one-exchange conversations (messages format) after ``edit(rows)``; ``template`` gives the
    model a copy with that chat template (the tiny model has none)."""
    def build(env: Env) -> list[str]:
        rows = [{"messages": [{"role": "user", "content": f"what is {i}"},
                              {"role": "assistant", "content": f"it is {i}"}]} for i in range(12)]
        edit(rows)
        data = env.tmp / "chats.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        config = env.config(data={"source": str(data)})
        if template is not None:
            model = env.tmp / "model"
            shutil.copytree(env.model, model)
            (model / "chat_template.jinja").write_text(template)
            raw = yaml.safe_load(config.read_text())
            config.write_text(yaml.safe_dump({**raw, "model": str(model)}))
        argv = ["run", str(config), "--out", str(env.tmp / "out")]
        for override in overrides:
            argv += ["--set", override]
        return argv
    return build


def _turn(row: int, turn: int, **changes) -> Callable[[list[dict]], None]:
    """Edit turn ``turn`` of record ``row`` (both counted from 1, as errors name them); a None value drops the key."""
    def edit(rows: list[dict]) -> None:
        item = rows[row - 1]["messages"][turn - 1]
        item.update(changes)
        for key in [k for k, v in changes.items() if v is None]:
            del item[key]
    return edit


def _as_sharegpt(rows: list[dict]) -> None:
    names = {"user": "human", "assistant": "gpt"}
    for row in rows:
        row["conversations"] = [{"from": names[t["role"]], "value": t["content"]} for t in row.pop("messages")]
    rows[5]["conversations"][0]["from"] = "user"


UNSTABLE_TEMPLATE = ("{{ messages | length }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>"
                     "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _full_disk_after_the_model(env: Env) -> list[str]:
    """Room for everything a full fine-tuning run writes up to its summary, model/ included: the disk fills up
    right after the model is saved (patched writes fail on summary.json only)."""
    import peftlab.run.experiment

    folder = env.disk.full(env.tmp / "disk", room=400 * 1024, failing="summary.json")
    real_save = peftlab.run.experiment.save_trained

    def save_then_fill(*args, **kwargs):
        artifact = real_save(*args, **kwargs)
        if env.disk.real:  # a real tmpfs: fill what is left; patched writes already refuse summary.json
            with contextlib.suppress(OSError), open(folder / "filler-after-model", "wb") as handle:
                while True:
                    handle.write(b"\0" * 4096)
                    handle.flush()
        return artifact
    env.disk.monkeypatch.setattr(peftlab.run.experiment, "save_trained", save_then_fill)
    return ["run", str(env.config(method={"name": "full"}, train={"num_samples": 0})), "--out", str(folder / "run")]


# --- finished runs: generate, merge, eval, push ---------------------------------------------------


def _finished_run(env: Env, status: str = "completed", **method) -> Path:
    """A run folder as a finished run leaves it, without training: config.yaml, summary.json, the artifact's
    folder. Enough for every check made before the model loads."""
    from summaries import make_summary

    from peftlab.run.summary import Artifact, Divergence, write_summary

    out = env.tmp / "finished"
    out.mkdir()
    config = env.config(**({"method": method} if method else {}))
    (out / "config.yaml").write_text(_resolved(config))
    (out / "adapter").mkdir()
    diverged = {"divergence": Divergence(2, "non-finite loss (nan)", ["w"])} if status == "diverged" else {}
    write_summary(out / "summary.json", make_summary(status, artifacts=Artifact("peft", "adapter", 1), **diverged))
    return out


def _trained_run(env: Env, **method) -> Path:
    """A real three-step run (tiny Llama), for checks made after the model loads."""
    out = env.tmp / "trained"
    config = env.config(**({"method": method} if method else {}), train={"num_samples": 0})
    assert main(["run", str(config), "--out", str(out)]) == 0
    return out


def _unfinished_run(env: Env) -> list[str]:
    out = env.tmp / "unfinished"
    out.mkdir()
    (out / "config.yaml").write_text(_resolved(env.config()))
    (out / "metrics.jsonl").write_text('{"step": 1, "train_loss": 5.0}\n')
    return ["generate", str(out), "--prompt", "hi"]


def _tampered_trainable(env: Env) -> list[str]:
    from safetensors.torch import load_file, save_file

    run = _trained_run(env, name="adapter")
    tensors = load_file(str(run / "trainable.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = torch.zeros(3, 3)
    save_file(tensors, str(run / "trainable.safetensors"))
    env.fragments.append(f"{name} (3, 3) vs")
    return ["generate", str(run), "--prompt", "hi"]


def _on_finished(command: str, *args: str, status: str = "completed",
                 method: dict | None = None) -> Callable[[Env], list[str]]:
    """``peftlab COMMAND <a _finished_run folder> ARGS`` ("{tmp}" in ARGS is the case's folder)."""
    def build(env: Env) -> list[str]:
        run = _finished_run(env, status, **(method or {}))
        return [command, str(run), *[arg.format(tmp=env.tmp) for arg in args]]
    return build


def _eval_on_reviews(env: Env) -> list[str]:
    """An instruction run evaluated on classification data."""
    return ["eval", str(_trained_run(env)), "--data", str(_reviews(env.tmp / "reviews.csv"))]


def _merge_into_non_empty(env: Env) -> list[str]:
    out = env.tmp / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    return ["merge", str(_finished_run(env)), "--out", str(out)]


@dataclass
class Case:
    id: str
    build: Callable[[Env], list[str]]
    fragment: str


NOT_UTF8 = "is not UTF-8 text"
CASES = [
    # files that are not UTF-8
    Case("config-not-utf8", _config_not_utf8, f"{NOT_UTF8} (byte 0xe9 on line 1"),
    Case("sweep-not-utf8", _sweep_not_utf8, NOT_UTF8),
    Case("jsonl-data-not-utf8", _data_not_utf8(".jsonl", "instruction"), f"{NOT_UTF8} (byte 0xe9 on line 25"),
    Case("csv-data-not-utf8", _data_not_utf8(".csv", "classification"), NOT_UTF8),
    Case("txt-data-not-utf8", _data_not_utf8(".txt", "causal_lm"), NOT_UTF8),
    # inf and nan where a finite number is needed
    Case("epochs-inf", _set("train.epochs=.inf"), "train.epochs must be a finite number, got inf"),
    Case("lr-nan", _set("train.lr=.nan"), "train.lr must be a finite number, got nan"),
    Case("lr-inf-string", _set("train.lr=inf"), "train.lr must be a finite number, got inf"),
    Case("alpha-inf", _set("method.alpha=.inf"), "method.alpha must be a finite number, got inf"),
    Case("multipliers-nan", _set("method.ranks.schedule=empirical", "method.ranks.multipliers=[0.6, .nan, 1.0]"),
         "method.ranks.multipliers[1] must be a finite number, got nan"),
    Case("eval-size-inf", _set("data.eval_size=.inf"), "data.eval_size must be a finite number, got inf"),
    Case("warmup-nan", _set("train.warmup_ratio=.nan"), "train.warmup_ratio must be a finite number"),
    Case("weight-decay-inf", _set("train.weight_decay=.inf"), "train.weight_decay must be a finite number"),
    Case("grad-norm-inf", _set("train.max_grad_norm=.inf"), "train.max_grad_norm must be a finite number"),
    Case("lora-plus-inf", _set("train.lora_plus_ratio=.inf"), "train.lora_plus_ratio must be a finite number"),
    Case("dropout-nan", _set("method.dropout=.nan"), "method.dropout must be a finite number"),
    Case("inspect-multiplier-inf", _inspect_ranks("empirical:8:0.6,inf,1.0"),
         "method.ranks.multipliers[1] must be a finite number, got inf"),
    # a field the chosen method does not read: refused, never silently ignored
    Case("adapter-with-placement", _method({"name": "adapter", "placement": "attention_only"}),
         "method.placement='attention_only' is not used by method adapter (only by lora)"),
    Case("full-with-rank", _method({"name": "full", "ranks": {"r": 4}}), "method.ranks.r=4 is not used by method full"),
    Case("partial-with-layers", _method({"name": "partial", "last_n": 1, "layers": [0]}),
         "method.layers=[0] is not used by method partial (only by lora and adapter)"),
    Case("sweep-strategy-field-unused", _sweep_with({"lora": {}, "full": {"method.name": "full", "method.alpha": 8}}),
         "strategy full: method.alpha=8.0 is not used by method full"),
    Case("sweep-base-field-read-by-none", _sweep_with({"full": {"method.name": "full"},
                                                       "last2": {"method.name": "partial", "method.last_n": 2}}),
         "strategy full: method.ranks.r=2 is not used by method full (only by lora)"),
    # precision, base dtype and QLoRA (run/precision.py, method.quantize_base)
    Case("base-dtype-unknown", _set("train.base_dtype=float16"),
         "train.base_dtype='float16' is not one of auto, fp32, bf16, fp16"),
    Case("fp32-compute-on-bf16-base", _set("train.base_dtype=bf16", "train.precision=fp32"),
         "train.precision=fp32 with train.base_dtype=bf16: fp32 compute on a half-precision base"),
    Case("bf16-autocast-on-fp16-base", _set("train.base_dtype=fp16", "train.precision=bf16"),
         "train.precision=bf16 with train.base_dtype=fp16: autocast must match the base dtype"),
    Case("gradient-checkpointing-not-bool", _set("train.gradient_checkpointing=sometimes"),
         "train.gradient_checkpointing must be bool, got 'sometimes'"),
    Case("quantize-base-unknown", _set("method.quantize_base=nf8"),
         "method.quantize_base='nf8' is not one of null, nf4, int8 (did you mean 'nf4'?)"),
    Case("quantize-base-with-dora", _set("method.quantize_base=nf4", "method.dora=true"),
         "method.dora=True with method.quantize_base='nf4': DoRA on a quantized base is not supported"),
    Case("quantize-base-on-cpu-device", _set("method.quantize_base=int8", "train.device=cpu"),
         "method.quantize_base='int8' (QLoRA) needs a CUDA GPU, but train.device=cpu"),
    *[Case(f"{name}-with-quantize-base", _method({"name": name, **fields, "quantize_base": "nf4"}),
           f"method.quantize_base='nf4' is not used by method {name} (only by lora)")
      for name, fields in (("adapter", {}), ("partial", {"last_n": 1}), ("full", {}))],
    *([Case("quantize-base-without-gpu-or-bitsandbytes", _set("method.quantize_base=nf4"),
            "method.quantize_base='nf4' (QLoRA) needs")] if not QLORA_RUNS_HERE else []),
    # a model whose weights cannot be loaded safely
    Case("pickle-model", _pickle_model, "pickle file that torch refuses to load as plain tensors"),
    # a full or read-only disk
    Case("full-disk", _full_disk, "No space left on device (ENOSPC)"),
    Case("full-disk-at-config", _full_disk_at(1, "config.yaml"), "config.yaml: No space left on device"),
    Case("full-disk-at-log", _full_disk_at(2, "train.log"), "train.log: No space left on device"),
    Case("full-disk-at-metrics", _full_disk_at(3, "metrics.jsonl"), "metrics.jsonl: No space left on device"),
    Case("full-disk-at-checkpoint", _full_disk_at_checkpoint, "checkpoint.safetensors: No space left on device"),
    Case("full-disk-at-summary", _full_disk_after_the_model, "summary.json: No space left on device"),
    Case("read-only-run", _read_only_run, "Read-only file system (EROFS)"),
    Case("read-only-sweep", _read_only_sweep, "Read-only file system (EROFS)"),
    Case("read-only-report", _read_only_report, "Read-only file system (EROFS)"),
    # damaged files met by --resume
    Case("truncated-summary-resume", _truncated_summary_on_resume, "summary.json is damaged"),
    Case("truncated-summary-sweep-resume", _truncated_summary_on_sweep_resume, "summary.json is damaged"),
    # a folder another process is using
    Case("run-folder-in-use", _run_folder_in_use, "is in use by another peftlab process"),
    Case("sweep-folder-in-use", _sweep_folder_in_use, "is in use by another peftlab process"),
    # every record dropped (its prompt fills max_length): once, training waited forever for a batch
    Case("no-example-left", _set("data.max_length=8"), "no training example is left"),
    # processes per trial (study/multiprocess.py) and train.fsdp
    Case("sweep-nproc-zero", lambda env: _sweep_with({"a": {}})(env) + ["--nproc", "0"], "--nproc must be >= 1, got 0"),
    Case("fsdp-with-qlora", _set("method.quantize_base=nf4", "train.fsdp=true"),
         "method.quantize_base='nf4' with train.fsdp=True: sharding a bitsandbytes-quantized base is not supported"),
    # best checkpoint and early stopping (run/best.py): both watch the periodic evaluations
    Case("keep-best-without-eval-every", _set("train.keep_best=eval_loss"),
         "train.keep_best needs train.eval_every"),
    Case("early-stopping-without-eval-every", _set("train.early_stopping={patience: 2}"),
         "train.early_stopping needs train.eval_every"),
    Case("keep-best-unknown", _set("train.keep_best=loss", "train.eval_every=2"),
         "train.keep_best='loss' is not one of null, eval_loss, accuracy"),
    Case("keep-best-accuracy-not-classification", _set("train.keep_best=accuracy", "train.eval_every=2"),
         "train.keep_best=accuracy needs task classification (task instruction has no accuracy)"),
    Case("early-stopping-patience-zero", _set("train.early_stopping={patience: 0}", "train.eval_every=2"),
         "train.early_stopping.patience must be >= 1, got 0"),
    Case("early-stopping-negative-min-delta", _set("train.early_stopping={min_delta: -0.1}", "train.eval_every=2"),
         "train.early_stopping.min_delta must be >= 0"),
    Case("early-stopping-unknown-key", _set("train.early_stopping={patiance: 2}", "train.eval_every=2"),
         "unknown config key train.early_stopping.patiance (did you mean train.early_stopping.patience?)"),
    Case("early-stopping-not-a-mapping", _set("train.early_stopping=3", "train.eval_every=2"),
         "train.early_stopping must be a mapping, got int"),
    # data formats and templates (inputs/data/conversations.py, templates.py)
    Case("data-template-unknown", _set("data.template=chatml"),
         "data.template='chatml' is not one of auto, alpaca, chat, none (did you mean 'chat'?)"),
    Case("data-format-unknown", _set("data.format=openai"),
         "data.format='openai' is not one of auto, alpaca, messages"),
    Case("data-template-on-classification", _set("task=classification", "data.template=chat"),
         "data.template='chat' is for task instruction only (task is classification)"),
    Case("chat-template-missing", _set("data.template=chat"), "data.template=chat, but the tokenizer of"),
    Case("format-messages-on-alpaca-data", _set("data.format=messages"),
         "is read as messages (data.format) but its first record has no 'messages' column"),
    Case("turn-without-content", _chats(_turn(3, 2, content=None)), "record 3, turn 2 has no 'content'"),
    Case("turn-without-role", _chats(_turn(2, 1, role=None)), "record 2, turn 1 has no 'role'"),
    Case("turn-unknown-role", _chats(_turn(4, 1, role="human")),
         "record 4, turn 1: unknown role 'human' (messages role values: system, user, assistant)"),
    Case("conversation-without-assistant", _chats(_turn(7, 2, role="user")),
         "record 7: the conversation has no assistant turn"),
    Case("conversation-empty", _chats(lambda rows: rows[4].update(messages=[])), "record 5: the conversation is empty"),
    Case("sharegpt-unknown-from", _chats(_as_sharegpt), "record 6, turn 1: unknown from 'user'"),
    Case("long-conversation-under-alpaca", _chats(lambda rows: rows[1]["messages"].extend(rows[2]["messages"])),
         "record 2: data.template=alpaca takes one user turn then one assistant turn"),
    Case("chat-template-not-prefix-stable", _chats(lambda rows: None, template=UNSTABLE_TEMPLATE),
         "record 1: the chat template of"),
    # train.max_batch_tokens: auto, null/0 or an integer >= 8
    Case("max-batch-tokens-word", _set("train.max_batch_tokens=big"),
         "train.max_batch_tokens must be auto, null or 0 (no split), or an integer >= 8, got 'big'"),
    Case("max-batch-tokens-small", _set("train.max_batch_tokens=4"),
         "train.max_batch_tokens must be auto, null or 0 (no split), or an integer >= 8, got 4"),
    # the eval section: generation metrics and forgetting
    Case("generate-metric-unknown", _set("eval.generate.metrics=[exact, rougeL]"),
         "eval.generate.metrics[0]='exact' is not one of exact_match, rougeL, contains (did you mean 'exact_match'?)"),
    Case("generate-on-classification", _set("task=classification", "eval.generate={num_examples: 4}"),
         "eval.generate needs task instruction (it scores generated answers against reference outputs), "
         "but task=classification"),
    Case("generate-num-examples-negative", _set("eval.generate.num_examples=-2"),
         "eval.generate.num_examples must be >= 0 (0: off), got -2"),
    Case("reference-source-unknown", _set("eval.reference=hamlett"),
         "eval.reference='hamlett' is not an embedded data set (chatterbot, rotten_tomatoes, hamlet) nor a local "
         "file (did you mean 'hamlet'?)"),
    Case("reference-file-missing", _set("eval.reference=./no/such/text.txt"),
         "eval.reference: data file not found: ./no/such/text.txt"),
    # finished runs: generate, merge, eval, push
    Case("generate-run-dir-missing", lambda env: ["generate", str(env.tmp / "nowhere"), "--prompt", "hi"],
         "run folder not found"),
    Case("generate-unfinished-run", _unfinished_run, "holds no summary.json: not a finished peftlab run"),
    Case("eval-diverged-run", _on_finished("eval", "--data", "x.jsonl", status="diverged"),
         "did not complete (diverged: step 2, non-finite loss (nan)), so it saved no model"),
    Case("merge-collapsed-run", _on_finished("merge", "--out", "{tmp}/m", status="collapsed"),
         "did not complete (collapsed"),
    Case("merge-out-not-empty", _merge_into_non_empty, "already exists and is not an empty folder"),
    Case("merge-adapter-run", _on_finished("merge", "--out", "{tmp}/m", method={"name": "adapter"}),
         "houlsby bottleneck adapters: layers that no transformers architecture has"),
    Case("eval-wrong-task-data", _eval_on_reviews, "lacks instruction (column 'instruction')"),
    Case("eval-set-outside-data", _on_finished("eval", "--data", "x", "--set", "train.lr=1"),
         "--set train.lr=1: eval changes data.* keys only"),
    Case("generate-no-prompt", _on_finished("generate"), "no prompt given"),
    Case("generate-trainable-does-not-fit", _tampered_trainable,
         "does not fit the model the run's config.yaml rebuilds (shape saved vs rebuilt: "),
    Case("push-bad-repo-id", _on_finished("push", "--repo", "not a repo", "--dry-run"),
         "--repo 'not a repo' is not a Hub repository id"),
    # experiment trackers (train.report_to)
    Case("report-to-unknown", _set("train.report_to=[tensorbord]"),
         "train.report_to: 'tensorbord' is not one of tensorboard, wandb, mlflow (did you mean 'tensorboard'?)"),
    Case("report-to-not-a-list", _set("train.report_to=wandb"), "train.report_to must be a list, got 'wandb'"),
    Case("report-to-twice", _set("train.report_to=[wandb, wandb]"), "train.report_to names a tracker twice"),
    Case("report-to-wandb-missing", _tracker_missing("wandb"),
         "train.report_to: wandb is not installed; pip install 'peftlab[wandb]'"),
    Case("report-to-mlflow-missing", _tracker_missing("mlflow"),
         "train.report_to: mlflow is not installed; pip install 'peftlab[mlflow]'"),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_one_line_and_exit_2(case, env, capsys):
    argv = case.build(env)
    code = main(argv)
    captured = capsys.readouterr()
    err = captured.err
    errors = [line for line in err.splitlines() if line.startswith("peftlab: error:")]
    assert code == 2, err
    assert len(errors) == 1, err
    assert case.fragment in errors[0] and all(f in errors[0] for f in env.fragments), errors[0]
    assert "Traceback" not in err and "this must never run" not in captured.out + err
    assert not [p for p in env.tmp.rglob("*.tmp")], "a temp file was left behind"


def test_the_catalogue_has_unique_ids():
    assert len({case.id for case in CASES}) == len(CASES)


# --- damaged files that are not mistakes: read past, and the run goes on ---------------------------


def test_a_full_disk_costs_nothing_once_space_is_freed(env, capsys):
    """The run that stopped on a full disk at its first checkpoint continues with --resume once there is room."""
    argv = _full_disk_at_checkpoint(env)
    assert main(argv) == 2
    out = Path(argv[argv.index("--out") + 1])
    if env.disk.real:
        (out.parent / "filler").unlink()
    else:
        env.disk.monkeypatch.undo()
    assert main(argv) == 2 and "--resume" in capsys.readouterr().err  # it trained a step: not silently redone
    assert main([*argv, "--resume"]) == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3]
    assert [r["step"] for r in records if "eval_loss" in r] == [3]


def test_a_torn_metrics_line_is_dropped_on_resume(env, capsys):
    """A kill mid-write leaves half a line at the end of metrics.jsonl: --resume drops it and goes on."""
    out = env.tmp / "out"
    config = env.config(train={"num_samples": 0})
    out.mkdir()
    (out / "config.yaml").write_text(_resolved(config))
    (out / "metrics.jsonl").write_text('{"step": 1, "train_loss": 5.7, "lr": 0.01}\n{"step": 2, "trai')
    assert main(["run", str(config), "--out", str(out), "--resume"]) == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]  # every line whole
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3]  # no checkpoint: restarted from 0


def test_report_lists_a_run_with_a_truncated_summary_with_the_reason(tmp_path, capsys):
    _write_run(tmp_path, "a__seed1", "a", 0, 1, loss=2.0)
    _write_run(tmp_path, "a__seed2", "a", 0, 2, loss=2.1)
    damaged = _write_run(tmp_path, "a__seed3", "a", 0, 3, loss=2.2)
    (damaged / "summary.json").write_text((damaged / "summary.json").read_text()[:40])
    assert main(["report", str(tmp_path)]) == 0, capsys.readouterr().err
    rows = {row["run_id"]: row for row in _csv_rows(tmp_path / "results.csv")}
    assert rows["a__seed3"]["status"] == "unfinished"
    assert "summary.json is damaged" in rows["a__seed3"]["reason"] and "--resume" in rows["a__seed3"]["reason"]
    assert rows["a__seed1"]["status"] == "completed"


def _csv_rows(path: Path) -> list[dict]:
    import csv

    with open(path) as handle:
        return list(csv.DictReader(handle))
