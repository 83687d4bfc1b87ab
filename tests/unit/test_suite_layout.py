"""Every test file is collected: no folder under tests/ matches pytest's norecursedirs (its
default skips "dist", which once hid tests/dist, the sharded runs, from the whole suite)."""

from __future__ import annotations

import fnmatch
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_no_test_folder_is_skipped_by_norecursedirs(pytestconfig):
    patterns = pytestconfig.getini("norecursedirs")
    folders = {path.parent for path in TESTS.rglob("test_*.py")}
    assert len(folders) >= 4
    skipped = [
        str(folder.relative_to(TESTS.parent))
        for folder in folders
        for part in folder.relative_to(TESTS.parent).parts
        if any(fnmatch.fnmatch(part, pattern) for pattern in patterns)
    ]
    assert not skipped, f"pytest would not collect {skipped} (norecursedirs {patterns})"
