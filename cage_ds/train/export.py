"""Export a finished cage-train run: ``python -m cage_ds.train.export RUN_DIR --out OUT``.

    python -m cage_ds.train.export out/tiny-w4a4-cage --out export/ [--format hf|packed|both]
                                   [--dtype float32|bfloat16]

Reads RUN_DIR/config.yaml, takes the newest complete checkpoint under the run's checkpoint
folder (CheckpointManager.select: ``latest`` if it verifies, else the newest that does),
rebuilds the model on CPU, loads its latent weights (zero_to_fp32 under ZeRO-1/2/3, the fp32
module weights at stage 0: cage_ds.zero.export.latent_state_dict; backend=fsdp2: the DCP
checkpoint's latents, cage_ds.fsdp.load_latents) and writes:

    OUT/hf/                  plain Hugging Face export (cage_ds.nn.export.save_plain_hf) and
                             the run's tokenizer: AutoModelForCausalLM.from_pretrained(OUT/hf)
    OUT/packed.safetensors   packed codes + scales (save_packed): cage_ds.nn.export.load_packed
    OUT/tokenizer/           the tokenizer, when OUT/hf is not written
    OUT/export.json          what was exported from where (run, checkpoint, step, files)

When the run had tracking on, OUT is logged as artifact ``export`` of the run's MLflow run
(best effort: a tracking failure is a warning, never a failed export).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

logger = logging.getLogger(__name__)

FORMATS = {"hf": ("hf",), "packed": ("packed",), "both": ("hf", "packed")}
DTYPES = ("float32", "bfloat16")


def run_config(run_dir: Path):
    """The run's resolved Config, with its run_dir pointing at ``run_dir`` (wherever the run
    folder has moved since training)."""
    from .config import ConfigError, load_config

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path} not found: {run_dir} is not a cage-train run folder")
    cfg = load_config(path)
    train = cfg.train.model_copy(
        update={"output_dir": str(run_dir.parent), "run_name": run_dir.name}
    )
    return cfg.model_copy(update={"train": train})


def newest_checkpoint(cfg) -> Path:
    """The newest complete checkpoint of the run; ConfigError naming the folder if none."""
    from .checkpoint import CheckpointManager
    from .config import ConfigError
    from .resume_guard import checkpoint_root

    root = checkpoint_root(cfg)
    if root is None:
        raise ConfigError(
            f"run {cfg.run_dir} saved no checkpoints (checkpoint.every=0 and "
            "checkpoint.save_final=false): rerun it with checkpoint.save_final=true"
        )
    tag = CheckpointManager(root).select()
    if tag is None:
        raise ConfigError(
            f"no complete checkpoint under {root} (run {cfg.run_dir}): train with "
            "checkpoint.save_final=true (or checkpoint.every=N) so the run leaves one"
        )
    return root / tag


def run_tokenizer(cfg) -> Any | None:
    """The run's tokenizer (a local one, or the BPE from the cache); None with a warning
    when it cannot be found (the weights are exported anyway)."""
    from .config import ConfigError
    from .data import data_identity
    from .tokenizer import load_tokenizer

    def not_cached():
        raise ConfigError(
            "the run's BPE is not in the cache (data.cache_dir or $CAGE_DS_CACHE as in training)"
        )

    try:
        return load_tokenizer(cfg.data, data_identity(cfg.data), not_cached)
    except (ConfigError, OSError) as err:
        logger.warning("exporting without a tokenizer: %s", err)
        return None


def export_run(
    run_dir: str | Path,
    out: str | Path,
    fmt: str = "both",
    dtype: str = "float32",
    trust_pickles: bool = False,
) -> dict[str, Any]:
    """Write the exports of the run's newest complete checkpoint under ``out`` (see module
    docstring); returns the record written to OUT/export.json. The checkpoint is read without
    running pickled code unless ``trust_pickles`` (cage_ds.train.safe_load)."""
    import torch

    from cage_ds.nn.export import save_packed, save_plain_hf
    from cage_ds.zero.export import load_latents

    from .checkpoint import step_of_tag
    from .model import build_model
    from .safe_load import refuse_unsafe_pickles, safe_zero_to_fp32_loads

    cfg = run_config(Path(run_dir))
    checkpoint = newest_checkpoint(cfg)
    tokenizer = run_tokenizer(cfg)
    eos = None if tokenizer is None else tokenizer.eos_token_id
    model, _ = build_model(cfg, {}, eos)
    if cfg.backend == "fsdp2":
        from cage_ds.fsdp import load_latents as load_fsdp_latents

        with refuse_unsafe_pickles():
            load_fsdp_latents(checkpoint, model, trust_pickles=trust_pickles)
    else:
        with safe_zero_to_fp32_loads(trust=trust_pickles):
            load_latents(checkpoint.parent, model, tag=checkpoint.name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    if "hf" in FORMATS[fmt]:
        files.append(save_plain_hf(model, out / "hf", tokenizer, getattr(torch, dtype)))
    elif tokenizer is not None:
        files.append(Path(tokenizer.save_pretrained(out / "tokenizer")[0]).parent)
    if "packed" in FORMATS[fmt]:
        save_packed(model, out / "packed.safetensors")
        files.append(out / "packed.safetensors")
    record = {
        "run_dir": str(Path(run_dir).resolve()),
        "checkpoint": str(checkpoint.resolve()),
        "step": step_of_tag(checkpoint.name),
        "format": fmt,
        "dtype": dtype,
        "files": [str(p.relative_to(out)) for p in files],
    }
    (out / "export.json").write_text(json.dumps(record, indent=2) + "\n")
    if cfg.tracking.enabled:
        from .tracking import log_to_run

        t = cfg.tracking
        log_to_run(t.experiment, cfg.run_name, out, "export", tracking_uri=t.tracking_uri)
    return record


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, export, print where; exit status 2 on a config or checkpoint error."""
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .safe_load import UnsafeCheckpointError

    p = argparse.ArgumentParser(
        prog="python -m cage_ds.train.export",
        description="Export a cage-train run's newest checkpoint (plain HF and/or packed).",
    )
    p.add_argument("run_dir", type=Path, help="the run folder (holds config.yaml)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--format", choices=sorted(FORMATS), default="both")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="plain HF weights' dtype")
    p.add_argument(
        "--trust-pickles",
        action="store_true",
        help="unpickle the checkpoint fully (may run code stored in it): trusted runs only",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        record = export_run(args.run_dir, args.out, args.format, args.dtype, args.trust_pickles)
    except (ConfigError, CheckpointError, UnsafeCheckpointError) as err:
        print(f"cage_ds.train.export: {err}", file=sys.stderr)
        return 2
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
