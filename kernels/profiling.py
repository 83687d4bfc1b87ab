"""Profiler ranges around the public ops: each call shows as ``cage_kernels.<op>`` in a
torch.profiler trace (benchmarks/train_step.py sums them into the step's quantization share).

The range is entered only while a profiler records (one C call otherwise). The public ops do
not call one another, so their ranges never nest and their times add up.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

RANGE_PREFIX = "cage_kernels."
P = ParamSpec("P")
R = TypeVar("R")


def profiled(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` inside a record_function range named RANGE_PREFIX + its name when profiling."""
    name = RANGE_PREFIX + fn.__name__

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        if not torch.autograd._profiler_enabled():
            return fn(*args, **kwargs)
        with torch.profiler.record_function(name):
            return fn(*args, **kwargs)

    return wrapper
