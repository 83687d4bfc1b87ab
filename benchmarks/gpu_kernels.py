"""Achieved bandwidth of every cage_kernels Triton kernel, and the fused CAGE-AdamW shard step
against torch.optim.AdamW(fused=True) on the same parameter set.

    .venv/bin/python benchmarks/gpu_kernels.py                       # one GPU, < 5 min on H100
    .venv/bin/python benchmarks/gpu_kernels.py --step-numel 268435456 --csv out.csv
    .venv/bin/python benchmarks/gpu_kernels.py --device cpu          # torch twins vs AdamW, CPU

GPU: first the card's copy bandwidth (dst.copy_(src), 2 x bytes moved), then per kernel
bytes it must move / time (triton.testing.do_bench quantiles 20/50/80 %), as GB/s and as a
fraction of the copy bandwidth. The step runs on one flat fp32 shard of --step-numel
elements (default 2^30, ~1.07 B) laid out as rows of 2048 quantized at 4 bits (one
segment), so CAGE-AdamW moves 28 B/element (read p g m v, write p m v) + 2 B of bf16
quantized copy; torch's fused AdamW moves the same 28 B. Targets (issue 3): fused step
>= 85 % of copy and <= 1.1x fused AdamW time; activation quantization >= 70 % of copy.
CPU: the torch twins (what CPU tensors run) vs torch.optim.AdamW, timed with perf_counter.
Prints a table and writes one CSV row per point: op, provider, metric, unit, size,
p20, p50, p80, device, date, versions.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from cage_kernels import ops
from cage_kernels.dispatch import use_triton
from cage_kernels.segments import Segment, SegmentTable

ROW = 2048
HP = dict(lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def versions() -> str:
    import triton

    py = platform.python_version()
    return f"torch {torch.__version__}; triton {triton.__version__}; python {py}"


def timer(device: str, repeats: int) -> Callable[[Callable[[], object]], list[float]]:
    """fn -> [p20, p50, p80] milliseconds."""
    if device == "cuda":
        import triton.testing

        def gpu(fn):
            return list(triton.testing.do_bench(fn, warmup=25, rep=200, quantiles=[0.2, 0.5, 0.8]))

        return gpu

    def cpu(fn):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        q = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
        return [q[1], statistics.median(times), q[7]]

    return cpu


class Table:
    """Collects rows; prints them aligned; writes the CSV."""

    def __init__(self, device_name: str):
        self.rows: list[dict] = []
        self.device_name = device_name
        self.date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.versions = versions()

    def add(self, op, provider, metric, unit, size, q):
        self.rows.append(dict(op=op, provider=provider, metric=metric, unit=unit, size=size,
                              p20=q[0], p50=q[1], p80=q[2], device=self.device_name,
                              date=self.date, versions=self.versions))  # fmt: skip

    def print(self):
        print(f"{'op':34} {'provider':16} {'metric':10} {'size':>12} {'p20':>10} {'p50':>10} "
              f"{'p80':>10} unit")  # fmt: skip
        for r in self.rows:
            print(f"{r['op']:34} {r['provider']:16} {r['metric']:10} {r['size']:>12} "
                  f"{r['p20']:10.4g} {r['p50']:10.4g} {r['p80']:10.4g} {r['unit']}")  # fmt: skip

    def write(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(self.rows[0]))
            w.writeheader()
            w.writerows(self.rows)
        print(f"wrote {path}")


def measure(table, bench, op, provider, size, nbytes, fn, copy_gbs=None):
    """Time fn; record time (ms), bandwidth (GB/s) and, given the copy rate, its fraction."""
    ms = bench(fn)
    table.add(op, provider, "time", "ms", size, ms)
    gbs = [nbytes / (t * 1e6) for t in reversed(ms)]  # slower time -> lower bandwidth
    table.add(op, provider, "bandwidth", "GB/s", size, gbs)
    if copy_gbs:
        table.add(op, provider, "of_copy", "fraction", size, [g / copy_gbs for g in gbs])
    return ms[1]


def copy_bandwidth(table, bench, dev, numel) -> float:
    """The card's copy rate in GB/s (read + write of numel fp32)."""
    src = torch.randn(numel, device=dev)
    dst = torch.empty_like(src)
    ms = measure(table, bench, "copy (dst.copy_(src))", "torch", f"{numel}", 8 * numel,
                 lambda: dst.copy_(src))  # fmt: skip
    return 8 * numel / (ms * 1e6)


