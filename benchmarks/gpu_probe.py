"""Locate the cost inside the QuEST row kernel and the fused CAGE-AdamW step on a GPU: time
variants that leave one stage out, side by side in one process (notes in
docs/benchmarks/kernel_tuning.md).

    python3 benchmarks/gpu_probe.py                 # all variants, a table of p50 times
    python3 benchmarks/gpu_probe.py --once act      # one launch each (for ncu -k ...)

Each line: variant, p50 ms, GB/s over the bytes the variant must move, and that as a fraction
of the card's copy rate measured first.
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
import triton.testing
from cage_kernels import ops, quest_triton
from cage_kernels.cage_adamw_triton import Schedule, cage_adamw_shard_triton
from cage_kernels.quest_triton import quest_quantize_packed_triton, quest_quantize_triton
from cage_kernels.segments import Segment, SegmentTable
from cage_kernels.sumsq import next_pow2, tree_dims
from cage_kernels.triton_lib import _add, fwht_tile, launch_opts, tree_opts, tree_row_sum

HP = dict(lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def p50(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5])


def copy_rate(numel: int) -> float:
    """The card's copy bandwidth in GB/s (numel fp32 read + written)."""
    src = torch.randn(numel, device="cuda")
    dst = torch.empty_like(src)
    return 8 * numel / (p50(lambda: dst.copy_(src)) * 1e6)


def _act_fwd_vec(x: torch.Tensor, vec: int) -> None:
    """The activation forward with the launcher's access width overridden (A/B of VEC)."""
    rows, n = x.shape
    values, step = torch.empty_like(x), torch.empty(rows, device=x.device)
    mask = torch.empty(rows, n, dtype=torch.uint8, device=x.device)
    quest_triton._launch(x, 4, 128, None, "trust", False, values, None, step, mask,
                         pack=False, write_codes=False, vec=vec)  # fmt: skip


def act_variants(tokens: int, width: int) -> list[tuple[str, float, object]]:
    """(name, bytes moved, fn) for the activation / weight row kernel and its parts."""
    out = []
    for dtype, size in ((torch.bfloat16, 2), (torch.float32, 4)):
        x = torch.randn(tokens, width, device="cuda", dtype=dtype)
        sumsq = x.float().square().sum(1)
        n = x.numel()
        tag = str(dtype).removeprefix("torch.")
        out += [
            (f"fwht {tag}", 2 * size * n, lambda x=x: ops.fwht(x, 128)),
            (f"act fwd {tag} v+mask", (2 * size + 1) * n,
             lambda x=x: quest_quantize_triton(x, 4, 128, with_codes=False)),
            (f"act fwd {tag} v+mask, uncapped vec (grid in 2 layouts)", (2 * size + 1) * n,
             lambda x=x: _act_fwd_vec(x, x.shape[1])),
            (f"act fwd {tag} v+mask, sumsq given", (2 * size + 1) * n,
             lambda x=x, s=sumsq: quest_quantize_triton(x, 4, 128, s, with_codes=False)),
            (f"quest {tag} v+codes+mask", (2 * size + 2) * n,
             lambda x=x: quest_quantize_triton(x, 4, 128)),
            (f"quest {tag} packed", (2 * size + 0.625) * n,
             lambda x=x: quest_quantize_packed_triton(x, 4, 128)),
        ]  # fmt: skip
    return out


@triton.jit
def _row_sumsq_kernel(x_ptr, out_ptr, n, N: tl.constexpr, LOG_N: tl.constexpr,
                      LOG_W: tl.constexpr, LOG_L: tl.constexpr, LOG_V: tl.constexpr,
                      HOW: tl.constexpr):  # fmt: skip
    """One row's sum of squares: HOW 0 tree_row_sum, 1 tl.sum, 2 load + store only."""
    r = tl.program_id(0).to(tl.int64)
    x = tl.load(x_ptr + r * n + tl.arange(0, N)[None, :]).to(tl.float32)
    if HOW == 0:
        s = tree_row_sum(x * x, 1, N, LOG_N, LOG_W, LOG_L, LOG_V)
    elif HOW == 1:
        s = tl.sum(x * x, axis=1)
    else:
        s = tl.reshape(tl.max(x, axis=1), [1])
    tl.store(out_ptr + r + tl.arange(0, 1), s)


def tree_variants(tokens: int, width: int) -> list[tuple[str, float, object]]:
    """The row statistics alone: the fixed-order tree against tl.sum and a bare max."""
    x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(tokens, device="cuda")
    log_n = width.bit_length() - 1
    return [
        (f"row sumsq {name}", 2 * x.numel(),
         lambda how=how: _row_sumsq_kernel[(tokens,)](x, out, width, N=width, LOG_N=log_n,
                                                      **tree_opts(width, 2), HOW=how,
                                                      **launch_opts(width)))
        for name, how in (("tree", 0), ("tl.sum", 1), ("max only", 2))
    ]  # fmt: skip


