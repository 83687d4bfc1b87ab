"""Accuracy study: paired-seed FP / RTN / QuEST / CAGE runs and the table that says who wins.

    .venv/bin/python benchmarks/accuracy.py configs/studies/tiny_bundled.yaml   # run + report
    .venv/bin/python benchmarks/accuracy.py STUDY --report   # report of the finished runs only
    .venv/bin/python benchmarks/accuracy.py STUDY --quick    # 4 steps, 2 seeds: a smoke test

A study file (YAML) names arms (an experiment config + overrides), blocks (a step count, the
seeds, the arms) and overrides common to every run; see configs/studies/. Every (block, arm,
seed) is one single-rank cage-train run (train.seed sets init and data order, so arms that
differ only in the method see the same data in the same order). Runs execute in-process in
``--jobs`` worker processes (one torch thread each); a finished run is a line in
``<out>/results.jsonl`` and is never run again, so an interrupted study resumes where it
stopped (an unfinished run restarts from scratch). Every run is tracked in MLflow
(``<out>/mlflow.db`` unless ``--tracking-uri``); the report is logged as one more run.

The report (``<out>/report.md``, printed; the pairs also in ``<out>/summary.json``, which
``cage-train --reference`` reads): per block and arm the mean final validation loss
(sd over seeds), ||W - Q(W)|| / ||W||, tokens per non-embedding parameter, the step-time
ratio to FP (runs share the machine, so ratios are indicative), and for every arm with a
``vs:`` baseline the paired differences (cage_ds.train.report) with their verdict and the share of
the baseline's gap to FP recovered; ``<out>/<block>.png`` plots every arm's validation loss
and relative quantization error over the steps (mean over seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
QUICK_STEPS, QUICK_SEEDS = 4, 2
HF_EXPORT = "hf"
"""Folder in a run dir where a run that another block fine-tunes saves its model
(save_pretrained of the trained full-precision model)."""
PARENT_WAIT_S = 3600
STEP_TIME_SKIP = 3
"""Steps excluded from the mean step time (warm-up of allocator and caches)."""


@dataclass(frozen=True)
class Arm:
    """One method: an experiment config, its own overrides, the baseline it is paired with."""

    name: str
    config: Path
    overrides: tuple[str, ...] = ()
    vs: str | None = None


@dataclass(frozen=True)
class Block:
    """Arms trained for the same number of steps on the same seeds; with ``init_from``
    (arm, steps), each run fine-tunes the finished run of that arm and length on its seed
    (QAT fine-tuning from a trained checkpoint) instead of starting from scratch."""

    name: str
    steps: int
    seeds: tuple[int, ...]
    arms: tuple[str, ...]
    init_from: tuple[str, int] | None = None
    fp_arm: str | None = None
    """The block's full-precision reference arm (default: the study file's top-level fp_arm)."""


@dataclass(frozen=True)
class RunSpec:
    block: str
    arm: str
    seed: int
    steps: int
    config: Path
    overrides: tuple[str, ...]
    parent: str | None = None
    """Key of the run this one fine-tunes (its HF export is model.pretrained)."""

    @property
    def key(self) -> str:
        """The run's identity: blocks with the same step count share their arms' runs."""
        start = f"-from-{self.parent}" if self.parent else ""
        return f"{self.arm}-{self.steps}steps-seed{self.seed}{start}"


@dataclass
class Study:
    name: str
    output: Path
    common: tuple[str, ...]
    arms: dict[str, Arm]
    blocks: list[Block]
    notes: str = ""

    def runs(self, quick: bool = False) -> list[RunSpec]:
        """Every run of the study once, block by block, seed-major (pairs finish together)."""
        out: dict[str, RunSpec] = {}
        for b in self.blocks:
            for spec in self.block_runs(b, quick):
                out.setdefault(spec.key, spec)
        return list(out.values())

    def block_runs(self, b: Block, quick: bool = False) -> list[RunSpec]:
        """The runs of one block (a run of the same arm, length and seed in another block is
        the same run: same key, same overrides)."""
        steps = min(b.steps, QUICK_STEPS) if quick else b.steps
        seeds = b.seeds[:QUICK_SEEDS] if quick else b.seeds
        cadence = [f"train.eval_every={max(steps // 8, 1)}",
                   f"train.log_every={max(steps // 20, 1)}"]  # fmt: skip
        if quick:
            cadence.append("data.val_max_blocks=4")
        runs_dir = self.output_dir(quick) / "runs"
        out = []
        for seed in seeds:
            parent, start = None, []
            if b.init_from is not None:
                parent_arm, parent_steps = b.init_from
                parent_steps = min(parent_steps, QUICK_STEPS) if quick else parent_steps
                parent = f"{parent_arm}-{parent_steps}steps-seed{seed}"
                start = [f"model.pretrained={hf_export(self.output_dir(quick), parent)}"]
            for name in b.arms:
                arm = self.arms[name]
                key = RunSpec(b.name, name, seed, steps, arm.config, (), parent).key
                run = [f"train.steps={steps}", f"train.seed={seed}", f"train.run_name={key}",
                       f"train.output_dir={runs_dir}"]  # fmt: skip
                overrides = (*self.common, *cadence, *arm.overrides, *start, *run)
                out.append(RunSpec(b.name, name, seed, steps, arm.config, overrides, parent))
        return out

    def output_dir(self, quick: bool) -> Path:
        return self.output.with_name(self.output.name + "-quick") if quick else self.output

    def pending(self, quick: bool = False) -> list[RunSpec]:
        """The runs still to train: those without a record, and fine-tuning parents recorded
        without their HF export (trained before a block fine-tuned from them: they run again,
        exporting, and their record is replaced)."""
        out = self.output_dir(quick)
        done = read_results(out)
        unexported = {k for k in self.parents(quick) if not hf_export(out, k).is_dir()}
        return [s for s in self.runs(quick) if s.key not in done or s.key in unexported]

    def parents(self, quick: bool = False) -> set[str]:
        """Keys of the runs that fine-tuning runs start from (they export their model)."""
        return {s.parent for s in self.runs(quick) if s.parent is not None}


def _fail(msg: str) -> None:
    raise SystemExit(f"accuracy study: {msg}")


def load_study(path: str | Path) -> Study:
    """Parse and check a study file (arms exist, configs exist, baselines name arms)."""
    path = Path(path)
    if not path.is_file():
        _fail(f"study file {str(path)!r} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    known = {"name", "output", "fp_arm", "common", "arms", "blocks", "notes"}
    if unknown := set(raw) - known:
        _fail(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    arms = {}
    for name, body in (raw.get("arms") or {}).items():
        config = REPO / body["config"]
        if not config.is_file():
            _fail(f"{path}: arm {name!r}: config {body['config']!r} does not exist")
        arms[name] = Arm(name, config, tuple(body.get("overrides", ())), body.get("vs"))
    for arm in arms.values():
        if arm.vs is not None and arm.vs not in arms:
            _fail(f"{path}: arm {arm.name!r} is paired with unknown arm {arm.vs!r}")
    blocks = []
    for body in raw.get("blocks") or []:
        init = body.get("init_from")
        b = Block(body["name"], int(body["steps"]), tuple(body["seeds"]), tuple(body["arms"]),
                  None if init is None else (init["arm"], int(init["steps"])),
                  body.get("fp_arm", raw.get("fp_arm")))  # fmt: skip
        if b.fp_arm is not None and b.fp_arm not in arms:
            _fail(f"{path}: block {b.name!r}: fp_arm {b.fp_arm!r} is not an arm")
        if missing := [a for a in b.arms if a not in arms]:
            _fail(f"{path}: block {b.name!r} names unknown arms {missing}")
        if b.init_from is not None:
            if b.init_from[0] not in arms or arms[b.init_from[0]].config.stem != "fp":
                _fail(f"{path}: block {b.name!r}: init_from must name a full-precision arm")
        blocks.append(b)
    if not blocks:
        _fail(f"{path}: no blocks")
    output = Path(raw.get("output", f"runs/accuracy/{path.stem}"))
    return Study(
        raw.get("name", path.stem),
        output if output.is_absolute() else REPO / output,
        tuple(raw.get("common", ())),
        arms,
        blocks,
        raw.get("notes", ""),
    )


# ---------------------------------------------------------------- running


def _results_path(out: Path) -> Path:
    return out / "results.jsonl"


def read_results(out: Path) -> dict[str, dict[str, Any]]:
    """key -> record of every finished run (the last record wins)."""
    path = _results_path(out)
    if not path.is_file():
        return {}
    records = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            records[rec["key"]] = rec
    return records


def _quant_history(run_dir: Path) -> list[tuple[int, float]]:
    points = []
    with open(run_dir / "metrics.jsonl") as fh:
        for line in fh:
            rec = json.loads(line)
            if "quant/rel_error" in rec:
                points.append((rec["step"], rec["quant/rel_error"]))
    return points


def _step_time(run_dir: Path) -> float:
    times = []
    with open(run_dir / "metrics.jsonl") as fh:
        for line in fh:
            rec = json.loads(line)
            if "train/step_time_s" in rec:
                times.append(rec["train/step_time_s"])
    times = times[STEP_TIME_SKIP:] or times
    return sum(times) / len(times)


def hf_export(out: Path, key: str) -> Path:
    """Where run ``key`` saved its trained model for the runs that fine-tune it (whole once it
    exists: run_one renames it into place)."""
    return out / "runs" / key / HF_EXPORT


def _wait_for_parent(spec: RunSpec, out: Path) -> None:
    """Block until the run that ``spec`` fine-tunes is recorded with its HF export (another
    worker may train it)."""
    deadline = time.time() + PARENT_WAIT_S
    while spec.parent not in read_results(out) or not hf_export(out, spec.parent).is_dir():
        if time.time() > deadline:
            _fail(f"{spec.key}: its parent run {spec.parent} did not finish in {PARENT_WAIT_S} s")
        time.sleep(10)


def run_one(spec: RunSpec, out: Path, tracking: list[str], export_hf: bool) -> dict[str, Any]:
    """Train one run in this process and return its results.jsonl record; ``export_hf``: also
    save the trained model with save_pretrained under <run_dir>/hf (a fine-tuning parent)."""
    import shutil

    from cage_ds.train.config import load_config
    from cage_ds.train.loop import Trainer
    from cage_ds.train.model import preset_parameter_counts
    from cage_ds.train.recipe import total_steps

    if spec.parent is not None:
        _wait_for_parent(spec, out)
    cfg = load_config(spec.config, [*spec.overrides, *tracking])
    if cfg.run_dir.exists():  # an interrupted attempt: start clean
        shutil.rmtree(cfg.run_dir)
    cfg.train.progress = False
    t0 = time.time()
    trainer = Trainer(cfg)
    if export_hf and (cfg.quant.enabled or trainer.stage != 0):
        _fail(f"{spec.key}: a fine-tuning parent must be a full-precision run at deepspeed.stage=0")
    result = trainer.run()
    if export_hf:  # renamed into place whole: a waiting child never reads half a model
        partial = cfg.run_dir / f"{HF_EXPORT}.partial"
        trainer.engine.module.save_pretrained(partial)
        partial.rename(cfg.run_dir / HF_EXPORT)
    params = preset_parameter_counts(cfg.model)["non_embedding"]
    tokens = total_steps(cfg) * cfg.train.global_batch_size * cfg.data.seq_len
    return {
        "key": spec.key,
        "block": spec.block,
        "arm": spec.arm,
        "seed": spec.seed,
        "steps": result.steps,
        "method": result.method,
        "quant": result.quant,
        "val_loss": result.val_loss,
        "train_loss": result.train_loss,
        "quant_rel_error": result.quant_rel_error,
        "tokens": tokens,
        "tokens_per_param": tokens / params,
        "step_time_s": _step_time(cfg.run_dir),
        "wall_s": time.time() - t0,
        "run_dir": str(cfg.run_dir),
        "val_history": result.history["val/loss"],
        "quant_history": _quant_history(cfg.run_dir),
        "cage_lambda": cfg.optim.cage_lambda,
        "parent": spec.parent,
    }


def worker(study: Study, quick: bool, index: int, jobs: int, tracking: list[str]) -> None:
    """Run this worker's share (every jobs-th pending run from index) and append results."""
    import warnings

    warnings.filterwarnings("ignore")
    out = study.output_dir(quick)
    parents = study.parents(quick)
    for spec in study.pending(quick)[index::jobs]:
        rec = run_one(spec, out, tracking, export_hf=spec.key in parents)
        with open(_results_path(out), "a") as fh:  # one short line per write: appends whole
            fh.write(json.dumps(rec) + "\n")
        print(f"[{spec.key}] val loss {rec['val_loss']:.4f} ({rec['wall_s']:.0f} s)", flush=True)


