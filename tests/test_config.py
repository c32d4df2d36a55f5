import pytest
import yaml

from peftlab.config import RunConfig, apply_overrides, config_to_dict, from_dict, load_config
from peftlab.errors import UserError


def test_defaults_and_nested_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\nmethod: {name: lora, ranks: {schedule: uniform, r: 4}}\n"
                    "train: {lr: 2.0e-4, max_steps: 3}\n")
    config = load_config(path)
    assert config.model == "m"
    assert config.method.ranks.r == 4
    assert config.train.lr == pytest.approx(2e-4)
    assert config.train.max_steps == 3
    assert config.data.source == "chatterbot"


def test_unknown_key_suggests_closest(tmp_path):
    with pytest.raises(UserError, match=r"unknown config key train.max_step \(did you mean train.max_steps\?\)"):
        from_dict(RunConfig, {"train": {"max_step": 5}})


def test_wrong_type_is_reported_with_its_path():
    with pytest.raises(UserError, match=r"train.batch_size must be int"):
        from_dict(RunConfig, {"train": {"batch_size": "eight"}})


def test_impossible_values_fail_before_anything_runs():
    with pytest.raises(UserError, match=r"method.ranks.r must be >= 1"):
        from_dict(RunConfig, {"method": {"ranks": {"r": 0}}})
    with pytest.raises(UserError, match=r"did you mean 'attention_only'"):
        from_dict(RunConfig, {"method": {"placement": "attention_olny"}})
    with pytest.raises(UserError, match=r"custom schedule needs exactly one"):
        from_dict(RunConfig, {"method": {"ranks": {"schedule": "custom"}}})
    with pytest.raises(UserError, match=r"train.max_batch_tokens must be auto, null or 0 \(no split\), or an integer"):
        from_dict(RunConfig, {"train": {"max_batch_tokens": 4}})


@pytest.mark.parametrize("data, fragment", [
    ({"split_mode": "random"}, "data.split_mode='random' is not one of shuffled, contiguous"),
    ({"split_mode": "contigous", "train_size": 100}, "(did you mean 'contiguous'?)"),
    ({"split_mode": "contiguous", "eval_size": 20}, "data.split_mode=contiguous needs data.train_size"),
    ({"split_mode": "contiguous", "train_size": 100, "eval_size": 0.1},
     "data.split_mode=contiguous needs a whole data.eval_size count, got 0.1"),
    ({"eval_size": 0}, "data.eval_size must be > 0"),
    ({"train_size": 0}, "data.train_size must be > 0"),
    ({"eval_size": float("inf")}, "data.eval_size must be a finite number, got inf"),
    ({"eval_size": float("nan")}, "data.eval_size must be a finite number, got nan"),
    ({"eval_size": "-inf"}, "data.eval_size must be a finite number, got -inf"),
])
def test_bad_data_values_are_one_line_errors(data, fragment):
    with pytest.raises(UserError) as error:
        from_dict(RunConfig, {"data": data})
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_split_mode_defaults_to_shuffled_and_takes_an_override():
    assert from_dict(RunConfig, {}).data.split_mode == "shuffled"
    overrides = ["data.split_mode=contiguous", "data.train_size=100", "data.eval_size=20"]
    config = from_dict(RunConfig, apply_overrides({}, overrides))
    assert (config.data.split_mode, config.data.train_size, config.data.eval_size) == ("contiguous", 100, 20)


def test_dotted_overrides_parse_yaml_values():
    data = apply_overrides({"train": {"lr": 1.0}}, ["train.max_steps=5", "method.placement=attention_only",
                                                     "train.lr=2e-4", "method.layers=[0, 1]"])
    config = from_dict(RunConfig, data)
    assert config.train.max_steps == 5
    assert config.method.placement == "attention_only"
    assert config.train.lr == pytest.approx(2e-4)
    assert config.method.layers == [0, 1]


def test_override_without_equals_is_a_user_error():
    with pytest.raises(UserError, match="expected key=value"):
        apply_overrides({}, ["train.max_steps"])


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)


