"""Fused CAGE-AdamW shard step (Triton) vs its twin cage_adamw_shard_ref, and the twin vs
kernels.adamw_update (the update CageAdamW runs).

Oracle: the twin run with a correctly rounded sqrt (torch's CPU sqrt can be 1 ulp off; the
kernel uses sqrt_rn like torch on CUDA). The kernel places its fused multiply-adds where
torch's CPU kernels fuse (lerp_, add(alpha), addcmul_), so where a probe shows torch fusing,
param / moments / quantized copy must be bit-identical; elsewhere a 16-ulp bound applies
(each of the ~10 roundings per element may then differ by 1 ulp, and no code flips are
expected at that distance on these inputs). Independently of the platform the quantized copy
must equal q(W H) of the kernel's own new W exactly, and the sharded run with cut rows
completed in a halo buffer must equal the unsharded run bit for bit.
Shards start and end mid-row and mid-Hadamard-block; elements no segment covers hold NaN
and must come back untouched (never read into statistics, never written).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from cage_kernels import ops
from cage_kernels.cage_adamw_ref import cage_adamw_shard_ref, quest_shard_quantize_ref
from cage_kernels.cage_adamw_triton import (
    Schedule,
    cage_adamw_shard_triton,
    default_schedule,
    quest_shard_quantize_triton,
    rows_per_tile,
)
from cage_kernels.segments import (
    ParamLayout,
    Segment,
    SegmentTable,
    halo_segments,
    shard_segments,
)
from kernel_oracles import as_bytes, expected_quest

pytestmark = pytest.mark.interpret

BLOCK = 64
# (rows, row_len, bits, ste); bits 0 = a parameter without quantizer (1-D, no rows).
PARAMS = [(7, 384, 4, True), (1, 300, 0, False), (5, 256, 2, False), (9, 192, 3, True),
          (3, 640, 8, False), (11, 64, 4, True)]  # fmt: skip
HP = dict(step=7, lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, lam=10.0)


def layouts() -> list[ParamLayout]:
    out, at = [], 0
    for i, (rows, row_len, bits, ste) in enumerate(PARAMS):
        out.append(ParamLayout(i, at, rows * row_len, row_len, bits, ste))
        at += rows * row_len
    return out


def stream_state(gen, n) -> list[torch.Tensor]:
    """param, grad, exp_avg, exp_avg_sq of a flat stream of n elements."""
    p = torch.randn(n, generator=gen) * 0.5
    return [p, torch.randn(n, generator=gen), torch.randn(n, generator=gen) * 0.1,
            torch.rand(n, generator=gen) * 0.01]  # fmt: skip


def covered(table: SegmentTable, n: int) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    for s in table.segments:
        mask[s.shard_start : s.shard_start + s.numel] = True
    return mask


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def torch_fuses_lerp() -> bool:
    """Does torch's CPU lerp_ round once (a fused multiply-add), as the kernel does?"""
    g = torch.Generator().manual_seed(0)
    m, x = torch.randn(4096, generator=g), torch.randn(4096, generator=g)
    w = torch.tensor(0.1, dtype=torch.float32).double()
    fused = (m.double() + w * (x - m).double()).float()
    return torch.equal(m.clone().lerp_(x, 0.1), fused)


def poisoned_mask(n: int) -> torch.Tensor:
    """bool [n] whose bytes are 0xFF: neither a written True (1) nor a written False (0)."""
    return torch.full((n,), 0xFF, dtype=torch.uint8).view(torch.bool)


def run_twin_ieee(state, table, qout, mask_out, variant, monkeypatch) -> None:
    """cage_adamw_shard_ref with torch.sqrt / Tensor.sqrt correctly rounded (float64 sqrt)."""
    with monkeypatch.context() as mp:
        plain = torch.Tensor.sqrt

        def sqrt(t):
            return plain(t.double()).to(t.dtype) if t.dtype == torch.float32 else plain(t)

        mp.setattr(torch.Tensor, "sqrt", sqrt)
        mp.setattr(torch, "sqrt", sqrt)
        cage_adamw_shard_ref(*state, table, qout=qout, mask_out=mask_out, variant=variant, **HP)