def tracking_overrides(study: Study, out: Path, uri: str | None) -> list[str]:
    """Every run's tracking settings; ``uri`` '' (--no-tracking) turns tracking off."""
    if uri == "":
        return ["tracking.enabled=false"]
    uri = uri or f"sqlite:///{out / 'mlflow.db'}"
    return [
        "tracking.enabled=true",
        f"tracking.tracking_uri={uri}",
        f"tracking.experiment=accuracy-{study.name}",
        "tracking.system_metrics=false",
    ]


def run_study(study: Study, study_path: Path, quick: bool, jobs: int, uri: str | None) -> None:
    """Start ``jobs`` workers over the pending runs and wait for them; a failed worker fails."""
    out = study.output_dir(quick)
    out.mkdir(parents=True, exist_ok=True)
    pending = study.pending(quick)
    done = read_results(out)
    again = sum(s.key in done for s in pending)
    rerun = f" ({again} trained again for the HF export a fine-tuning block needs)" if again else ""
    print(f"accuracy study {study.name}: {len(pending)} runs pending{rerun}, {jobs} worker(s) "
          f"-> {out}")  # fmt: skip
    if not pending:
        return
    jobs = max(1, min(jobs, len(pending)))
    _create_experiment(study, out, uri)  # once, before workers race to create the store
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("CAGE_STUDY_THREADS", "1"),
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # every worker is its own single-rank job
    procs = []
    for i in range(jobs):
        cmd = [sys.executable, __file__, str(study_path), "--worker", f"{i}/{jobs}"]
        cmd += ["--quick"] if quick else []
        cmd += ["--tracking-uri", uri] if uri is not None else []
        log = open(out / f"worker{i}.log", "a")
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    failed = []
    for i, (proc, log) in enumerate(procs):
        if proc.wait() != 0:
            failed.append(f"worker {i} exited {proc.returncode}: see {out / f'worker{i}.log'}")
        log.close()
    if failed:
        _fail("; ".join(failed))


