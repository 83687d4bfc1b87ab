"""Fixtures every test folder shares: one replayable seed and the generator drawn from it.

A test that draws random inputs takes ``seed`` (an int) or ``gen`` (a torch.Generator seeded
with it): a fresh seed per test, printed (pytest shows it when the test fails);
``CAGE_TEST_SEED=<n>`` replays one. Plain helpers (a free port) live in ``testkit.py``.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

import pytest
import torch

# Every process a test starts finds the venv's tools first. DeepSpeed JIT-builds its CPU shm
# comm op with whichever `ninja` is on PATH; the venv's (1.13) and a system one (1.11) hash the
# build log differently, so each rebuilds what the other built: 60-90 s per switch, with every
# rank of every job waiting on the build lock.
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
# The suite runs DeepSpeed on its CPU accelerator (gloo), offline, without MLflow telemetry:
# what cage-train sets for itself (cage_ds/train/cli.py). testkit's fork server imports
# DeepSpeed and huggingface_hub, which read these at import, with this environment, before any
# test's own environment reaches a forked child.
for key, value in (("DS_ACCELERATOR", "cpu"), ("HF_HUB_OFFLINE", "1"),
                   ("HF_DATASETS_OFFLINE", "1"), ("MLFLOW_DISABLE_TELEMETRY", "true")):  # fmt: skip
    os.environ.setdefault(key, value)


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("CAGE_TEST_SEED") or secrets.randbits(31))
    print(f"random seed {value} (replay with CAGE_TEST_SEED={value})")
    return value


@pytest.fixture
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with multi-process (slow) tests first, each file's order kept: with the suite's two
    workers taking whole files (scripts/test.sh), the many short files then fill both workers
    at the end instead of one long file running alone."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