@pytest.mark.parametrize("variant", ["decoupled", "coupled"])
@pytest.mark.parametrize("qdtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rule", ["trust", "clip"])
def test_fused_step_matches_twin(gen, dev, monkeypatch, variant, qdtype, rule):
    lay = layouts()
    total = lay[-1].start + lay[-1].numel
    lo = 2 * 384 + 100  # mid-row, mid-block of param 0
    hi = lay[3].start + 4 * 192 + 37  # mid-row, mid-block of param 3
    segs, cuts = shard_segments(lay, lo, hi)
    assert cuts, "the shard must cut rows at both ends"
    table = SegmentTable(tuple(segs), BLOCK, rule)
    n = hi - lo
    inside = covered(table, n)
    state = [t[lo:hi].clone() for t in stream_state(gen, total)]
    for t in state:
        t[~inside] = float("nan")
    qout = torch.full((n,), float("nan"), dtype=qdtype)
    kern = [t.clone().to(dev) for t in state]
    kq, kmask = qout.clone().to(dev), poisoned_mask(n).to(dev)
    cage_adamw_shard_triton(*kern, table, qout=kq, mask_out=kmask, variant=variant, **HP)
    kern, kq, kmask = [t.cpu() for t in kern], kq.cpu(), kmask.cpu()
    twin, tq, tmask = [t.clone() for t in state], qout.clone(), poisoned_mask(n)
    run_twin_ieee(twin, table, tq, tmask, variant, monkeypatch)
    assert (as_bytes(kmask)[~inside] == 0xFF).all() and (as_bytes(tmask)[~inside] == 0xFF).all()

    for k, t0 in zip([*kern, kq], [*state, qout], strict=True):  # uncovered: untouched NaN
        assert torch.equal(bits_of(k[~inside]), bits_of(t0[~inside]))
    assert torch.equal(bits_of(kern[1]), bits_of(state[1])), "grad must not be written"
    exact = torch_fuses_lerp()
    for name, k, t in zip(("param", "grad", "exp_avg", "exp_avg_sq", "qout"), [*kern, kq],
                          [*twin, tq], strict=True):  # fmt: skip
        k, t = k[inside].float(), t[inside].float()
        if exact:
            assert torch.equal(k, t), f"{name}: {(k != t).sum().item()} of {k.numel()} differ"
        else:
            torch.testing.assert_close(k, t, rtol=16 * 2.0**-24, atol=16 * 2.0**-24 * HP["lr"])
    if exact:
        assert torch.equal(as_bytes(kmask), as_bytes(tmask)), "mask_out differs from the twin"
    assert_copy_is_quest_of(kern[0], kq, kmask, table)


def assert_copy_is_quest_of(param, qout, mask_out, table: SegmentTable) -> None:
    """The quantized copy and its mask are those of q(W H) of the kernel's own new W, row
    statistics in the tree order of each row's own width, exactly (any platform)."""
    for s in table.segments:
        span = slice(s.shard_start, s.shard_start + s.numel)
        w = param[span].view(s.n_rows, s.row_len)
        want = expected_quest(w, s.bits, table.block, None, table.mask_rule) if s.bits else None
        got = qout[span].view_as(w)
        assert torch.equal(got, (w if want is None else want.values).to(got.dtype)), (
            f"qout of param {s.param_id}"
        )
        want_mask = torch.ones_like(w, dtype=torch.bool) if want is None else want.mask
        assert torch.equal(as_bytes(mask_out[span].view_as(w)), as_bytes(want_mask)), (
            f"mask_out of param {s.param_id}"
        )


def test_table_by_width_keeps_every_segment_once():
    lay = layouts()
    table = SegmentTable(tuple(shard_segments(lay, 0, lay[-1].start + lay[-1].numel)[0]), BLOCK)
    parts = table.by_width()
    widths = [p.width for p in parts]
    assert widths == sorted(set(widths)) == [64, 256, 512, 1024]
    for p in parts:
        assert all(SegmentTable((s,), BLOCK).width == p.width for s in p.segments)
        assert (p.block, p.mask_rule) == (table.block, table.mask_rule)
    assert sorted(s.shard_start for p in parts for s in p.segments) == sorted(
        s.shard_start for s in table.segments
    )
    assert {s for p in parts for s in p.segments} == set(table.segments)


