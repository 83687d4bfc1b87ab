"""CageTrainer under DeepSpeed ZeRO-1, ZeRO-2 and ZeRO-3 on 2 CPU ranks (gloo), with and
without gradient accumulation: the same training as cage_ds.zero.initialize with a
hand-written loop (tests/dist/hf_trainer_worker.py).

Bit for bit: the Trainer's per-rank loss is sum / N_global * world (num_items_in_batch,
average_tokens_across_devices) and the hand loop's the mean sum / N_local; with equal token
counts N_global = world * N_local, world = 2 is a power of two, so both round the same real
and their gradients are the same floats. With GA micro batches per step (GA a power of two)
the Trainer's loss is sum / (GA N_global) * world = mean / GA, exactly what DeepSpeed's
engine.backward makes of the hand loop's mean (scale_wrt_gas), so the recorded Trainer loss
times GA is the hand loop's. Everything else (config, data rows, optimizer
settings, the CAGE ops) is identical, so any difference is a wiring bug.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_zero_cage import _check_gathered, _launch

WORLD, STEPS = 2, 3
EVAL_RTOL = 1e-6
TELEMETRY = ("quant/rel_error", "quant/masked_frac/weight", "quant/masked_frac/act", "train/lambda")


@pytest.mark.slow
@pytest.mark.parametrize("stage, ga, mode", [(1, 1, ""), (2, 1, ""), (3, 1, "eval"), (3, 2, "")])
def test_cage_trainer_equals_hand_loop(tmp_path, stage, ga, mode):
    """mode "eval": trainer.evaluate() runs before train(): its loss is the fake-quant model's
    (EVAL_RTOL: the ranks' losses averaged in another order) and train() after it still
    equals the hand loop."""
    args = (str(STEPS), str(stage), str(ga)) + ((mode,) if mode else ())
    _launch(WORLD, str(tmp_path), script="hf_trainer_worker.py", args=args)
    ranks = torch.load(tmp_path / "result.pt", weights_only=False)
    for rank, res in enumerate(ranks):
        where = f"ZeRO-{stage} GA {ga} rank {rank}"
        trainer, hand = [loss * ga for loss in res["trainer_losses"]], res["hand_losses"]
        assert len(trainer) == STEPS * ga and trainer == hand, f"{where}: {trainer} vs {hand}"
        assert res["attached"] and res["client_is_cage"], where
        if mode == "eval":
            got, want = res["eval_loss"], res["eval_ref"]
            assert abs(got - want) <= EVAL_RTOL * want, f"{where}: eval {got} vs {want}"
        assert res["client_state"] > 0 and res["last_lambda"] > 0, where
        _check_gathered(res["gathered"], where)
        logged = [h for h in res["log_history"] if "loss" in h]
        assert len(logged) == STEPS, f"{where}: {res['log_history']}"
        for entry in logged:
            missing = [k for k in TELEMETRY if k not in entry]
            assert not missing, f"{where}: step {entry['step']} lacks {missing}"
            assert entry["train/lambda"] > 0 and 0 < entry["quant/rel_error"] < 1, entry


def _step_logs(history: list[dict]) -> list[dict]:
    return [{k: h[k] for k in ("step", "loss", "train/lambda")} for h in history if "loss" in h]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [3])  # ZeRO-2 resumes through the same Trainer path
def test_cage_trainer_resume_equals_uninterrupted(tmp_path, stage):
    """train(resume_from_checkpoint=checkpoint-2) in a second launch continues as the
    uninterrupted 4-step run (tests/dist/hf_trainer_resume_worker.py), bit for bit: losses
    of steps 3-4 (and their logged loss and lambda), final latents and Adam moments, CAGE step
    counters and lambda; the forward weights after resuming are Q(latent)."""
    for phase in ("A", "B"):
        _launch(
            WORLD, str(tmp_path), script="hf_trainer_resume_worker.py", args=(str(stage), phase)
        )
    a, b = (torch.load(tmp_path / f"{p}.pt", weights_only=False) for p in ("A", "B"))
    for rank, (ra, rb) in enumerate(zip(a, b, strict=True)):
        where = f"ZeRO-{stage} rank {rank}"
        got, want = rb["losses"], ra["losses"]
        assert len(want) == 4 and got == want[2:], f"{where}: resumed {got} vs {want}"
        for name, w in ra["latents"].items():
            assert torch.equal(rb["latents"][name], w), f"{where}: latent {name} differs"
        for which, m_b, m_a in zip(
            ("exp_avg", "exp_avg_sq"), rb["moments"], ra["moments"], strict=True
        ):
            for name, w in m_a.items():
                assert torch.equal(m_b[name], w), f"{where}: {which} of {name} differs"
        assert ra["steps"] and rb["steps"] == ra["steps"] == [4.0] * len(ra["steps"]), where
        assert rb["last_lambda"] == ra["last_lambda"] > 0, where
        logs_a, logs_b = _step_logs(ra["log_history"]), _step_logs(rb["log_history"])
        assert logs_b == logs_a, f"{where}: {logs_b} vs {logs_a}"  # 1-2 from trainer_state
        _check_gathered(rb["gathered"], where)
