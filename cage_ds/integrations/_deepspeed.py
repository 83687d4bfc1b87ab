"""What CageTrainer and CageAccelerator share under DeepSpeed: the config refusal, the
attach of the CAGE hooks to an engine built by someone else, and the telemetry.

Invariant: a client optimizer is CAGE-capable iff it has the ``quant_ops`` hook (CageAdamW,
CageCoupled), the test cage_ds.zero.initialize applies; attach runs only on an engine whose
ZeRO wrapper steps exactly that client.
"""

from __future__ import annotations

from typing import Any

import torch

from cage_ds.nn import quant_stats as module_quant_stats
from cage_ds.zero import attach, attachment, check_config
from cage_ds.zero import quant_stats as zero_quant_stats


def is_cage_client(optimizer: Any) -> bool:
    """True for an optimizer cage_ds.zero can hook (it has the quant_ops method)."""
    return isinstance(optimizer, torch.optim.Optimizer) and callable(
        getattr(optimizer, "quant_ops", None)
    )


def check_deepspeed_config(config: dict, who: str = "CageTrainer") -> None:
    """Refuse a DeepSpeed config the integration ``who`` cannot honour, naming the setting."""
    if "optimizer" in config:
        kind = (config["optimizer"] or {}).get("type", "?")
        raise ValueError(
            f"{who}: the DeepSpeed config has an 'optimizer' section (type {kind!r}); "
            "DeepSpeed would build that optimizer instead of CageAdamW and CAGE would be lost. "
            "Remove the section (CageTrainer takes lr, betas, eps and weight decay from "
            "TrainingArguments; CageAccelerator steps the CageAdamW you pass to prepare)"
        )
    check_config(config)


def attach_client(engine: Any, client: torch.optim.Optimizer, who: str) -> None:
    """cage_ds.zero.attach(engine, client) unless attached already; refuses an engine whose
    ZeRO wrapper steps another optimizer."""
    wrapper = engine.optimizer
    if attachment(engine) is not None:
        return
    # pinned to deepspeed==0.19.8: ZeRO wrappers keep the client optimizer as .optimizer
    inner = getattr(wrapper, "optimizer", None)
    if inner is not client:
        raise RuntimeError(
            f"{who}: DeepSpeed's engine does not step the CageAdamW (it wraps "
            f"{type(inner).__name__}); pass the CageAdamW with the model in one prepare call"
        )
    attach(engine, client)


def telemetry(model: Any, client: Any, deepspeed: bool) -> dict[str, float]:
    """cage-train's keys: quant/* and train/lambda. ``model``: the engine under DeepSpeed
    (collective: every rank calls it at the same point), else the module."""
    stats = zero_quant_stats(model) if deepspeed else module_quant_stats(model)
    return {**stats, "train/lambda": float(client.last_lambda)}