@pytest.mark.parametrize("variant", ["decoupled", "coupled"])
def test_rows_of_every_width_keep_their_own_statistics(gen, dev, monkeypatch, variant):
    """One shard with rows whose tree views differ (sumsq.tree_dims: 4 warps at 1024, 8 at
    2048): each row's step comes from the tree of its own width, as in the twin and in the
    per-tensor quantizer, not from the view of the shard's longest row."""
    params = [(3, 1024, 4, True), (2, 1920, 3, False), (2, 640, 2, True)]
    lay, at = [], 0
    for i, (rows, row_len, bits, ste) in enumerate(params):
        lay.append(ParamLayout(i, at, rows * row_len, row_len, bits, ste))
        at += rows * row_len
    table = SegmentTable(tuple(shard_segments(lay, 0, at)[0]), 128)
    state = stream_state(gen, at)
    kern = [t.clone().to(dev) for t in state]
    kq = torch.full((at,), float("nan"), dtype=torch.bfloat16, device=dev)
    kmask = poisoned_mask(at).to(dev)
    cage_adamw_shard_triton(*kern, table, qout=kq, mask_out=kmask, variant=variant, **HP)
    kern = [t.cpu() for t in kern]
    assert_copy_is_quest_of(kern[0], kq.cpu(), kmask.cpu(), table)
    twin = [t.clone() for t in state]
    run_twin_ieee(twin, table, None, None, variant, monkeypatch)
    if torch_fuses_lerp():
        assert torch.equal(bits_of(kern[0]), bits_of(twin[0])), "param differs from the twin"


@pytest.mark.parametrize("variant", ["decoupled", "coupled"])
def test_sharded_with_halo_rows_equals_unsharded(gen, dev, variant):
    lay = layouts()
    total = lay[-1].start + lay[-1].numel
    full = stream_state(gen, total)
    ref = [t.clone().to(dev) for t in full]
    ref_q = torch.full((total,), float("nan"), dtype=torch.bfloat16, device=dev)
    segs, cuts = shard_segments(lay, 0, total)
    assert not cuts
    table = SegmentTable(tuple(segs), BLOCK)
    cage_adamw_shard_triton(*ref, table, qout=ref_q, variant=variant, **HP)

    bounds = [0, 2 * 384 + 100, lay[3].start + 4 * 192 + 37, lay[4].start + 1000, total]
    out = [torch.full((total,), float("nan")) for _ in range(4)]
    out_q = torch.full((total,), float("nan"), dtype=torch.bfloat16)
    for lo, hi in itertools.pairwise(bounds):  # one "rank" at a time
        segs, cuts = shard_segments(lay, lo, hi)
        shard = [t[lo:hi].clone().to(dev) for t in full]
        q = torch.full((hi - lo,), float("nan"), dtype=torch.bfloat16, device=dev)
        table = SegmentTable(tuple(segs), BLOCK)
        cage_adamw_shard_triton(*shard, table, qout=q, variant=variant, **HP)
        # Halo: each cut row whole (elements of the neighbours included), stepped on the side.
        idx = torch.cat([torch.arange(c.stream_start, c.stream_start + c.row_len) for c in cuts])
        side = [t[idx].clone().to(dev) for t in full]
        side_q = torch.full((idx.numel(),), float("nan"), dtype=torch.bfloat16, device=dev)
        cage_adamw_shard_triton(*side, SegmentTable(tuple(halo_segments(cuts)), BLOCK), qout=side_q,
                                variant=variant, **HP)  # fmt: skip
        local = (idx >= lo) & (idx < hi)
        for t, s, so in zip([*shard, q], [*side, side_q], [*out, out_q], strict=True):
            t = t.cpu()
            t[idx[local] - lo] = s.cpu()[local]
            so[lo:hi] = t
    for name, a, b in zip(("param", "grad", "exp_avg", "exp_avg_sq", "qout"), [*out, out_q],
                          [*ref, ref_q], strict=True):  # fmt: skip
        assert torch.equal(a, b.cpu()), f"{name}: sharded+halo differs from unsharded"


