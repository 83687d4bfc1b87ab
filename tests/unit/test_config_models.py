"""What the pydantic config models guarantee beyond test_config.py: every section refuses an
unknown key with a suggestion, scalar types are strict (no bool or float as an int, no 0/1 as a
bool, finite floats), each error names the layer (file or command line) that set the value, and
every field keeps its docstring as its description."""

from __future__ import annotations

import pytest

from cage_ds.train.config import CONFIGS_DIR, SECTIONS, TOP_KEYS, Config, ConfigError, load_config

EXPERIMENT = CONFIGS_DIR / "experiments" / "cage_w4a4.yaml"


def refusal(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    return str(err.value)


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_section_refuses_an_unknown_key_with_a_suggestion(section):
    key = list(SECTIONS[section].model_fields)[-1]
    message = refusal(EXPERIMENT, [f"{section}.{key}x=1"])
    assert message.startswith(
        f"command line: unknown key '{section}.{key}x'; did you mean '{section}.{key}'"
    ), message


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("deepspeed.stage=true", "deepspeed.stage must be an int, got True"),
        ("deepspeed.stage=2.0", "deepspeed.stage must be an int, got 2.0"),
        ("deepspeed.stage=4", "deepspeed.stage must be <= 3, got 4"),
        ("model.preset=5", "model.preset must be a string, got 5"),
        ("optim.cage_lambda=.nan", "optim.cage_lambda must be a finite number, got nan"),
        ("optim.lr=.nan", "optim.lr must be > 0.0, got nan"),
        ("optim.betas=[0.9, true]", "optim.betas[1] must be a number, got True"),
        ("optim.betas=[0.9, 1.0]", "optim.betas[1] must be < 1, got 1.0"),
        ("tracking.enabled=0", "tracking.enabled must be true or false, got 0"),
        ("tracking.enabled='yes'", "tracking.enabled must be true or false, got 'yes'"),
        ("quant.targets=q_proj", "quant.targets must be a list, got 'q_proj'"),
        ("data.source=''", "data.source must not be empty, got ''"),
    ],
)
def test_strict_types_refuse_what_the_code_cannot_read(override, message):
    assert refusal(EXPERIMENT, [override]) == f"command line: {message}"


def test_lax_where_yaml_needs_it():
    cfg = load_config(EXPERIMENT, ["optim.weight_decay=0", "optim.eps=1e-6", "quant.targets=[a]"])
    assert type(cfg.optim.weight_decay) is float and cfg.optim.eps == 1e-6
    assert cfg.quant.targets == ("a",)


def test_errors_name_the_layer_that_set_the_value(tmp_path):
    (tmp_path / "base.yaml").write_text("train: {steps: 0}\n")
    top = tmp_path / "top.yaml"
    top.write_text("extends: base.yaml\ntrain: {seed: 1}\n")
    base = tmp_path / "base.yaml"
    assert refusal(top) == f"{base}: train.steps must be >= 1, got 0"
    assert refusal(top, ["train.steps=1.5"]) == "command line: train.steps must be an int, got 1.5"
    top.write_text("extends: base.yaml\ntrain: {steps: x}\n")
    assert refusal(top) == f"{top}: train.steps must be an int, got 'x'"
    top.write_text("extends: base.yaml\noptim: 3\n")  # the unknown key wins over other errors
    base.write_text("train: {steps: 0, stpes: 3}\n")
    assert refusal(top).startswith(f"{base}: unknown key 'train.stpes'; did you mean")
    base.write_text("train: {steps: 3}\n")
    assert refusal(top) == f"{top}: optim must be a mapping, got 3"
    preset = tmp_path / "preset.yaml"
    preset.write_text("model: {num_layerz: 2}\n")
    assert refusal(None, [f"model.preset={preset}"]).startswith(
        f"{preset}: unknown key 'model.num_layerz'; did you mean 'model.num_layers'"
    )


def test_every_field_keeps_its_docstring():
    fields = {f"{s}.{k}": f for s, m in SECTIONS.items() for k, f in m.model_fields.items()}
    fields |= {k: Config.model_fields[k] for k in TOP_KEYS}
    assert len(fields) > 60
    assert [name for name, f in fields.items() if not f.description] == []
    assert SECTIONS["model"].model_fields["hidden_size"].description == "Model width d."
