"""CageAdamW and CageCoupled against torch.optim and the formulas of cage-method.md section 2.

The references below are written out independently (plain float64 arithmetic, no
in-place tricks); random tensors come from a seed printed on failure
(CAGE_TEST_SEED=<n> replays one).
"""

from __future__ import annotations

import dataclasses
import io
import math

import pytest
import torch

from cage_ds.optim import (
    CageAdamW,
    CageCoupled,
    DenseQuantOps,
    TensorQuantOps,
    lambda_at,
    quantizer_from_group,
)
from cage_ds.quant import Quantizer, QuantSpec

SPEC = QuantSpec(bits=4, hadamard_block=16)
QUANT = dataclasses.asdict(SPEC)


def ref_lambda(k: int, lam: float, silence: float, kind: str, total: int | None) -> float:
    """cage-method.md section 2, written out: r = k / T; 0 for r <= s, then ramp or constant."""
    r = k / total if total else math.inf
    if total and r <= silence:
        return 0.0
    if kind == "constant" or total is None:
        return lam
    return lam * min(1.0, (r - silence) / (1.0 - silence))


class FixedGridOps:
    """Q(w) = D (floor(w / D) + 1/2): a fixed no-zero grid in float64, independent of QuEST."""

    def __init__(self, step: float = 0.05):
        self.step = step

    def q(self, w: torch.Tensor) -> torch.Tensor:
        return self.step * (torch.floor(w / self.step) + 0.5)

    def error(self, w: torch.Tensor) -> torch.Tensor:
        return w - self.q(w)

    def ste_grad(self, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return g


class SmoothOps(FixedGridOps):
    """A smooth stand-in Q(w) = 0.5 tanh(w), so fp32-vs-float64 comparisons never hit a
    rounding boundary; ste_grad scales by 1 + w^2 to prove it is applied."""

    def q(self, w: torch.Tensor) -> torch.Tensor:
        return 0.5 * torch.tanh(w)

    def ste_grad(self, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return g * (1 + w * w)


class OpsAdamW(CageAdamW):
    """CageAdamW whose quantized groups use the given ops (the hook a ZeRO adapter overrides)."""

    def __init__(self, params, ops: TensorQuantOps, **kw):
        self.ops = ops
        super().__init__(params, **kw)

    def quant_ops(self, group, p):
        return None if group["quant"] is None else self.ops


def make_params(gen: torch.Generator, dtype: torch.dtype) -> list[torch.Tensor]:
    """Two quantizable weights with odd row counts, a bias, an embedding."""
    shapes = [(7, 48), (5, 32), (7,), (11, 16)]
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]


def make_groups(params: list[torch.Tensor], **quant_group_kw) -> list[dict]:
    w1, w2, bias, emb = params
    return [
        {"params": [w1, w2], "quant": QUANT, "weight_decay": 0.1, **quant_group_kw},
        {"params": [bias], "weight_decay": 0.0, "lr": 3e-3},
        {"params": [emb], "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.05},
    ]


def random_grads(gen, params, step: int) -> list[torch.Tensor | None]:
    """Fresh gradients; the embedding gets none on every third step (it must be skipped)."""
    grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) for p in params]
    if step % 3 == 2:
        grads[3] = None
    return grads


def set_grads(params, grads) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = None if g is None else g.clone()


