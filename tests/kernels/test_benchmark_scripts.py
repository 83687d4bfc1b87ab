"""The GPU benchmark scripts stay runnable between GPU sessions: gpu_kernels.py end to end
in its CPU mode (the same ops and keywords its GPU run calls), and gpu_probe.py's
experimental fwht, whose lane stages are reductions, equal to fwht_ref and to fwht_tile."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cage_kernels.hadamard import fwht_ref

pytestmark = pytest.mark.interpret
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_gpu_kernels_cpu_mode_writes_every_row(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_kernels

    out = tmp_path / "table.csv"
    gpu_kernels.main(["--device", "cpu", "--step-numel", "65536", "--tokens", "64",
                      "--width", "256", "--repeats", "1", "--csv", str(out)])  # fmt: skip
    rows = {line.split(",")[0] for line in out.read_text().splitlines()[1:]}
    for want in ("act quest fwd bf16 w4 (v+mask)", "cage-adamw decoupled+ste +copy +mask",
                 "cage-adamw decoupled+ste(mask in) +copy +mask", "torch adamw"):  # fmt: skip
        assert want in rows, f"{want!r} missing from {sorted(rows)}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_probe_fwht_lane_stages_by_reductions_is_the_butterfly(gen, dev, dtype, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_probe

    x = torch.randn(3, 512, generator=gen).to(dtype)
    ys = [torch.empty(3, 512, device=dev) for _ in range(2)]
    log_v = (16 // x.element_size()).bit_length() - 1
    for how, y in enumerate(ys):
        gpu_probe._fwht_probe_kernel[(3,)](x.to(dev), y, 128**-0.5, N=512, LOG_V=log_v,
                                           HOW=how)  # fmt: skip
    assert torch.equal(ys[0].cpu(), fwht_ref(x.float(), 128))
    assert torch.equal(ys[1], ys[0])
