"""cage-train config: layering, unknown keys with suggestions, type and whole-config checks,
and the model presets' parameter counts (built on the meta device)."""

from __future__ import annotations

import json

import pytest

from cage_ds.train.config import (
    CONFIGS_DIR,
    ConfigError,
    load_config,
    swiglu_hidden,
)
from cage_ds.train.preflight import validate

EXPERIMENT = CONFIGS_DIR / "experiments" / "cage_w4a4.yaml"


def write(path, text):
    path.write_text(text)
    return path


def test_layers_preset_file_extends_and_overrides(tmp_path):
    write(tmp_path / "base.yaml", "model: {preset: tiny}\noptim: {weight_decay: 0.05}\n")
    top = write(tmp_path / "top.json", json.dumps({"extends": "base.yaml", "train": {"steps": 7}}))
    cfg = load_config(top, ["optim.lr=1e-4", "quant.preset=w3a3", "optim.betas=[0.8, 0.9]"])
    assert cfg.model.hidden_size == 128 and cfg.model.vocab_size == 4096  # from the tiny preset
    assert cfg.data.seq_len == 128  # preset fragment outside the model section
    assert cfg.optim.weight_decay == 0.05 and cfg.train.steps == 7  # extends, then file
    assert cfg.optim.lr == 1e-4  # '1e-4' is a YAML string: coerced to float
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.quant.to_quant_config().weight.bits == 3
    # the config file beats the preset, the command line beats the file
    assert load_config(top, ["train.steps=9"]).train.steps == 9


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["optim.lrr=1"], "unknown key 'optim.lrr'; did you mean 'optim.lr'"),
        (["trian.steps=3"], "unknown section 'trian'; did you mean 'train'"),
        (["train.steps"], "malformed override 'train.steps'"),
        (["steps=3"], "malformed override 'steps=3'"),
        (["optim.betas=[0.9,"], "malformed value in override"),
        (["train.steps=1.5"], "train.steps must be an int, got 1.5"),
        (["train.steps=ten"], "train.steps must be an int, got 'ten'"),
        (["optim.lr=abc"], "optim.lr must be a number, got 'abc'"),
        (["data.streaming=1"], "data.streaming must be true or false, got 1"),
        (["optim.betas=[0.9]"], "optim.betas must have 2 entries"),
        (["quant.method=gptq"], "quant.method must be one of ['quest', 'rtn']"),
        (["quant.preset=w9a9"], "bits must be an int in 1..8, got 9"),
        (["optim.cage_silence=1.5"], "cage_silence must lie in [0, 1]"),
        (["model.num_heads=3"], "model.hidden_size=128 is not divisible by model.num_heads=3"),
        (["model.preset=30n"], "did you mean '30m'"),
        (["train.global_batch_size=12"], "train.global_batch_size=12 is not divisible by"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(EXPERIMENT, override)
    assert message in str(err.value)


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = write(tmp_path / "x.yaml", "train:\n  stpes: 3\n")
    with pytest.raises(
        ConfigError, match=r"x\.yaml: unknown key 'train\.stpes'; did you mean 'train\.steps'"
    ):
        load_config(path)


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path / "bad.yaml", "train: {steps: [\n"))


@pytest.mark.parametrize(
    ("override", "world", "message"),
    [
        ([], 3, "not divisible by train.micro_batch_size=8 x world size 3"),
        (["data.bpe_vocab_size=5000"], 1, "tokenizer vocabulary 5000"),
        (["data.source=/no/such/corpus.jsonl"], 1, "data.source='/no/such/corpus.jsonl': no such"),
        (["data.seq_len=1024"], 1, "data.seq_len=1024 exceeds model.max_position_embeddings=512"),
        (["quant.hadamard_block=256"], 1, "hadamard_block=256 does not divide in_features=128"),
        (["deepspeed.config=/no/ds.json"], 1, "deepspeed.config='/no/ds.json' does not exist"),
        (["model.pretrained=/no/model"], 1, "model.pretrained='/no/model': no config.json"),
        (["data.tokenizer=/no/tok"], 1, "data.tokenizer='/no/tok': no tokenizer"),
        (["quant.method=rtn"], 1, "with quant.method='rtn' under ZeRO stage 3"),
        (
            ["quant.targets=[q_proj]", "optim.cage_targets=[q_proj,up_proj]"],
            1,
            "optim.cage_targets has ['up_proj'], which quant.targets=['q_proj'] does not quantize",
        ),
    ],
)
def test_validate_whole_config(override, world, message):
    cfg = load_config(EXPERIMENT, override)
    with pytest.raises(ConfigError) as err:
        validate(cfg, world)
    assert message in str(err.value)


def test_validate_accepts_every_experiment_config():
    names = sorted(p.name for p in (CONFIGS_DIR / "experiments").glob("*.yaml"))
    for method in ("rtn", "quest", "cage"):
        for bits in ("w4a4", "w3a3", "w2a2", "w4a16"):
            assert f"{method}_{bits}.yaml" in names
    assert "fp.yaml" in names
    for name in names:
        cfg = load_config(CONFIGS_DIR / "experiments" / name)
        validate(cfg, 2)
        is_cage = name.startswith("cage")
        assert (cfg.optim.cage_lambda > 0) == is_cage, name
        if name.startswith("rtn"):
            assert cfg.quant.method == "rtn"


def test_local_tokenizer_larger_than_model_vocab(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(5000)} | {"<|endoftext|>": 5000}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg = load_config(EXPERIMENT, [f"data.tokenizer={tmp_path / 'tokenizer.json'}"])
    with pytest.raises(ConfigError, match=r"tokenizer vocabulary 5001 .* model's vocab_size=4096"):
        validate(cfg, 1)


PAPER = {
    "30m": 30e6,
    "50m": 50e6,
    "100m": 100e6,
    "200m": 200e6,
    "430m": 430e6,
    "800m": 800e6,
    "1b": 1e9,
}


@pytest.mark.parametrize("preset", sorted(PAPER))
def test_preset_non_embedding_params_match_name(preset):
    from cage_ds.train.model import preset_parameter_counts

    cfg = load_config(None, [f"model.preset={preset}"])
    m = cfg.model
    assert m.hidden_size % m.num_heads == 0 and not m.tie_embeddings
    if preset != "1b":  # paper sizes: head dim 128, SwiGLU 8/3 d rounded up to 256, vocab 32000
        assert m.hidden_size // m.num_heads == 128 and m.vocab_size == 32000
        assert m.ffn_size == swiglu_hidden(m.hidden_size) and m.ffn_size % 256 == 0
        assert m.ffn_size >= 8 * m.hidden_size / 3
    n = preset_parameter_counts(m)["non_embedding"]
    assert abs(n / PAPER[preset] - 1) < 0.1, (preset, n)


def test_8b_preset_is_llama3_8b_sized():
    from cage_ds.train.model import preset_parameter_counts

    counts = preset_parameter_counts(load_config(None, ["model.preset=8b"]).model)
    assert abs(counts["total"] / 8.03e9 - 1) < 0.01, counts


def test_tiny_preset_matches_bundled_bpe():
    cfg = load_config(None, [])
    assert cfg.model.preset == "tiny" and cfg.model.vocab_size == cfg.data.bpe_vocab_size
    validate(cfg, 2)