@pytest.mark.parametrize("variant", ["decoupled", "coupled"])
@pytest.mark.parametrize(
    "cage_kw",
    [{"cage_lambda": 0.0}, {"cage_lambda": 10.0, "cage_silence": 1.0, "total_steps": 60}],
    ids=["lambda0", "silent"],
)
def test_zero_lambda_equals_torch_adamw(gen, variant, cage_kw):
    ours = [p.clone() for p in make_params(gen, torch.float64)]
    theirs = [p.clone() for p in ours]
    cage = CageAdamW(make_groups(ours), lr=1e-2, cage_variant=variant, **cage_kw)
    torch_groups = [{k: v for k, v in g.items() if k != "quant"} for g in make_groups(theirs)]
    adamw = torch.optim.AdamW(torch_groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for step in range(60):
        grads = random_grads(gen, ours, step)
        set_grads(ours, grads)
        set_grads(theirs, grads)
        cage.step()
        adamw.step()
        assert cage.last_lambda == 0.0
    for p, q in zip(ours, theirs, strict=True):
        assert (p - q).abs().max().item() <= 1e-12
        mine, ref = cage.state[p], adamw.state[q]
        assert set(mine) == {"step", "exp_avg", "exp_avg_sq"}
        assert mine["step"].dtype == torch.float32 and mine["step"].dim() == 0
        assert mine["step"].item() == ref["step"].item()
        for key in ("exp_avg", "exp_avg_sq"):
            assert mine[key].dtype == torch.float64
            assert (mine[key] - ref[key]).abs().max().item() <= 1e-12
    assert cage.state[ours[3]]["step"].item() == 40  # skipped on the 20 steps without a grad


def test_zero_lambda_fp32_is_bit_identical_to_torch_adamw(gen):
    ours = [p.clone() for p in make_params(gen, torch.float32)]
    theirs = [p.clone() for p in ours]
    cage = CageAdamW(make_groups(ours), lr=1e-2, cage_lambda=0.0)
    torch_groups = [{k: v for k, v in g.items() if k != "quant"} for g in make_groups(theirs)]
    adamw = torch.optim.AdamW(torch_groups, lr=1e-2, betas=(0.9, 0.95), foreach=False)
    for step in range(20):
        grads = random_grads(gen, ours, step)
        set_grads(ours, grads)
        set_grads(theirs, grads)
        cage.step()
        adamw.step()
    for p, q in zip(ours, theirs, strict=True):
        assert torch.equal(p, q)


def reference_cage_adamw(w, grads, *, lr, betas, eps, wd, lambdas, variant, ops,
                         correction_lrs=None):  # fmt: skip
    """cage-method.md section 2 for one tensor over len(grads) steps, float64; ``lr`` a
    number or the per-step lrs; the decoupled correction at ``correction_lrs`` if given."""
    w = w.double().clone()
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    b1, b2 = betas
    lrs = lr if isinstance(lr, list) else [lr] * len(grads)
    for t, (g, lam) in enumerate(zip(grads, lambdas, strict=True), start=1):
        lr = lrs[t - 1]
        g = ops.ste_grad(w, g.double())
        if variant == "coupled":
            g = g + lam * (w - ops.q(w))
        w = w * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        w = w - lr * m_hat / (torch.sqrt(v_hat) + eps)
        if variant == "decoupled":
            w = w - (lr if correction_lrs is None else correction_lrs[t - 1]) * lam * (w - ops.q(w))
    return w, m, v


def test_next_lr_ratio_corrects_at_the_lr_after_the_scheduler_step(gen):
    """The official code's order: Adam step at lr_k, scheduler step, correction at lr_{k+1}."""
    steps, lam = 8, 3.0
    f = [1.0, 0.9, 0.7, 0.4, 0.3, 0.25, 0.2, 0.1, 0.05]  # lr multipliers of steps 1..9
    params = make_params(gen, torch.float64)
    start = [p.clone() for p in params]
    opt = OpsAdamW(make_groups(params), FixedGridOps(), lr=2e-2, cage_lambda=lam,
                   cage_silence=0.5, total_steps=steps,
                   next_lr_ratio=lambda k: f[k] / f[k - 1])  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: f[i])
    history = []
    for step in range(steps):
        history.append(random_grads(gen, params, step))
        set_grads(params, history[-1])
        opt.step()
        sched.step()
    lambdas = [ref_lambda(k, lam, 0.5, "linear_ramp", steps) for k in range(1, steps + 1)]
    assert opt.last_lambda == pytest.approx(lam * f[steps] / f[steps - 1])
    lrs = [2e-2 * x for x in f]
    for i in (0, 1):  # the quantized params (group lr 2e-2)
        ours = params[i].double()
        want = reference_cage_adamw(start[i], [h[i] for h in history], lr=lrs[:steps],
                                    betas=(0.9, 0.95), eps=1e-8, wd=0.1, lambdas=lambdas,
                                    variant="decoupled", ops=FixedGridOps(),
                                    correction_lrs=lrs[1:])[0]  # fmt: skip
        assert (ours - want).abs().max().item() <= 1e-12 * max(1.0, want.abs().max().item())
        this_step = reference_cage_adamw(start[i], [h[i] for h in history], lr=lrs[:steps],
                                         betas=(0.9, 0.95), eps=1e-8, wd=0.1, lambdas=lambdas,
                                         variant="decoupled", ops=FixedGridOps())[0]  # fmt: skip
        assert (ours - this_step).abs().max().item() > 1e-9  # the order is visible


