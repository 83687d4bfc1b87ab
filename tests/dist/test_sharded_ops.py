"""ShardedQuantOps on N gloo ranks (CPU processes) equals the unsharded ops, bit for bit.

Every rank builds the same random 2-D weights (ZeRO-3 and ZeRO-1/2 layouts, row lengths of
1-3 Hadamard blocks, so cuts fall inside rows and blocks at N = 2..5) and, for every element
it holds, checks against the whole-tensor computation:
  quantize      values, mask, error == Quantizer.evaluate(W)
  ste_grad      == (M ⊙ g) H of the whole rotated-domain gradient
  fused_step    two CAGE-AdamW steps (decoupled and coupled) == CageAdamW on the whole
                weights fed the latent gradient (M ⊙ g) H (step 2's M: the masks step 1
                wrote, runs and whole cut rows, passed back in); W, m, v, the lp copy
                (write_lp, fp32 and bf16) == cast(Quantizer.values(W_new)) and the STE
                mask == Quantizer.mask(W_new) (QuEST: the step's own, no re-quantization)
Cut rows are assembled whole from their holders (point-to-point), so no tolerance is needed.
On the torch twins (CPU) at N = 1, 2, 3, 5, and on the Triton kernels (interpreter) at N = 3.
"""

from __future__ import annotations

import dataclasses
import os
import random

import pytest
import torch
import torch.distributed as tdist
from cage_kernels.dispatch import use_triton
from test_shardmap import _zero3_flats, _zero12_flats, _zero12_layout
from testkit import free_port, spawn_ranks

from cage_ds.optim import CageAdamW
from cage_ds.quant import Quantizer, QuantSpec
from cage_ds.zero.optimizer import ShardedQuantOps, install_quant_ops
from cage_ds.zero.shardmap import zero3_maps, zero12_maps

BLOCK = 8
SPECS = [
    QuantSpec(bits=4, hadamard_block=BLOCK, mask="trust"),
    QuantSpec(bits=3, hadamard_block=BLOCK, mask="clip"),
    QuantSpec(bits=2, hadamard_block=BLOCK, mask="trust"),
    QuantSpec(method="rtn", bits=4, group_size=BLOCK),
]
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, lam=10.0)


def _case(rng: random.Random, gen: torch.Generator, world: int, layout: str):
    shapes = [(rng.randint(1, 7), BLOCK * rng.randint(1, 3)) for _ in range(rng.randint(1, 4))]
    params = [torch.randn(s, generator=gen) for s in shapes]
    if layout == "zero3":
        return shapes, params, zero3_maps(shapes, world), lambda ts: _zero3_flats(ts, world)
    offsets, numel = _zero12_layout(params, world, align=4)
    maps = zero12_maps(shapes, offsets, numel, world)
    return shapes, params, maps, lambda ts: _zero12_flats(ts, offsets, numel, world)


def _pieces(ops: ShardedQuantOps):
    for p in ops.layout.map.pieces:
        yield p.param, slice(p.flat_start, p.flat_start + p.length), slice(p.elem_start, p.elem_end)


def _equal(got: torch.Tensor, full: list[torch.Tensor], ops: ShardedQuantOps, what: str):
    for j, dst, src in _pieces(ops):
        want = full[j].flatten()[src].to(got.dtype)
        assert torch.equal(got[dst], want), f"{ops!r} {what} of parameter {j}"


