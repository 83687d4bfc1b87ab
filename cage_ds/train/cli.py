"""``cage-train`` / ``python -m cage_ds.train``: the command-line entry point.

    cage-train --config configs/experiments/cage_w4a4.yaml train.steps=300 optim.lr=3e-3
    cage-train --config ... --check --world-size 2     # validate only (launch scripts)
    deepspeed --num_accelerators 2 --module cage_ds.train --config ...

Prints the resolved config on rank 0, trains, and ends with the validation table. Config
errors exit with status 2 before any distributed set-up.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cage-train", description="CAGE quantization-aware training of Llama on DeepSpeed."
    )
    p.add_argument(
        "--config", help="YAML/JSON config file (e.g. configs/experiments/cage_w4a4.yaml)"
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="validate the resolved config for --world-size ranks, print it, exit",
    )
    p.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="ranks to validate for with --check (default: $WORLD_SIZE or 1)",
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="section.field=value",
        help="config overrides, e.g. train.steps=100 quant.preset=w3a3",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, validate, train; returns the process exit status."""
    import yaml

    from .config import ConfigError, load_config, validate

    args = _parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg, world)
    except ConfigError as err:
        print(f"cage-train: config error: {err}", file=sys.stderr)
        return 2
    if rank == 0:
        print(f"# resolved config ({cfg.run_name}, world size {world})")
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
    if args.check:
        return 0

    import warnings

    # torch 2.13 deprecates the c10d name DeepSpeed 0.19.8 still calls every step.
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*deprecated")
    from .loop import train
    from .tracking import format_eval_table

    result = train(cfg)
    if rank == 0:
        print("\nvalidation:")
        print(format_eval_table([result.row()]))
        print(f"run folder: {cfg.run_dir}")
        if cfg.tracking.enabled:
            from .tracking import default_tracking_uri

            uri = cfg.tracking.tracking_uri or default_tracking_uri()
            print(f"MLflow UI: mlflow ui --backend-store-uri {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
