"""One optimizer step on the parameter set of the paper's 50M Llama: CageAdamW (QuEST W4 on
the decoder linears, lambda active) vs torch.optim.AdamW(foreach=True), side by side on CPU.

    .venv/bin/python benchmarks/bench_optimizer_step.py --threads 1
    .venv/bin/python benchmarks/bench_optimizer_step.py --threads 2 --repeats 5 --all

Model (cage-method.md section 4, 50M preset): 7 layers, d 768, 6 heads, SwiGLU hidden 2048,
vocab 32000, untied embeddings; the tensors are built directly (no transformers). Groups
as for training: linear weights decay 0.1 (+ "quant" W4 QuEST for CAGE), lm_head decay 0.1,
embeddings and norms no decay. Variants, all on the same parameters and gradients:
  adamw-foreach   torch.optim.AdamW(foreach=True)            (the baseline)
  cage-lambda0    CageAdamW, lambda = 0                      (its loop, no quantization)
  cage-decoupled  CageAdamW, lambda = 10 active from step 1  (the default form)
  e = W - Q(W)    the quantization error of all linear weights alone (CAGE's extra work)
  with --all also:
  adamw-single    torch.optim.AdamW(foreach=False)           (torch's per-tensor loop)
  cage-coupled    CageAdamW, coupled variant, lambda = 10
Repeats are interleaved across variants so machine load affects them alike. Printed per
variant: median wall time and median process CPU time (all threads; steadier than wall
time on a shared machine), each with its ratio to adamw-foreach.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable

import torch

from cage_ds.optim import CageAdamW
from cage_ds.quant import QuantConfig, Quantizer

LAYERS, D, HIDDEN, VOCAB = 7, 768, 2048, 32000
LINEARS = {
    "q_proj": (D, D),
    "k_proj": (D, D),
    "v_proj": (D, D),
    "o_proj": (D, D),
    "gate_proj": (HIDDEN, D),
    "up_proj": (HIDDEN, D),
    "down_proj": (D, HIDDEN),
}


def llama50m_params(gen: torch.Generator) -> dict[str, list[torch.nn.Parameter]]:
    """The 50M preset's tensors (std 0.02 init), by role: linear, lm_head, no_decay."""

    def param(*shape: int) -> torch.nn.Parameter:
        return torch.nn.Parameter(torch.randn(*shape, generator=gen) * 0.02)

    linear = [param(*s) for _ in range(LAYERS) for s in LINEARS.values()]
    norms = [torch.nn.Parameter(torch.ones(D)) for _ in range(2 * LAYERS + 1)]
    return {"linear": linear, "lm_head": [param(VOCAB, D)], "no_decay": [param(VOCAB, D), *norms]}


def groups(params: dict[str, list[torch.nn.Parameter]], quant: dict | None) -> list[dict]:
    linear = {"params": params["linear"], "weight_decay": 0.1}
    if quant is not None:
        linear["quant"] = quant
    return [
        linear,
        {"params": params["lm_head"], "weight_decay": 0.1},
        {"params": params["no_decay"], "weight_decay": 0.0},
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--all", action="store_true", help="add adamw-single and cage-coupled")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    params = llama50m_params(gen)
    flat = [p for ps in params.values() for p in ps]
    for p in flat:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    spec = QuantConfig.preset("w4a4").weight
    quant = dataclasses.asdict(spec)
    common = {"lr": 1.2e-3, "betas": (0.9, 0.95), "eps": 1e-8}
    cage = {"cage_silence": 0.0, "cage_schedule": "constant", "cage_lambda": 10.0}
    quantizer = Quantizer(spec)

    def quant_error() -> None:
        with torch.no_grad():
            for w in params["linear"]:
                quantizer.error(w)

    variants: dict[str, Callable[[], object]] = {
        "adamw-foreach": torch.optim.AdamW(groups(params, None), foreach=True, **common).step,
        "cage-lambda0": CageAdamW(groups(params, quant), **common, cage_lambda=0.0).step,
        "cage-decoupled": CageAdamW(groups(params, quant), **common, **cage).step,
        "e = W - Q(W)": quant_error,
    }
    if args.all:
        variants["adamw-single"] = torch.optim.AdamW(
            groups(params, None), foreach=False, **common
        ).step
        variants["cage-coupled"] = CageAdamW(
            groups(params, quant), **common, **cage, cage_variant="coupled"
        ).step
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(args.warmup + args.repeats):
        for name, step in variants.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            if i >= args.warmup:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)

    n_all = sum(p.numel() for p in flat)
    n_quant = sum(p.numel() for p in params["linear"])
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, fp32, "
        f"{n_all / 1e6:.1f}M params ({n_quant / 1e6:.1f}M quantized: {spec.method} W{spec.bits}, "
        f"block {spec.hadamard_block}), repeats {args.repeats} (after {args.warmup} warm-up)"
    )
    base_wall = statistics.median(wall["adamw-foreach"])
    base_cpu = statistics.median(cpu["adamw-foreach"])
    print(f"| {'variant':<15} | wall ms (median) | ratio | CPU ms (median) | ratio |")
    print(f"|{'-' * 17}|{'-' * 17}:|{'-' * 6}:|{'-' * 16}:|{'-' * 6}:|")
    for name in variants:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(
            f"| {name:<15} | {w * 1e3:>16.0f} | {w / base_wall:>5.2f} "
            f"| {c * 1e3:>15.0f} | {c / base_cpu:>5.2f} |"
        )


if __name__ == "__main__":
    main()
