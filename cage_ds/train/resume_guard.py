"""A resumed run keeps the config it was started with, or says it changes.

Every checkpoint cage-train writes carries the run's resolved config (the manifest's
``meta["config"]``, ``Config.to_dict()``). Before a resume, the current config is compared with
it key by key: a change to a key that alters the run (optimizer and lr schedule, CAGE,
quantization, model, data, steps, global batch, seed, DeepSpeed, backend) is a ConfigError
naming every changed key with its old -> new value, unless
``checkpoint.allow_config_change=true``; keys that only change what is logged or kept
(``FREE_KEYS``) may change freely. Section keys the checkpoint's config lacks (added to
cage-train since) are not compared (a missing ``backend`` reads deepspeed); a checkpoint without a
config (written before this check) resumes with a warning.

The check runs in ``cage-train`` (and ``--check``) before any worker starts, and again in the
trainer on the checkpoint it actually loads.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import TOP_KEYS, Config, ConfigError

CONFIG_META_KEY = "config"
"""Key of the resolved config in a checkpoint's ``meta``."""

FREE_KEYS = (
    "tracking.*",
    "checkpoint.*",
    "train.log_every",
    "train.eval_every",
    "train.progress",
    "train.output_dir",
    "train.run_name",
    "train.micro_batch_size",
    "data.val_max_blocks",
    "data.cache_dir",
)
"""Keys (``section.*``: a whole section) that may change between a run and its resume: what
is logged, evaluated, kept or where files go; the micro-batch only splits the same global
batch. Every other key alters the run."""


def checkpoint_root(cfg: Config) -> Path | None:
    """Where the run's checkpoints live (checkpoint.resume's folder when it names one, else
    checkpoint.dir or <run_dir>/checkpoints); None when the run neither saves nor resumes."""
    c = cfg.checkpoint
    explicit = c.resume not in ("auto", "never")
    if not (c.every or c.save_final or explicit):
        return None
    return Path(c.resume if explicit else c.dir or cfg.run_dir / "checkpoints")


def _is_free(key: str) -> bool:
    section = key.partition(".")[0]
    return key in FREE_KEYS or f"{section}.*" in FREE_KEYS


def config_changes(saved: Mapping[str, Any], cfg: Config) -> list[tuple[str, Any, Any]]:
    """(section.key, saved value, current value) for each run-altering key that differs,
    in config order; keys the saved config lacks are skipped, except top-level keys
    (``backend``), which take their default there (written before the key existed)."""
    changes = []
    for section, body in cfg.to_dict().items():
        if section in TOP_KEYS:  # backend: deepspeed -> fsdp2 changes the run
            old = saved.get(section, Config.model_fields[section].default)
            if old != body:
                changes.append((section, old, body))
            continue
        old_body = saved.get(section, {})
        for key, value in body.items():
            name = f"{section}.{key}"
            if key in old_body and old_body[key] != value and not _is_free(name):
                changes.append((name, old_body[key], value))
    return changes


def check_config(cfg: Config, meta: Mapping[str, Any] | None, checkpoint: Path) -> list[str]:
    """Compare ``cfg`` with the config in ``checkpoint``'s ``meta``; ConfigError on a change
    that alters the run (unless allowed), else the notes to print (may be empty)."""
    saved = (meta or {}).get(CONFIG_META_KEY)
    if saved is None:
        return [
            f"warning: checkpoint {checkpoint} holds no config (written by an older cage-train): "
            "resuming without checking that the config is unchanged"
        ]
    changes = config_changes(saved, cfg)
    if not changes:
        return []
    listed = ", ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changes)
    if cfg.checkpoint.allow_config_change:
        return [f"resuming {checkpoint} with a changed config (allowed): {listed}"]
    raise ConfigError(
        f"the config differs from the one checkpoint {checkpoint} was written with: {listed}; "
        "relaunch with the old values, start a new run (another train.run_name, or "
        "checkpoint.resume=never), or set checkpoint.allow_config_change=true to resume with "
        "the new values"
    )


def check_before_resume(cfg: Config) -> list[str]:
    """``check_config`` against the checkpoint an automatic resume would load first (read
    without loading or verifying it); no notes when the run will not resume."""
    from .checkpoint import CheckpointError, CheckpointManager

    root = checkpoint_root(cfg)
    if root is None or cfg.checkpoint.resume == "never":
        return []
    try:
        found = CheckpointManager(root).read_meta()
    except CheckpointError:  # unreadable manifest: the resume falls back, the trainer checks
        return []
    if found is None:
        return []
    tag, meta = found
    return check_config(cfg, meta, root / tag)