def test_every_float_is_finite_however_the_config_is_built():
    """One check in each section's __post_init__: dataclasses built in code (inspect --ranks) are checked too."""
    from peftlab.config import MethodConfig, RankConfig, TrainConfig

    with pytest.raises(UserError, match=r"^train.epochs must be a finite number, got inf$"):
        TrainConfig(epochs=float("inf"))
    with pytest.raises(UserError, match=r"^method.ranks.multipliers\[2\] must be a finite number, got nan$"):
        RankConfig(schedule="empirical", multipliers=[0.6, 1.2, float("nan")])
    with pytest.raises(UserError, match=r"^method.alpha must be a finite number, got inf$"):
        MethodConfig(alpha=float("inf"))
    assert TrainConfig(max_grad_norm=None, lora_plus_ratio=None).max_grad_norm is None  # None stays allowed


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model: m\nname: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(UserError) as error:
        load_config(path)
    assert str(error.value) == f"config file {path} is not UTF-8 text (byte 0xe9 on line 2); save it as UTF-8"


# --- base dtype, precision, gradient checkpointing, QLoRA ------------------------------------------


@pytest.mark.parametrize("train, fragment", [
    ({"base_dtype": "half"}, "train.base_dtype='half' is not one of auto, fp32, bf16, fp16"),
    ({"base_dtype": "bf16", "precision": "fp32"}, "train.precision=fp32 with train.base_dtype=bf16"),
    ({"base_dtype": "fp16", "precision": "fp32"}, "train.precision=fp32 with train.base_dtype=fp16"),
    ({"base_dtype": "fp16", "precision": "bf16"}, "train.precision=bf16 with train.base_dtype=fp16"),
    ({"precision": "fp16"}, "train.precision='fp16' is not one of auto, fp32, bf16"),
    ({"gradient_checkpointing": "yes"}, "train.gradient_checkpointing must be bool, got 'yes'"),
])
def test_bad_precision_settings_are_one_line_errors(train, fragment):
    with pytest.raises(UserError) as error:
        from_dict(RunConfig, {"train": train})
    assert fragment in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("base_dtype, precision", [
    ("auto", "auto"), ("auto", "fp32"), ("auto", "bf16"), ("fp32", "fp32"), ("fp32", "bf16"),
    ("bf16", "auto"), ("bf16", "bf16"), ("fp16", "auto"),
])
def test_consistent_precision_settings_load(base_dtype, precision):
    config = from_dict(RunConfig, {"train": {"base_dtype": base_dtype, "precision": precision,
                                             "gradient_checkpointing": True}})
    assert (config.train.base_dtype, config.train.precision, config.train.gradient_checkpointing) == (
        base_dtype, precision, True)


def test_precision_defaults():
    train = from_dict(RunConfig, {}).train
    assert (train.base_dtype, train.precision, train.gradient_checkpointing) == ("auto", "auto", False)
    assert from_dict(RunConfig, {}).method.quantize_base is None


@pytest.mark.parametrize("quantize", ["nf4", "int8", None])
def test_quantize_base_takes_its_choices_for_lora(tmp_path, quantize):
    path = tmp_path / "c.yaml"
    path.write_text(f"method: {{name: lora, quantize_base: {quantize if quantize else 'null'}}}\n")
    assert load_config(path).method.quantize_base == quantize


@pytest.mark.parametrize("data, fragment", [
    ({"method": {"quantize_base": "4bit"}}, "method.quantize_base='4bit' is not one of null, nf4, int8"),
    ({"method": {"quantize_base": "int4"}}, "(did you mean 'int8'?)"),
    ({"method": {"quantize_base": True}}, "method.quantize_base must be str, got True"),
    ({"method": {"quantize_base": "nf4", "dora": True}}, "DoRA on a quantized base is not supported"),
    ({"method": {"quantize_base": "nf4"}, "train": {"device": "cpu"}},
     "method.quantize_base='nf4' (QLoRA) needs a CUDA GPU, but train.device=cpu"),
    ({"method": {"quantize_base": "int8"}, "train": {"device": "mps"}}, "but train.device=mps"),
])
def test_bad_quantize_base_is_a_one_line_error(data, fragment):
    with pytest.raises(UserError) as error:
        from_dict(RunConfig, data)
    assert fragment in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("method", [{"name": "adapter"}, {"name": "partial", "last_n": 1}, {"name": "full"}])