@pytest.mark.parametrize(
    "schedule", [Schedule(2), Schedule(4, stages=2), Schedule(3, stages=2, max_registers=64)]
)
def test_looping_schedules_equal_one_program_per_tile(gen, dev, schedule):
    """Programs that loop over several tiles (with the next tile's loads pipelined when
    stages > 1, registers capped and spilled with max_registers) write exactly what one
    program per tile writes."""
    tile = rows_per_tile(256)  # two params of one tile width: >= 6 tiles (interpreter or GPU)
    second = (3 * tile + 5) * 256
    table = SegmentTable((Segment(0, 0, 0, 3 * tile + 5, 256, 4, ste=True),
                          Segment(1, second, 0, 2 * tile + 1, 192, 3)), BLOCK)  # fmt: skip
    assert len(table.by_width()) == 1
    n_tiles = table.tiles(tile).shape[0]
    assert n_tiles > schedule.programs  # loops
    total = table.end
    state = stream_state(gen, total)
    outs = []
    for sched in (Schedule(n_tiles), schedule):
        run = [t.clone().to(dev) for t in state]
        q = torch.full((total,), float("nan"), dtype=torch.bfloat16, device=dev)
        mask = poisoned_mask(total).to(dev)
        cage_adamw_shard_triton(*run, table, qout=q, mask_out=mask, variant="decoupled",
                                schedule=sched, **HP)  # fmt: skip
        outs.append([bits_of(t.cpu()) for t in [*run, q]] + [as_bytes(mask.cpu())])
    for name, a, b in zip(("param", "grad", "exp_avg", "exp_avg_sq", "qout", "mask_out"),
                          *outs, strict=True):  # fmt: skip
        assert torch.equal(a, b), f"{name} differs under {schedule}"