def _latent_grad(quant: Quantizer, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return quant.rotate(g * quant.mask(w))


def _check_case(rank: int, world: int, spec: QuantSpec, layout: str, seed: int) -> None:
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    shapes, params, maps, flats_of = _case(rng, gen, world, layout)
    quant = Quantizer(spec)
    lp_dtype = torch.bfloat16 if seed % 2 else torch.float32
    ops = ShardedQuantOps(maps, rank, spec, lp_dtype, name=f"{layout} {spec}")
    w = flats_of(params)[rank]
    q = ops.quantize(w)
    whole = [quant.evaluate(p) for p in params]
    for field in ("values", "mask", "error"):
        _equal(getattr(q, field), [getattr(e, field) for e in whole], ops, field)
    grads = [torch.randn(s, generator=gen) for s in shapes]
    if spec.method == "quest":
        _equal(
            ops.ste_grad(w, flats_of(grads)[rank]),
            [_latent_grad(quant, p, g) for p, g in zip(params, grads, strict=True)],
            ops,
            "ste_grad",
        )
    for variant in ("decoupled", "coupled"):
        _check_steps(rank, ops, quant, spec, params, shapes, flats_of, gen, variant)


def _check_steps(rank, ops, quant, spec, params, shapes, flats_of, gen, variant) -> None:
    """Two steps of CageAdamW on the flat partition (ops installed as cage_ds.zero does)
    against CageAdamW on the whole weights."""
    kw = dict(
        lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
        weight_decay=HYPER["weight_decay"], cage_lambda=HYPER["lam"], cage_silence=0.0,
        cage_schedule="constant", cage_variant=variant,
    )  # fmt: skip
    dense = [p.clone() for p in params]
    oracle = CageAdamW([{"params": dense, "quant": dataclasses.asdict(spec)}], **kw)
    w = flats_of(params)[rank]
    sharded = CageAdamW([{"params": [w], "quant": dataclasses.asdict(spec)}], **kw)
    install_quant_ops(sharded, {id(w): ops})
    kept = ops.steps_on_kept_masks
    for k in (1, 2):
        grads = [torch.randn(s, generator=gen) for s in shapes]  # dL/dq, rotated domain
        for p, g in zip(dense, grads, strict=True):
            p.grad = _latent_grad(quant, p, g) if spec.method == "quest" else g
        oracle.step()
        w.grad = flats_of(grads)[rank]
        sharded.step()
        where = f"{variant} step {k}"
        _equal(w, dense, ops, f"W after {where}")
        for key in ("exp_avg", "exp_avg_sq"):
            want = [oracle.state[p][key] for p in dense]
            _equal(sharded.state[w][key], want, ops, f"{key} after {where}")
        quantized = ops.elements_quantized
        _equal(ops.mask(w), [quant.mask(p) for p in dense], ops, f"mask after {where}")
        if spec.method == "quest":  # the fused step's own mask, no second quantization
            assert ops.elements_quantized == quantized, f"{ops!r}: mask re-quantized W"
        lp = torch.full_like(w, float("nan"), dtype=ops.lp_dtype)
        ops.write_lp(w, lp)
        _equal(lp, [quant.values(p) for p in dense], ops, f"lp copy after {where}")
    if spec.method == "quest":  # step 2's STE took step 1's masks instead of quantizing W
        assert ops.steps_on_kept_masks == kept + 1, f"{ops!r}: the kept masks were not used"


def _worker(
    rank: int, world: int, port: int, seed: int, specs: list[QuantSpec], cases: int
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    kernels = os.environ.get("CAGE_TRITON_INTERPRET") == "1"
    assert use_triton(torch.zeros(1)) == kernels, "the dispatch does not serve the intended path"
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rng = random.Random(seed)
        for spec in specs:
            for layout in ("zero3", "zero12"):
                for _ in range(cases):
                    _check_case(rank, world, spec, layout, rng.randrange(2**31))
    finally:
        tdist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_sharded_ops_equal_unsharded(world, seed):
    spawn_ranks(_worker, (world, free_port(), seed, SPECS, 3), world)


@pytest.mark.slow
def test_sharded_ops_on_the_triton_kernels(seed):
    """The same checks with the Triton kernels (interpreter) on both sides at N = 3 (cuts
    inside rows and blocks): the fused step over runs and cut rows, its mask output and the
    sharded quantization, against the dense path's kernels."""
    env = {"TRITON_INTERPRET": "1", "CAGE_TRITON_INTERPRET": "1"}  # read at the first kernel
    spawn_ranks(_worker, (3, free_port(), seed, SPECS[:2], 1), 3, env)


def test_another_tensor_at_the_same_address_is_quantized_afresh(seed):
    """The kept STE mask and lp copy belong to the tensor object the step wrote. Another tensor
    at the same address and in-place version (a freed partition's successor; here a view,
    which shares both) gets its own quantization: the test of address and version alone once
    handed a stale mask to such a tensor, depending on where the allocator put it."""
    spec = SPECS[0]
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    _, params, maps, flats_of = _case(rng, gen, 1, "zero3")
    ops = ShardedQuantOps(maps, 0, spec, torch.float32, name="identity")
    w = flats_of(params)[0]
    kw = dict(lr=HYPER["lr"], cage_lambda=HYPER["lam"], cage_silence=0.0)
    opt = CageAdamW([{"params": [w], "quant": dataclasses.asdict(spec)}], **kw)
    install_quant_ops(opt, {id(w): ops})
    w.grad = torch.randn(w.shape, generator=gen)
    opt.step()
    quantized = ops.elements_quantized
    kept = ops.mask(w).clone()
    assert ops.elements_quantized == quantized  # the step's own mask
    alias = w.view_as(w)
    assert alias is not w and (alias.data_ptr(), alias._version) == (w.data_ptr(), w._version)
    assert torch.equal(ops.mask(alias), kept)
    assert ops.elements_quantized > quantized, "a stale mask served another tensor"
