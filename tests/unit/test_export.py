"""Exports of a live W4A4 model trained a few CAGE steps (single process, fp32, CPU):
plain Hugging Face (stock LlamaForCausalLM.from_pretrained; logits = the W4A16 view) and
packed (load_packed rebuilds the model itself; logits = the W4A4 forward bit for bit)."""

from __future__ import annotations

import json

import pytest
import torch
from testkit import tiny_llama

from cage_ds import CageAdamW, QuantConfig, cage_param_groups, prepare_model
from cage_ds.nn import quant_config_of
from cage_ds.nn.export import CONFIG_KEY, load_packed, save_packed, save_plain_hf

VOCAB = 256
FP32_ATOL = 1e-4
"""Plain vs W4A16 view in fp32: the project multiplies x H q(W H)^T, the plain model x Q(W)^T
(logits of magnitude ~1 agree to ~1e-6; 1e-4 leaves margin, far below the W4A4/W4A16 gap)."""
BF16_RTOL = 2e-2
"""bf16 export: weights rounded to bf16 (relative 2^-9 each) -> |dlogits| / |logits| ~1e-3."""


def _llama(tie: bool):
    return tiny_llama(
        0,
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )


def _batch(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def trained(request):
    """A W4A4 Llama after 3 CAGE steps (latents moved away from the init)."""
    model = prepare_model(_llama(request.param), QuantConfig.preset("w4a4"))
    opt = CageAdamW(cage_param_groups(model), lr=1e-2, cage_lambda=1.0, total_steps=3)
    for k in range(3):
        ids = _batch(k)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def _w4a16_view(model):
    """A fresh model prepared with the weight spec only, holding ``model``'s latents."""
    weight_only = QuantConfig(weight=quant_config_of(model).weight, activation=None)
    view = prepare_model(_llama(model.config.tie_word_embeddings), weight_only)
    view.load_state_dict(model.state_dict())
    return view.eval()


@torch.no_grad()
def test_plain_hf_loads_stock_and_equals_the_w4a16_view(trained, tmp_path):
    from transformers import LlamaForCausalLM

    save_plain_hf(trained, tmp_path)
    plain, info = LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids = _batch(99)
    got = plain(input_ids=ids).logits
    want = _w4a16_view(trained)(input_ids=ids).logits
    w4a4 = trained(input_ids=ids).logits
    assert (got - want).abs().max() <= FP32_ATOL
    assert (w4a4 - want).abs().max() > 100 * FP32_ATOL  # activations were really quantized
    record = json.loads((tmp_path / "config.json").read_text())[CONFIG_KEY]
    assert record["quant_config"]["activation"] == {"method": "quest", "bits": 4,
        "hadamard_block": 128, "mask": "trust", "group_size": 128}  # fmt: skip
    assert QuantConfig.from_dict(record["quant_config"]) == quant_config_of(trained)


@torch.no_grad()
def test_plain_hf_bf16(trained, tmp_path):
    from transformers import LlamaForCausalLM

    save_plain_hf(trained, tmp_path, dtype=torch.bfloat16)
    plain = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    ids = _batch(98)
    got = plain(input_ids=ids).logits
    want = _w4a16_view(trained)(input_ids=ids).logits
    assert float((got - want).norm() / want.norm()) <= BF16_RTOL


@torch.no_grad()
def test_packed_reloads_the_w4a4_forward_bit_for_bit(trained, tmp_path):
    file = tmp_path / "packed.safetensors"
    state = save_packed(trained, file)
    assert any(k.endswith(".weight.codes") for k in state)
    loaded = load_packed(file)
    assert quant_config_of(loaded) == quant_config_of(trained)
    ids = _batch(97)
    assert torch.equal(loaded(input_ids=ids).logits, trained(input_ids=ids).logits)


def test_packed_refuses_a_file_without_metadata_and_a_mismatched_model(trained, tmp_path):
    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"
    save_file({"x": torch.zeros(1)}, str(bare))
    with pytest.raises(ValueError, match=r"no 'cage_ds\.quant_config'"):
        load_packed(bare)
    file = tmp_path / "packed.safetensors"
    save_packed(trained, file)
    w3 = prepare_model(_llama(trained.config.tie_word_embeddings), QuantConfig.preset("w3a3"))
    with pytest.raises(ValueError, match="was exported with"):
        load_packed(file, w3)


def test_quant_config_of_refuses_mixed_specs_and_says_none_for_fp():
    from cage_ds.quant import Quantizer, QuantSpec

    assert quant_config_of(_llama(False)) is None
    model = prepare_model(_llama(False), QuantConfig.preset("w4a4"))
    model.model.layers[0].mlp.down_proj.weight_quantizer = Quantizer(QuantSpec(bits=3))
    with pytest.raises(ValueError, match="2 different spec pairs"):
        quant_config_of(model)