@pytest.mark.parametrize(("width", "chunks"), [(1024, 2), (4096, 2), (4096, 4)])
@pytest.mark.parametrize("case", ["decoupled", "coupled", "mask_in", "quantize"])
def test_rows_in_chunks_equal_whole_rows(gen, dev, width, chunks, case):
    """Schedule(chunks=K) holds a K-th of a row at a time and writes every output bit for bit
    as whole rows do: the row statistic keeps its tree order (kernel_tuning.md, section 9).
    Rows shorter than the tile (padding masked per chunk), STE and plain rows, a parameter
    without quantizer, two tiles a segment. A row of 1024 has 2 h-slices of 512 (one a chunk),
    one of 4096 has 4 of 1024 (sumsq.tree_dims): 2 chunks of 2 slices each, or 4 of one."""
    rows = rows_per_tile(width) + 1
    shapes = ((rows, width - BLOCK, 4, True), (rows, width * 3 // 4 + BLOCK, 3, False),
              (1, width - 100, 0, False))  # fmt: skip
    segs, at = [], 0
    for pid, (n_rows, row_len, bits, ste) in enumerate(shapes):
        segs.append(Segment(pid, at, 0, n_rows, row_len, bits, ste=ste))
        at += n_rows * row_len
    table = SegmentTable(tuple(segs), BLOCK, "clip" if case == "coupled" else "trust")
    assert [p.width for p in table.by_width()] == [width]
    n_tiles = table.tiles(rows_per_tile(width)).shape[0]
    state = stream_state(gen, at)
    # blocks of 16 weights scaled by 4^-3 .. 4^3: chunk partials of unlike size, so that any
    # other grouping of the row sum rounds differently in most rows
    scale = 4.0 ** torch.randint(-3, 4, (-(-at // 16),), generator=gen).repeat_interleave(16)
    state[0] *= scale[:at]
    given = poisoned_mask(at)
    quest_shard_quantize_ref(state[0], table, None, given)
    outs = []
    for sched in (Schedule(n_tiles), Schedule(n_tiles, chunks=chunks)):
        run = [t.clone().to(dev) for t in state]
        q = torch.full((at,), float("nan"), dtype=torch.bfloat16, device=dev)
        mask = poisoned_mask(at).to(dev)
        if case == "quantize":
            quest_shard_quantize_triton(run[0], table, q, mask, schedule=sched)
        else:
            mask_in = given.clone().to(dev) if case == "mask_in" else None
            variant = "coupled" if case == "coupled" else "decoupled"
            cage_adamw_shard_triton(*run, table, qout=q, mask_out=mask, mask_in=mask_in,
                                    variant=variant, schedule=sched, **HP)  # fmt: skip
        outs.append([bits_of(t.cpu()) for t in [*run, q]] + [as_bytes(mask.cpu())])
    for name, a, b in zip(("param", "grad", "exp_avg", "exp_avg_sq", "qout", "mask_out"),
                          *outs, strict=True):  # fmt: skip
        assert torch.equal(a, b), f"{name}: {(a != b).sum().item()} elements differ in chunks"
    assert not torch.isnan(outs[1][4].view(torch.bfloat16)).any(), "qout not written"


def test_chunks_that_do_not_divide_the_row_are_refused(dev):
    table = SegmentTable((Segment(0, 0, 0, 2, 960, 4),), BLOCK)  # width 1024: 2 h-slices
    state = [torch.zeros(1920, device=dev) for _ in range(4)]
    with pytest.raises(ValueError, match=r"at most 2 chunks"):
        cage_adamw_shard_triton(*state, table, variant="decoupled",
                                schedule=Schedule(table.tiles(rows_per_tile(1024)).shape[0],
                                                  chunks=4), **HP)  # fmt: skip
    with pytest.raises(ValueError, match=r"chunks 1, 2 or 4"):
        cage_adamw_shard_triton(*state, table, variant="decoupled", schedule=Schedule(1, chunks=3),
                                **HP)  # fmt: skip


def test_default_schedule_caps_registers_where_a_thread_holds_8_elements():
    """GPU default: one program per tile, 80 registers where a thread holds <= 8 elements of
    a row (widths up to 2048), every register above (docs/benchmarks/kernel_tuning.md, 8);
    the interpreter: one program per tile, no cap."""
    cuda = torch.device("cuda")  # default_schedule reads only the device type
    for width in (128, 1024, 2048):
        assert default_schedule(cuda, 7, width) == Schedule(7, max_registers=80), width
    for width in (4096, 8192, 16384):
        assert default_schedule(cuda, 7, width) == Schedule(7), width
    assert default_schedule(torch.device("cpu"), 7, 2048) == Schedule(7)


@pytest.mark.parametrize("impl", ["kernel", "twin"])
def test_given_mask_replaces_the_ste_quantization(gen, dev, impl):
    """mask_in = the STE mask of the current W (here from quest_shard_quantize; in the ZeRO
    adapter the previous step's mask_out) gives the same step bit for bit, also when it is
    the mask_out buffer itself; a different mask changes the step (it is really used)."""
    step = cage_adamw_shard_triton if impl == "kernel" else cage_adamw_shard_ref
    lay = layouts()
    total = lay[-1].start + lay[-1].numel
    table = SegmentTable(tuple(shard_segments(lay, 0, total)[0]), BLOCK)
    assert any(s.ste and s.bits for s in table.segments)
    state = stream_state(gen, total)
    old_mask = poisoned_mask(total)
    quest_shard_quantize_ref(state[0], table, None, old_mask)

    def run(mask_in: torch.Tensor | None, alias: bool = False) -> list[torch.Tensor]:
        out = [t.clone().to(dev) for t in state]
        q = torch.full((total,), float("nan"), dtype=torch.bfloat16, device=dev)
        given = None if mask_in is None else mask_in.clone().to(dev)
        mask = given if alias else poisoned_mask(total).to(dev)
        step(*out, table, qout=q, mask_out=mask, mask_in=given, variant="decoupled", **HP)
        return [bits_of(t.cpu()) for t in [*out, q]] + [as_bytes(mask.cpu())]

    computed = run(None)
    for name, a, b in zip(("param", "grad", "exp_avg", "exp_avg_sq", "qout", "mask_out"),
                          computed, run(old_mask), strict=True):  # fmt: skip
        assert torch.equal(a, b), f"{name}: a given mask changed the step"
    assert all(torch.equal(a, b) for a, b in zip(computed, run(old_mask, alias=True),
                                                   strict=True))  # fmt: skip
    assert not torch.equal(computed[0], run(torch.ones(total, dtype=torch.bool))[0])


def test_ops_dispatch_and_bad_input(gen, dev, monkeypatch):
    table = SegmentTable((Segment(0, 0, 0, 2, 128, 4),), BLOCK)
    state = [t.to(dev) for t in stream_state(gen, 256)]
    with pytest.raises(ValueError, match="cage_variant"):
        ops.cage_adamw_shard_step(*state, table, variant="nope", **HP)
    with pytest.raises(ValueError, match="covers 256 elements but the param has 200"):
        ops.cage_adamw_shard_step(*(t[:200] for t in state), table, variant="coupled", **HP)
    with pytest.raises(ValueError, match="contiguous 1-D fp32"):
        cage_adamw_shard_triton(state[0].double(), *state[1:], table, variant="coupled", **HP)
    for bad in (Schedule(0), Schedule(2, stages=0), Schedule(2, max_registers=8)):
        with pytest.raises(ValueError, match="programs >= 1, stages >= 1, max_registers >= 24"):
            cage_adamw_shard_triton(*state, table, variant="coupled", schedule=bad, **HP)
    with pytest.raises(ValueError, match="not at a row start"):
        Segment(3, 0, 100, 1, 128, 4)
    with pytest.raises(ValueError, match="overlap"):
        SegmentTable((Segment(0, 0, 0, 2, 128, 4), Segment(1, 200, 0, 1, 128, 4)), BLOCK)
    with pytest.raises(ValueError, match="not a multiple of the hadamard block"):
        SegmentTable((Segment(0, 0, 0, 2, 96, 4),), BLOCK)


@pytest.mark.parametrize("qdtype", [torch.bfloat16, torch.float32])
def test_shard_quantize_only(gen, dev, qdtype):
    lay = layouts()
    lo, hi = 2 * 384 + 100, lay[4].start + 1000
    segs, _ = shard_segments(lay, lo, hi)
    table = SegmentTable(tuple(segs), BLOCK, "clip")
    param = torch.randn(hi - lo, generator=gen)
    inside = covered(table, hi - lo)
    param[~inside] = float("nan")
    qout = torch.full((hi - lo,), float("nan"), dtype=qdtype).to(dev)
    mask = poisoned_mask(hi - lo).to(dev)
    ops.quest_shard_quantize(param.to(dev), table, qout, mask)
    qout, mask = qout.cpu(), mask.cpu()
    assert torch.isnan(qout[~inside]).all()
    assert (as_bytes(mask)[~inside] == 0xFF).all()  # bytes first: indexing a bool normalizes
    for s in table.segments:
        span = slice(s.shard_start, s.shard_start + s.numel)
        w = param[span].view(s.n_rows, s.row_len)
        want = expected_quest(w, s.bits, BLOCK, None, "clip") if s.bits else None
        low = w if want is None else want.values
        assert torch.equal(qout[span].view_as(w), low.to(qdtype)), f"param {s.param_id}"
        want_mask = torch.ones_like(w, dtype=torch.bool) if want is None else want.mask
        assert torch.equal(as_bytes(mask[span].view_as(w)), as_bytes(want_mask))


@pytest.mark.parametrize("variant", ["decoupled", "coupled"])
def test_cage_adamw_runs_the_fused_kernel(gen, dev, variant, monkeypatch):
    """CageAdamW on kernel-served tensors takes one fused pass per quantized weight and
    lands where its composed torch path lands (ulp-level differences only)."""
    from cage_ds.optim import CageAdamW

    calls = []
    fused = ops.cage_adamw_shard_step
    monkeypatch.setattr(
        ops, "cage_adamw_shard_step", lambda *a, **k: calls.append(1) or fused(*a, **k)
    )
    w0 = torch.randn(7, 256, generator=gen)
    grads = [torch.randn(7, 256, generator=gen) for _ in range(3)]
    quant = {"method": "quest", "bits": 4, "hadamard_block": 64, "mask": "trust", "group_size": 128}

    def run(device: str) -> torch.Tensor:
        w = w0.clone().to(device).requires_grad_()
        opt = CageAdamW([{"params": [w], "quant": quant}], lr=1e-2, weight_decay=0.1,
                        cage_lambda=2.0, cage_silence=0.0, cage_variant=variant)  # fmt: skip
        for g in grads:
            w.grad = g.to(device)
            opt.step()
        return w.detach().cpu()

    fused_w = run(dev)
    assert len(calls) == 3
    monkeypatch.delenv("CAGE_TRITON_INTERPRET", raising=False)
    if dev == "cpu":
        torch.testing.assert_close(fused_w, run("cpu"), rtol=1e-5, atol=1e-5)
        assert len(calls) == 3  # the torch path did not call the kernel
