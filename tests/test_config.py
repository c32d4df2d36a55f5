import pytest

from peftlab.config import RunConfig, apply_overrides, from_dict, load_config
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
    with pytest.raises(UserError, match=r"train.max_batch_tokens must be >= 8"):
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