def test_next_lr_ratio_is_refused_for_the_coupled_variant(gen):
    params = make_params(gen, torch.float64)
    with pytest.raises(ValueError, match=r"param group 0: next_lr_ratio .* cage_variant=.coupled."):
        CageAdamW(make_groups(params), cage_variant="coupled", total_steps=4,
                  next_lr_ratio=lambda k: 1.0)  # fmt: skip


@pytest.mark.parametrize("variant", ["decoupled", "coupled"])
@pytest.mark.parametrize(
    ("dtype", "ops", "tol"),
    [(torch.float64, FixedGridOps(), 1e-12), (torch.float32, SmoothOps(), 2e-5)],
    ids=["fp64-grid", "fp32-smooth"],
)
def test_cage_steps_match_the_section2_formula(gen, variant, dtype, ops, tol):
    steps, total, lam, silence = 8, 8, 3.0, 0.5
    params = make_params(gen, dtype)
    start = [p.clone() for p in params]
    opt = OpsAdamW(
        make_groups(params),
        ops,
        lr=2e-2,
        cage_lambda=lam,
        cage_silence=silence,
        cage_schedule="linear_ramp",
        cage_variant=variant,
        total_steps=total,
    )
    history = []
    for step in range(steps):
        grads = random_grads(gen, params, step)
        grads[3] = torch.randn(params[3].shape, generator=gen, dtype=torch.float64).to(dtype)
        history.append(grads)
        set_grads(params, grads)
        opt.step()
        assert opt.last_lambda == pytest.approx(
            ref_lambda(step + 1, lam, silence, "linear_ramp", total)
        )
    lambdas = [ref_lambda(k, lam, silence, "linear_ramp", total) for k in range(1, steps + 1)]
    assert lambdas[:4] == [0.0] * 4 and lambdas[-1] == lam  # silent half, then the ramp
    for i, (group_wd, group_lr, betas, eps, quantized) in enumerate(
        [(0.1, 2e-2, (0.9, 0.95), 1e-8, True), (0.1, 2e-2, (0.9, 0.95), 1e-8, True),
         (0.0, 3e-3, (0.9, 0.95), 1e-8, False), (0.05, 2e-2, (0.8, 0.99), 1e-6, False)]
    ):  # fmt: skip
        want_w, want_m, want_v = reference_cage_adamw(
            start[i],
            [h[i] for h in history],
            lr=group_lr,
            betas=betas,
            eps=eps,
            wd=group_wd,
            lambdas=lambdas if quantized else [0.0] * steps,
            variant=variant,
            ops=ops if quantized else FixedGridOps(),
        )
        scale = max(1.0, want_w.abs().max().item())
        assert (params[i].double() - want_w).abs().max().item() <= tol * scale, i
        assert (opt.state[params[i]]["exp_avg"].double() - want_m).abs().max() <= tol * 10, i
        assert (opt.state[params[i]]["exp_avg_sq"].double() - want_v).abs().max() <= tol * 10, i
    # the correction did act: the quantized weights differ from a lambda = 0 run
    plain = reference_cage_adamw(
        start[0], [h[0] for h in history], lr=2e-2, betas=(0.9, 0.95), eps=1e-8, wd=0.1,
        lambdas=[0.0] * steps, variant=variant, ops=ops,
    )[0]  # fmt: skip
    assert (params[0].double() - plain).abs().max().item() > 1e3 * tol


