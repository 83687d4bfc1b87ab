"""Validation for cage-train and the comparison table of finished runs.

``evaluate``: mean next-token loss over this rank's validation batches, averaged over all
ranks (every rank runs the same number of forwards, so ZeRO-3 gathers stay in step).
``python -m cage_ds.train.evaluate RUN_DIR...`` prints the validation table of runs from
their result.json files.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from .result import RunResult


@torch.no_grad()
def evaluate(engine, batches: Sequence[torch.Tensor]) -> float:
    """sum_b loss_b * rows_b / sum_b rows_b over all ranks (blocks have equal length)."""
    was_training = engine.training
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=engine.device)  # NCCL reduces on GPU
    for batch in batches:
        batch = batch.to(engine.device)
        loss = engine(input_ids=batch, labels=batch).loss
        total[0] += loss.detach().double() * len(batch)
        total[1] += len(batch)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    if was_training:
        engine.train()
    return float(total[0] / total[1])


def result_rows(run_dirs: Sequence[str | Path]) -> list[dict]:
    """The table rows of finished runs (their result.json), in the given order."""
    rows = []
    for d in run_dirs:
        path = Path(d) / "result.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no result.json (did the run finish?)")
        data = json.loads(path.read_text())
        data["history"] = {k: [tuple(p) for p in v] for k, v in data.get("history", {}).items()}
        rows.append(RunResult(**data).row())
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """Print the Markdown validation table of the run folders given."""
    from .report import format_eval_table

    parser = argparse.ArgumentParser(
        prog="python -m cage_ds.train.evaluate", description=main.__doc__
    )
    parser.add_argument("run_dirs", nargs="+", help="run folders holding result.json")
    args = parser.parse_args(argv)
    print(format_eval_table(result_rows(args.run_dirs)))


if __name__ == "__main__":
    main()
