"""Train-step (forward + backward) time of the tiny Llama: QuEST W4A4 fake quantization vs
no quantization, side by side in one run on CPU.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_fakequant_step.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_fakequant_step.py --batch 8 --seq 128

Variants: "fp" (plain LlamaForCausalLM), "fp-quantlinear" (prepared with no quantizer on
either side: the cost of the QuantLinear wrapper alone), and the given presets (default
w4a4). Repeats are interleaved across variants so machine load affects them alike; the
median per variant and its ratio to "fp" are printed (and the minimum, steadier on a
shared machine).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cage_ds.nn import prepare_model
from cage_ds.quant import QuantConfig


def tiny_llama(preset: str | None) -> LlamaForCausalLM:
    """The test suite's tiny Llama (d 256, 2 layers, 4 heads, SwiGLU 512, vocab 512)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=512,
        vocab_size=512,
        max_position_embeddings=1024,
    )
    model = LlamaForCausalLM(config).train()
    return model if preset is None else prepare_model(model, QuantConfig.preset(preset))


def step_seconds(model: LlamaForCausalLM, ids: torch.Tensor) -> float:
    """Wall time of one forward + backward (loss on the batch itself)."""
    start = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--presets", nargs="+", default=["w4a4"])
    args = parser.parse_args()

    variants = {"fp": tiny_llama(None), "fp-quantlinear": tiny_llama("fp")}
    variants.update({p: tiny_llama(p) for p in args.presets})
    ids = torch.randint(0, 512, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(args.warmup + args.repeats):
        for name, model in variants.items():
            t = step_seconds(model, ids)
            if i >= args.warmup:
                times[name].append(t)

    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, "
        f"seq {args.seq}, repeats {args.repeats} (after {args.warmup} warm-up)"
    )
    base, base_min = statistics.median(times["fp"]), min(times["fp"])
    print(f"{'variant':<16} {'median ms':>10} {'ratio':>6} {'min ms':>8} {'min ratio':>9}")
    for name, ts in times.items():
        med, low = statistics.median(ts), min(ts)
        print(
            f"{name:<16} {med * 1e3:>10.1f} {med / base:>6.2f} {low * 1e3:>8.1f} "
            f"{low / base_min:>9.2f}"
        )


if __name__ == "__main__":
    main()
