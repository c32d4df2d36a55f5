"""Where peftlab's LoRA step spends its time, and what each speed lever buys.

    .venv/bin/python bench/levers.py --examples 64 --rounds 3            # all levers + a profile
    .venv/bin/python bench/levers.py --levers full_logits,threads_1 --no-profile

One process, one prepared model (peftlab LoRA on SmolLM2, the benchmark's settings), a fixed list
of training batches from peftlab.inputs.data.batches. Each lever is a context manager that changes one
thing and yields the ``StepOptions`` (loss, batch splitter) the steps run with: a lever on the loss or
the split passes other functions there; the others change a torch setting or the model object and
undo it. Nothing in peftlab is patched. The variants run interleaved (baseline, lever 1, lever 2, ...,
baseline, ...) over ``--rounds`` rounds and each reports the median seconds per training token of
peftlab's real optimizer step (peftlab.run.train.optimizer_step), its ratio to the baseline, the peak
RSS during its steps, and the largest loss / gradient difference against the baseline on the same
batch (dropout off, peftlab.run.train.accumulate_gradients), which must be float noise for a lever to
be kept. Writes ``<out>/levers-<machine>-<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import statistics
import sys
import time
import types
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from bench import machine  # noqa: E402
from bench.systems import Spec, load_data  # noqa: E402
from peftlab.config import MethodConfig, RankConfig, TrainConfig  # noqa: E402
from peftlab.core.methods import prepare  # noqa: E402
from peftlab.core.methods.dropout import LoRADropout  # noqa: E402
from peftlab.core.methods.lora import LoRALinear  # noqa: E402
from peftlab.core.modelmap import build_model_map  # noqa: E402
from peftlab.inputs.data import TaskData, batches, split_by_tokens  # noqa: E402
from peftlab.inputs.models import load_model  # noqa: E402
from peftlab.run.evaluate import evaluate  # noqa: E402
from peftlab.run.losses import IGNORE_INDEX, full_logits_loss_sum, labelled_logits, loss_sum  # noqa: E402
from peftlab.run.optimizer import build_optimizer, trainable_named_parameters  # noqa: E402
from peftlab.run.resources import peak_memory, reset_peak_memory, seed_everything  # noqa: E402
from peftlab.run.train import StepOptions, accumulate_gradients, optimizer_step  # noqa: E402

SHIPPED = StepOptions()  # peftlab's loss and batch splitter, as every run uses them
CPU = torch.device("cpu")
# A lever: given the model, a context manager that yields the StepOptions its steps run with.
Lever = Callable[[nn.Module], contextlib.AbstractContextManager[StepOptions]]


# --- the levers: each changes exactly one thing, and undoes it ------------------------------------


def _options(**changes: Any) -> contextlib.AbstractContextManager[StepOptions]:
    """A lever on what a step calls: the shipped options with ``changes``; nothing to undo."""
    return contextlib.nullcontext(StepOptions(**changes))


def full_logits_loss(model: nn.Module, batch: dict, task: str) -> tuple[torch.Tensor, int]:
    """What HF models do: the head and cross-entropy at every position, then mask."""
    return full_logits_loss_sum(model, batch)


def labelled_unfused_loss(model: nn.Module, batch: dict, task: str) -> tuple[torch.Tensor, int]:
    """Head at labelled positions only, then a plain F.cross_entropy over its [N, V] logits."""
    logits, targets = labelled_logits(model, batch)
    return F.cross_entropy(logits.float(), targets, reduction="sum"), int(targets.numel())


def fixed_split(max_tokens: int | None) -> Callable[[dict, int | None], list[dict]]:
    """A splitter that cuts every batch at ``max_tokens`` padded tokens, whatever the step's config says."""
    return lambda batch, _cap: split_by_tokens(batch, max_tokens)


@contextlib.contextmanager
def _attribute(owner: Any, name: str, value: Any) -> Iterator[StepOptions]:
    """Set an attribute of the model under test (never of a peftlab module) for the lever's duration."""
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield SHIPPED
    finally:
        setattr(owner, name, saved)


@contextlib.contextmanager
def _threads(n: int) -> Iterator[StepOptions]:
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield SHIPPED
    finally:
        torch.set_num_threads(saved)