@triton.jit
def _lane_stage_by_reductions(x, R: tl.constexpr, N: tl.constexpr, s: tl.constexpr):
    """Butterfly stage h = 2^s as two reductions over the pair axis (sum, and difference by
    negating the upper element): warp shuffles wherever the pair lives, never shared memory.
    Same adds as fwht_tile's stage (a + b, a - b), so bit-identical."""
    x4 = tl.reshape(x, [R, N >> (s + 1), 2, 1 << s])
    lower = tl.arange(0, 2)[None, None, :, None] == 0
    total = tl.reduce(x4, 2, _add)
    diff = tl.reduce(tl.where(lower, x4, -x4), 2, _add)
    x4 = tl.where(lower, tl.expand_dims(total, 2), tl.expand_dims(diff, 2))
    return tl.reshape(x4, [R, N])


@triton.jit
def _fwht_probe_kernel(x_ptr, y_ptr, hscale, N: tl.constexpr, LOG_V: tl.constexpr,
                       HOW: tl.constexpr):  # fmt: skip
    """One row's block-128 fwht: HOW 0 fwht_tile; 1 its in-thread stages (s < LOG_V) as
    there, the lane stages by reductions (no shared-memory transposes or barriers)."""
    offs = tl.program_id(0).to(tl.int64) * N + tl.arange(0, N)[None, :]
    x = tl.load(x_ptr + offs).to(tl.float32)
    if HOW == 0:
        y = fwht_tile(x, 1, N, 7, hscale)
    else:
        y = fwht_tile(x, 1, N, LOG_V, 1.0)
        for s in tl.static_range(LOG_V, 7):
            y = _lane_stage_by_reductions(y, 1, N, s)
        y = y * hscale
    tl.store(y_ptr + offs, y)


