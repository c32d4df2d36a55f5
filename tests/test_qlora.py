"""QLoRA (method.quantize_base: nf4 | int8): what every machine checks, and the GPU path where it can run.

Without a CUDA GPU and bitsandbytes a QLoRA config is one UserError line (exit 2 from the CLI), raised
before any weights load. The tests of LoRA on real bitsandbytes layers run only where both exist; on a
CPU-only machine they are skipped, so there QLoRA training itself is untested.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from test_run import _alpaca, _config
from torch import nn
from transformers import LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from peftlab.config import MethodConfig, RankConfig
from peftlab.core.methods import lora as lora_module
from peftlab.core.methods import prepare
from peftlab.core.methods.lora import (
    LoRALinear,
    linear_features,
    lora_modules,
    quantized_kind,
    require_quantization_support,
    weight_as_out_in,
)
from peftlab.core.modelmap import build_model_map
from peftlab.errors import UserError
from peftlab.inputs.models import load_model

REPO = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
QLORA_RUNS_HERE = HAS_CUDA and importlib.util.find_spec("bitsandbytes") is not None
without_cuda = pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without a CUDA GPU")
with_qlora = pytest.mark.skipif(not QLORA_RUNS_HERE, reason="needs a CUDA GPU and bitsandbytes")


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# --- refused where QLoRA cannot run ------------------------------------------------------------------


@without_cuda
def test_qlora_without_a_gpu_is_one_line():
    with pytest.raises(UserError) as error:
        require_quantization_support("nf4")
    assert _one_line(error).startswith("method.quantize_base='nf4' (QLoRA) needs a CUDA GPU (torch sees none")


@pytest.mark.parametrize("version, fragment", [
    (None, "needs bitsandbytes (not installed: pip install 'peftlab[qlora]')"),
    ("0.42.0", "needs bitsandbytes>=0.43 (found 0.42.0: pip install -U 'peftlab[qlora]')"),
])
def test_missing_or_old_bitsandbytes_names_what_to_install(version, fragment, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # only the bitsandbytes half is tested
    monkeypatch.setattr(lora_module, "_installed_version", lambda package: version)
    with pytest.raises(UserError) as error:
        require_quantization_support("int8")
    message = _one_line(error)
    assert message.startswith("method.quantize_base='int8' (QLoRA) ") and fragment in message
    assert "CUDA" not in message


def test_gpu_and_bitsandbytes_present_pass_the_check(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(lora_module, "_installed_version", lambda package: "0.45.5")
    require_quantization_support("nf4")


@pytest.mark.skipif(QLORA_RUNS_HERE, reason="QLoRA can run here")
def test_load_model_refuses_before_reading_anything():
    """The folder does not exist: the QLoRA line, not "does not exist", shows nothing was read first."""
    with pytest.raises(UserError) as error:
        load_model("./no/such/folder", "instruction", quantize="nf4")
    assert "(QLoRA) needs" in _one_line(error)


@pytest.mark.skipif(QLORA_RUNS_HERE, reason="QLoRA can run here")
def test_prepare_refuses_quantize_base_on_an_unquantized_model_and_touches_nothing():
    """The safety net for a caller that loads the base without quantize=: never LoRA on an fp32 base silently."""
    model = tiny_llama()
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    with pytest.raises(UserError) as error:
        prepare(model, MethodConfig(quantize_base="nf4"), build_model_map(model), train_head=False)
    assert "method.quantize_base='nf4' (QLoRA) needs" in _one_line(error)
    assert not lora_modules(model) and before == {name: p.requires_grad for name, p in model.named_parameters()}


def test_a_meta_skeleton_maps_as_it_would_quantized():
    """peftlab inspect prepares a meta-device skeleton: placement does not depend on quantization."""
    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_llama().config)
    prepared = prepare(model, MethodConfig(quantize_base="int8", ranks=RankConfig(r=2)), build_model_map(model),
                       train_head=False)
    assert prepared.targets and all(isinstance(m, LoRALinear) for m in lora_modules(model).values())


@without_cuda
def test_cli_run_with_quantize_base_on_cpu_exits_2_without_a_traceback(tmp_path, tiny_llama_dir):
    config = _config(tmp_path, tiny_llama_dir, _alpaca(tmp_path / "alpaca.jsonl"), quantize_base="nf4")
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "peftlab", "run", str(config), "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("peftlab: error:")]
    assert done.returncode == 2, done.stderr
    assert len(errors) == 1 and "method.quantize_base='nf4' (QLoRA) needs a CUDA GPU" in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists() or {p.name for p in out.iterdir()} <= {".lock"}  # nothing of a run was written


# --- plain layers are untouched by the quantized-layer helpers -----------------------------------------


def test_plain_linear_and_conv1d_are_not_quantized():
    linear, conv = nn.Linear(3, 5), Conv1D(5, 3)  # Conv1D(nf=out, nx=in)
    assert quantized_kind(linear) is None and quantized_kind(conv) is None
    assert linear_features(linear) == linear_features(conv) == (3, 5)
    assert weight_as_out_in(conv).shape == weight_as_out_in(linear).shape == (5, 3)


# --- on a CUDA GPU with bitsandbytes (skipped elsewhere) ----------------------------------------------


@with_qlora
@pytest.mark.parametrize("quantize, kind", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_lora_on_a_quantized_base(quantize, kind, tiny_llama_dir, tmp_path):
    from peftlab.core.export import export_merged, export_peft_adapter

    loaded = load_model(str(tiny_llama_dir), "instruction", dtype=torch.bfloat16, quantize=quantize)
    model = loaded.model
    input_ids = torch.randint(3, 100, (2, 10), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        base_logits = model(input_ids=input_ids).logits
    prepared = prepare(model, MethodConfig(ranks=RankConfig(r=4), alpha=8.0, quantize_base=quantize),
                       build_model_map(model), train_head=False)
    wrappers = lora_modules(model)
    assert prepared.targets and all(w.quantized == kind for w in wrappers.values())
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.equal(model(input_ids=input_ids).logits, base_logits)  # B = 0: exactly the base
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(input_ids=input_ids).logits.float().pow(2).mean().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == {
        n for n, p in model.named_parameters() if p.requires_grad}
    wrapper = next(iter(wrappers.values()))
    with torch.no_grad():
        wrapper.lora_B.normal_()
    dense = lora_module.dequantized_weight(wrapper.base).float()
    assert torch.allclose(wrapper.merged_rows(), dense + wrapper.delta_weight())
    assert (export_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=loaded.source)
            / "adapter_model.safetensors").is_file()
    with pytest.raises(UserError, match="quantized"):
        wrapper.merge()
    with pytest.raises(UserError, match="quantized"):
        export_merged(model, tmp_path / "merged")
