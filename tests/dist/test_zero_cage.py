"""N-rank ZeRO-1/2/3 CAGE training equals single-process CAGE (real DeepSpeed engines, gloo).

One launch per world size N (testkit.run_ranks: ranks forked from a server that imported
DeepSpeed once) runs every stage x variant sequentially (tests/dist/zero_worker.py);
this process replays each step unsharded (zero_case.oracle_step) from the latents and Adam
moments the engine had before it ("teacher forcing"), so a comparison covers one step and
differences cannot compound through the quantizer's discontinuities.

Tolerance, per parameter and step, relative to the step's own update u = W_ref - W_k:
  bulk:     ||W_ds - W_ref|| <= UPDATE_RTOL * ||u|| after dropping the OUTLIERS largest
            elementwise differences (at least 4, 1 per 10^4 elements);
  outliers: every |W_ds - W_ref| <= 5 lr (an AdamW-CAGE step moves an element by at most
            lr |m_hat| / sqrt(v_hat) + lr lambda |e| + lr wd |w|, about lr here).
Legitimate differences: the ranks' gradient all-reduce / reduce-scatter sums in another order
than one backward (~1e-7 relative), amplified by Adam's 1 / sqrt(v) where the gradient is
near zero; and, rarely, a weight/activation code or trust-mask bit that flips at an exact
tie because of those ulps, which changes single elements by up to one Adam step (the
outliers). The quantization itself has no tolerance: every rank computes whole rows (cut
rows assembled from their holders), so the gathered weights must equal
cast(Quantizer.values(full latent)) element for element (_check_gathered). Measured bulk
ratios are <= 5e-4; a wrong cut row, row statistic, mask or rotation moves whole rows/blocks
by O(update) and fails the bulk bound by orders of magnitude.

Also checked here, sharing the launches: resume after save/load equals the uninterrupted run
bit for bit (ZeRO-1/2/3); cage_ds.zero.quant_stats equals cage_ds.nn.quant_stats of the
gathered latents at every N (fp32 and the bf16 cases, see QUANT_STATS_RTOL); and, at N = 2,
a second launch, a real torchrun (fresh interpreters: another PYTHONHASHSEED, a fresh
allocator), of the ZeRO-2/3 coupled cases
reproduces the first bit for bit (run to run).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from testkit import run_ranks, torchrun
from zero_case import LAMBDA, LR, make_batch, make_model_and_optimizer, oracle_step

from cage_ds.nn import quant_stats

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS, CKPT_AT = 3, 1
UPDATE_RTOL = 2e-3  # 4x the worst measured bulk ratio
EXTRA_WORLD = 3  # this launch also runs the bf16 smoke and the RTN weight quantizer cases
CASES = [(s, v) for s in (1, 2, 3) for v in ("decoupled", "coupled")]
REPEAT_WORLD, REPEAT_CASES = 2, ("2:coupled", "3:coupled")  # the determinism re-launch
# quant_stats: the sharded W - Q(W) and mask are the unsharded ones element for element (whole
# rows at every N); only the sums differ: float64 per piece vs the reference's float32
# torch.sum over <= 2^18 squares, relative error <= (log2 n + 1) u = 19 * 2^-24 ~ 1.1e-6 on
# numerator and denominator each, halved by the square root, plus a few ulps adding the 7
# layers: RTOL 4e-6. Masked fractions: exact (same mask, same counts).
QUANT_STATS_RTOL = 4e-6


def _launch(
    world: int,
    out: str,
    script: str = "zero_worker.py",
    args: tuple[str, ...] = (str(STEPS), str(CKPT_AT)),
    **extra_env: str,
) -> None:
    """``world`` CPU ranks of tests/dist/``script`` OUT ``args`` (testkit.run_ranks)."""
    env = {"CAGE_ZERO_EXTRA": "1" if world == EXTRA_WORLD else "0", **extra_env}
    run_ranks(world, os.path.join(HERE, script), out, *args, env=env)


def _check_gathered(log: list, where: str) -> None:
    """Gathered weight == cast(Quantizer.values(full latent)), element for element."""
    assert log, f"{where}: no gathered weights were checked"
    for entry in log:
        assert entry["mismatches"] == 0, f"{where}: {entry}"


def _check_steps(
    variant: str, trace: list, final: dict, where: str, method: str = "quest", first: int = 0
) -> dict:
    """Each traced step (0-based steps first, first + 1, ...) against oracle_step."""
    worst = {}
    nxt = [t[0] for t in trace[1:]] + [final]
    for k, ((w, m, v), w_next) in enumerate(zip(trace, nxt, strict=True), start=first):
        ref = oracle_step(variant, k, w, m, v, method)
        for n, want in ref.items():
            upd = (want - w[n]).norm()
            diff = (w_next[n] - want).abs().flatten()
            assert upd > 0, f"{where}: step {k} {n} did not move"
            assert float(diff.max()) <= 5 * LR, f"{where}: step {k} {n}: max diff {diff.max():.2e}"
            drop = max(4, diff.numel() // 10_000)
            ratio = float(diff.sort().values[:-drop].norm() / upd)
            worst[n] = max(worst.get(n, 0.0), ratio)
            assert ratio <= UPDATE_RTOL, (
                f"{where}: step {k} {n}: |W_ds - W_ref| / |update| = {ratio:.2e}"
            )
    return worst


def _check_bf16(out) -> None:
    """bf16: the gathered weights are cast_bf16(q(W H)) of the full latent; training moves W."""
    for stage, wrapper in ((1, "BF16_Optimizer"), (3, "DeepSpeedZeroOptimizer_Stage3")):
        res = torch.load(out / f"bf16_{stage}.pt", weights_only=False)
        assert res["wrapper"] == wrapper
        _check_gathered(res["gathered"], f"bf16 {wrapper}")
        assert all(res["moved"].values()), f"bf16 {wrapper}: some master weights did not move"
        assert all(torch.isfinite(torch.tensor(res["losses"]))), res["losses"]
        _check_quant_stats(res["quant_stats"], res["latents"], f"bf16 {wrapper}")


def _check_export(ckpt: str, world: int) -> None:
    """Latents (zero_to_fp32) -> codes + scales (safetensors) -> reload: the same loss."""
    from cage_ds.nn.export import load_packed
    from cage_ds.zero.export import export_quantized_checkpoint

    latent_model, _ = make_model_and_optimizer("decoupled")
    out = os.path.join(ckpt, "quantized.safetensors")
    state = export_quantized_checkpoint(ckpt, latent_model, out, tag="t")
    assert any(k.endswith(".weight.codes") for k in state)
    reloaded, _ = make_model_and_optimizer("decoupled")
    load_packed(out, reloaded)
    ids = make_batch(99)
    with torch.no_grad():
        want = latent_model(input_ids=ids, labels=ids).loss
        got = reloaded(input_ids=ids, labels=ids).loss
    assert torch.equal(got, want), f"N={world}: reloaded export loss {got} != latent loss {want}"


def _check_quant_stats(got: dict, latents: dict, where: str) -> None:
    """cage_ds.zero.quant_stats vs cage_ds.nn.quant_stats of an unsharded fake-quant model
    holding the same latents (weight keys; the activation fraction depends on the batch)."""
    model, _ = make_model_and_optimizer("decoupled")
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(latents[n])
    ids = make_batch(0)
    model(input_ids=ids, labels=ids)  # records the weight STE masks
    want = {k: v for k, v in quant_stats(model).items() if k != "quant/masked_frac/act"}
    assert "quant/rel_error/down_proj" in want and "quant/masked_frac/weight" in want, want
    assert set(want) <= set(got), f"{where}: quant_stats keys {sorted(got)} lack {sorted(want)}"
    for key, ref in want.items():
        bound = QUANT_STATS_RTOL * ref if key.startswith("quant/rel_error") else 0
        assert abs(got[key] - ref) <= bound, f"{where}: {key} {got[key]} vs {ref}"


def _check_repeat(first: dict, again: dict, where: str) -> None:
    """Two launches of the same case: identical per-step losses and final latents, bitwise."""
    assert first["losses"] == again["losses"], f"{where}: {first['losses']} {again['losses']}"
    for n, want in first["latents"].items():
        assert torch.equal(again["latents"][n], want), f"{where}: re-launch differs at {n}"


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 3])  # 4 cuts like 2, on row boundaries (zero_case)
def test_zero_cage_matches_single_process(world, tmp_path):
    assert LR * LAMBDA > 0  # the correction is active from step 1 (silence 0, constant lambda)
    _launch(world, str(tmp_path))
    if world == EXTRA_WORLD:
        _check_bf16(tmp_path)
        for stage in (2, 3):
            res = torch.load(tmp_path / f"rtn_{stage}.pt", weights_only=False)
            _check_gathered(res["gathered"], f"RTN ZeRO-{stage}")
            _check_steps("decoupled", res["trace"], res["latents"], f"RTN ZeRO-{stage}", "rtn")
    for stage, variant in CASES:
        where = f"N={world} ZeRO-{stage} {variant}"
        res = torch.load(tmp_path / f"{stage}_{variant}.pt", weights_only=False)
        _check_gathered(res["gathered"], where)
        worst = _check_steps(variant, res["trace"], res["latents"], where)
        print(where, "worst |dW|/|update|", f"{max(worst.values()):.2e}")
        _check_quant_stats(res["quant_stats"], res["latents"], where)
        if "resumed" in res:
            rs = res["resumed"]
            _check_gathered(rs["gathered"], where + " resumed")
            for n, want in res["latents"].items():
                assert torch.equal(rs["latents"][n], want), f"{where}: resumed run differs at {n}"
                assert torch.equal(rs["zero_to_fp32"][n], rs["at_ckpt"][n]), (
                    f"{where}: zero_to_fp32 {n}"
                )
            if stage == 3:
                _check_export(str(tmp_path / f"ckpt_{stage}"), world)
    if world == REPEAT_WORLD:
        again = tmp_path / "again"
        again.mkdir()
        env = {"CAGE_ZERO_CASES": ",".join(REPEAT_CASES), "PYTHONHASHSEED": "7"}
        torchrun(world, os.path.join(HERE, "zero_worker.py"), str(again), str(STEPS),
                 str(CKPT_AT), env=env)  # fmt: skip
        for case in REPEAT_CASES:
            name = case.replace(":", "_") + ".pt"
            first = torch.load(tmp_path / name, weights_only=False)
            _check_repeat(first, torch.load(again / name, weights_only=False), f"N=2 {case}")