class QuestRef:
    """Q from the real Quantizer (its formula is proven in test_quantizer.py); ste_grad = g."""

    def __init__(self, spec: QuantSpec):
        self.quantizer = Quantizer(spec)

    def q(self, w: torch.Tensor) -> torch.Tensor:
        return self.quantizer.dequantize(w)

    def ste_grad(self, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return g


@pytest.mark.parametrize("variant", ["decoupled", "coupled"])
def test_default_quant_ops_use_the_groups_quest_spec(gen, variant):
    params = make_params(gen, torch.float64)
    start = [p.clone() for p in params]
    opt = CageAdamW(
        make_groups(params), lr=2e-2, cage_lambda=5.0, cage_silence=0.0,
        cage_schedule="constant", cage_variant=variant,
    )  # fmt: skip
    assert isinstance(opt.quant_ops(opt.param_groups[0], params[0]), DenseQuantOps)
    assert opt.quant_ops(opt.param_groups[1], params[2]) is None
    history = []
    for step in range(4):
        grads = random_grads(gen, params, step)
        history.append(grads)
        set_grads(params, grads)
        opt.step()
        assert opt.last_lambda == 5.0
    for i in (0, 1):
        want, _, _ = reference_cage_adamw(
            start[i], [h[i] for h in history], lr=2e-2, betas=(0.9, 0.95), eps=1e-8, wd=0.1,
            lambdas=[5.0] * 4, variant=variant, ops=QuestRef(SPEC),
        )  # fmt: skip
        assert (params[i] - want).abs().max().item() <= 1e-12


def test_quant_ops_are_built_once_and_set_quant_ops_routes_them(gen):
    """The dense ops of a parameter are cached per "quant" spec (a changed spec rebuilds
    them); set_quant_ops(provider) serves every parameter from the provider, None restores."""
    params = make_params(gen, torch.float64)
    opt = CageAdamW(make_groups(params), lr=1e-2, cage_silence=0.0)
    group = opt.param_groups[0]
    first = opt.quant_ops(group, params[0])
    assert opt.quant_ops(group, params[0]) is first
    group["quant"] = {**QUANT, "bits": 3}
    rebuilt = opt.quant_ops(group, params[0])
    assert rebuilt is not first and rebuilt.quantizer.spec.bits == 3
    fixed = FixedGridOps()
    seen = []

    def provider(g, p):
        seen.append(id(p))
        return fixed

    opt.set_quant_ops(provider)
    assert opt.quant_ops(group, params[0]) is fixed
    assert opt.quant_ops(opt.param_groups[1], params[2]) is fixed
    assert opt.quant_ops(group, params[0]) is fixed and seen == [id(params[0]), id(params[2])]
    opt.set_quant_ops(None)
    assert isinstance(opt.quant_ops(group, params[0]), DenseQuantOps)


@pytest.mark.parametrize(
    ("k", "total", "silence", "kind", "want"),
    [
        (8, 10, 0.8, "linear_ramp", 0.0),  # r = s: still silent
        (9, 10, 0.8, "linear_ramp", 5.0),  # just after: (0.9 - 0.8) / 0.2 of lambda
        (10, 10, 0.8, "linear_ramp", 10.0),  # r = 1
        (12, 10, 0.8, "linear_ramp", 10.0),  # past the end: capped
        (801, 1000, 0.8, "linear_ramp", 0.05),  # first active step of a long run
        (9, 10, 0.8, "constant", 10.0),
        (8, 10, 0.8, "constant", 0.0),
        (1, 10, 0.0, "linear_ramp", 1.0),  # silence 0: the ramp starts at k = 1
        (1, 10, 0.0, "constant", 10.0),
        (10, 10, 1.0, "linear_ramp", 0.0),  # silence 1: never on
        (10, 10, 1.0, "constant", 0.0),
        (3, None, 0.0, "linear_ramp", 10.0),  # no horizon, silence 0: on from the start
    ],
)
def test_schedule_boundaries(k, total, silence, kind, want):
    got = lambda_at(k, 10.0, silence, kind, total)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert got == pytest.approx(ref_lambda(k, 10.0, silence, kind, total), rel=1e-12, abs=1e-15)
    assert lambda_at(k, 0.0, silence, kind, total) == 0.0


def run_steps(opt, params, grads_per_step) -> list[float]:
    lambdas = []
    for grads in grads_per_step:
        set_grads(params, grads)
        opt.step()
        lambdas.append(opt.last_lambda)
    return lambdas


@pytest.mark.parametrize("variant", ["decoupled", "coupled"])
def test_state_dict_round_trip_continues_bit_identically(gen, variant):
    kw = {"lr": 1e-2, "cage_lambda": 4.0, "cage_silence": 0.3, "cage_variant": variant,
          "total_steps": 12}  # fmt: skip
    base = make_params(gen, torch.float64)
    grads = [random_grads(gen, base, s) for s in range(12)]
    straight = [p.clone() for p in base]
    groups = make_groups(straight)
    groups[0]["name"] = "decoder linears"  # extra user keys must survive the round trip
    opt = CageAdamW(groups, **kw)
    lambdas_straight = run_steps(opt, straight, grads)

    first = [p.clone() for p in base]
    groups = make_groups(first)
    groups[0]["name"] = "decoder linears"
    opt1 = CageAdamW(groups, **kw)
    run_steps(opt1, first, grads[:5])
    buf = io.BytesIO()
    torch.save({"params": first, "optim": opt1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    resumed = [p.clone() for p in saved["params"]]
    opt2 = CageAdamW(make_groups(resumed), lr=0.5, cage_lambda=0.0, cage_variant="decoupled")
    opt2.load_state_dict(saved["optim"])
    assert opt2.param_groups[0]["name"] == "decoder linears"
    assert opt2.param_groups[0]["quant"] == QUANT and opt2.param_groups[0]["lr"] == 1e-2
    assert opt2.param_groups[0]["cage_variant"] == variant
    lambdas_resumed = run_steps(opt2, resumed, grads[5:])
    assert lambdas_resumed == lambdas_straight[5:] and lambdas_straight[-1] == 4.0
    for p, q in zip(straight, resumed, strict=True):
        assert torch.equal(p, q)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], opt2.state[q][key])


def reference_coupled_sgd(w, grads, lambdas, ops, lr, momentum, wd):
    """torch.optim.SGD's rule (d = g + wd w; b = d, then b = mu b + d; w -= lr b) with
    g <- g + lambda_k (w - Q(w)) first, float64."""
    w = w.double().clone()
    buf = None
    for g, lam in zip(grads, lambdas, strict=True):
        d = ops.ste_grad(w, g.double()) + lam * (w - ops.q(w)) + wd * w
        buf = d if buf is None else momentum * buf + d
        w = w - lr * buf
    return w


@pytest.mark.parametrize("ops_kind", ["fixed-grid", "quest-default"])
def test_coupled_wrapper_around_sgd_matches_the_formula(gen, ops_kind):
    w = torch.randn(5, 32, generator=gen, dtype=torch.float64)
    bias = torch.randn(5, generator=gen, dtype=torch.float64)
    start_w, start_b = w.clone(), bias.clone()
    sgd = torch.optim.SGD(
        [{"params": [w], "quant": QUANT}, {"params": [bias]}], lr=0.05, momentum=0.9,
        weight_decay=0.01,
    )  # fmt: skip
    fixed = FixedGridOps(0.1)
    quant_ops = (
        (lambda group, p: fixed if group.get("quant") else None)
        if ops_kind == "fixed-grid"
        else None
    )
    opt = CageCoupled(sgd, quant_ops, cage_lambda=2.0, cage_silence=0.25, total_steps=8)
    grads = [(torch.randn(5, 32, generator=gen, dtype=torch.float64),
              torch.randn(5, generator=gen, dtype=torch.float64)) for _ in range(8)]  # fmt: skip
    for k, (gw, gb) in enumerate(grads, start=1):
        opt.zero_grad()
        w.grad, bias.grad = gw.clone(), gb.clone()
        opt.step()
        lam = ref_lambda(k, 2.0, 0.25, "linear_ramp", 8)
        assert opt.last_lambda == pytest.approx(lam) and opt.cage_step == k
    lambdas = [ref_lambda(k, 2.0, 0.25, "linear_ramp", 8) for k in range(1, 9)]
    ref_ops = fixed if ops_kind == "fixed-grid" else QuestRef(SPEC)
    want_w = reference_coupled_sgd(
        start_w, [g for g, _ in grads], lambdas, ref_ops, 0.05, 0.9, 0.01
    )
    want_b = reference_coupled_sgd(
        start_b, [g for _, g in grads], [0.0] * 8, FixedGridOps(), 0.05, 0.9, 0.01
    )
    assert (w - want_w).abs().max().item() <= 1e-12
    assert (bias - want_b).abs().max().item() <= 1e-12
    assert (w - reference_coupled_sgd(start_w, [g for g, _ in grads], [0.0] * 8, ref_ops,
                                      0.05, 0.9, 0.01)).abs().max().item() > 1e-6  # fmt: skip


def test_coupled_wrapper_state_dict_round_trip(gen):
    def build(w):
        sgd = torch.optim.SGD([{"params": [w], "quant": QUANT}], lr=0.05, momentum=0.9)
        return CageCoupled(sgd, cage_lambda=2.0, cage_silence=0.5, total_steps=6)

    start = torch.randn(3, 16, generator=gen, dtype=torch.float64)
    grads = [torch.randn(3, 16, generator=gen, dtype=torch.float64) for _ in range(6)]
    straight = start.clone()
    opt = build(straight)
    for g in grads:
        straight.grad = g.clone()
        opt.step()
    first = start.clone()
    opt1 = build(first)
    for g in grads[:3]:
        first.grad = g.clone()
        opt1.step()
    buf = io.BytesIO()
    torch.save(opt1.state_dict(), buf)
    buf.seek(0)
    resumed = first.clone()
    opt2 = build(resumed)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.cage_step == 3
    for g in grads[3:]:
        resumed.grad = g.clone()
        opt2.step()
    assert torch.equal(resumed, straight) and opt2.last_lambda == opt.last_lambda == 2.0


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"cage_lambda": -1.0}, r"cage_lambda must be a finite number >= 0, got -1.0"),
        ({"cage_lambda": float("nan")}, r"cage_lambda .* got nan"),
        ({"cage_silence": -0.1}, r"cage_silence must lie in \[0, 1\], got -0.1"),
        ({"cage_silence": 1.5}, r"cage_silence must lie in \[0, 1\], got 1.5"),
        ({"cage_schedule": "cosine"}, r"cage_schedule must be one of .* got 'cosine'"),
        ({"cage_variant": "both"}, r"cage_variant must be one of .* got 'both'"),
        ({"total_steps": None}, r"total_steps is required when cage_lambda > 0"),
        ({"total_steps": 0}, r"total_steps must be a positive int, got 0"),
        ({"total_steps": 10.5}, r"total_steps must be a positive int, got 10.5"),
        ({"lr": -1e-3}, r"lr must be a finite number >= 0, got -0.001"),
        ({"betas": (0.9, 1.0)}, r"betas must be two numbers in \[0, 1\), got \(0.9, 1.0\)"),
        ({"betas": (0.9,)}, r"betas must be two numbers .* got \(0.9,\)"),
        ({"eps": -1e-8}, r"eps must be a finite number >= 0, got -1e-08"),
        ({"weight_decay": -0.1}, r"weight_decay must be a finite number >= 0, got -0.1"),
    ],
)
def test_bad_optimizer_arguments_name_the_value(kwargs, pattern):
    kw = {"total_steps": 100, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        CageAdamW([torch.zeros(2, 16)], **kw)


def test_bad_group_settings_name_the_group():
    w, b = torch.zeros(4, 16), torch.zeros(4)
    with pytest.raises(ValueError, match=r"param group 1: cage_lambda .* got -2"):
        CageAdamW([{"params": [w]}, {"params": [b], "cage_lambda": -2}], total_steps=10)
    with pytest.raises(
        ValueError, match=r"param group 0: invalid 'quant' .*bits must be an int in 1..8, got 9"
    ):
        CageAdamW([{"params": [w], "quant": {"bits": 9}}], total_steps=10)
    with pytest.raises(
        ValueError, match=r"param group 0: invalid 'quant' .*unexpected keyword.*'bitz'"
    ):
        CageAdamW([{"params": [w], "quant": {"bitz": 4}}], total_steps=10)
    with pytest.raises(TypeError, match=r"param group 0: 'quant' must be a dict .* got 'w4a4'"):
        CageAdamW([{"params": [w], "quant": "w4a4"}], total_steps=10)
    opt = CageAdamW([w], total_steps=10)
    with pytest.raises(ValueError, match=r"param group 1: cage_variant .* got 'x'"):
        opt.add_param_group({"params": [b], "cage_variant": "x"})
    assert len(opt.param_groups) == 1


def test_quantized_param_shape_errors_name_the_param():
    vec = torch.nn.Parameter(torch.zeros(16))
    opt = CageAdamW([{"params": [("model.norm.weight", vec)], "quant": QUANT}], cage_lambda=0.0)
    vec.grad = torch.ones(16)
    with pytest.raises(
        ValueError, match=r"param 0 \('model.norm.weight'\): got a flat 1-D tensor of shape \(16,\)"
    ):
        opt.step()
    cube = torch.nn.Parameter(torch.zeros(2, 4, 16))
    opt = CageAdamW([{"params": [cube], "quant": QUANT}], cage_lambda=0.0)
    cube.grad = torch.ones(2, 4, 16)
    with pytest.raises(ValueError, match=r"param 0: .* 2-D weight .* \(2, 4, 16\)"):
        opt.step()
    odd = torch.nn.Parameter(torch.zeros(4, 24))
    opt = CageAdamW([{"params": [odd], "quant": QUANT}], cage_lambda=0.0)
    odd.grad = torch.ones(4, 24)
    with pytest.raises(
        ValueError, match=r"param group 0, param 0: hadamard_block=16 .* in_features=24"
    ):
        opt.step()


def test_sparse_gradients_are_refused():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = CageAdamW(emb.parameters(), cage_lambda=0.0)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"param group 0, param 0: .* sparse"):
        opt.step()