# ---------------------------------------------------------------- report


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def block_table(
    study: Study, block: Block, records: Sequence[dict[str, Any]], fp: dict[int, dict[str, Any]]
) -> tuple[list[str], list[dict[str, Any]]]:
    """Markdown lines of one block (per arm means, paired differences vs its baseline) and
    the summary.json entries of its pairs; ``fp``: seed -> the full-precision reference run
    (the block's FP arm, or for fine-tuning the FP run it starts from)."""
    from cage_ds.train.report import gap_recovered, mean_sd, paired

    by_arm: dict[str, dict[int, dict]] = defaultdict(dict)
    for r in records:
        by_arm[r["arm"]][r["seed"]] = r
    fp_loss = mean_sd([r["val_loss"] for r in fp.values()])[0] if fp else None
    fp_time = mean_sd([r["step_time_s"] for r in fp.values()])[0] if fp else None
    steps = next(iter(records))["steps"]
    tpp = next(iter(records))["tokens_per_param"]
    start = (
        ""
        if block.init_from is None
        else (f", fine-tuning the {block.init_from[1]}-step {block.init_from[0]} run of each seed")
    )
    lines = [
        f"### {block.name}: {steps} steps, {tpp:.2f} tokens per non-embedding parameter{start}",
        "",
        "| arm | n | val loss (sd) | rel. error | step time / FP | vs | paired diff "
        "(sd) | t | gap to FP recovered | verdict |",
        "|" + "---|" * 10,
    ]
    entries: list[dict[str, Any]] = []
    for name in block.arms:
        runs = by_arm.get(name, {})
        if not runs:
            lines.append(f"| {name} | 0 | pending | | | | | | | |")
            continue
        loss, sd = mean_sd([r["val_loss"] for r in runs.values()])
        errs = [r["quant_rel_error"] for r in runs.values() if r["quant_rel_error"] is not None]
        err = mean_sd(errs)[0] if errs else None
        step_time = mean_sd([r["step_time_s"] for r in runs.values()])[0]
        time_ratio = step_time / fp_time if fp_time else None
        arm = study.arms[name]
        cells = [name, str(len(runs)), f"{loss:.4f} ({_fmt(sd)})", _fmt(err), _fmt(time_ratio, 2)]
        base = by_arm.get(arm.vs or "", {})
        seeds = sorted(set(runs) & set(base))
        if arm.vs and seeds:
            p = paired([runs[s]["val_loss"] for s in seeds], [base[s]["val_loss"] for s in seeds])
            base_loss = mean_sd([base[s]["val_loss"] for s in seeds])[0]
            arm_loss = mean_sd([runs[s]["val_loss"] for s in seeds])[0]
            gap = gap_recovered(arm_loss, base_loss, fp_loss) if fp_loss is not None else None
            t = p.t
            entries.append({
                "block": block.name, "steps": steps, "tokens_per_param": tpp, "arm": name,
                "config": str(arm.config.relative_to(REPO)), "overrides": list(arm.overrides),
                "vs": arm.vs, "vs_config": str(study.arms[arm.vs].config.relative_to(REPO)),
                "vs_overrides": list(study.arms[arm.vs].overrides), "seeds": seeds,
                "n": p.n, "mean": p.mean, "sd": p.sd, "t": t, "gap_recovered": gap,
                "verdict": p.verdict(),
            })  # fmt: skip
            cells += [
                arm.vs,
                f"{p.mean:+.4f} ({_fmt(p.sd)})",
                "-" if t is None else f"{t:+.1f}",
                "-" if gap is None else f"{100 * gap:+.0f} %",
                p.verdict(),
            ]
        else:
            cells += ["-"] * 5
        lines.append("| " + " | ".join(cells) + " |")
    return lines, entries


