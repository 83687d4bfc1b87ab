"""LatentWeight's FSDP2 gather hooks in one process: ranks simulated by FSDP2's row cut.

For a [5, 256] latent cut over N = 1-4 ranks as fully_shard cuts it (ceil(5 / N) rows per
rank, the last ranks fewer or none: N = 4 leaves rank 3 empty), each rank's
fsdp_pre_all_gather input is concatenated in rank order (what the all-gather delivers)
and handed to fsdp_post_all_gather: the values gather and the low-bit gather must both
give cast(Quantizer.values(full latent)) bit for bit, also when refilling ``out`` (FSDP2's
re-gather); the bytes counted per rank are the input sizes. And the switch's refusals.
"""

from __future__ import annotations

import pytest
import torch

from cage_ds.fsdp import GatherPlan, LatentWeight
from cage_ds.quant import Quantizer, QuantSpec

SPECS = [
    QuantSpec(bits=4),
    QuantSpec(bits=3, mask="clip"),
    QuantSpec(bits=2),
    QuantSpec(method="rtn", bits=4, group_size=64),
]


class _Mesh:
    """The one DeviceMesh call the hook makes."""

    def __init__(self, rank: int):
        self.rank = rank

    def get_local_rank(self) -> int:
        return self.rank


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _gather(full: torch.Tensor, plan: GatherPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """(unsharded weight from the first gather, the same refilled into ``out``; in values
    ``out`` views the gathered buffer, which the gather itself refills)."""
    chunks = list(torch.chunk(full, plan.world))
    chunks += [full[:0]] * (plan.world - len(chunks))
    sent = [LatentWeight(c, plan).fsdp_pre_all_gather(_Mesh(r)) for r, c in enumerate(chunks)]
    gathered = torch.cat([inputs[0] for inputs, _ in sent])
    shard = LatentWeight(chunks[0], plan)
    out, inner = shard.fsdp_post_all_gather((gathered,), sent[0][1], plan.param_dtype)
    assert len(inner) == 1 and inner[0] is out  # what FSDP2 frees and re-allocates
    weight = torch.as_strided(out, full.shape, full.stride())
    refill = weight if plan.wire is None else torch.full_like(weight, float("nan"))
    assert shard.fsdp_post_all_gather((gathered,), sent[0][1], plan.param_dtype, out=refill) is None
    assert plan.sent == sum(inputs[0].numel() * inputs[0].element_size() for inputs, _ in sent)
    return weight, refill


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.method}{s.bits}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_lowbit_and_values_gathers_give_the_quantized_weight(spec, dtype, world):
    full = torch.randn(5, 256, generator=torch.Generator().manual_seed(world))
    full[1, :64] = 0.0  # an all-zero RTN group and a QuEST row with a zero block
    want = _bits(Quantizer(spec).values(full).to(dtype))
    sizes = {}
    for lowbit in (False, True):
        plan = GatherPlan(Quantizer(spec), full.shape, dtype, world)
        plan.use_lowbit(lowbit, "w")
        assert (plan.wire is not None) == lowbit
        weight, refill = _gather(full, plan)
        assert weight.dtype == dtype and torch.equal(_bits(weight), want), f"lowbit={lowbit}"
        assert torch.equal(_bits(refill), want), f"lowbit={lowbit}: refilled out"
        sizes[lowbit] = plan.sent
    rows = -(-5 // world)
    scales = rows * (1 if spec.method == "quest" else 256 // spec.group_size)
    assert sizes[True] == world * (4 * scales + rows * 256 * spec.bits // 8)
    assert sizes[False] == world * rows * 256 * dtype.itemsize


def test_the_switch_refuses_what_it_cannot_serve():
    quantizer, shape = Quantizer(QuantSpec(bits=4)), torch.Size([4, 128])
    plan = GatherPlan(quantizer, shape, torch.float16, 2)
    with pytest.raises(ValueError, match=r"lowbit_gather=True cannot serve w .*float16"):
        plan.use_lowbit(True, "w")
    plan.use_lowbit(None, "w")
    assert plan.wire is None  # fp16 params: values
    one = GatherPlan(quantizer, shape, torch.float32, 1)
    one.use_lowbit(None, "w")
    assert one.wire is None  # one rank: nothing to save by default
    one.use_lowbit(True, "w")
    assert one.wire is not None
    one.sent = 8
    with pytest.raises(RuntimeError, match=r"w was gathered already.*before the first forward"):
        one.use_lowbit(False, "w")