def test_quantize_base_is_refused_for_methods_that_do_not_read_it(tmp_path, method):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"method": {**method, "quantize_base": "nf4"}}))
    with pytest.raises(UserError) as error:
        load_config(path)
    assert str(error.value).startswith(f"method.quantize_base='nf4' is not used by method {method['name']} "
                                       "(only by lora)")


# --- the eval section (generation metrics and forgetting) ----------------------------------------


def test_the_eval_section_is_off_by_default_and_an_old_saved_config_reads_the_same(tmp_path):
    config = RunConfig()
    assert config.eval.generate is None and not config.eval.generation_on and config.eval.reference is None
    # a config.yaml saved before the section existed has no eval key: it reads back equal to a new default
    saved = config_to_dict(RunConfig(model="m"))
    del saved["eval"]
    assert config_to_dict(from_dict(RunConfig, saved)) == config_to_dict(RunConfig(model="m"))


def test_eval_generate_takes_defaults_and_overrides():
    config = load_config(None, ["eval.generate={}", "eval.reference=hamlet"])
    assert config.eval.generation_on and config.eval.reference == "hamlet" and config.eval.reference_size == 64
    assert (config.eval.generate.metrics, config.eval.generate.max_new_tokens, config.eval.generate.num_examples) == (
        ["exact_match", "rougeL", "contains"], 48, 32)
    off = load_config(None, ["eval.generate.num_examples=0"])
    assert not off.eval.generation_on  # 0 examples: off, as null is
    assert load_config(None, ["eval.generate={metrics: [contains], num_examples: 4}"]).eval.generate.metrics == [
        "contains"]


@pytest.mark.parametrize(("overrides", "fragment"), [
    (["eval.generate.metrics=[rouge]"], "eval.generate.metrics[0]='rouge' is not one of exact_match, rougeL, "
                                        "contains (did you mean 'rougeL'?)"),
    (["eval.generate.metrics=[]"], "eval.generate.metrics must name at least one of"),
    (["eval.generate.metrics=[contains, contains]"], "names a metric twice"),
    (["eval.generate.num_examples=-1"], "eval.generate.num_examples must be >= 0 (0: off), got -1"),
    (["eval.generate.max_new_tokens=0"], "eval.generate.max_new_tokens must be >= 1"),
    (["eval.reference_size=0"], "eval.reference_size must be >= 1"),
    (["eval.reference= "], "eval.reference must name a text source"),
    (["task=classification", "eval.generate.num_examples=4"], "eval.generate needs task instruction"),
    (["task=causal_lm", "eval.generate={}"], "eval.generate needs task instruction"),
    (["task=classification", "eval.reference=hamlet"], "eval.reference measures a causal LM's loss"),
    (["eval.refrence=hamlet"], "unknown config key eval.refrence (did you mean eval.reference?)"),
])
def test_bad_eval_values_are_one_line_errors(overrides, fragment):
    with pytest.raises(UserError) as error:
        load_config(None, overrides)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_eval_on_a_causal_lm_run_and_generation_off_on_classification_load():
    assert load_config(None, ["task=causal_lm", "eval.reference=hamlet"]).eval.reference == "hamlet"
    assert load_config(None, ["task=classification", "eval.generate=null"]).eval.generate is None


def test_the_selective_placement_example_measures_generation_and_forgetting():
    from pathlib import Path

    from peftlab.study.sweep import expand, load_sweep

    trials = expand(load_sweep(Path(__file__).resolve().parents[1] / "examples" / "selective_placement.yaml"), "o")
    trained = [t for t in trials if not t.is_reference]
    assert len(trained) == 18 and all(t.config.eval.generation_on and t.config.eval.reference == "hamlet"
                                      for t in trained)
    config = trained[0].config
    assert (config.eval.generate.num_examples, config.eval.reference_size) == (16, 32)
    assert config.train.max_new_tokens == config.eval.generate.max_new_tokens  # samples reuse the scored answers
    # the base-model reference evaluation keeps only what its eval loss depends on
    assert all(t.config.eval.reference is None and t.config.eval.generate is None for t in trials if t.is_reference)
