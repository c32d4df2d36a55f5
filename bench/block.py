"""One decoder block's forward + backward with peftlab's LoRA: where the dropout and the compiler stand.

    .venv/bin/python bench/block.py --rounds 9                  # dropout variants, eager
    .venv/bin/python bench/block.py --rounds 9 --compile        # and torch.compile of the block

The benchmark's LoRA (r=16, alpha 32, dropout 0.1 on q, k, v, o, gate, up, down) on one decoder block of
the model, fed random hidden states of ``--tokens`` positions in one row, with the model's own rotary
embeddings; a random upstream gradient drives the backward. Variants, interleaved over ``--rounds``
rounds, each the median of its per-round mean over ``--calls`` calls:

* shipped:    peftlab's LoRADropout (16-bit-field masks, the scale on x A^T)
* nn_dropout: the same modules as nn.Dropout (a bernoulli_ mask, scaled on x): the previous version
* no_dropout: dropout p = 0 (what the dropout costs is shipped - no_dropout)
* compiled:   (--compile) the shipped block under torch.compile (one graph for the block), after a
              first call that compiles it (its seconds are reported)

A profile of the shipped variant (torch.profiler, self CPU time of the top ops) comes with it. Writes
``<out>/block-<machine>-<date>.{json,md}``. A microscope, not the headline: levers.py times the real step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench import machine  # noqa: E402
from bench.systems import Spec  # noqa: E402
from peftlab.config import MethodConfig, RankConfig  # noqa: E402
from peftlab.core.methods import prepare  # noqa: E402
from peftlab.core.methods.dropout import LoRADropout  # noqa: E402
from peftlab.core.methods.lora import LoRALinear  # noqa: E402
from peftlab.core.modelmap import build_model_map  # noqa: E402
from peftlab.inputs.models import load_model  # noqa: E402


def block_step(model: nn.Module, layer: int, tokens: int,
               seed: int = 0) -> tuple[nn.Module, Callable[[nn.Module], None]]:
    """(the block, a function that runs a given callable block's forward + backward once)."""
    torch.manual_seed(seed)
    block = model.model.layers[layer]
    hidden = torch.randn(1, tokens, model.config.hidden_size, requires_grad=True)
    upstream = torch.randn(1, tokens, model.config.hidden_size)
    positions = torch.arange(tokens)[None]
    rotary = model.model.rotary_emb(hidden, positions)

    def run(callable_block: nn.Module) -> None:
        out = callable_block(hidden, position_embeddings=rotary, attention_mask=None, position_ids=positions)
        (out[0] if isinstance(out, tuple) else out).backward(upstream)
    return block, run


def set_dropout(block: nn.Module, cls: type[nn.Module], p: float) -> None:
    """Every LoRA layer's dropout in the block becomes ``cls`` with rate ``p`` (the class swapped in place)."""
    for module in block.modules():
        if isinstance(module, LoRALinear) and isinstance(module.dropout, nn.Dropout):
            module.dropout.__class__, module.dropout.p = cls, p


def mean_ms(run: Callable[[], None], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        run()
    return (time.perf_counter() - started) / calls * 1e3


def measure(block: nn.Module, run: Callable[[nn.Module], None], spec: Spec, args: argparse.Namespace) -> dict[str, Any]:
    variants: dict[str, tuple[type[nn.Module], float, bool]] = {
        "shipped": (LoRADropout, spec.dropout, False), "nn_dropout": (nn.Dropout, spec.dropout, False),
        "no_dropout": (LoRADropout, 0.0, False)}
    results: dict[str, Any] = {}
    compiled = None
    if args.compile:
        compiled = torch.compile(block, dynamic=False)
        set_dropout(block, LoRADropout, spec.dropout)
        started = time.perf_counter()
        run(compiled)
        results["compile_seconds"] = time.perf_counter() - started
        variants["compiled"] = (LoRADropout, spec.dropout, True)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for cls, p, use_compiled in variants.values():  # warm-up
        set_dropout(block, cls, p)
        run(compiled if use_compiled else block)
    for round_index in range(args.rounds):
        for name, (cls, p, use_compiled) in variants.items():
            set_dropout(block, cls, p)
            target = compiled if use_compiled else block
            samples[name].append(mean_ms(lambda target=target: run(target), args.calls))
        print(f"block {time.strftime('%H:%M:%S')} round {round_index + 1}/{args.rounds}: "
              + ", ".join(f"{n} {v[-1]:.1f} ms" for n, v in samples.items()), file=sys.stderr, flush=True)
    set_dropout(block, LoRADropout, spec.dropout)
    results["median_ms"] = {name: statistics.median(values) for name, values in samples.items()}
    results["samples_ms"] = samples
    return results


def profile_shipped(run: Callable[[nn.Module], None], block: nn.Module, calls: int, top: int = 12) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            run(block)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key, "calls": e.count, "share": e.self_cpu_time_total / total} for e in events[:top]]


def render_markdown(results: dict[str, Any]) -> str:
    info, s, medians = results["machine"], results["settings"], results["median_ms"]
    lines = [f"## One decoder block, forward + backward — {results['date']}, {info['cpu']}, "
             f"{info['torch_threads']} threads", "",
             f"{s['model']} layer {s['layer']}, {s['tokens']} tokens in one row, LoRA r=16 alpha 32 dropout 0.1 on "
             f"every linear; medians over {s['rounds']} interleaved rounds of {s['calls']} calls.", "",
             "| variant | ms per fwd+bwd | vs shipped |", "|---|---:|---:|"]
    lines += [f"| {name} | {ms:.1f} | {ms / medians['shipped']:.3f}x |" for name, ms in medians.items()]
    if "compile_seconds" in results:
        lines += ["", f"torch.compile: {results['compile_seconds']:.1f} s for the first call."]
    lines += ["", "Profile of the shipped variant (self CPU time):", "", "| op | calls | share |", "|---|---:|---:|"]
    lines += [f"| {o['op']} | {o['calls']} | {o['share']:.1%} |" for o in results["profile"]]
    lines += ["", f"Command: `.venv/bin/python bench/block.py {' '.join(results['argv'])}`"]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="embedded alias or local dir")
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=5, help="calls per variant and round")
    parser.add_argument("--compile", action="store_true", help="also time the block under torch.compile")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    spec = Spec(model=args.model)
    model = load_model(spec.model, "instruction").model
    method = MethodConfig(name="lora", placement="all_linear", ranks=RankConfig(r=spec.r), alpha=spec.alpha,
                          dropout=spec.dropout, train_head=False)
    prepare(model, method, build_model_map(model), train_head=False)
    model.train()
    block, run = block_step(model, args.layer, args.tokens)
    info = machine.describe(torch.device("cpu"))
    results: dict[str, Any] = {"machine": info, "date": time.strftime("%Y-%m-%d"), "argv": list(argv or sys.argv[1:]),
                               "settings": {**vars(args), "out": str(args.out)}}
    results.update(measure(block, run, spec, args))
    results["profile"] = profile_shipped(run, block, args.calls)
    machine.write_results(args.out, "block", results, render_markdown(results))
    return results


if __name__ == "__main__":
    main()