def kernel_points(table, bench, dev, copy_gbs, tokens, width):
    """Every small kernel on an activation-sized tensor [tokens, width]."""
    n = tokens * width
    a = torch.randn(tokens, width, device=dev, dtype=torch.bfloat16)
    w32 = torch.randn(tokens // 4, width, device=dev)
    g = torch.randn_like(a)
    size = f"{tokens}x{width}"
    provider = "triton" if use_triton(a) else "torch-twin"

    measure(table, bench, "fwht bf16", provider, size, 4 * n, lambda: ops.fwht(a, 128), copy_gbs)
    measure(table, bench, "act quest fwd bf16 w4 (v+mask)", provider, size, 5 * n,
            lambda: ops.quest_act(a, 4, 128), copy_gbs)  # fmt: skip
    _, mask = ops.quest_act(a, 4, 128)
    measure(table, bench, "act quest bwd bf16 (mask, H)", provider, size, 5 * n,
            lambda: ops.quest_act_backward(g, mask, 128), copy_gbs)  # fmt: skip
    nw = w32.numel()
    measure(table, bench, "weight quest fp32 w4 packed", provider, f"{tokens // 4}x{width}",
            nw * (4 + 4 + 0.5 + 0.125), lambda: ops.quest_quantize_packed(w32, 4, 128),
            copy_gbs)  # fmt: skip
    codes = torch.randint(0, 16, (tokens, width), device=dev, dtype=torch.uint8)
    packed = ops.pack(codes, 4)
    measure(table, bench, "pack 4-bit", provider, size, 1.5 * n, lambda: ops.pack(codes, 4),
            copy_gbs)  # fmt: skip
    measure(table, bench, "unpack 4-bit", provider, size, 1.5 * n, lambda: ops.unpack(packed, 4),
            copy_gbs)  # fmt: skip
    step = torch.rand(tokens, 1, device=dev)
    measure(table, bench, "dequantize w4 -> bf16", provider, size, 3 * n,
            lambda: ops.dequantize(codes, step, 4, torch.bfloat16), copy_gbs)  # fmt: skip


def step_points(table, bench, dev, copy_gbs, numel):
    """Fused CAGE-AdamW shard step variants vs torch AdamW on the same flat parameter."""
    rows = numel // ROW
    numel = rows * ROW
    p = torch.randn(numel, device=dev) * 0.02
    g = torch.randn(numel, device=dev) * 1e-3
    m = torch.zeros(numel, device=dev)
    v = torch.zeros(numel, device=dev)
    qout = torch.empty(numel, device=dev, dtype=torch.bfloat16)
    size = f"{numel}"
    table_q = SegmentTable((Segment(0, 0, 0, rows, ROW, 4),), 128)
    table_ste = SegmentTable((Segment(0, 0, 0, rows, ROW, 4, ste=True),), 128)
    provider = "triton" if use_triton(p) else "torch-twin"
    t = {}

    def cage(table, lam, variant, q, mask=None, mask_in=None):
        return lambda: ops.cage_adamw_shard_step(p, g, m, v, table, step=10, lam=lam,
                                                 variant=variant, qout=q, mask_out=mask,
                                                 mask_in=mask_in, **HP)  # fmt: skip

    t["l0"] = measure(table, bench, "cage-adamw lambda=0 no-copy", provider, size, 28 * numel,
                      cage(table_q, 0.0, "decoupled", None), copy_gbs)  # fmt: skip
    t["dec"] = measure(table, bench, "cage-adamw decoupled +bf16 copy", provider, size,
                       30 * numel, cage(table_q, 10.0, "decoupled", qout), copy_gbs)  # fmt: skip
    measure(table, bench, "cage-adamw coupled +bf16 copy", provider, size, 30 * numel,
            cage(table_q, 10.0, "coupled", qout), copy_gbs)  # fmt: skip
    measure(table, bench, "cage-adamw decoupled+ste +copy", provider, size, 30 * numel,
            cage(table_ste, 10.0, "decoupled", qout), copy_gbs)  # fmt: skip
    mask = torch.empty(numel, device=dev, dtype=torch.bool)
    measure(table, bench, "cage-adamw decoupled+ste +copy +mask", provider, size, 31 * numel,
            cage(table_ste, 10.0, "decoupled", qout, mask), copy_gbs)  # fmt: skip
    # What cage_ds.zero runs from its second step on: the last step's mask passed back in.
    measure(table, bench, "cage-adamw decoupled+ste(mask in) +copy +mask", provider, size,
            32 * numel, cage(table_ste, 10.0, "decoupled", qout, mask, mask), copy_gbs)  # fmt: skip
    del qout, mask
    param = torch.nn.Parameter(p)
    param.grad = g
    kinds = {"fused": dict(fused=True)} if dev == "cuda" else {"single": dict(foreach=False)}
    kinds["foreach"] = dict(foreach=True)
    for kind, kw in kinds.items():
        opt = torch.optim.AdamW([param], betas=(HP["beta1"], HP["beta2"]), lr=HP["lr"],
                                eps=HP["eps"], weight_decay=HP["weight_decay"], **kw)  # fmt: skip
        t[kind] = measure(table, bench, "torch adamw", kind, size, 28 * numel, opt.step, copy_gbs)
        del opt
    base = t.get("fused", t["foreach"])
    table.add("cage-adamw decoupled / adamw", "ratio", "time_ratio", "x", size,
              [t["dec"] / base] * 3)  # fmt: skip
    table.add("cage-adamw lambda=0 / adamw", "ratio", "time_ratio", "x", size,
              [t["l0"] / base] * 3)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--step-numel", type=int, default=None,
                    help="elements of the optimizer shard (cuda 2^30, cpu 2^22)")  # fmt: skip
    ap.add_argument("--tokens", type=int, default=None,
                    help="activation rows (cuda 16384, cpu 1024)")  # fmt: skip
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5, help="CPU timing repeats")
    ap.add_argument("--csv", type=Path, default=None)
    ap.add_argument("--skip-kernels", action="store_true", help="only copy + optimizer step")
    args = ap.parse_args(argv)
    dev = args.device
    if dev == "cuda":
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --device cpu for the CPU figures")
        name = torch.cuda.get_device_name()
    else:
        name = f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    numel = args.step_numel or (1 << 30 if dev == "cuda" else 1 << 22)
    tokens = args.tokens or (16384 if dev == "cuda" else 1024)
    bench = timer(dev, args.repeats)
    table = Table(name)

    copy_gbs = copy_bandwidth(table, bench, dev, 1 << 28 if dev == "cuda" else 1 << 24)
    if not args.skip_kernels:
        kernel_points(table, bench, dev, copy_gbs, tokens, args.width)
    step_points(table, bench, dev, copy_gbs, numel)
    table.print()
    stamp = datetime.date.today().isoformat()
    table.write(args.csv or Path(f"benchmarks/results/gpu_kernels_{dev}_{stamp}.csv"))


if __name__ == "__main__":
    main()
