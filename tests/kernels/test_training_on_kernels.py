"""QuantLinear and CageAdamW on the kernels: a small HF Llama, W4A4 with a CAGE correction,
trains on the Triton kernels (compiled on a GPU by benchmarks/gpu_check.sh, interpreted on the
CPU otherwise) as it does on the torch twins, and the kernels are the code that ran.

Interpreted, both runs do the same CPU arithmetic but for the fused optimizer step's fma
placement (a few ulps, tests/kernels/test_cage_adamw.py); on a GPU the matrix products round
differently too: tolerances differ per mode. Ulps can also put a rotated weight exactly on a
grid boundary in one run and not the other. Q(W) then differs by one step D in one rotated
coordinate, and the decoupled correction moves W by lr lam D (H is orthonormal). So each
quantized weight may also differ by up to FLIPS such moves."""

from __future__ import annotations

import pytest
import torch
from cage_kernels import cage_adamw_triton, hadamard_triton, quest_triton
from cage_kernels.grid import ALPHA
from testkit import tiny_llama

from cage_ds.nn import cage_param_groups
from cage_ds.optim import CageAdamW
from cage_ds.quant import QuantConfig

pytestmark = pytest.mark.interpret
STEPS = 3
LR, LAM, BITS = 3e-3, 5.0, 4
FLIPS = 2  # grid-boundary code flips of Q(W) tolerated per weight over the run


def small_llama(seed: int, config: QuantConfig) -> torch.nn.Module:
    return tiny_llama(seed, config, vocab_size=96, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=16)  # fmt: skip


def train(model: torch.nn.Module, tokens: torch.Tensor) -> list[float]:
    opt = CageAdamW(cage_param_groups(model, weight_decay=0.1), lr=LR, cage_lambda=LAM,
                    cage_silence=0.0, total_steps=STEPS)  # fmt: skip
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def count_calls(monkeypatch, module, name: str, counts: dict[str, int]) -> None:
    fn = getattr(module, name)
    counts[name] = 0

    def counted(*args, **kwargs):
        counts[name] += 1
        return fn(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)


def test_w4a4_cage_training_on_kernels_matches_the_twins(gen, dev, monkeypatch):
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    tokens = torch.randint(0, 96, (2, 16), generator=gen)
    config = QuantConfig.preset(f"w{BITS}a{BITS}", hadamard_block=32)
    counts: dict[str, int] = {}
    count_calls(monkeypatch, quest_triton, "quest_quantize_triton", counts)
    count_calls(monkeypatch, hadamard_triton, "fwht_triton", counts)
    count_calls(monkeypatch, cage_adamw_triton, "cage_adamw_shard_triton", counts)

    model = small_llama(seed, config).to(dev)
    got = train(model, tokens.to(dev))
    assert all(counts.values()), f"a kernel never ran: {counts}"

    monkeypatch.delenv("CAGE_TRITON_INTERPRET", raising=False)  # the twins, on the CPU
    ran = dict(counts)
    twin = small_llama(seed, config)
    want = train(twin, tokens)
    assert counts == ran, "the twin run must not reach the kernels"

    # interpreted: the same CPU arithmetic up to the fused step's fma placement (ulps); on a
    # GPU also the matrix products' rounding, which can move a value across a grid boundary
    rtol = 1e-5 if dev == "cpu" else 1e-3
    assert torch.allclose(torch.tensor(got), torch.tensor(want), rtol=rtol), (got, want)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        p, q = p.detach().cpu(), q.detach()
        bound = rtol * q.norm()
        if name.endswith("proj.weight"):  # quantized: D = 2 ALPHA[b] rms / (2^b - 1) per row
            step = 2 * ALPHA[BITS] * q.square().mean(1).sqrt().max() / (2**BITS - 1)
            bound = bound + FLIPS * LR * LAM * step
        assert (p - q).norm() <= bound, (name, (p - q).norm().item(), bound.item())