@contextlib.contextmanager
def _flush_denormal() -> Iterator[StepOptions]:
    torch.set_flush_denormal(True)
    try:
        yield SHIPPED
    finally:
        torch.set_flush_denormal(False)


def lora_forward_unfused(self: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """LoRALinear.forward before issue 15: the update scaled and added in two passes over [tokens, out].

    Shipped now: one addmm (base(x) + scaling * (drop(x) A^T) B^T). Only the plain case (no merge, no
    DoRA, all output rows) differed; every other case runs the shipped forward.
    """
    if self.merged or self.magnitude is not None or self.out_index is not None:
        return LoRALinear.forward(self, x)
    result = self.base(x)  # [..., out]
    return result + self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T * self.scaling


@contextlib.contextmanager
def _lora_forward(model: nn.Module,
                  forward: Callable[[LoRALinear, torch.Tensor], torch.Tensor]) -> Iterator[StepOptions]:
    """Every LoRALinear of ``model`` runs ``forward``: set on the instances, so peftlab's class is untouched."""
    layers = [module for module in model.modules() if isinstance(module, LoRALinear)]
    for layer in layers:
        layer.forward = types.MethodType(forward, layer)  # an instance attribute shadows the class's method
    try:
        yield SHIPPED
    finally:
        for layer in layers:
            del layer.forward


@contextlib.contextmanager
def _dropout_class(model: nn.Module, cls: type[nn.Module]) -> Iterator[StepOptions]:
    """Every LoRA dropout of ``model`` runs as ``cls`` (same ``p``): the class is swapped on the instances."""
    dropouts = [module for module in model.modules() if isinstance(module, LoRADropout)]
    for dropout in dropouts:
        dropout.__class__ = cls
    try:
        yield SHIPPED
    finally:
        for dropout in dropouts:
            dropout.__class__ = LoRADropout


@contextlib.contextmanager
def _autocast_bf16() -> Iterator[StepOptions]:
    """bf16 autocast on the CPU (oneDNN uses AMX / AVX512-BF16 where the CPU has them): numerics change,
    so the loss and gradient columns show how far; a precision choice, not a free lever."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yield SHIPPED


def _split_batches(max_tokens: int | None) -> contextlib.AbstractContextManager[StepOptions]:
    """train.max_batch_tokens: every batch runs as pieces of at most max_tokens padded tokens in one step
    (None: whole), whatever the shipped default resolves to on this device."""
    return _options(split=fixed_split(max_tokens))


def _no_kv_cache(model: nn.Module) -> contextlib.AbstractContextManager[StepOptions]:
    """use_cache=False: HF decoders otherwise build a KV cache even in training forwards."""
    return _attribute(model.config, "use_cache", False)


LEVERS: dict[str, tuple[str, Lever]] = {
    "baseline": ("peftlab as shipped (max_batch_tokens auto, the shipped dropout mask)", lambda m: _options()),
    "full_logits": ("head + CE at every position (what HF models do)", lambda m: _options(loss=full_logits_loss)),
    "labelled_unfused": ("head at labelled positions, unfused F.cross_entropy",
                         lambda m: _options(loss=labelled_unfused_loss)),
    "chunk_2e22": ("fused CE, 2^22-element chunks (85 rows)",
                   lambda m: _options(loss=partial(loss_sum, chunk_elements=2**22))),
    "chunk_2e26": ("fused CE, 2^26-element chunks (1365 rows)",
                   lambda m: _options(loss=partial(loss_sum, chunk_elements=2**26))),
    "threads_1": ("torch.set_num_threads(1)", lambda m: _threads(1)),
    "flush_denormal": ("torch.set_flush_denormal(True)", lambda m: _flush_denormal()),
    "no_kv_cache": ("model.config.use_cache = False", _no_kv_cache),
    "lora_unfused": ("LoRA update scaled and added in two passes (the forward before issue 15)",
                     lambda m: _lora_forward(m, lora_forward_unfused)),
    "dropout_bernoulli": ("LoRA dropout as nn.Dropout (bernoulli_ mask, scaled on x): the dropout before this version",
                          lambda m: _dropout_class(m, nn.Dropout)),
    "autocast_bf16": ("train.precision bf16 on the CPU (autocast; a numerics change, not a free lever)",
                      lambda m: _autocast_bf16()),
    "max_batch_tokens_128": ("train.max_batch_tokens = 128 (pieces in one optimizer step)",
                             lambda m: _split_batches(128)),
    "max_batch_tokens_256": ("train.max_batch_tokens = 256 (pieces in one optimizer step)",
                             lambda m: _split_batches(256)),
    "max_batch_tokens_512": ("train.max_batch_tokens = 512 (pieces in one optimizer step)",
                             lambda m: _split_batches(512)),
    "max_batch_tokens_off": ("train.max_batch_tokens off (batches run whole)", lambda m: _split_batches(None)),
}


# --- measuring ------------------------------------------------------------------------------------


def fresh_peak() -> None:
    """Reset the RSS high-water mark after handing freed heap pages back to the OS.

    In one process, glibc keeps the pages of freed tensors, so without malloc_trim the next peak
    would start from the previous variant's high-water mark and differences would not show.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    reset_peak_memory(torch.device("cpu"))


def build(spec: Spec, n_batches: int) -> tuple[nn.Module, list[dict], TaskData, TrainConfig, int]:
    """peftlab's LoRA model as the benchmark prepares it, fixed train batches, the data, the pad id."""
    data, tokenizer = load_data(spec)
    seed_everything(spec.seed)
    model = load_model(spec.model, "instruction").model
    method = MethodConfig(name="lora", placement="all_linear", ranks=RankConfig(r=spec.r), alpha=spec.alpha,
                          dropout=spec.dropout, train_head=False)
    prepare(model, method, build_model_map(model), train_head=False)
    cfg = TrainConfig(batch_size=spec.batch_size, lr=spec.lr, weight_decay=spec.weight_decay, seed=spec.seed)
    train_batches = list(batches(data.train, spec.batch_size, pad_id=tokenizer.pad_token_id, seed=spec.seed, epoch=0))
    return model, train_batches[:n_batches], data, cfg, tokenizer.pad_token_id


def timed_steps(model: nn.Module, optimizer: torch.optim.Optimizer, train_batches: list[dict],
                cfg: TrainConfig, options: StepOptions = SHIPPED) -> tuple[float, int]:
    """Seconds and non-pad tokens of one optimizer step per batch, through peftlab's own step."""
    parameters = trainable_named_parameters(model)
    tokens = 0
    model.train()
    started = time.perf_counter()
    for batch in train_batches:
        tokens += optimizer_step(model, parameters, optimizer, [batch], "instruction", cfg, CPU, options).tokens
    return time.perf_counter() - started, tokens


def loss_and_grads(model: nn.Module, batch: dict, options: StepOptions = SHIPPED,
                   cfg: TrainConfig | None = None) -> tuple[float, dict[str, torch.Tensor]]:
    """A step's loss and the gradients it leaves on one batch, dropout off: peftlab's own accumulation.

    ``cfg``: the step's settings (default TrainConfig(): no split unless ``options`` splits, fp32 on the CPU).
    """
    model.eval()
    model.zero_grad(set_to_none=True)
    step = accumulate_gradients(model, [batch], "instruction", cfg or TrainConfig(), CPU, options)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.train()
    return step.loss, grads


def max_difference(reference: tuple[float, dict], other: tuple[float, dict]) -> dict[str, float]:
    (loss_a, grads_a), (loss_b, grads_b) = reference, other
    worst = max(float((grads_a[n] - grads_b[n]).abs().max() / grads_a[n].abs().max().clamp_min(1e-30))
                for n in grads_a)
    return {"loss_rel_diff": abs(loss_a - loss_b) / abs(loss_a), "grad_max_rel_diff": worst}


def measure_levers(model: nn.Module, train_batches: list[dict], cfg: TrainConfig, names: list[str],
                   rounds: int) -> dict[str, dict]:
    optimizer = build_optimizer(model, cfg)
    samples: dict[str, list[dict]] = {name: [] for name in names}
    timed_steps(model, optimizer, train_batches[:1], cfg)  # warm-up: first-call allocations, thread pools
    for round_index in range(rounds):
        for name in names:
            with LEVERS[name][1](model) as options:
                fresh_peak()
                # Untimed: fresh_peak handed freed pages back to the OS, so the first step after it pays
                # for faulting them in again, more so after a low-memory variant; the peak still counts it.
                timed_steps(model, optimizer, train_batches[:1], cfg, options)
                seconds, tokens = timed_steps(model, optimizer, train_batches, cfg, options)
                peak = peak_memory(torch.device("cpu"))["peak_memory_mb"]
            samples[name].append({"seconds": seconds, "tokens": tokens, "peak_memory_mb": peak})
            _progress(f"round {round_index + 1}/{rounds} {name}: {tokens / seconds:.1f} tok/s, peak {peak:.0f} MB")
    with LEVERS["baseline"][1](model) as options:
        reference = loss_and_grads(model, train_batches[0], options)
    report = {}
    base_rate = statistics.median(s["tokens"] / s["seconds"] for s in samples["baseline"])
    for name in names:
        with LEVERS[name][1](model) as options:
            difference = max_difference(reference, loss_and_grads(model, train_batches[0], options))
        rate = statistics.median(s["tokens"] / s["seconds"] for s in samples[name])
        # paired: each round's lever against that round's baseline, run next to it (robust to slow drifts)
        paired = [(s["tokens"] / s["seconds"]) / (b["tokens"] / b["seconds"])
                  for s, b in zip(samples[name], samples["baseline"], strict=True)]
        report[name] = {"description": LEVERS[name][0], "tokens_per_s_median": rate,
                        "speed_vs_baseline": rate / base_rate, "paired_speed_vs_baseline": statistics.median(paired),
                        "peak_memory_mb_median": statistics.median(s["peak_memory_mb"] for s in samples[name]),
                        **difference, "samples": samples[name]}
    return report


def measure_all_labelled(model: nn.Module, train_batches: list[dict], cfg: TrainConfig,
                         rounds: int) -> dict[str, Any]:
    """The fused head + CE where it matters most: every position labelled (causal_lm, response_only off).

    Each step's batches get labels = input_ids on every real token; baseline (fused, chunked) and
    labelled_unfused are interleaved; peak RSS is per variant.
    """
    labelled = [{**b, "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, IGNORE_INDEX)}
                for b in train_batches]
    optimizer = build_optimizer(model, cfg)
    samples: dict[str, list[tuple[float, float]]] = {"baseline": [], "labelled_unfused": []}
    for _ in range(rounds):
        for name in samples:
            with LEVERS[name][1](model) as options:
                fresh_peak()
                seconds, tokens = timed_steps(model, optimizer, labelled, cfg, options)
                samples[name].append((tokens / seconds, peak_memory(torch.device("cpu"))["peak_memory_mb"]))
    rate = {n: statistics.median(r for r, _ in v) for n, v in samples.items()}
    peak = {n: statistics.median(m for _, m in v) for n, v in samples.items()}
    return {"tokens_per_s": rate, "peak_memory_mb": peak,
            "fused_speed_vs_unfused": rate["baseline"] / rate["labelled_unfused"],
            "fused_memory_saving_mb": peak["labelled_unfused"] - peak["baseline"]}


def measure_compile(model: nn.Module, train_batches: list[dict], cfg: TrainConfig) -> dict[str, Any]:
    """torch.compile of every decoder block: compile seconds (first steps) and steady-state speed after."""
    optimizer = build_optimizer(model, cfg)
    eager_seconds, eager_tokens = timed_steps(model, optimizer, train_batches, cfg)
    blocks = model.base_model.layers
    for block in blocks:
        block.compile(dynamic=True)  # batch lengths vary; one dynamic graph instead of one per length
    try:
        started = time.perf_counter()
        timed_steps(model, optimizer, train_batches[:1], cfg)
        first_step = time.perf_counter() - started
        warm_seconds, warm_tokens = timed_steps(model, optimizer, train_batches, cfg)
        compiled_seconds, compiled_tokens = timed_steps(model, optimizer, train_batches, cfg)
    finally:
        for block in blocks:
            block._compiled_call_impl = None  # nn.Module.compile's hook: back to eager
    eager_rate, compiled_rate = eager_tokens / eager_seconds, compiled_tokens / compiled_seconds
    return {"first_step_seconds_with_compile": first_step, "warm_pass_tokens_per_s": warm_tokens / warm_seconds,
            "eager_tokens_per_s": eager_rate, "compiled_tokens_per_s": compiled_rate,
            "speed_vs_eager": compiled_rate / eager_rate}


def measure_pipeline_and_eval(model: nn.Module, spec: Spec, data: TaskData, pad_id: int,
                              step_seconds_per_token: float) -> dict[str, Any]:
    """Cost of building batches (data pipeline) and of one evaluation, next to training."""
    started = time.perf_counter()
    built = list(batches(data.train, spec.batch_size, pad_id=pad_id, seed=spec.seed, epoch=0))
    batch_seconds = time.perf_counter() - started
    train_tokens = sum(int(b["attention_mask"].sum()) for b in built)
    eval_batches = list(batches(data.eval, spec.batch_size, pad_id=pad_id, seed=spec.seed, epoch=0, shuffle=False))
    eval_tokens = sum(int(b["attention_mask"].sum()) for b in eval_batches)
    timings = {}
    for name in ("baseline", "full_logits"):
        with LEVERS[name][1](model) as options:
            timings[name] = evaluate(model, eval_batches, "instruction", loss=options.loss).seconds
    epoch_train_seconds = train_tokens * step_seconds_per_token
    return {"batches_seconds_per_epoch": batch_seconds, "train_seconds_per_epoch_estimate": epoch_train_seconds,
            "pipeline_fraction": batch_seconds / epoch_train_seconds, "eval_tokens": eval_tokens,
            "eval_seconds": timings["baseline"], "eval_seconds_full_logits": timings["full_logits"],
            "eval_tokens_per_s": eval_tokens / timings["baseline"],
            "eval_speed_vs_full_logits": timings["full_logits"] / timings["baseline"]}


# --- profile --------------------------------------------------------------------------------------

CATEGORIES = (  # (category, op-name fragments), first match wins; self time is attributed
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("attention (sdpa)", ("scaled_dot_product", "flash_attention")),
    ("dropout", ("bernoulli", "dropout")),
    ("optimizer", ("adam", "_foreach", "sqrt", "lerp")),
    ("softmax / cross-entropy", ("softmax", "logsumexp", "nll", "cross_entropy", "exp", "scatter", "gather")),
    ("copies / indexing", ("copy_", "cat", "index", "to_copy", "contiguous", "clone", "masked", "nonzero", "fill_")),
    ("elementwise (norm, rope, silu, add, mul)", ("aten::",)),
)


def profile_steps(model: nn.Module, train_batches: list[dict], cfg: TrainConfig, steps: int = 2) -> dict[str, Any]:
    """torch.profiler over a few optimizer steps: top ops by self CPU time, and time per category."""
    from torch.profiler import ProfilerActivity, profile

    optimizer = build_optimizer(model, cfg)
    timed_steps(model, optimizer, train_batches[:1], cfg)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        timed_steps(model, optimizer, train_batches[:steps], cfg)
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events)
    categories: dict[str, float] = {}
    for event in events:
        category = next(c for c, fragments in CATEGORIES if any(f in event.key for f in fragments))
        categories[category] = categories.get(category, 0.0) + event.self_cpu_time_total
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]
    return {"steps": steps, "total_self_seconds": total / 1e6,
            "categories": {c: {"seconds": t / 1e6, "share": t / total} for c, t in
                           sorted(categories.items(), key=lambda kv: -kv[1])},
            "top_ops": [{"op": e.key, "calls": e.count, "self_seconds": e.self_cpu_time_total / 1e6,
                         "share": e.self_cpu_time_total / total} for e in top]}


