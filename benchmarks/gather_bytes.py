"""All-gather bytes of ZeRO-3 and FSDP2 CAGE training: the low-bit gather against the stock one.

    .venv/bin/python benchmarks/gather_bytes.py [--steps 3]

Launches 2 CPU ranks (torchrun, gloo) of cage-train's tiny preset under ZeRO-3 (bf16
partitions) with CAGE W4A4 twice: low-bit gather on, then off (cage_ds.zero.gather). Every
all-gather is counted by wrapping DeepSpeed's comm backend (all_gather_into_tensor and
all_gather, the calls ZeRO-3 makes); the bytes issued while cage_ds.zero.gather marks a
gather of CAGE-quantized weights count as "quantized weights", the rest as "other". Prints
both runs' losses (they must be identical), the bytes, the ratio computed from the shard map
(cage_ds.quant.lowbit.WireFormat, no training) for the tiny, 800m and 8b presets, and ends with
``all-gather bytes, quantized weights, W4 / bf16: <ratio>``.
FSDP2 row (before it): the same preset with ``backend=fsdp2`` on 2 CPU ranks (fp32 params
on CPU), the quantized weights gathered in values, then low-bit (cage_ds.fsdp's
set_lowbit_gather); per rank, the bytes the quantized weights hand to the all-gathers
(cage_ds.fsdp.sent_bytes) and those of every FSDP2 all-gather input (count_all_gathers);
its shard-map ratios use FSDP2's row cut (ceil(rows / world) rows per rank).
ZeRO-2 row (before the ZeRO-3 one): the same preset under ZeRO-2 (bf16), the quantized flat
group gathered stock, then low-bit (cage_ds.zero.flat_gather), counted the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def preset_shapes(preset: str) -> list[tuple[int, int]]:
    """[out, in] of every quantized linear of a model preset (meta device, no memory)."""
    import torch
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from cage_ds.train.config import load_config
    from cage_ds.train.model import llama_config

    hf = llama_config(load_config(None, [f"model.preset={preset}"]).model)
    with torch.device("meta"):
        model = MODEL_FOR_CAUSAL_LM_MAPPING[type(hf)](hf)
    return [
        tuple(m.weight.shape) for n, m in model.named_modules() if n.split(".")[-1] in QUANTIZED
    ]


def shard_map_ratio(
    shapes: list[tuple[int, int]], world: int, bits: int, rows: bool = False, itemsize: int = 2
) -> float:
    """Low-bit payload bytes / stock bytes (``itemsize`` per value) of one gather of every
    weight (QuEST row scales); ZeRO-3's flat cut, or FSDP2's whole-row cut if ``rows``."""
    from cage_ds.quant import QuantSpec
    from cage_ds.quant.lowbit import WireFormat

    spec = QuantSpec(bits=bits)
    fmts = [
        WireFormat.of(spec, o * i, i, world, -(-o // world) * i if rows else None)
        for o, i in shapes
    ]
    return sum(f.nbytes for f in fmts) / sum(f.stock_nbytes(itemsize) for f in fmts)


def _count_gathers(counts: dict[str, int]) -> None:
    """Add every all-gather's output bytes to counts[gather.current_kind()]."""
    from deepspeed.comm import comm

    from cage_ds.zero.gather import current_kind

    backend = comm.cdb
    into, listed = backend.all_gather_into_tensor, backend.all_gather

    def all_gather_into_tensor(output_tensor, input_tensor, *args, **kwargs):
        counts[current_kind()] += output_tensor.numel() * output_tensor.element_size()
        return into(output_tensor, input_tensor, *args, **kwargs)

    def all_gather(tensor_list, tensor, *args, **kwargs):
        counts[current_kind()] += sum(t.numel() * t.element_size() for t in tensor_list)
        return listed(tensor_list, tensor, *args, **kwargs)

    backend.all_gather_into_tensor, backend.all_gather = all_gather_into_tensor, all_gather


def _trainer(mode: str, steps: int, workdir: str, *overrides: str):
    """cage-train's Trainer of the tiny preset, CAGE W4A4, ``steps`` steps, no tracking."""
    from cage_ds.train.config import CONFIGS_DIR, load_config
    from cage_ds.train.loop import Trainer

    cfg = load_config(
        CONFIGS_DIR / "experiments" / "cage_w4a4.yaml",
        [f"train.steps={steps}", f"train.output_dir={workdir}", f"train.run_name={mode}",
         "train.progress=false", "train.log_every=1", "tracking.enabled=false",
         "checkpoint.save_final=false", *overrides],
    )  # fmt: skip
    return Trainer(cfg)


def _write(out: str, result, counts: dict[str, int]) -> None:
    import torch

    if torch.distributed.get_rank() == 0:
        losses = [loss for _, loss in result.history["train/loss"]]
        Path(out).write_text(json.dumps({"bytes": counts, "losses": losses,
                                         "val_loss": result.val_loss}))  # fmt: skip


def worker(out: str, mode: str, steps: int, workdir: str) -> None:
    """One rank of a cage-train run (tiny, ZeRO-3 bf16, or ZeRO-2 for modes z2_*, CAGE W4A4)
    with the gathers counted."""
    from cage_ds.train.config import CONFIGS_DIR
    from cage_ds.zero import attachment

    stage = 2 if mode.startswith("z2_") else 3
    ds = json.loads((CONFIGS_DIR / "deepspeed" / f"zero{stage}_cpu.json").read_text())
    ds["bf16"] = {"enabled": True}
    ds_path = Path(workdir) / f"zero{stage}_bf16_cpu.json"
    ds_path.write_text(json.dumps(ds))
    trainer = _trainer(mode, steps, workdir, f"deepspeed.config={ds_path}")
    gather = attachment(trainer.engine).lowbit
    if gather is None:
        raise RuntimeError("the low-bit gather is not active on this run")
    gather.enabled = mode.endswith("lowbit")
    counts = {"quantized": 0, "other": 0}
    _count_gathers(counts)
    _write(out, trainer.run(), counts)