def test_coupled_wrapper_errors():
    w = torch.zeros(4, 16, requires_grad=True)
    with pytest.raises(TypeError, match=r"torch.optim.Optimizer, got list"):
        CageCoupled([w])
    sgd = torch.optim.SGD([w], lr=0.1)
    with pytest.raises(ValueError, match=r"CageCoupled param group 0: cage_silence .* got 2"):
        CageCoupled(sgd, cage_silence=2, total_steps=10)
    with pytest.raises(ValueError, match=r"total_steps is required"):
        CageCoupled(sgd)
    bad = torch.optim.SGD([{"params": [w], "quant": {"bits": 0}}], lr=0.1)
    with pytest.raises(ValueError, match=r"CageCoupled param group 0: invalid 'quant'.* got 0"):
        CageCoupled(bad, cage_silence=0.0)


def test_closure_and_none_grads():
    w = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = CageAdamW([{"params": [w], "quant": QUANT}, {"params": [b]}], cage_silence=0.0)

    def closure():
        opt.zero_grad()
        loss = (w * w).sum()
        loss.backward()
        return loss

    before = w.detach().clone()
    loss = opt.step(closure)
    assert loss.item() == pytest.approx((before * before).sum().item())
    assert b not in opt.state and opt.last_lambda == 10.0
    assert not torch.equal(w.detach(), before)


