"""What a finished cage-train run reports: rank 0 writes it to <run_dir>/result.json; the
validation tables (cage_ds.train.evaluate, the comparison printout) read it back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunResult:
    """What a finished run reports (rank 0 writes it to <run_dir>/result.json)."""

    run: str
    quant: str
    method: str
    steps: int
    val_loss: float
    val_ppl: float
    train_loss: float
    quant_rel_error: float | None
    tokens: int
    time_s: float
    seed: int = 0
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """The validation-table row."""
        err = self.quant_rel_error
        return {
            "run": self.run,
            "quant": self.quant,
            "method": self.method,
            "steps": self.steps,
            "train_loss": round(self.train_loss, 4),
            "val_loss": round(self.val_loss, 4),
            "val_ppl": round(self.val_ppl, 2),
            "quant_rel_error": "-" if err is None else round(err, 4),
        }