def fwht_variants(tokens: int, width: int) -> list[tuple[str, float, object]]:
    """The rotation alone, fp32 out, with its lane stages as layout transposes or shuffles;
    both outputs are checked equal before timing."""
    out = []
    for dtype, size in ((torch.bfloat16, 2), (torch.float32, 4)):
        x = torch.randn(tokens, width, device="cuda", dtype=dtype)
        ys = [torch.empty(tokens, width, device="cuda") for _ in range(2)]
        log_v = (16 // size).bit_length() - 1
        runs = [lambda how=how, x=x, y=y, log_v=log_v: _fwht_probe_kernel[(tokens,)](
                    x, y, 128**-0.5, N=width, LOG_V=log_v, HOW=how, **launch_opts(width))
                for how, y in enumerate(ys)]  # fmt: skip
        for run in runs:
            run()
        assert torch.equal(ys[0], ys[1]), "lane stages by reductions changed the rotation"
        tag = str(dtype).removeprefix("torch.")
        names = ("split/join", "lane stages by shuffles")
        out += [(f"fwht {tag}->fp32 {name}", (size + 4) * x.numel(), run)
                for name, run in zip(names, runs, strict=True)]  # fmt: skip
    return out


def step_variants(numel: int, row: int, caps=(None, 96, 80, 64),
                  chunks=(1,)) -> list[tuple[str, float, object]]:  # fmt: skip
    """(name, bytes moved, fn): torch's fused AdamW, and the fused step's variants with
    registers uncapped and capped (Schedule.max_registers), whole rows and rows in chunks
    (Schedule.chunks, where the row has as many h-slices), one program per tile."""
    rows = numel // row
    numel = rows * row
    p = torch.randn(numel, device="cuda") * 0.02
    g = torch.randn(numel, device="cuda") * 1e-3
    m = torch.zeros(numel, device="cuda")
    v = torch.zeros(numel, device="cuda")
    q = torch.empty(numel, device="cuda", dtype=torch.bfloat16)
    mask = torch.empty(numel, device="cuda", dtype=torch.bool)
    quant = SegmentTable((Segment(0, 0, 0, rows, row, 4),), 128)
    ste = SegmentTable((Segment(0, 0, 0, rows, row, 4, ste=True),), 128)

    def step(table, lam, variant, regs, k, mask_out=None):
        sched = Schedule(rows, max_registers=regs, chunks=k)  # >= the tiles: one program each
        return lambda: cage_adamw_shard_triton(p, g, m, v, table, step=10, lam=lam,
                                               variant=variant, qout=q, mask_out=mask_out,
                                               mask_in=mask_out, schedule=sched,
                                               **HP)  # fmt: skip

    param = torch.nn.Parameter(p)
    param.grad = g
    adamw = torch.optim.AdamW([param], betas=(HP["beta1"], HP["beta2"]), lr=HP["lr"],
                              eps=HP["eps"], weight_decay=HP["weight_decay"],
                              fused=True)  # fmt: skip
    out = [(f"torch AdamW fused (row {row})", 28 * numel, adamw.step)]
    kinds = [("decoupled + copy", quant, 10.0, "decoupled", None, 30),
             ("decoupled+ste(mask in) + copy + mask", ste, 10.0, "decoupled", mask, 32),
             ("coupled + copy", quant, 10.0, "coupled", None, 30),
             ("lambda=0 + copy", quant, 0.0, "decoupled", None, 30)]  # fmt: skip
    slices = tree_dims(next_pow2(row), 4)[0]
    for k in (k for k in chunks if k <= slices):
        for name, table, lam, variant, mask_out, nbytes in kinds:
            for regs in caps if lam else (None, 80):
                label = f"step {name}, row {row}{f', {k} chunks' * (k > 1)}"
                out.append((f"{label}, <= {regs or 'any'} registers", nbytes * numel,
                            step(table, lam, variant, regs, k, mask_out)))  # fmt: skip
    return out


def mixed_variants(numel: int) -> list[tuple[str, float, object]]:
    """A Llama-like shard: half its elements in rows of 2048, half in rows of 8192. One call
    splits the table by row width itself (SegmentTable.by_width; before that split every tile
    was 8192 wide); the second row makes the per-width calls by hand (the same work)."""
    segs, start = [], 0
    for pid, row in enumerate((2048, 8192)):
        rows = numel // 2 // row
        segs.append(Segment(pid, start, 0, rows, row, 4, ste=True))
        start += rows * row
    table = SegmentTable(tuple(segs), 128)
    p, g = torch.randn(start, device="cuda") * 0.02, torch.randn(start, device="cuda") * 1e-3
    m, v = torch.zeros(start, device="cuda"), torch.zeros(start, device="cuda")
    q = torch.empty(start, device="cuda", dtype=torch.bfloat16)
    mask = torch.empty(start, device="cuda", dtype=torch.bool)

    def run(*tables: SegmentTable) -> None:
        for t in tables:
            ops.cage_adamw_shard_step(p, g, m, v, t, step=10, lam=10.0, variant="decoupled",
                                      qout=q, mask_out=mask, mask_in=mask, **HP)  # fmt: skip

    by_width = [SegmentTable((s,), 128) for s in segs]
    name = "step decoupled+ste(mask in) + copy + mask, rows 2048 and 8192"
    return [(f"{name}, one call", 32 * start, lambda: run(table)),
            (f"{name}, a call per width", 32 * start, lambda: run(*by_width))]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--step-numel", type=int, default=1 << 28)
    ap.add_argument("--rows", type=int, nargs="+", default=[2048, 8192],
                    help="row widths of the fused step's shard")  # fmt: skip
    ap.add_argument("--steps-only", action="store_true", help="only the fused step rows")
    ap.add_argument("--caps", type=int, nargs="+", default=[0, 96, 80, 64],
                    help="register caps of the step rows (0 = none)")  # fmt: skip
    ap.add_argument("--chunks", type=int, nargs="+", default=[1],
                    help="Schedule.chunks of the step rows (1 = whole rows)")  # fmt: skip
    ap.add_argument("--once", choices=["act", "step", "tree", "fwht"], default=None)
    args = ap.parse_args()
    caps = tuple(c or None for c in args.caps)
    rows = [(lambda r=r: step_variants(args.step_numel, r, caps, args.chunks)) for r in args.rows]
    groups = {"tree": [lambda: tree_variants(args.tokens, args.width)],
              "fwht": [lambda: fwht_variants(args.tokens, args.width)],
              "act": [lambda: act_variants(args.tokens, args.width)],
              "step": [*rows, lambda: mixed_variants(args.step_numel)]}  # fmt: skip
    if args.once:
        for make in groups[args.once]:
            for _, _, fn in make():
                fn()
        torch.cuda.synchronize()
        return
    copy = copy_rate(1 << 28)
    print(f"{torch.cuda.get_device_name()}  copy {copy:.0f} GB/s")
    for part, makers in groups.items():
        if args.steps_only and part != "step":
            continue
        for make in makers:  # one group's tensors at a time
            for name, nbytes, fn in make():
                ms = p50(fn)
                gbs = nbytes / (ms * 1e6)
                print(f"{name:40} {ms:9.4f} ms {gbs:8.0f} GB/s {gbs / copy:6.3f} of copy",
                      flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