# --- command --------------------------------------------------------------------------------------


def _progress(text: str) -> None:
    print(f"levers {time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=4, help="training batches timed per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--levers", default=",".join(LEVERS), help=f"comma list of {', '.join(LEVERS)}")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile of the blocks (slow)")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = ["baseline", *[n for n in args.levers.split(",") if n != "baseline"]]
    unknown = set(names) - set(LEVERS)
    if unknown:
        raise SystemExit(f"unknown levers: {', '.join(sorted(unknown))}")
    spec = Spec(model=args.model, examples=args.examples, batch_size=args.batch_size, threads=args.threads)
    model, train_batches, data, cfg, pad_id = build(spec, args.batches)
    info = machine.describe(torch.device("cpu"))
    _progress(f"{len(train_batches)} batches, shapes {[tuple(b['input_ids'].shape) for b in train_batches]}")
    results: dict[str, Any] = {"machine": info, "date": time.strftime("%Y-%m-%d"),
                               "settings": {**vars(args), "out": str(args.out)}}
    if not args.no_profile:
        results["profile"] = profile_steps(model, train_batches, cfg)
        _progress("profile: " + ", ".join(f"{c} {v['share']:.0%}" for c, v in results["profile"]["categories"].items()))
    results["levers"] = measure_levers(model, train_batches, cfg, names, args.rounds)
    base = results["levers"]["baseline"]
    results["pipeline_and_eval"] = measure_pipeline_and_eval(model, spec, data, pad_id, 1 / base["tokens_per_s_median"])
    results["all_labelled"] = measure_all_labelled(model, train_batches, cfg, args.rounds)
    if args.compile:
        results["compile"] = measure_compile(model, train_batches, cfg)
    machine.write_results(args.out, "levers", results, render_markdown(results))
    return results