def test_quantizer_from_group_and_dense_ops(gen):
    quantizer = quantizer_from_group(QUANT)
    assert quantizer.spec == SPEC
    ops = DenseQuantOps(quantizer)
    assert isinstance(ops, TensorQuantOps)
    w = torch.randn(3, 32, generator=gen, dtype=torch.float64)
    g = torch.randn(3, 32, generator=gen, dtype=torch.float64)
    assert torch.equal(ops.error(w), w - Quantizer(SPEC).dequantize(w))
    assert ops.ste_grad(w, g) is g
    with pytest.raises(ValueError, match=r"layer 3: 'quant' is None"):
        quantizer_from_group(None, "layer 3")


def test_loaded_groups_are_validated():
    w = torch.zeros(4, 16)
    opt = CageAdamW([{"params": [w], "quant": QUANT}], total_steps=10)
    state = opt.state_dict()
    state["param_groups"][0]["cage_silence"] = 1.5
    with pytest.raises(ValueError, match=r"param group 0 \(loaded\): cage_silence .* got 1.5"):
        opt.load_state_dict(state)
    assert opt.param_groups[0]["cage_silence"] == 0.8  # the optimizer was left as it was


def test_last_lambda_survives_a_step_without_quantized_params():
    """ZeRO-3 calls step() once per sub-group: a call that updates no quantized weight must
    not reset the reported lambda."""
    w = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = CageAdamW([{"params": [w], "quant": QUANT}, {"params": [b]}], cage_silence=0.0)
    w.grad = torch.randn_like(w)
    opt.step()
    assert opt.last_lambda == 10.0
    w.grad, b.grad = None, torch.randn_like(b)
    opt.step()
    assert opt.last_lambda == 10.0 and b in opt.state
