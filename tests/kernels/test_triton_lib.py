"""The arithmetic building blocks of triton_lib against torch, element for element:
div_rn_by (one reciprocal per row, then a Markstein correction) must equal IEEE division, and
round_half_even (the 1.5 * 2^23 trick) must equal torch.round, on fresh random inputs with
the hard cases mixed in (ties, divisors whose significand is all ones, powers of two); the
in-kernel row statistics must follow the twin's tree order at every width."""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl
from cage_kernels.grid import grid_step
from cage_kernels.quest import quest_quantize_ref
from cage_kernels.quest_triton import quest_quantize_triton
from cage_kernels.sumsq import next_pow2, row_sumsq_tree_ref, tree_dims
from cage_kernels.triton_lib import div_rn_by, launch_opts, round_half_even

pytestmark = pytest.mark.interpret
BLOCK = 1 << 14


@triton.jit
def _lib_kernel(a_ptr, b_ptr, inv_ptr, t_ptr, q_ptr, r_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    a = tl.load(a_ptr + i, mask=ok, other=1.0)
    b = tl.load(b_ptr + i, mask=ok, other=1.0)
    inv = tl.load(inv_ptr + i, mask=ok, other=1.0)
    tl.store(q_ptr + i, div_rn_by(a, b, inv), mask=ok)
    tl.store(r_ptr + i, round_half_even(tl.load(t_ptr + i, mask=ok, other=0.0)), mask=ok)


def _divisors(gen: torch.Generator, n: int) -> torch.Tensor:
    """Random fp32 divisors over a wide exponent range, a third with an all-ones significand
    (the hardest case for a reciprocal) and some exact powers of two."""
    exp = torch.randint(-40, 40, (n,), generator=gen).float()
    b = torch.rand(n, generator=gen).add(1.0) * torch.exp2(exp)
    ones = torch.exp2(exp + 1) * (1 - 2.0**-24)  # 1.11...1 x 2^exp in fp32
    pick = torch.randint(0, 6, (n,), generator=gen)
    b = torch.where(pick < 2, ones, torch.where(pick == 2, torch.exp2(exp), b))
    return b.float()


def test_div_rn_by_and_round_half_even_match_torch(gen, dev):
    n = 3 * BLOCK + 77
    b = _divisors(gen, n)
    inv = 1.0 / b  # correctly rounded fp32 reciprocal, as the kernels take it per row
    quotient = (torch.rand(n, generator=gen) * 256 - 128) * torch.exp2(
        -torch.randint(0, 50, (n,), generator=gen).float() * (torch.rand(n, generator=gen) < 0.1)
    )  # mostly |a / b| <= 128, a tenth down to 2^-50, so |a| >= 2^-90 (div_rn_by's domain)
    a = (quotient * b).float()
    half_steps = torch.randint(-(1 << 22), 1 << 22, (n,), generator=gen).float() / 2  # ties
    t = torch.where(torch.rand(n, generator=gen) < 0.5, half_steps,
                    (torch.rand(n, generator=gen) - 0.5) * 2**22)  # fmt: skip
    q = torch.empty(n, device=dev)
    r = torch.empty(n, device=dev)
    _lib_kernel[(triton.cdiv(n, BLOCK),)](
        a.to(dev), b.to(dev), inv.to(dev), t.to(dev), q, r, n, BLOCK=BLOCK, **launch_opts()
    )
    exact = a / b
    bad = (q.cpu() != exact).nonzero()
    assert bad.numel() == 0, f"div_rn_by differs at {bad[:5].flatten().tolist()}"
    assert torch.equal(r.cpu(), torch.round(t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_kernel_row_statistics_follow_the_tree_order(gen, dev, dtype):
    """The quest kernel's own row sums of squares give exactly the twin's step, for widths
    that exercise every part of the [H, W, L, V] view (sumsq.tree_dims), down to one element."""
    for n in (1, 3, 8, 24, 100, 256, 640, 1500, 4096, 5000):
        assert math.prod(tree_dims(next_pow2(n), dtype.itemsize)) == next_pow2(n)
        block = min(n & -n, 128)  # the largest power of two dividing n
        x = (torch.randn(5, n, generator=gen) * 3).to(dtype)
        step = quest_quantize_triton(x.to(dev), 4, block).step.cpu()
        assert torch.equal(step, grid_step(row_sumsq_tree_ref(x), n, 4)), n


@pytest.mark.parametrize("bits", range(1, 9))
def test_codes_stay_on_the_grid_at_and_beyond_the_clip(gen, dev, bits):
    """Neither the twin nor the kernel clamps k: the clip of y alone keeps k in [0, 2^b).
    Rows of y (rotated=True, row statistics given over 18 decades) hold +-c exactly, the
    floats next to +-c, values far beyond it and infinities; codes must equal those of the
    clamped formula round(clamp(y, -c, c) / D + h).clamp(0, 2^b - 1), bit for bit."""
    rows, n = 64, 32
    sumsq = (torch.rand(rows, 1, generator=gen) + 0.5) * 10.0 ** torch.randint(
        -12, 6, (rows, 1), generator=gen
    ).float()
    step = grid_step(sumsq, n, bits)
    half = (2**bits - 1) / 2
    c = step * half
    edge = torch.cat([c, -c, c.nextafter(c * 2), (-c).nextafter(-c * 2), c.nextafter(c * 0),
                      (-c).nextafter(c * 0), c * 1e6, -c * 1e30,
                      torch.full_like(c, math.inf), torch.full_like(c, -math.inf)], 1)  # fmt: skip
    y = torch.randn(rows, n, generator=gen) * c
    y[:, : edge.shape[1]] = edge
    t = torch.clamp(y, -c, c) / step + half
    clamped = torch.round(t).clamp(0, 2**bits - 1).to(torch.uint8)
    twin = quest_quantize_ref(y, bits, n, sumsq, rotated=True)
    kernel = quest_quantize_triton(y.to(dev), bits, n, sumsq.to(dev), rotated=True)
    assert torch.equal(twin.codes, clamped)
    assert torch.equal(kernel.codes.cpu(), clamped)
    assert int(clamped.max()) == 2**bits - 1 and int(clamped.min()) == 0


def test_kernels_use_only_builtins_of_triton_language():
    """triton.language's own @jit functions (tl.zeros, tl.sum, ...) are fixed as compiled or
    interpreted when triton is first imported, so a kernel calling one fails under the
    interpreter whenever triton came in before TRITON_INTERPRET was set (the whole suite's
    order): no kernel module may use them (triton_lib's docstring)."""
    import ast
    from pathlib import Path

    import cage_kernels
    from triton.runtime.interpreter import InterpretedFunction

    used = set()
    for path in Path(cage_kernels.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and getattr(node.value, "id", None) == "tl":
                used.add((path.name, node.attr))
    kinds = (triton.runtime.JITFunction, InterpretedFunction)
    jitted = sorted((f, n) for f, n in used if isinstance(getattr(tl, n, None), kinds))
    assert not jitted, f"triton.language @jit functions used in kernels: {jitted}"
