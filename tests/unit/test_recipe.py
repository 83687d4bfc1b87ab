"""The run's recipe: a CAGE strength S = sum_t lr_t lambda_t resolves to the lambda that reaches
it on the run's own lr schedule (so a recipe carries over between run lengths), unstable
lambdas are refused, and per-config overrides of a comparison launch reach one config only."""

from __future__ import annotations

import random

import pytest

from cage_ds.optim.schedule import lambda_for_strength, peak_pull, strength
from cage_ds.train.cli import split_overrides
from cage_ds.train.config import CONFIGS_DIR, ConfigError, load_config
from cage_ds.train.recipe import learning_rates, resolve_cage_lambda, total_steps

CAGE = CONFIGS_DIR / "experiments" / "cage_w4a4.yaml"
QUEST = CONFIGS_DIR / "experiments" / "quest_w4a4.yaml"
ON = ["optim.cage_min_tokens_per_param=null"]
"""The shipped recipe keeps the correction off in short runs; these tests look at it acting."""


def test_strength_is_the_sum_of_lr_times_lambda_over_the_run():
    rng = random.Random(3)
    lrs = [rng.uniform(1e-4, 3e-3) for _ in range(50)]
    # silence 0.8 of 50 steps: steps 41..50 act, ramping (k/50 - 0.8) / 0.2 up to 1
    expected = sum(lrs[k - 1] * 10.0 * (k / 50 - 0.8) / 0.2 for k in range(41, 51))
    assert strength(lrs, 10.0, 0.8, "linear_ramp") == pytest.approx(expected, rel=1e-12)
    assert strength(lrs, 10.0, 0.8, "constant") == pytest.approx(10 * sum(lrs[40:]), rel=1e-12)
    assert peak_pull(lrs, 10.0, 0.0, "constant") == pytest.approx(10 * max(lrs))


@pytest.mark.parametrize("steps", [80, 300, 2000])
def test_a_strength_resolves_to_the_lambda_that_reaches_it(steps):
    cfg = load_config(CAGE, [*ON, "optim.cage_lambda=0", "optim.cage_strength=0.7",
                             f"train.steps={steps}"])  # fmt: skip
    lam = resolve_cage_lambda(cfg, total_steps(cfg))
    lrs = learning_rates(cfg, steps)
    assert strength(lrs, lam, 0.8, "linear_ramp") == pytest.approx(0.7, rel=1e-9)
    # the official defaults (lambda 10) reach about 0.7 at 2000 steps of the tiny preset
    if steps == 2000:
        assert lam == pytest.approx(10 * 0.7 / 0.709, rel=0.01)
    assert cfg.method == "cage"


def test_the_next_lr_order_corrects_at_the_lr_after_the_scheduler_step():
    """optim.cage_lr_order=next: the correction of step t uses lr_{t+1}; the optimizer gets
    lr_{t+1} / lr_t as next_lr_ratio, and a strength resolves on the shifted lrs."""
    import torch

    from cage_ds.train.loop import build_optimizer
    from cage_ds.train.recipe import warmup_cosine

    steps = 80
    step_cfg = load_config(CAGE, [*ON, f"train.steps={steps}"])
    cfg = load_config(CAGE, [*ON, f"train.steps={steps}", "optim.cage_lr_order=next"])
    lr, w, m = cfg.optim.lr, cfg.optim.warmup_fraction, cfg.optim.min_lr_ratio
    want = [lr * warmup_cosine(t + 1, steps, w, m) for t in range(1, steps + 1)]
    assert learning_rates(cfg, steps) == want
    assert learning_rates(step_cfg, steps) == [lr * warmup_cosine(t, steps, w, m)
                                               for t in range(1, steps + 1)]  # fmt: skip
    model = torch.nn.Linear(4, 4)
    opt = build_optimizer(cfg, model, steps, 0, 10.0)
    assert build_optimizer(step_cfg, model, steps, 0, 10.0).next_lr_ratio is None
    for t in (1, 8, 9, 40, 79, 80):
        assert opt.next_lr_ratio(t) == pytest.approx(
            want[t - 1] / (lr * warmup_cosine(t, steps, w, m))
        )
    strong = load_config(CAGE, [*ON, "optim.cage_lambda=0", "optim.cage_strength=0.7",
                                f"train.steps={steps}", "optim.cage_lr_order=next"])  # fmt: skip
    lam = resolve_cage_lambda(strong, steps)
    assert strength(want, lam, 0.8, "linear_ramp") == pytest.approx(0.7, rel=1e-9)
    with pytest.raises(ConfigError, match="cage_lr_order='next' applies to the decoupled"):
        load_config(CAGE, [*ON, "optim.cage_lr_order=next", "optim.cage_variant=coupled"])


