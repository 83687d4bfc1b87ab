"""Loading DeepSpeed checkpoints without running pickled code (resume and export).

``safe_load`` is ``torch.load(weights_only=True)`` plus the few classes DeepSpeed 0.19.8's
own checkpoint files hold (``deepspeed_globals``, found by loading cage-train's ZeRO 0-3
checkpoints). A file that needs anything else is refused with ``UnsafeCheckpointError``
naming the file, the offending global and the opt-out (``checkpoint.trust_pickles=true`` in
cage-train, ``--trust-pickles`` in export; never read from the run directory itself, whose
files an attacker could change along with the checkpoint).
"""

from __future__ import annotations

import contextlib
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch

TRUST_HINT = (
    "only if you trust the files in that directory: checkpoint.trust_pickles=true (cage-train) "
    "or --trust-pickles (export)"
)
_UNSUPPORTED = re.compile(r"Unsupported global: GLOBAL (\S+)|WeightsUnpickler error: ([^\n]+)")
_torch_load = torch.load


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file needs code outside the allow-list to unpickle."""


def deepspeed_globals() -> list[Any]:
    """What DeepSpeed 0.19.8 pickles beyond tensors and containers, all in
    ``*_optim_states.pt``: ZeRO's stage enum, the (static) loss scaler, and ZeRO-1/2's
    parameter fragment addresses."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str | Path, map_location: Any = None, **_ignored: Any) -> Any:
    """``torch.load(path, weights_only=True)`` allowing ``deepspeed_globals``; the caller's
    other keywords (DeepSpeed passes ``weights_only=False``) are ignored."""
    try:
        with torch.serialization.safe_globals(deepspeed_globals()):
            return _torch_load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = _UNSUPPORTED.search(str(err))
        what = (found.group(1) or found.group(2)).strip() if found else "not weights-only"
        raise UnsafeCheckpointError(
            f"{path}: refusing to load, its pickle calls {what[:120]!r} (code, not tensors); "
            f"{TRUST_HINT}"
        ) from None


@contextlib.contextmanager
def safe_engine_loads(engine: Any, trust: bool = False) -> Iterator[None]:
    """While open, ``engine.load_checkpoint`` reads every file through ``safe_load`` (unless
    ``trust``). DeepSpeed 0.19.8 reads model, optimizer and expert states through
    ``engine.checkpoint_engine.load`` (TorchCheckpointEngine: ``weights_only=False``), so
    this one instance method is the narrowest hook. An engine without a checkpoint_engine
    (cage_ds.train.fsdp_engine.FsdpEngine) applies its own ``trust_pickles``."""
    if trust or not hasattr(engine, "checkpoint_engine"):
        yield
        return
    with mock.patch.object(engine.checkpoint_engine, "load", safe_load):
        yield


@contextlib.contextmanager
def safe_zero_to_fp32_loads(trust: bool = False) -> Iterator[None]:
    """While open, DeepSpeed's ``zero_to_fp32`` (export) reads through ``safe_load`` (unless
    ``trust``). It calls ``torch.load`` itself, so ``torch.load`` is replaced for the block
    (export is one thread)."""
    if trust:
        yield
        return
    from deepspeed.utils import zero_to_fp32

    with mock.patch.object(zero_to_fp32.torch, "load", safe_load):
        yield


@contextlib.contextmanager
def refuse_unsafe_pickles() -> Iterator[None]:
    """Turn the pickle.UnpicklingError of a safe DCP load (cage_ds.fsdp) into an
    UnsafeCheckpointError with the opt-out."""
    try:
        yield
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(f"{err}; {TRUST_HINT}") from None
