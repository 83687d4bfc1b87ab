"""Kernel tests: Triton under its CPU interpreter (default) or compiled on a GPU.

Interpreter mode (default): TRITON_INTERPRET=1 is set at import of this conftest, before any
cage_kernels Triton module is imported (triton decides interpret-or-compile when a kernel is
decorated, i.e. at our modules' import, reading the env then, so an earlier ``import triton``
elsewhere in the session is harmless). Modules already imported in compiled mode are
reloaded, and ``interpreted_kernels`` fails loudly if any kernel still is not interpreted.
CAGE_TRITON_INTERPRET=1 (CPU tensors -> Triton in ops dispatch) is set per test only, so
other tests in the same session keep the torch path.

Compiled mode: CAGE_KERNELS_DEVICE=cuda (benchmarks/gpu_check.sh) leaves the env alone and
runs the same tests with kernel inputs on the GPU against the torch twins on the CPU.

Every test draws fresh random inputs from a printed seed (CAGE_TEST_SEED=<n> replays one).
Outputs are poisoned: torch.empty / empty_like return NaN (floats) or 0xFF bytes (ints,
bools) while a test runs, so an element a kernel fails to write cannot pass.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

DEVICE = os.environ.get("CAGE_KERNELS_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

KERNEL_MODULES = (
    "cage_kernels.triton_lib",
    "cage_kernels.quest_triton",
    "cage_kernels.hadamard_triton",
    "cage_kernels.pack_triton",
    "cage_kernels.dequant_triton",
    "cage_kernels.cage_adamw_chunked_triton",  # before cage_adamw_triton, which imports it
    "cage_kernels.cage_adamw_triton",
)
KERNELS = {
    "cage_kernels.quest_triton": "_quest_rows_kernel",
    "cage_kernels.hadamard_triton": "_fwht_kernel",
    "cage_kernels.pack_triton": "_pack_kernel",
    "cage_kernels.dequant_triton": "_dequant_kernel",
    "cage_kernels.cage_adamw_chunked_triton": "_cage_adamw_chunked_kernel",
    "cage_kernels.cage_adamw_triton": "_cage_adamw_kernel",
}


def _load_kernel_modules() -> None:
    """Import (or, if imported before the env was set, reload) every Triton module in order."""
    stale = any(name in sys.modules for name in KERNEL_MODULES)
    for name in KERNEL_MODULES:
        module = importlib.import_module(name)
        if stale and DEVICE == "cpu":
            importlib.reload(module)


_load_kernel_modules()


@pytest.fixture(scope="session", autouse=True)
def interpreted_kernels():
    """In interpreter mode every kernel must be an InterpretedFunction, else fail loudly."""
    if DEVICE == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        for mod, kernel in KERNELS.items():
            fn = getattr(sys.modules[mod], kernel)
            if not isinstance(fn, InterpretedFunction):
                pytest.fail(f"{mod}.{kernel} is not interpreted: TRITON_INTERPRET came too late")
    elif not torch.cuda.is_available():
        pytest.fail(f"CAGE_KERNELS_DEVICE={DEVICE} but no CUDA device is visible")


@pytest.fixture(autouse=True)
def triton_dispatch(monkeypatch):
    """Route CPU tensors through Triton in ops dispatch for this test only."""
    if DEVICE == "cpu":
        monkeypatch.setenv("CAGE_TRITON_INTERPRET", "1")


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        return t.fill_(float("nan"))
    if t.dtype == torch.bool:
        t.view(torch.uint8).fill_(0xFF)
        return t
    return t.fill_(-1) if t.dtype.is_signed else t.fill_(0xFF)


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """torch.empty / empty_like hand out poisoned memory while the test runs."""
    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(empty_like(*a, **k)))


@pytest.fixture
def dev() -> str:
    """Where kernel inputs live: 'cpu' (interpreter) or 'cuda' (compiled)."""
    return DEVICE