def test_a_raw_lambda_resolves_to_itself_and_quest_to_zero():
    cfg = load_config(CAGE, [*ON, "train.steps=300"])
    assert resolve_cage_lambda(cfg, 300) == 10.0
    assert resolve_cage_lambda(load_config(QUEST, ["train.steps=300"]), 300) == 0.0


def test_lambda_and_strength_together_is_an_error():
    with pytest.raises(ConfigError, match=r"cage_lambda=10\.0 and optim\.cage_strength=0\.5"):
        load_config(CAGE, [*ON, "optim.cage_strength=0.5"])


def test_an_unreachable_strength_names_the_silence():
    with pytest.raises(ValueError, match="never acts"):
        lambda_for_strength(0.5, [1e-3] * 10, 1.0, "linear_ramp")


def test_a_lambda_that_would_overshoot_the_grid_is_refused():
    cfg = load_config(CAGE, [*ON, "optim.cage_lambda=2000", "train.steps=80"])
    with pytest.raises(ConfigError, match=r"max_t lr_t lambda_t = 0.6 over 80 steps"):
        resolve_cage_lambda(cfg, 80)
    strong = load_config(CAGE, [*ON, "optim.cage_lambda=0", "optim.cage_strength=50",
                                "train.steps=80"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"cage_strength=50\.0 resolves to lambda="):
        resolve_cage_lambda(strong, 80)


def test_scoped_overrides_reach_one_config_and_values_may_hold_colons():
    paths = [str(QUEST), str(CAGE)]
    per = split_overrides(
        ["train.steps=5", "cage_w4a4:optim.cage_lambda=20", "tracking.tracking_uri=sqlite:///a.db"],
        paths,
    )
    assert per[0] == ["train.steps=5", "tracking.tracking_uri=sqlite:///a.db"]
    assert per[1] == [
        "train.steps=5",
        "optim.cage_lambda=20",
        "tracking.tracking_uri=sqlite:///a.db",
    ]
    cfgs = [load_config(p, o) for p, o in zip(paths, per, strict=True)]
    assert (cfgs[0].optim.cage_lambda, cfgs[1].optim.cage_lambda) == (0.0, 20.0)
    with pytest.raises(ConfigError, match="scope 'cage_w3a3' must name exactly one --config"):
        split_overrides(["cage_w3a3:optim.cage_lambda=20"], paths)


def test_below_the_token_floor_the_correction_is_off_and_says_why():
    from cage_ds.train.recipe import cage_off_reason, tokens_per_param

    floor = ["optim.cage_min_tokens_per_param=1.0"]
    short = load_config(CAGE, [*ON, *floor, "train.steps=80"])  # 80 x 16 x 128 tokens / 0.52M
    norms = 2 * 2 * 128 + 128  # 2 layers x 2 RMSNorms + the final one
    assert tokens_per_param(short, 80) == pytest.approx(80 * 16 * 128 / (524288 + norms))
    assert resolve_cage_lambda(short, 80) == 0.0
    assert "0.31 tokens per non-embedding parameter" in cage_off_reason(short, 80)
    assert short.method == "cage"  # still the CAGE recipe; the pairing sees it
    long = load_config(CAGE, [*ON, *floor, "train.steps=800"])
    assert cage_off_reason(long, 800) is None and resolve_cage_lambda(long, 800) == 10.0
    assert cage_off_reason(load_config(QUEST, [*floor, "train.steps=80"]), 80) is None
    with pytest.raises(ConfigError, match=r"cage_min_tokens_per_param must be >= 0, got -1"):
        load_config(CAGE, [*ON, "optim.cage_min_tokens_per_param=-1"])


def test_the_token_count_works_inside_a_live_zero3_run():
    """cage-train resolves lambda after building the model under a live ZeRO-3
    HfDeepSpeedConfig; counting parameters must not go through ZeRO-3 initialization."""
    from transformers.integrations import HfDeepSpeedConfig

    from cage_ds.train.recipe import tokens_per_param

    cfg = load_config(CAGE, ["train.steps=80"])
    keep_alive = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_batch_size": 1})
    assert tokens_per_param(cfg, 80) == pytest.approx(0.312, abs=1e-3)
    assert resolve_cage_lambda(cfg, 80) == 0.0  # below the shipped recipe's floor
    del keep_alive