def render_markdown(results: dict[str, Any]) -> str:
    lines = [f"## peftlab LoRA step levers — {results['date']}, {results['machine']['cpu']}, "
             f"{results['machine']['torch_threads']} threads", ""]
    if "profile" in results:
        lines += ["Profile (self CPU time by category, aten ops, peftlab step):", "",
                  "| category | share |", "|---|---:|"]
        lines += [f"| {c} | {v['share']:.1%} |" for c, v in results["profile"]["categories"].items()]
        lines += ["", "| top op | calls | share |", "|---|---:|---:|"]
        lines += [f"| {o['op']} | {o['calls']} | {o['share']:.1%} |" for o in results["profile"]["top_ops"][:10]]
        lines.append("")
    lines += ["| lever | what | tokens/s | vs baseline | paired | peak RSS MB | loss rel diff | grad max rel diff |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results["levers"].items():
        lines.append(f"| {name} | {r['description']} | {r['tokens_per_s_median']:.1f} | "
                     f"{r['speed_vs_baseline']:.3f}x | {r['paired_speed_vs_baseline']:.3f}x | "
                     f"{r['peak_memory_mb_median']:.0f} | {r['loss_rel_diff']:.1e} | {r['grad_max_rel_diff']:.1e} |")
    lines += ["", "vs baseline: the ratio of the median tokens/s; paired: the median over rounds of the lever's "
              "tokens/s over the baseline's in the same round."]
    p = results["pipeline_and_eval"]
    lines += ["", f"Data pipeline: {p['batches_seconds_per_epoch']:.3f} s to build an epoch's batches "
              f"({p['pipeline_fraction']:.2%} of its training time). Evaluation: {p['eval_tokens_per_s']:.0f} tok/s "
              f"({p['eval_seconds']:.1f} s for {p['eval_tokens']} tokens), {p['eval_speed_vs_full_logits']:.2f}x "
              "the full-logits evaluation."]
    if "all_labelled" in results:
        a = results["all_labelled"]
        lines += ["", f"Every position labelled (causal_lm / response_only off): fused chunked head + CE "
                  f"{a['fused_speed_vs_unfused']:.3f}x the unfused speed, peak RSS "
                  f"{a['peak_memory_mb']['baseline']:.0f} vs {a['peak_memory_mb']['labelled_unfused']:.0f} MB "
                  f"({a['fused_memory_saving_mb']:.0f} MB saved)."]
    if "compile" in results:
        c = results["compile"]
        lines += ["", f"torch.compile of the blocks: first step {c['first_step_seconds_with_compile']:.0f} s "
                  f"(compile), then {c['compiled_tokens_per_s']:.1f} tok/s vs eager {c['eager_tokens_per_s']:.1f} "
                  f"({c['speed_vs_eager']:.2f}x)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
