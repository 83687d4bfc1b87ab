"""QuantLinear against an independent float64 reference (explicit Hadamard matrices and the
grid formulas of cage-method.md section 3), for several WxAy, odd batch shapes, both ways
of matching the operands' domains, the prequantized mode and the export."""

from __future__ import annotations

import math

import pytest
import torch
from cage_kernels.hadamard import hadamard_matrix
from torch import nn

from cage_ds.nn import QuantLinear
from cage_ds.quant import QuantConfig, QuantSpec

# cage-method.md section 3: MSE-optimal Gaussian clip, in units of the RMS.
ALPHA_DOC = {1: 0.7979, 2: 1.4935, 3: 2.0511, 4: 2.5139, 5: 2.9161, 6: 3.2766, 7: 3.6010, 8: 3.8849}


def block_hadamard(n: int, block: int) -> torch.Tensor:
    """I ⊗ H_block as an explicit float64 [n, n] matrix."""
    return torch.block_diag(*[hadamard_matrix(block)] * (n // block))


def ref_quant(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Float64 reference of rows x [rows, n]: (q, mask, tie) where q is in the rotated domain
    for QuEST (original for RTN) and tie is the smallest distance of a rounding or mask
    decision to its threshold, in grid units / 2^bits (where fp32 may legitimately differ)."""
    n_lv = 2**spec.bits
    if spec.method == "quest":
        y = x @ block_hadamard(x.shape[-1], spec.hadamard_block)
        rms = y.square().mean(-1, keepdim=True).sqrt()
        c = ALPHA_DOC[spec.bits] * rms
        step = 2 * c / (n_lv - 1)
        t = y / step + (n_lv - 1) / 2
        k = torch.round(t).clamp(0, n_lv - 1)
        q = (k - (n_lv - 1) / 2) * step
        if spec.mask == "trust":
            mask = (y - q).abs() <= step / 2
            tie = (t - torch.floor(t) - 0.5).abs()
        else:
            mask = y.abs() <= c
            tie = torch.minimum(
                (t - torch.floor(t) - 0.5).abs(), torch.minimum(t.abs(), (t - n_lv + 1).abs())
            )
        return q, mask, tie.min().item() / n_lv
    m = 2 ** (spec.bits - 1) - 1
    g = x.reshape(x.shape[0], -1, spec.group_size)
    s = g.abs().amax(-1, keepdim=True) / m
    t = g / s
    q = (torch.round(t).clamp(-m, m) * s).reshape(x.shape)
    tie = (t - torch.floor(t) - 0.5).abs().min().item() / n_lv
    return q, torch.ones_like(x, dtype=torch.bool), tie


def ref_linear(x, w, b, g, cfg: QuantConfig):
    """Float64 forward y = a_r w_r^T + b in the rotated domain (if any side is QuEST) and
    the STE gradients dx = (M_a ⊙ dL/da_r) H, dW = (M_w ⊙ dL/dw_r) H. Also returns the
    smallest tie distance of all rounding decisions."""
    specs = [s for s in (cfg.weight, cfg.activation) if s is not None and s.method == "quest"]
    n = x.shape[-1]
    h = block_hadamard(n, specs[0].hadamard_block) if specs else torch.eye(n, dtype=torch.float64)
    ties = [math.inf]

    def operand(t, spec):
        if spec is None:
            return t @ h, torch.ones_like(t, dtype=torch.bool)
        q, mask, tie = ref_quant(t, spec)
        ties.append(tie)
        return (q if spec.method == "quest" else q @ h), mask

    a_r, m_a = operand(x, cfg.activation)
    w_r, m_w = operand(w, cfg.weight)
    y = a_r @ w_r.T + (0 if b is None else b)
    dx = (m_a * (g @ w_r)) @ h
    dw = (m_w * (g.T @ a_r)) @ h
    db = None if b is None else g.sum(0)
    return y, dx, dw, db, min(ties)


def draw(gen, shape, out, bias, dtype=torch.float32):
    x = torch.randn(*shape, generator=gen, dtype=dtype)
    w = torch.randn(out, shape[-1], generator=gen, dtype=dtype) / math.sqrt(shape[-1])
    b = torch.randn(out, generator=gen, dtype=dtype) if bias else None
    g = torch.randn(*shape[:-1], out, generator=gen, dtype=dtype)
    return x, w, b, g


def make_layer(w, b, cfg: QuantConfig) -> QuantLinear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(b)
    return QuantLinear.from_linear(lin, cfg)


def draw_untied(gen, shape, out, bias, cfg, tries=60):
    """Inputs whose reference rounding decisions are all clear of ties by 1e-6 * 2^bits
    grid steps (measured fp32-vs-fp64 drift: <= 2e-7 * 2^bits)."""
    for _ in range(tries):
        x, w, b, g = draw(gen, shape, out, bias)
        ref = ref_linear(
            x.double().reshape(-1, shape[-1]),
            w.double(),
            None if b is None else b.double(),
            g.double().reshape(-1, out),
            cfg,
        )
        if ref[-1] > 1e-6:
            return (x, w, b, g), ref
    pytest.fail("could not draw inputs without near-ties")


Q4, Q3, Q2 = (QuantSpec(bits=b, hadamard_block=64) for b in (4, 3, 2))
R4 = QuantSpec(method="rtn", bits=4, group_size=64)
CASES = {
    "w4a4-b64": (QuantConfig(weight=Q4, activation=Q4), (3, 5, 256), 40, True),
    "w3a3-b128-big-rows": (QuantConfig.preset("w3a3"), (7, 9, 256), 24, False),
    "w2a2-b256": (QuantConfig.preset("w2a2", hadamard_block=256), (11, 256), 33, True),
    "w8a8": (QuantConfig.preset("w8a8"), (5, 128), 12, True),
    "w2a2-clip-mask": (
        QuantConfig.preset("w2a2", mask="clip", hadamard_block=64),
        (9, 128),
        20,
        True,
    ),
    "w4a16-few-rows": (QuantConfig(weight=Q4, activation=None), (2, 3, 2, 256), 40, True),
    "w4a16-many-rows": (QuantConfig(weight=Q4, activation=None), (60, 256), 24, False),
    "w16a4-few-rows": (QuantConfig(weight=None, activation=Q4), (3, 256), 40, True),
    "w16a4-many-rows": (QuantConfig(weight=None, activation=Q4), (5, 13, 256), 24, False),
    "wrtn4-aquest4-few": (QuantConfig(weight=R4, activation=Q4), (5, 256), 40, True),
    "wrtn4-aquest4-many": (QuantConfig(weight=R4, activation=Q4), (4, 25, 256), 24, True),
    "wquest4-artn4-many": (QuantConfig(weight=Q3, activation=R4), (2, 50, 256), 24, False),
    "w4a4-rtn": (QuantConfig.preset("w4a4", method="rtn", group_size=64), (3, 7, 256), 24, True),
}


@pytest.mark.parametrize("case", CASES)
def test_forward_and_ste_backward_match_float64_reference(case, gen):
    cfg, shape, out, bias = CASES[case]
    (x, w, b, g), (y_ref, dx_ref, dw_ref, db_ref, _) = draw_untied(gen, shape, out, bias, cfg)
    layer = make_layer(w, b, cfg)
    x.requires_grad_(True)
    y = layer(x)
    y.backward(g)
    assert y.shape == (*shape[:-1], out) and y.dtype == torch.float32
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y.double().reshape(-1, out), y_ref, **tol)
    torch.testing.assert_close(x.grad.double().reshape(-1, shape[-1]), dx_ref, **tol)
    torch.testing.assert_close(layer.weight.grad.double(), dw_ref, **tol)
    if bias:
        torch.testing.assert_close(layer.bias.grad.double(), db_ref, **tol)


@pytest.mark.parametrize(
    "case", ["w4a4-b64", "w8a8", "w2a2-clip-mask", "wrtn4-aquest4-many", "w4a4-rtn"]
)
def test_masked_counts_equal_reference_masks(case, gen):
    cfg, shape, out, bias = CASES[case]
    (x, w, b, g), _ = draw_untied(gen, shape, out, bias, cfg)
    layer = make_layer(w, b, cfg)
    layer(x.requires_grad_(True)).backward(g)
    counts = {k: (int(c), n) for k, (c, n) in layer.masked_counts().items()}
    for side, spec, t in (("weight", cfg.weight, w), ("act", cfg.activation, x)):
        _, mask, _ = ref_quant(t.double().reshape(-1, shape[-1]), spec)
        assert counts[side] == (int((~mask).sum()), t.numel())
    with torch.no_grad():
        layer(x)  # an eval forward leaves the last backward's counts alone
    assert {k: (int(c), n) for k, (c, n) in layer.masked_counts().items()} == counts


@pytest.mark.parametrize("rows", [7, 90])  # <= and > out_features: both domain conversions
def test_w4a16_rotation_only_activation_equals_plain_linear_on_qw(rows, gen):
    cfg = QuantConfig.preset("w4a16")
    x, w, b, g = draw(gen, (rows, 256), 48, True)
    layer = make_layer(w, b, cfg)
    xq = x.clone().requires_grad_(True)
    y = layer(xq)
    y.backward(g)
    qw = layer.weight_quantizer.dequantize(w)
    xp = x.clone().requires_grad_(True)
    y_plain = nn.functional.linear(xp, qw, b)
    y_plain.backward(g)
    torch.testing.assert_close(y, y_plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xq.grad, xp.grad, rtol=1e-5, atol=1e-5)


def test_fp_config_is_plain_linear(gen):
    x, w, b, _ = draw(gen, (4, 3, 256), 20, True)
    layer = make_layer(w, b, QuantConfig.preset("fp"))
    assert torch.equal(layer(x), nn.functional.linear(x, w, b))


@pytest.mark.parametrize("rows", [9, 120])
def test_prequantized_forward_equals_fake_and_grad_is_rotated_domain(rows, gen):
    cfg = QuantConfig.preset("w4a4")
    x, w, b, g = draw(gen, (rows, 256), 64, True)
    fake = make_layer(w, b, cfg)
    xf = x.clone().requires_grad_(True)
    y_fake = fake(xf)
    y_fake.backward(g)

    q = fake.weight_quantizer.values(w)
    pre = make_layer(q, b, cfg)
    pre.weight_prequantized = True
    xp = x.clone().requires_grad_(True)
    y_pre = pre(xp)
    y_pre.backward(g)

    assert torch.equal(y_pre, y_fake)
    assert torch.equal(xp.grad, xf.grad)
    assert "weight" not in pre.masked_counts()
    # dL/dq = g^T a_r with a_r the rotated quantized activation; the fake weight's STE
    # gradient is (M_w ⊙ dL/dq) H.
    a_r, _, _ = ref_quant(x.double(), cfg.activation)
    torch.testing.assert_close(pre.weight.grad.double(), g.double().T @ a_r, rtol=1e-4, atol=1e-4)
    # M_w is the layer's own fp32 trust mask. The float64 reference must agree with it
    # except where |y - q| sits within 1e-5 steps of D/2, a decision fp32 may take either
    # way (it did for one element with seed 2982535462).
    spec = cfg.weight
    assert spec.mask == "trust"
    h = block_hadamard(256, spec.hadamard_block)
    q_ref, m_ref, _ = ref_quant(w.double(), spec)
    y = w.double() @ h
    step = 2 * ALPHA_DOC[spec.bits] * y.square().mean(-1, keepdim=True).sqrt() / (2**spec.bits - 1)
    near_tie = ((y - q_ref).abs() - step / 2).abs() < 1e-5 * step
    m_w = fake.weight_quantizer.mask(w)
    assert not (m_w != m_ref)[~near_tie].any(), "fp32 and float64 masks differ off a tie"
    torch.testing.assert_close(
        fake.weight.grad.double(), (m_w * pre.weight.grad.double()) @ h, rtol=1e-5, atol=1e-5
    )


def test_to_linear_exports_q_w_in_original_domain(gen):
    cfg = QuantConfig.preset("w4a16")
    (x, w, b, _), _ = draw_untied(gen, (6, 256), 32, True, cfg)  # fp32 codes = float64 codes
    layer = make_layer(w, b, cfg)
    lin = layer.to_linear()
    assert type(lin) is nn.Linear and lin.weight.dtype == w.dtype
    q_ref, _, _ = ref_quant(w.double(), cfg.weight)
    torch.testing.assert_close(
        lin.weight.double(), q_ref @ block_hadamard(256, 128), rtol=1e-5, atol=1e-6
    )
    assert torch.equal(lin.bias, b) and lin.bias.data_ptr() != layer.bias.data_ptr()
    torch.testing.assert_close(lin(x), layer(x), rtol=1e-5, atol=1e-5)
    pre = make_layer(layer.weight_quantizer.values(w), b, cfg)
    pre.weight_prequantized = True
    torch.testing.assert_close(pre.to_linear().weight, lin.weight, rtol=0, atol=1e-6)


def test_bf16_runs_and_is_close_to_fp32(gen):
    cfg = QuantConfig.preset("w4a4")
    x, w, b, g = draw(gen, (4, 33, 256), 64, True)
    x, w, b = (t.bfloat16().float() for t in (x, w, b))
    y32 = make_layer(w, b, cfg)(x)
    layer16 = make_layer(w.bfloat16(), b.bfloat16(), cfg)
    x16 = x.bfloat16().requires_grad_(True)
    y16 = layer16(x16)
    y16.backward(g.bfloat16())
    assert y16.dtype == torch.bfloat16 and layer16.weight.grad.dtype == torch.bfloat16
    assert torch.isfinite(x16.grad.float()).all()
    rel = ((y16.float() - y32).norm() / y32.norm()).item()
    assert rel < 0.05, rel  # bf16 rounding moves a few elements to a neighbouring level


def test_autocast_bf16_keeps_fp32_weights_and_grads(gen):
    cfg = QuantConfig.preset("w4a4")
    x, w, b, g = draw(gen, (2, 17, 256), 48, True)
    layer = make_layer(w, b, cfg)
    y32 = layer(x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().backward(g)
    assert y.dtype == torch.bfloat16 and layer.weight.grad.dtype == torch.float32
    assert ((y.float() - y32).norm() / y32.norm()).item() < 0.01


def test_from_linear_shares_parameters_and_is_meta_safe():
    lin = nn.Linear(256, 16, device="meta")
    layer = QuantLinear.from_linear(lin, QuantConfig.preset("w4a4"), name="model.layers.0.q")
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert layer.weight.is_meta
    assert layer.weight_quantizer.spec == QuantSpec() and layer.weight_prequantized is False
    assert set(layer.state_dict()) == {"weight", "bias"}


def test_bad_block_names_the_layer():
    lin = nn.Linear(192, 8)
    with pytest.raises(
        ValueError, match=r"model\.layers\.3\.mlp\.up_proj.*hadamard_block=128.*192"
    ):
        QuantLinear.from_linear(lin, QuantConfig.preset("w4a4"), name="model.layers.3.mlp.up_proj")


def test_mismatched_blocks_refused():
    from cage_ds.quant import Quantizer

    with pytest.raises(ValueError, match="hadamard_block must match"):
        QuantLinear(
            256,
            8,
            weight_quantizer=Quantizer(QuantSpec(hadamard_block=64)),
            act_quantizer=Quantizer(QuantSpec(hadamard_block=128)),
        )


def test_prequantized_without_weight_quantizer_raises(gen):
    x, w, b, _ = draw(gen, (3, 256), 8, True)
    layer = make_layer(w, b, QuantConfig.preset("w16a4"))
    layer.weight_prequantized = True
    with pytest.raises(RuntimeError, match="without a weight quantizer"):
        layer(x)