def plot_block(block: Block, records: Sequence[dict[str, Any]], path: Path) -> Path:
    """Validation loss and ||W - Q(W)|| / ||W|| over the steps, mean over seeds, every arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    try:
        for name in block.arms:
            runs = [r for r in records if r["arm"] == name]
            for ax, key in ((ax_loss, "val_history"), (ax_err, "quant_history")):
                series = defaultdict(list)
                for r in runs:
                    for step, value in r[key]:
                        series[step].append(value)
                if series:
                    steps = sorted(series)
                    ax.plot(
                        steps,
                        [sum(series[s]) / len(series[s]) for s in steps],
                        label=f"{name} (n={len(runs)})",
                    )
        ax_loss.set(xlabel="step", ylabel="validation loss", title=f"{block.name}: val loss")
        ax_err.set(
            xlabel="step",
            ylabel="||W - Q(W)|| / ||W||",
            title=f"{block.name}: latent quantization error",
        )
        for ax in (ax_loss, ax_err):
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def report(study: Study, quick: bool, uri: str | None) -> str:
    """Write report.md and one plot per block; log them to MLflow; return the markdown."""
    out = study.output_dir(quick)
    records = read_results(out)
    lines = [f"# Accuracy study `{study.name}`{' (quick)' if quick else ''}", ""]
    if study.notes:
        lines += [study.notes.strip(), ""]
    plots, summary = [], []
    for block in study.blocks:
        keys = {s.key for s in study.block_runs(block, quick)}
        rs = [r for r in records.values() if r["key"] in keys]
        if not rs:
            lines += [f"### {block.name}: pending", ""]
            continue
        if block.init_from is None or block.fp_arm in block.arms:
            fp = {r["seed"]: r for r in rs if r["arm"] == block.fp_arm}
        else:  # fine-tuning without an FP fine-tuning arm: the FP run it starts from
            parents = {s.seed: s.parent for s in study.block_runs(block, quick)}
            fp = {seed: records[key] for seed, key in parents.items() if key in records}
        table, entries = block_table(study, block, rs, fp)
        lines += [*table, ""]
        summary += entries
        plots.append(plot_block(block, rs, out / f"{block.name}.png"))
        lines += [f"![{block.name}]({block.name}.png)", ""]
    text = "\n".join(lines)
    (out / "report.md").write_text(text + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    _log_report(study, out, uri, [out / "report.md", out / "summary.json", *plots])
    return text


def _create_experiment(study: Study, out: Path, uri: str | None) -> None:
    """The study's MLflow experiment, its artifacts under <out>/mlartifacts (not ./mlruns)."""
    if uri == "":
        return
    import mlflow

    mlflow.set_tracking_uri(uri or f"sqlite:///{out / 'mlflow.db'}")
    name = f"accuracy-{study.name}"
    if mlflow.get_experiment_by_name(name) is None:
        mlflow.create_experiment(name, artifact_location=(out / "mlartifacts").as_uri())
    mlflow.set_experiment(name)


