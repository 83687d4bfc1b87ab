"""The lambda-Pareto check of cage-method.md section 1 on a quadratic with a fixed grid.

f(x) = 1/2 (x - a)^T A (x - a) over a weight x [2, 8] (flattened to 16), A SPD with
eigenvalues in [0.5, 1]; Q is QuEST (3 bits, Hadamard block 8) with FIXED row statistics
(sumsq chosen so the clip is c = 1), i.e. a fixed nearest-level map on a rotated grid of
step D = 2/7. Coupled CAGE-SGD (CageCoupled around torch.optim.SGD, STE gradient
grad f at Q(x)) must reach x* with
    ||A (Q(x*) - a) + lambda (x* - Q(x*))|| <= 1e-10
Why: inside the cell of q = Q(x) the step is x <- (1 - lr lambda) x + lr lambda x_q with
x_q = q - A (q - a) / lambda, a convex combination for lr lambda < 1, so x stays in the
cell and converges geometrically (rate 1 - lr lambda = 1/2 here) to x_q whenever x_q lies
in it. Starting at x0 = a, with
a's rotated coordinates inside the clip range, ||A (q - a)||_inf <= ||A|| sqrt(16) D / 2,
so lambda > 4 ||A|| guarantees that (asserted below). Then ||x* - Q(x*)|| =
||A (q - a)|| / lambda: larger lambda moves x* closer to the grid. lambda = 0 is plain STE.
"""

from __future__ import annotations

import pytest
import torch
from cage_kernels.grid import ALPHA

from cage_ds.optim import CageCoupled
from cage_ds.quant import Quantizer, QuantSpec

ROWS, IN, BITS, BLOCK = 2, 8, 3, 8
LAMBDAS = (5.0, 20.0, 80.0)
STEPS = 80  # (1/2)^80 ~ 1e-24: converged to rounding


class FixedScaleOps:
    """Q(w) = q(w H) H^T with the rows' sum of squares pinned (so the grid never moves)."""

    def __init__(self, quantizer: Quantizer, sumsq: torch.Tensor):
        self.quantizer = quantizer
        self.sumsq = sumsq

    def q(self, w: torch.Tensor) -> torch.Tensor:
        return self.quantizer.unrotate(self.quantizer.values(w, sumsq=self.sumsq))

    def error(self, w: torch.Tensor) -> torch.Tensor:
        return w - self.q(w)

    def ste_grad(self, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return g


def make_problem(gen: torch.Generator):
    """A [16, 16] SPD, a [2, 8] with rotated coordinates in [-0.9c, 0.9c], the fixed-grid ops."""
    u, _ = torch.linalg.qr(torch.randn(ROWS * IN, ROWS * IN, generator=gen, dtype=torch.float64))
    eig = 0.5 + 0.5 * torch.rand(ROWS * IN, generator=gen, dtype=torch.float64)
    a_mat = u @ torch.diag(eig) @ u.T
    quantizer = Quantizer(QuantSpec(bits=BITS, hadamard_block=BLOCK))
    sumsq = torch.full((ROWS, 1), IN / ALPHA[BITS] ** 2)  # RMS = 1 / alpha, so c = 1
    a_rot = 0.9 * (2 * torch.rand(ROWS, IN, generator=gen, dtype=torch.float64) - 1)
    a = quantizer.unrotate(a_rot)
    return a_mat, a, FixedScaleOps(quantizer, sumsq)


def ste_grad_f(a_mat, a, ops, x):
    """grad f evaluated at Q(x): A (Q(x) - a), in x's shape."""
    return (a_mat @ (ops.q(x) - a).reshape(-1)).reshape(x.shape)


def run_coupled_sgd(a_mat, a, ops, lam: float, lr: float, steps: int) -> torch.Tensor:
    x = a.clone()
    opt = CageCoupled(
        torch.optim.SGD([x], lr=lr),
        lambda group, p: ops,
        cage_lambda=lam,
        cage_silence=0.0,
        cage_schedule="constant",
    )
    for _ in range(steps):
        x.grad = ste_grad_f(a_mat, a, ops, x)
        opt.step()
    return x


def test_coupled_cage_sgd_reaches_a_lambda_pareto_point(gen):
    a_mat, a, ops = make_problem(gen)
    q_a = ops.q(a)
    step = 2.0 / (2**BITS - 1)  # D for c = 1
    pull = a_mat @ (q_a - a).reshape(-1)
    assert torch.linalg.matrix_norm(a_mat, ord=2) <= 1.0 + 1e-12
    assert (q_a - a).norm() <= (ROWS * IN) ** 0.5 * step / 2 + 1e-12
    distances = []
    for lam in LAMBDAS:
        # the sufficient condition for x_q = q - A (q - a) / lambda to stay in q's cell
        assert pull.abs().max() / lam < step / 2
        x = run_coupled_sgd(a_mat, a, ops, lam, 0.5 / lam, STEPS)
        qx = ops.q(x)
        assert torch.equal(qx, q_a)  # stayed in the starting cell
        residual = a_mat @ (qx - a).reshape(-1) + lam * (x - qx).reshape(-1)
        assert residual.norm().item() <= 1e-10, (lam, residual.norm().item())
        distance = (x - qx).norm().item()
        assert distance == pytest.approx(pull.norm().item() / lam, rel=1e-9)
        distances.append(distance)
    assert distances[0] > distances[1] > distances[2] > 0
    assert distances[2] < distances[0] / 10  # lambda -> inf drives x* onto the grid


def test_zero_lambda_is_plain_ste_sgd(gen):
    a_mat, a, ops = make_problem(gen)
    cage = run_coupled_sgd(a_mat, a, ops, 0.0, 0.1, 50)
    x = a.clone()
    sgd = torch.optim.SGD([x], lr=0.1)
    for _ in range(50):
        x.grad = ste_grad_f(a_mat, a, ops, x)
        sgd.step()
    assert torch.equal(cage, x)
    assert not torch.equal(x, a)
