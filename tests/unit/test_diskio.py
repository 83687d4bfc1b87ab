"""Disk full while writing run files: metrics lines are whole or absent, a torn tail is
dropped (not glued to the next record), and ENOSPC/EDQUOT become one-line "disk full"
errors naming the file (simulated with a monkeypatched os.write; no disk is filled)."""

from __future__ import annotations

import errno
import json
import logging
import os

import pytest

from cage_ds.train import diskio
from cage_ds.train.diskio import DiskFullError, append_line, disk_full_guard, repair_torn_tail
from cage_ds.train.loop import append_jsonl


def _records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_full_disk_append_leaves_whole_lines_and_names_the_file(tmp_path, monkeypatch, code):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"step": 1, "train/loss": 2.5})
    real_write = os.write

    def write_half_then_fail(fd, data):  # the disk fills mid-line
        real_write(fd, data[: len(data) // 2])
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(diskio.os, "write", write_half_then_fail)
    with pytest.raises(DiskFullError) as full:
        append_jsonl(path, {"step": 2, "train/loss": 2.25})
    assert str(full.value).startswith(f"disk full (no space or quota left) writing {path}:")
    assert "\n" not in str(full.value)
    monkeypatch.setattr(diskio.os, "write", lambda fd, data: real_write(fd, data[:7]))
    with pytest.raises(DiskFullError):  # a short write without an error: also cut back
        append_jsonl(path, {"step": 2, "train/loss": 2.25})
    monkeypatch.setattr(diskio.os, "write", real_write)
    append_jsonl(path, {"step": 2, "train/loss": 2.0})
    assert _records(path) == [{"step": 1, "train/loss": 2.5}, {"step": 2, "train/loss": 2.0}]


def test_torn_tail_is_dropped_with_a_warning_not_glued(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train/loss": 2.5}\n{"step": 2, "train/lo')
    with caplog.at_level(logging.WARNING):
        assert repair_torn_tail(path) == len('{"step": 2, "train/lo')
    assert "torn record" in caplog.text and str(path) in caplog.text
    append_line(path, json.dumps({"event": "start", "step": 1}))
    assert _records(path) == [{"step": 1, "train/loss": 2.5}, {"event": "start", "step": 1}]
    assert repair_torn_tail(path) == 0 and repair_torn_tail(tmp_path / "absent") == 0
    (tmp_path / "torn-only").write_text("{")
    assert repair_torn_tail(tmp_path / "torn-only") == 1
    assert (tmp_path / "torn-only").read_text() == ""


def test_guard_passes_other_errors_through(tmp_path):
    with pytest.raises(DiskFullError, match=f"writing {tmp_path / 'x.pt'}:"):
        with disk_full_guard(tmp_path):
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.pt"))
    with pytest.raises(PermissionError), disk_full_guard(tmp_path):
        raise PermissionError(errno.EACCES, "Permission denied")