def _log_report(study: Study, out: Path, uri: str | None, files: Sequence[Path]) -> None:
    if uri == "":
        return
    import mlflow

    _create_experiment(study, out, uri)
    with mlflow.start_run(run_name="report"):
        for f in files:
            mlflow.log_artifact(str(f))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("study", type=Path, help="study file, e.g. configs/studies/tiny_bundled.yaml")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps, {QUICK_SEEDS} seeds")
    p.add_argument("--report", action="store_true", help="only write the report of finished runs")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default <out>/mlflow.db)")
    p.add_argument("--no-tracking", action="store_true", help="no MLflow (e.g. not installed)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    study = load_study(args.study)
    out = study.output_dir(args.quick)
    if args.no_tracking:
        args.tracking_uri = ""
    if args.worker is not None:
        index, jobs = (int(x) for x in args.worker.split("/"))
        worker(study, args.quick, index, jobs, tracking_overrides(study, out, args.tracking_uri))
        return 0
    if args.jobs < 1:
        _fail(f"--jobs must be >= 1, got {args.jobs}")
    if not args.report:
        _check_configs(study, args.quick)
        run_study(study, args.study, args.quick, args.jobs, args.tracking_uri)
    print(report(study, args.quick, args.tracking_uri))
    return 0


def _check_configs(study: Study, quick: bool) -> None:
    """Resolve and validate every run's config before any worker starts (fine-tuning runs:
    resolve only)."""
    from cage_ds.train.config import ConfigError, load_config
    from cage_ds.train.preflight import validate

    for spec in study.runs(quick):
        try:
            cfg = load_config(spec.config, spec.overrides)
            if spec.parent is None:  # a fine-tuning run's model exists once its parent ran
                validate(cfg, 1)
        except ConfigError as err:
            _fail(f"{spec.key}: {err}")


if __name__ == "__main__":
    sys.exit(main())
