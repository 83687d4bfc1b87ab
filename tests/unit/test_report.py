"""The report of finished runs: the loss-curve PNG and the eval table (Markdown, CSV); paired
comparisons: the statistics (against a hand computation), the verdicts, the share of the gap
recovered, and how a launch's runs are paired and judged against a study summary."""

from __future__ import annotations

import csv
import json
import math
import random

import pytest

from cage_ds.train.report import (
    format_eval_table,
    gap_recovered,
    paired,
    paired_report,
    save_eval_table,
    save_loss_curve,
)


def test_paired_statistics_match_a_hand_computation():
    rng = random.Random(11)
    base = [rng.uniform(3, 5) for _ in range(5)]
    diffs = [rng.gauss(-0.01, 0.004) for _ in range(5)]
    p = paired([b + d for b, d in zip(base, diffs, strict=True)], base)
    mean = sum(diffs) / 5
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 4)
    assert (p.n, p.mean, p.sd) == (5, pytest.approx(mean), pytest.approx(sd))
    assert p.t == pytest.approx(mean / (sd / math.sqrt(5)))


def test_verdicts_separate_signal_from_noise():
    assert paired([1.0, 2.0, 3.0], [1.02, 2.021, 3.019]).verdict().startswith("better")
    assert paired([1.02, 2.021, 3.019], [1.0, 2.0, 3.0]).verdict().startswith("worse")
    assert paired([1.001, 1.999, 3.0], [1.0, 2.0, 3.0]).verdict().startswith("no difference")
    one = paired([1.003], [1.0])
    assert one.sd is None and one.t is None
    assert "cannot separate" in one.verdict()
    assert one.verdict(reference_sd=0.01).startswith("no difference")
    assert one.verdict(reference_sd=0.001).startswith("worse")
    with pytest.raises(ValueError, match="2 method values vs 1 base"):
        paired([1.0, 2.0], [1.0])


def test_gap_recovered():
    assert gap_recovered(3.38, 3.39, 3.36) == pytest.approx(1 / 3)
    assert gap_recovered(3.40, 3.39, 3.36) == pytest.approx(-1 / 3)
    assert gap_recovered(3.30, 3.35, 3.36) is None  # no gap to recover


def run(name, method, loss, seed=0, quant="w4a4", steps=80):
    return {"name": name, "method": method, "quant": quant, "steps": steps, "seed": seed,
            "val_loss": loss}  # fmt: skip


def test_a_launch_pairs_cage_with_quest_of_the_same_bits_seed_and_length(tmp_path):
    runs = [run("fp", "fp", 5.0), run("quest_w4a4", "quest", 5.05), run("cage_w4a4", "cage", 5.049),
            run("quest_w3a3", "quest", 5.1, quant="w3a3")]  # fmt: skip
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps([
        {"arm": "cage_w4a4", "vs": "quest_w4a4", "overrides": ["optim.cage_lambda=10"],
         "steps": 80, "n": 3, "mean": 0.0004, "sd": 0.002, "verdict": "no difference"},
        {"arm": "cage_w4a4", "vs": "quest_w4a4", "overrides": [], "steps": 800, "n": 3,
         "mean": -0.01, "sd": 0.0001, "verdict": "better", "tokens_per_param": 3.12,
         "gap_recovered": 0.0912},
        {"arm": "cage_w4a4", "vs": "quest_w4a4", "overrides": [], "steps": 800, "n": 3,
         "mean": -0.02, "sd": 0.0001, "verdict": "a second block of the same length"},
        {"arm": "cage_w4a4", "vs": "quest_w4a4", "overrides": [], "steps": 300, "n": 3,
         "mean": 0.002, "sd": 0.0001, "verdict": "worse", "gap_recovered": -0.1},
        {"arm": "cage_w4a4", "vs": "quest_w4a4", "overrides": [], "steps": 40, "n": 3,
         "mean": 0.003, "sd": 0.0001, "verdict": "shorter"},
        {"arm": "cage_w4a4", "vs": "quest_w4a4", "overrides": [], "steps": 1600, "n": 1,
         "mean": -0.03, "sd": None, "verdict": "one seed"},
        {"arm": "cage_w4a4_x", "vs": "quest_w4a4", "overrides": [], "steps": 80, "n": 3,
         "mean": 0.5, "sd": 0.0001, "verdict": "worse"},
    ]))  # fmt: skip
    text = paired_report(runs, summary)
    assert "cage_w4a4 - quest_w4a4 (w4a4, seed 0, 80 steps): val loss -0.0010" in text
    assert "(cage_w4a4: optim.cage_lambda=10): 3 seeds at 80 steps, mean +0.0004, sd 0.0020" in text
    assert "this run: no difference beyond noise" in text and "quest_w3a3" not in text
    longer = [line.strip() for line in text.splitlines() if "study, longer" in line]
    assert longer == ["study, longer: 300 steps: +0.0020 (worse)",
                      "study, longer: 800 steps (3.1 tokens/param): -0.0100, 9 % of the gap to FP "
                      "recovered (better)"]  # fmt: skip
    runs[2]["note"] = "CAGE correction off: too short"
    assert "    CAGE correction off: too short\n    this run:" in paired_report(runs, summary)
    off = [run("quest_w4a4", "quest", 5.05), {**run("cage_w4a4", "cage", 5.05), "note": "off"}]
    assert "this run: identical to QuEST (the correction was off)" in paired_report(off)
    alone = paired_report(runs)
    assert "cannot separate" in alone and "study" not in alone
    assert paired_report([run("fp", "fp", 5.0), run("quest_w4a4", "quest", 5.05)]) == ""


def test_loss_curve_png_and_eval_table(tmp_path):
    import matplotlib.image

    png = save_loss_curve(
        {"train": [(0, 4.0), (1, 3.0), (2, 2.5)], "val": [(2, 2.7)]}, tmp_path / "curve.png"
    )
    image = matplotlib.image.imread(png)
    assert image.shape[:2] == (400, 700)
    assert image.std() > 0  # something was drawn
    rows = [
        {"variant": "fp", "val_loss": 2.5, "ppl": 12.18},
        {"variant": "cage", "val_loss": 2.6, "ppl": 13.46},
    ]
    csv_path = save_eval_table(rows, tmp_path / "eval.csv")
    with open(csv_path) as fh:
        back = list(csv.DictReader(fh))
    assert back == [{k: str(v) for k, v in row.items()} for row in rows]
    assert format_eval_table(rows).splitlines()[2] == "| fp | 2.5 | 12.18 |"
    with pytest.raises(ValueError, match="row 1 has keys"):
        format_eval_table([{"a": 1}, {"b": 2}])