def fsdp_worker(out: str, mode: str, steps: int, workdir: str) -> None:
    """One rank of a cage-train run (tiny, backend=fsdp2, CAGE W4A4), gathers counted."""
    from cage_ds import fsdp

    trainer = _trainer(mode, steps, workdir, "backend=fsdp2")
    model = trainer.engine.module
    fsdp.set_lowbit_gather(model, mode == "fsdp_lowbit")
    counter = fsdp.count_all_gathers(model)
    result = trainer.run()
    quantized = fsdp.sent_bytes(model)
    _write(out, result, {"quantized": quantized, "other": counter.nbytes - quantized})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_two_ranks(argv: list[str]) -> None:
    """``torchrun`` 2 CPU ranks of this script with ``argv``; raises on failure."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true"}  # fmt: skip
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node=2",
           f"--master_port={_free_port()}", __file__, *argv]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{argv} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


def launch(mode: str, steps: int, workdir: str, start=torchrun_two_ranks) -> dict:
    """Run ``worker`` (``fsdp_worker`` for modes fsdp_*) on 2 CPU ranks started by ``start``
    (argv of this script's worker mode -> None; torchrun by default); returns rank 0's
    record."""
    out = os.path.join(workdir, f"{mode}.json")
    start(["--worker", out, mode, str(steps), workdir])
    return json.loads(Path(out).read_text())


def _paired(low_mode: str, base_mode: str, steps: int, start) -> dict:
    """Both runs and the measured ratio of their quantized weights' bytes."""
    with tempfile.TemporaryDirectory() as workdir:
        low = launch(low_mode, steps, workdir, start)
        base = launch(base_mode, steps, workdir, start)
    ratio = low["bytes"]["quantized"] / base["bytes"]["quantized"]
    return {low_mode.removeprefix("fsdp_").removeprefix("z2_"): low,
            base_mode.removeprefix("fsdp_").removeprefix("z2_"): base, "ratio": ratio}  # fmt: skip


def _shard_map_ratios(rows: bool = False) -> dict:
    """Shard-map ratios vs bf16: tiny at world 2, the 800m and 8b presets at 8 and 64."""
    return {
        (preset, world, bits): shard_map_ratio(preset_shapes(preset), world, bits, rows=rows)
        for preset, worlds in (("tiny", (2,)), ("800m", (8, 64)), ("8b", (8, 64)))
        for world in worlds
        for bits in (4, 3, 2)
    }


def measure_fsdp(steps: int = 3, start=torchrun_two_ranks) -> dict:
    """FSDP2: both runs, the measured ratio (vs fp32 values) and the row-cut shard-map ratios."""
    runs = _paired("fsdp_lowbit", "fsdp_values", steps, start)
    return {**runs, "shard_map": _shard_map_ratios(True)}


def measure_zero2(steps: int = 3, start=torchrun_two_ranks) -> dict:
    """ZeRO-2: both runs and the measured ratio."""
    return _paired("z2_lowbit", "z2_stock", steps, start)


def measure(steps: int = 3, start=torchrun_two_ranks) -> dict:
    """ZeRO-3: both runs, the measured ratio and the shard-map ratios."""
    return {**_paired("lowbit", "stock", steps, start), "shard_map": _shard_map_ratios()}


def _print_runs(label: str, result: dict, modes: tuple[str, str]) -> None:
    """Each mode's losses, validation loss and gathered bytes; whether training was identical."""
    for mode in modes:
        rec = result[mode]
        print(f"{label} {mode:6s} losses {rec['losses']} val {rec['val_loss']:.6f} "
              f"bytes {rec['bytes']}")  # fmt: skip
    same = result[modes[0]]["losses"] == result[modes[1]]["losses"]
    print(f"{label}: training identical with and without the low-bit gather: {same}")


def _print_shard_map(title: str, ratios: dict) -> None:
    print(f"shard-map ratio, {title} (low-bit / bf16), QuEST row scales included:")
    for (preset, world, bits), ratio in ratios.items():
        print(f"  {preset:5s} world {world:3d} W{bits}: {ratio:.4f}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        out, mode, steps, workdir = sys.argv[2:6]
        run = fsdp_worker if mode.startswith("fsdp_") else worker
        return run(out, mode, int(steps), workdir)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    steps = ap.parse_args().steps
    f = measure_fsdp(steps)
    print("FSDP2 (backend=fsdp2, fp32 params on CPU), bytes handed to the all-gathers per rank:")
    _print_runs("FSDP2", f, ("values", "lowbit"))
    _print_shard_map("FSDP2 row cut", f["shard_map"])
    print(f"all-gather bytes, FSDP2, quantized weights, W4 / fp32: {f['ratio']:.4f}")
    z = measure_zero2(steps)
    _print_runs("ZeRO-2", z, ("stock", "lowbit"))
    print(f"all-gather bytes, ZeRO-2, quantized weights, W4 / bf16: {z['ratio']:.4f}")
    r = measure(steps)
    _print_runs("ZeRO-3", r, ("stock", "lowbit"))
    _print_shard_map("ZeRO-3", r["shard_map"])
    print(f"all-gather bytes, quantized weights, W4 / bf16: {r['ratio']:.4f}")


if __name__ == "__main__":
    main()
