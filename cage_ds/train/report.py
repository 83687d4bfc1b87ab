"""What finished runs report: a run's validation table and loss curve (its artifacts), and
paired comparisons of runs, the statistics behind "does CAGE beat QuEST here?".

Two runs are paired when they share the seed (model init and data order) and the run length
and differ only in the method; for pairs i = 1..n with d_i = loss(CAGE)_i - loss(QuEST)_i:

    mean = sum d_i / n,  sd = sqrt(sum (d_i - mean)^2 / (n - 1)),  t = mean / (sd / sqrt(n))

A difference counts as real only when |mean| > 2 sd / sqrt(n) (|t| > 2, about a 95 % two-sided
interval for large n; with n = 3 a t of 2 is weak evidence, and the text says so); with a
single pair there is no sd, so the verdict refers to the seed-to-seed spread measured
elsewhere, if given. The share of the baseline's gap to full precision that a method
recovers is (loss(base) - loss(method)) / (loss(base) - loss(FP)) on the means.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------- tables and plots of runs


def save_loss_curve(
    series: Mapping[str, Sequence[tuple[int, float]]],
    path: str | os.PathLike,
    title: str = "loss",
) -> Path:
    """Plot each named series of (step, value) points on one log-y axis into a PNG (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        for name, points in series.items():
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, label=name, marker="." if len(points) < 50 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(title)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def _table_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The shared column names of ``rows``; an error names the first row that differs."""
    if not rows:
        raise ValueError("eval table: no rows")
    columns = list(rows[0])
    for i, row in enumerate(rows):
        if list(row) != columns:
            raise ValueError(f"eval table: row {i} has keys {list(row)}, expected {columns}")
    return columns


def format_eval_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows of equal keys -> a Markdown table (floats with 4 significant digits)."""
    columns = _table_columns(rows)

    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def save_eval_table(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write rows as CSV (``.csv``) or a Markdown table (any other suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=_table_columns(rows))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text(format_eval_table(rows) + "\n")
    return path


# ---------------------------------------------------------------- paired comparisons


@dataclass(frozen=True)
class Paired:
    """Summary of paired differences d_i = method_i - base_i (lower loss is better)."""

    n: int
    mean: float
    sd: float | None
    """Sample sd (n - 1); None for a single pair."""

    @property
    def t(self) -> float | None:
        """mean / (sd / sqrt(n)); None without an sd, inf when every pair is equal and nonzero."""
        if self.sd is None:
            return None
        if self.sd == 0:
            return 0.0 if self.mean == 0 else math.copysign(math.inf, self.mean)
        return self.mean / (self.sd / math.sqrt(self.n))

    def verdict(self, reference_sd: float | None = None) -> str:
        """One plain sentence: better, worse, or no difference beyond noise.

        ``reference_sd``: the sd of single-pair differences measured in another study at the
        same setting, used when this comparison has one pair only.
        """
        if self.n == 0:
            return "no paired runs"
        sd = self.sd if self.sd is not None else reference_sd
        if sd is None:
            return (
                f"one pair (difference {self.mean:+.4f}): one seed cannot separate a method "
                "from seed noise"
            )
        half_width = 2 * sd / math.sqrt(self.n)
        noise = f"|mean| {abs(self.mean):.4f} vs 2 sd/sqrt(n) = {half_width:.4f}"
        if self.sd is None:
            noise += " (sd from the reference study)"
        if abs(self.mean) <= half_width:
            return f"no difference beyond noise ({noise})"
        side = "better (lower loss)" if self.mean < 0 else "worse (higher loss)"
        return f"{side} beyond noise ({noise})"


def paired(method: Sequence[float], base: Sequence[float]) -> Paired:
    """Paired differences method_i - base_i (equal-length sequences, same seed order)."""
    if len(method) != len(base):
        raise ValueError(f"paired: {len(method)} method values vs {len(base)} base values")
    d = [m - b for m, b in zip(method, base, strict=True)]
    n = len(d)
    if n == 0:
        return Paired(0, math.nan, None)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else None
    return Paired(n, mean, sd)


def gap_recovered(method: float, base: float, full_precision: float) -> float | None:
    """(base - method) / (base - FP): the share of the base's gap to FP the method closes
    (1 = FP quality, 0 = no better than base, < 0 = worse); None when there is no gap."""
    gap = base - full_precision
    if gap <= 0:
        return None
    return (base - method) / gap


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """(mean, sample sd or None for fewer than two values)."""
    n = len(values)
    if n == 0:
        return math.nan, None
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return mean, sd


# ---------------------------------------------------------------- runs of one cage-train launch


def pair_runs(runs: Sequence[Mapping[str, Any]]) -> list[tuple[Mapping, Mapping]]:
    """(CAGE run, QuEST run) pairs among ``runs`` (dicts with name, method, quant, steps, seed,
    val_loss, and optionally a note to print with the pair): same quant preset, steps and seed,
    the second with method 'quest'."""
    pairs = []
    for cage in (r for r in runs if r["method"] == "cage"):
        for base in runs:
            same = all(base[k] == cage[k] for k in ("quant", "steps", "seed"))
            if same and base["method"] == "quest":
                pairs.append((cage, base))
    return pairs


def find_reference(
    summary: Sequence[Mapping[str, Any]], config: str, base_config: str, steps: int
) -> Mapping[str, Any] | None:
    """The study summary entry (benchmarks/accuracy.py writes summary.json) whose arms are named
    like the experiment configs ``config`` and ``base_config`` (file names without suffix; the
    entry's overrides say what exactly the study ran) at ``steps`` steps, or None."""
    for entry in summary:
        if (entry["arm"], entry["vs"], entry["steps"]) == (config, base_config, steps):
            if entry["n"] >= 2:
                return entry
    return None


def longer_references(
    summary: Sequence[Mapping[str, Any]], config: str, base_config: str, steps: int
) -> list[Mapping[str, Any]]:
    """The study's entries for the same arms at more than ``steps`` steps (>= 2 seeds), one per
    length (the first listed), shortest first: where the correction was measured at lengths
    this run did not reach."""
    longer: dict[int, Mapping[str, Any]] = {}
    for entry in summary:
        if (entry["arm"], entry["vs"]) == (config, base_config) and entry["steps"] > steps:
            if entry["n"] >= 2:
                longer.setdefault(entry["steps"], entry)
    return [longer[k] for k in sorted(longer)]


def _reference_line(entry: Mapping[str, Any]) -> str:
    """'800 steps (3.1 tokens/param): -0.0021, 9 % of the gap to FP recovered (better ...)'."""
    tpp = entry.get("tokens_per_param")
    line = f"{entry['steps']} steps" + (f" ({tpp:.1f} tokens/param)" if tpp else "")
    line += f": {entry['mean']:+.4f}"
    if entry.get("gap_recovered") is not None and entry["mean"] < 0:
        line += f", {100 * entry['gap_recovered']:.0f} % of the gap to FP recovered"
    return f"{line} ({entry['verdict']})"


def paired_report(runs: Sequence[Mapping[str, Any]], reference: str | Path | None = None) -> str:
    """Text lines for every CAGE/QuEST pair in ``runs``: the measured difference and a verdict;
    a single pair borrows the seed-to-seed sd of the matching entry of a study summary, and
    the study's results for the same arms at longer lengths are listed with it."""
    summary = json.loads(Path(reference).read_text()) if reference else []
    lines = []
    for cage, base in pair_runs(runs):
        d = paired([cage["val_loss"]], [base["val_loss"]])
        lines.append(
            f"  {cage['name']} - {base['name']} ({cage['quant']}, seed {cage['seed']}, "
            f"{cage['steps']} steps): val loss {d.mean:+.4f}"
        )
        ref = find_reference(summary, cage["name"], base["name"], cage["steps"])
        if ref is not None:
            ran = " ".join(ref["overrides"]) or "as configured"
            lines.append(
                f"    study {reference} ({cage['name']}: {ran}): {ref['n']} seeds at "
                f"{ref['steps']} steps, mean {ref['mean']:+.4f}, sd {ref['sd']:.4f} "
                f"({ref['verdict']})"
            )
        for entry in longer_references(summary, cage["name"], base["name"], cage["steps"]):
            lines.append(f"    study, longer: {_reference_line(entry)}")
        if cage.get("note"):
            lines.append(f"    {cage['note']}")
        if cage.get("note") and d.mean == 0:
            lines.append("    this run: identical to QuEST (the correction was off)")
        else:
            lines.append(f"    this run: {d.verdict(None if ref is None else ref['sd'])}")
    return "\n".join(lines)
