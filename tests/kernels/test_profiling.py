"""Each public op runs inside a ``cage_kernels.<op>`` profiler range while torch.profiler
records (the ranges benchmarks/train_step.py sums) and returns the op's own result; without a
profiler no range is entered."""

from __future__ import annotations

import torch
from cage_kernels import ops
from cage_kernels.hadamard import fwht_ref


def test_ops_record_named_ranges_only_while_profiling(gen, dev, monkeypatch):
    x = torch.randn(3, 256, generator=gen)
    with torch.profiler.profile() as prof:
        y = ops.fwht(x.to(dev), 128)
        ops.pack(ops.quest_quantize(x.to(dev), 4, 128).codes, 4)
    names = [e.name for e in prof.events()]
    for op in ("fwht", "quest_quantize", "pack"):
        assert names.count(f"cage_kernels.{op}") == 1, sorted(set(names))
    assert torch.equal(y.cpu(), fwht_ref(x, 128))
    entered: list[str] = []
    monkeypatch.setattr(torch.profiler, "record_function", entered.append)
    assert torch.equal(ops.fwht(x.to(dev), 128).cpu(), y.cpu())
    assert entered == []
