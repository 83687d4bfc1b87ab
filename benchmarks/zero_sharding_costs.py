"""Per-step, per-rank cost of exact sharded CAGE under ZeRO, from the shard maps.

    .venv/bin/python benchmarks/zero_sharding_costs.py [--measured DIR]

For the paper's 30M and 800M Llama presets (cage-method.md: SwiGLU hidden 8/3 d rounded up
to 256, head dim 128, vocab 32000, untied embeddings) and several world sizes, for ZeRO-3
(each weight cut on its own) and ZeRO-1/2 (the quantized weights flattened into one group
and cut evenly), the busiest rank's (cage_ds/zero/rows.py):
  elements the fused step computes (its whole rows in place + its cut rows assembled whole),
  bytes received per fused step (point to point: the peers' parts of its cut rows, for W,
    dL/dq, m and v, fp32) and per quantization of W alone (lp write after a load, the
    clipping mask, telemetry),
and the bf16 all-gather of all parameters that ZeRO does anyway ((world-1)/world * 2 bytes
* numel per gather; ZeRO-3 gathers in forward and again in backward, ZeRO-1/2 once).
``--measured DIR`` adds the counters of a tests/dist/zero_worker.py run (the tiny model).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from cage_ds.zero.rows import RowLayout, split_rows
from cage_ds.zero.shardmap import PartitionMap, zero3_maps, zero12_maps

BLOCK = 128
PRESETS = {"30M": (6, 640), "800M": (16, 2048)}
WORLDS = (8, 64, 256)
VOCAB = 32000


def llama_shapes(layers: int, d: int) -> tuple[list[tuple[int, int]], int]:
    """(quantized weight shapes in model order, total parameter count)."""
    inter = math.ceil(8 * d / 3 / 256) * 256
    per_layer = [(d, d), (d, d), (d, d), (d, d), (inter, d), (inter, d), (d, inter)]
    quant = per_layer * layers
    total = sum(r * c for r, c in quant) + 2 * VOCAB * d + (2 * layers + 1) * d
    return quant, total


def busiest(maps: list[PartitionMap]) -> dict[str, int]:
    """Max over ranks of the elements computed per step and of the elements received per
    exchanged tensor."""
    splits = split_rows(maps)
    lays = [RowLayout(maps, r, 4, True, splits) for r in range(len(maps))]
    return {
        "computed": max(lay.run_numel + lay.side_numel for lay in lays),
        "received": max(lay.received_per_tensor for lay in lays),
    }


def layouts(shapes: list[tuple[int, int]], world: int) -> dict[str, list[PartitionMap]]:
    offsets, pos = [], 0
    for r, c in shapes:
        offsets.append(pos)
        pos += r * c
    flat = pos + (-pos) % (2 * world)
    return {
        "ZeRO-3": zero3_maps(shapes, world),
        "ZeRO-1/2": zero12_maps(shapes, offsets, flat, world),
    }


def fmt_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} GiB"


def table() -> list[str]:
    rows = [
        "| preset | world | layout | elems computed / step (rank) | unsharded elems | "
        "received / fused step | received / Q eval | bf16 all-gather / step | "
        "extra / all-gather |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (layers, d) in PRESETS.items():
        shapes, total = llama_shapes(layers, d)
        qnumel = sum(r * c for r, c in shapes)
        for world in WORLDS:
            gather = (world - 1) / world * 2 * total
            for layout, maps in layouts(shapes, world).items():
                c = busiest(maps)
                step, q_eval = 4 * 4 * c["received"], 4 * c["received"]
                ag = gather * (2 if layout == "ZeRO-3" else 1)
                rows.append(
                    f"| {name} | {world} | {layout} | {c['computed']:,} | {qnumel:,} | "
                    f"{fmt_bytes(step)} | {fmt_bytes(q_eval)} | {fmt_bytes(ag)} | "
                    f"{step / ag:.2e} |"
                )
    return rows


def measured(path: str) -> list[str]:
    """Rank 0's counters of a zero_worker.py run next to the bf16 all-gather of the same
    steps: (world-1)/world * 2 B * all parameters, twice per step for ZeRO-3, once for 1/2."""
    import torch

    rows = [
        "| run | world | stage | variant | steps | exchanges | bytes received (rank 0) "
        "| quantized elems (rank 0) | bf16 all-gather (rank 0) | extra / all-gather |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for stage in (1, 2, 3):
        for variant in ("decoupled", "coupled"):
            f = os.path.join(path, f"{stage}_{variant}.pt")
            if not os.path.exists(f):
                continue
            res = torch.load(f, weights_only=False)
            s, world, steps = res["stats"], res["world"], len(res["losses"])
            numel = sum(t.numel() for t in res["latents"].values())
            gather = (world - 1) / world * 2 * numel * steps * (2 if stage == 3 else 1)
            ratio = f"{s['bytes_received'] / gather:.2e}" if gather else "-"
            rows.append(
                f"| {os.path.basename(path.rstrip('/'))} | {world} | {stage} | {variant} | {steps} "
                f"| {s['exchanges']} | {s['bytes_received']:,} | {s['elements_quantized']:,} "
                f"| {fmt_bytes(gather)} | {ratio} |"
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measured", nargs="*", default=[], help="zero_worker.py output dirs")
    args = ap.parse_args()
    print("\n".join(table()))
    for d in args.measured:
        print()
        print("\n".join(measured(d)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
