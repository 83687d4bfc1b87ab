"""benchmarks/gather_bytes.py: 2 CPU ranks (forked by testkit.run_ranks where the benchmark uses
torchrun) of the tiny preset under ZeRO-3 (bf16), CAGE W4A4,
with and without the low-bit gather. The counted bytes of the quantized weights' gathers
must give exactly the shard-map ratio (every weight is gathered as often in both runs),
the other gathers must be unchanged, and the training losses identical."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from testkit import run_ranks

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "gather_bytes.py"


def _forked(argv: list[str]) -> None:
    """The benchmark's 2 ranks, forked (testkit.run_ranks) instead of torchrun."""
    run_ranks(2, str(BENCH), *argv, env={"MLFLOW_DISABLE_TELEMETRY": "true"})


def _bench():
    spec = importlib.util.spec_from_file_location("gather_bytes", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_gather_bytes_ratio_equals_the_shard_map():
    bench = _bench()
    r = bench.measure(steps=2, start=_forked)
    expected = bench.shard_map_ratio(bench.preset_shapes("tiny"), 2, 4)
    assert r["ratio"] == pytest.approx(expected, rel=1e-12, abs=0)
    assert r["ratio"] <= 0.27
    assert r["lowbit"]["bytes"]["other"] == r["stock"]["bytes"]["other"] > 0
    assert r["lowbit"]["losses"] == r["stock"]["losses"] and len(r["lowbit"]["losses"]) == 2
    assert r["lowbit"]["val_loss"] == r["stock"]["val_loss"]


def test_preset_ratios_meet_the_targets():
    bench = _bench()
    for preset in ("800m", "8b"):
        shapes = bench.preset_shapes(preset)
        assert bench.shard_map_ratio(shapes, 8, 4) <= 0.27
        assert bench.shard_map_ratio(shapes, 8, 3) <= 0.21


@pytest.mark.slow
def test_fsdp_gather_bytes_ratio_equals_the_shard_map():
    """The FSDP2 row: backend=fsdp2 (fp32 params on CPU), values then low-bit gather."""
    bench = _bench()
    r = bench.measure_fsdp(steps=2, start=_forked)
    expected = bench.shard_map_ratio(bench.preset_shapes("tiny"), 2, 4, rows=True, itemsize=4)
    assert r["ratio"] == pytest.approx(expected, rel=1e-12, abs=0)
    assert r["ratio"] <= 0.135  # 4 / 32 plus the row scales
    assert r["lowbit"]["bytes"]["other"] == r["values"]["bytes"]["other"] > 0
    assert r["lowbit"]["losses"] == r["values"]["losses"] and len(r["lowbit"]["losses"]) == 2
    assert r["lowbit"]["val_loss"] == r["values"]["val_loss"]
