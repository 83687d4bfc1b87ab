"""prepare_model and friends on a tiny transformers LlamaForCausalLM: the swaps, state
dicts, generate(), bad input, CAGE param groups, telemetry, quantized export / reload."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from testkit import tiny_llama
from torch import nn

from cage_ds.nn import (
    cage_param_groups,
    export_quantized_state,
    load_quantized_state,
    prepare_model,
    quant_stats,
    quantized_modules,
    set_weight_prequantized,
)
from cage_ds.quant import DEFAULT_TARGETS, QuantConfig, QuantSpec

VOCAB = 512


def ids_for(seed: int, shape=(2, 19)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def test_swaps_exactly_the_seven_projections_per_layer(seed):
    model = tiny_llama(seed)
    before = dict(model.named_modules())
    fp_params = {n: p for n, p in model.named_parameters() if "proj" not in n}
    assert prepare_model(model, QuantConfig.preset("w4a4")) is model
    swapped = dict(quantized_modules(model))
    parts = {
        "q_proj": "self_attn",
        "k_proj": "self_attn",
        "v_proj": "self_attn",
        "o_proj": "self_attn",
        "gate_proj": "mlp",
        "up_proj": "mlp",
        "down_proj": "mlp",
    }
    expected = {f"model.layers.{i}.{parts[t]}.{t}" for i in range(2) for t in DEFAULT_TARGETS}
    assert set(swapped) == expected and len(swapped) == 14
    for name, layer in swapped.items():
        assert layer.weight is before[name].weight  # parameters shared, not copied
    for name, module in model.named_modules():
        if name not in swapped:
            assert module is before[name], name  # embeddings, lm_head, norms untouched
    assert type(model.lm_head) is nn.Linear
    assert all(p is dict(model.named_parameters())[n] for n, p in fp_params.items())


def test_state_dict_round_trip_gives_identical_logits_and_generate_works(seed, tmp_path):
    cfg = QuantConfig.preset("w3a3")
    src = prepare_model(tiny_llama(seed), cfg)
    ids = ids_for(seed)
    save_file(src.state_dict(), tmp_path / "model.safetensors")
    dst = prepare_model(tiny_llama(seed + 1), cfg)
    dst.load_state_dict(load_file(tmp_path / "model.safetensors"))
    with torch.no_grad():
        assert torch.equal(src(ids).logits, dst(ids).logits)
    prompt = ids[:, :4]
    attn = torch.ones_like(prompt)
    out = src.generate(
        prompt, attention_mask=attn, max_new_tokens=6, do_sample=False, pad_token_id=0
    )
    assert out.shape == (2, 10) and torch.equal(out[:, :4], prompt)
    again = dst.generate(
        prompt, attention_mask=attn, max_new_tokens=6, do_sample=False, pad_token_id=0
    )
    assert torch.equal(out, again)


def test_prepare_on_meta_device_allocates_nothing():
    with torch.device("meta"):
        model = tiny_llama()
    prepare_model(model, QuantConfig.preset("w4a4"))
    layers = list(quantized_modules(model))
    assert len(layers) == 14 and all(layer.weight.is_meta for _, layer in layers)


def test_hf_checkpoint_of_unprepared_model_loads_into_prepared_one(seed):
    plain = tiny_llama(seed)
    prepared = prepare_model(tiny_llama(seed + 1), QuantConfig.preset("w4a4"))
    prepared.load_state_dict(plain.state_dict())
    assert set(plain.state_dict()) == set(prepared.state_dict())
    assert torch.equal(
        prepared.model.layers[1].mlp.down_proj.weight, plain.model.layers[1].mlp.down_proj.weight
    )


def test_no_matching_layer_names_targets_and_modules():
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU())
    with pytest.raises(
        ValueError, match=r"no nn.Linear.*q_proj.*modules found include \['0', '1'\]"
    ):
        prepare_model(model, QuantConfig.preset("w4a4"))


def test_bad_block_names_the_layer_and_changes_nothing(seed):
    model = tiny_llama(seed, intermediate_size=320)  # down_proj in_features 320 % 128 != 0
    with pytest.raises(
        ValueError, match=r"model\.layers\.0\.mlp\.down_proj: hadamard_block=128 .*320"
    ):
        prepare_model(model, QuantConfig.preset("w4a4"))
    assert not list(quantized_modules(model))
    prepare_model(model, QuantConfig.preset("w4a4", hadamard_block=64))  # 64 divides 320


def test_bits_9_refused():
    with pytest.raises(ValueError, match=r"bits must be an int in 1\.\.8, got 9"):
        QuantConfig.preset("w9a9")


def test_already_prepared_model_refused(seed):
    model = prepare_model(tiny_llama(seed), QuantConfig.preset("w4a4"))
    with pytest.raises(ValueError, match="already prepared"):
        prepare_model(model, QuantConfig.preset("w4a4"))


@pytest.mark.parametrize("tie", [False, True])
def test_cage_param_groups(seed, tie):
    model = prepare_model(tiny_llama(seed, tie_word_embeddings=tie), QuantConfig.preset("w4a4"))
    groups = cage_param_groups(model, weight_decay=0.1, cage_lambda=5.0)
    assert all(g["cage_lambda"] == 5.0 for g in groups)
    quant = [g for g in groups if g["quant"] is not None]
    assert len(quant) == 1 and quant[0]["quant"] == dataclasses.asdict(QuantSpec())
    assert quant[0]["weight_decay"] == 0.1
    qweights = {id(layer.weight) for _, layer in quantized_modules(model)}
    assert {id(p) for p in quant[0]["params"]} == qweights
    named = dict(model.named_parameters())
    for g in groups:
        assert all(named[n] is p for n, p in zip(g["param_names"], g["params"], strict=True))
    decay = [g for g in groups if g["quant"] is None and g["weight_decay"] == 0.1]
    no_decay = [g for g in groups if g["weight_decay"] == 0.0]
    assert [g["param_names"] for g in decay] == ([] if tie else [["lm_head.weight"]])
    assert set(no_decay[0]["param_names"]) == {
        "model.embed_tokens.weight",
        "model.norm.weight",
        *(
            f"model.layers.{i}.{n}.weight"
            for i in range(2)
            for n in ("input_layernorm", "post_attention_layernorm")
        ),
    }
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(all_ids) == sorted({id(p) for p in model.parameters()})


@pytest.mark.parametrize("correct", [("q_proj", "k_proj", "v_proj", "o_proj"), ("down_proj",)])
def test_cage_param_groups_correct_only_the_named_layers(seed, correct):
    """One CageAdamW step with lambda on: the named layers move exactly as under a plain
    all-layer CAGE optimizer, the others exactly as under QuEST (lambda 0)."""
    from cage_ds.optim import CageAdamW

    def step(model, **kw):
        groups = cage_param_groups(model, 0.1, cage_silence=0.0, total_steps=1, **kw)
        opt = CageAdamW(groups, lr=1e-2, cage_silence=0.0, total_steps=1)
        model(ids_for(seed), labels=ids_for(seed)).loss.backward()
        opt.step()
        return dict(model.named_parameters()), groups

    config = QuantConfig.preset("w4a4")
    only, groups = step(prepare_model(tiny_llama(seed), config), correct=correct, cage_lambda=10.0)
    every, _ = step(prepare_model(tiny_llama(seed), config), cage_lambda=10.0)
    none, _ = step(prepare_model(tiny_llama(seed), config), cage_lambda=0.0)
    lambdas = {n: g["cage_lambda"] for g in groups if g["quant"] for n in g["param_names"]}
    assert len(lambdas) == 14
    for name, lam in lambdas.items():
        corrected = name.removesuffix(".weight").rsplit(".", 1)[1] in correct
        assert lam == (10.0 if corrected else 0.0), name
        assert torch.equal(only[name], (every if corrected else none)[name]), name
        assert not torch.equal(every[name], none[name]), name


def test_cage_param_groups_correct_matching_nothing_is_refused(seed):
    model = prepare_model(tiny_llama(seed), QuantConfig(targets=("q_proj",)))
    with pytest.raises(ValueError, match=r"no quantized layer matches correct=\('up_proj',\)"):
        cage_param_groups(model, correct=("up_proj",))


def test_param_groups_of_unquantized_weights_and_mixed_specs(seed):
    model = prepare_model(tiny_llama(seed), QuantConfig.preset("w16a4"))
    groups = cage_param_groups(model)
    assert all(g["quant"] is None for g in groups)
    assert sum(len(g["params"]) for g in groups if g["weight_decay"] == 0.1) == 15  # 14 + lm_head
    model = prepare_model(tiny_llama(seed), QuantConfig(targets=("q_proj", "k_proj")))
    w3 = QuantConfig(weight=QuantSpec(bits=3), activation=None, targets=("up_proj",))
    prepare_model(model.model.layers[0].mlp, w3)
    specs = sorted(g["quant"]["bits"] for g in cage_param_groups(model) if g["quant"])
    assert specs == [3, 4]


def test_set_weight_prequantized(seed):
    model = prepare_model(tiny_llama(seed), QuantConfig.preset("w4a4"))
    assert set_weight_prequantized(model, True) == 14
    assert all(layer.weight_prequantized for _, layer in quantized_modules(model))
    assert set_weight_prequantized(model, False) == 14
    assert not any(layer.weight_prequantized for _, layer in quantized_modules(model))
    w16 = prepare_model(tiny_llama(seed), QuantConfig.preset("w16a4"))
    assert set_weight_prequantized(w16, True) == 0


def test_quant_stats_keys_and_values(seed):
    model = prepare_model(tiny_llama(seed), QuantConfig.preset("w4a4"))
    before = quant_stats(model)
    types = DEFAULT_TARGETS
    assert set(before) == {"quant/rel_error", *(f"quant/rel_error/{t}" for t in types)}
    ids = ids_for(seed)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    stats = quant_stats(model)
    assert set(stats) == set(before) | {"quant/masked_frac/weight", "quant/masked_frac/act"}
    assert all(type(v) is float and math.isfinite(v) for v in stats.values())
    # independent aggregation of ||W - Q(W)||^2 / ||W||^2 in float64
    num, den = {}, {}
    for name, layer in quantized_modules(model):
        t = name.rsplit(".", 1)[-1]
        w = layer.weight.detach().double()
        e2 = (w - layer.quantized_weight().double()).square().sum().item()
        num[t], den[t] = num.get(t, 0.0) + e2, den.get(t, 0.0) + w.square().sum().item()
    for t in types:
        assert stats[f"quant/rel_error/{t}"] == pytest.approx(math.sqrt(num[t] / den[t]), rel=1e-5)
    assert stats["quant/rel_error"] == pytest.approx(
        math.sqrt(sum(num.values()) / sum(den.values())), rel=1e-5
    )
    assert 0.05 < stats["quant/rel_error"] < 0.2  # 4-bit Gaussian MSE-optimal grid: ~0.1
    # trust mask of Gaussian-like rows: only the tail beyond c + D/2 (~2.7 sigma) is masked
    assert 0.0 < stats["quant/masked_frac/weight"] < 0.05
    assert 0.0 <= stats["quant/masked_frac/act"] < 0.05
    set_weight_prequantized(model, True)
    model(input_ids=ids, labels=ids).loss.backward()
    assert set(quant_stats(model)) == {"quant/masked_frac/act"}


@pytest.mark.parametrize(
    "preset,method,dtype",
    [
        ("w4a4", "quest", torch.float32),
        ("w3a8", "quest", torch.float32),
        ("w4a4", "rtn", torch.float32),
        ("w4a4", "quest", torch.bfloat16),
    ],
)
def test_export_load_quantized_state_round_trip(seed, tmp_path, preset, method, dtype):
    cfg = QuantConfig.preset(preset, method=method)
    src = prepare_model(tiny_llama(seed).to(dtype), cfg)
    ids = ids_for(seed)
    state = export_quantized_state(src)
    name = "model.layers.1.mlp.down_proj"
    assert name + ".weight" not in state
    bits = cfg.weight.bits
    assert state[name + ".weight.codes"].dtype == torch.uint8
    assert state[name + ".weight.codes"].shape == (256, 512 * bits // 8)
    method = ["quest", "rtn"].index(method)
    assert state[name + ".weight.format"].tolist() == [method, bits, 128, 128]
    save_file(state, tmp_path / "q.safetensors")
    dst = prepare_model(tiny_llama(seed + 1).to(dtype), cfg)
    load_quantized_state(dst, load_file(tmp_path / "q.safetensors"))
    assert all(layer.weight_prequantized for _, layer in quantized_modules(dst))
    with torch.no_grad():
        assert torch.equal(src(ids).logits, dst(ids).logits)
    with pytest.raises(ValueError, match="prequantized"):
        export_quantized_state(dst)


def test_load_quantized_state_refuses_mismatched_bits(seed):
    state = export_quantized_state(prepare_model(tiny_llama(seed), QuantConfig.preset("w4a4")))
    dst = prepare_model(tiny_llama(seed), QuantConfig.preset("w3a4"))
    layer = r"model\.layers\.0\.self_attn\.q_proj"
    formats = r"=\[0, 4, 128, 128\], .* is \[0, 3, 128, 128\]"
    with pytest.raises(ValueError, match=f"{layer} was exported as .*{formats}"):
        load_quantized_state(dst, state)
    with pytest.raises(KeyError, match="missing"):
        load_quantized_state(prepare_model(tiny_llama(seed), QuantConfig.preset("w4a4")), {})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight": "w4"}, r"QuantConfig\.weight must be a QuantSpec or None, got str 'w4'.*"
                           r"QuantConfig\.preset\('w4a4'\)"),
        ({"activation": 4}, r"QuantConfig\.activation must be a QuantSpec or None, got int 4"),
        ({"targets": "q_proj"}, r"QuantConfig\.targets must be a tuple .*got 'q_proj'"),
    ],
)  # fmt: skip
def test_quant_config_wrong_types_name_the_argument(kwargs, message):
    with pytest.raises(TypeError, match=message):
        QuantConfig(**kwargs)


def test_prepare_model_with_a_preset_name_says_how(seed):
    model = tiny_llama(seed)
    with pytest.raises(
        TypeError,
        match=r"config must be a QuantConfig, got str 'w4a4'; use prepare_model\(model, "
        r"QuantConfig\.preset\('w4a4'\)\)",
    ):
        prepare_model(model, "w4a4")
    assert not list(quantized_modules(model))
