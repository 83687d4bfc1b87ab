"""``cage-train`` / ``python -m cage_ds.train``: the command-line entry point.

    cage-train --config configs/experiments/cage_w4a4.yaml train.steps=300 optim.lr=3e-3
    cage-train --config ... --check --world-size 2     # validate only (launch scripts)
    cage-train --config a.yaml --config b.yaml ...     # several runs, one comparison table
    deepspeed --num_accelerators 2 --module cage_ds.train --config ...

Prints each resolved config on rank 0, trains, and ends with the validation table. Every
config is validated before the first run starts; errors exit with status 2 before any
distributed set-up.
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
        "--config",
        action="append",
        help="YAML/JSON config file (e.g. configs/experiments/cage_w4a4.yaml); repeat it to "
        "run several configs one after the other in the same processes and compare them",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="validate the resolved config(s) for --world-size ranks, print them, exit",
    )
    p.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="ranks to validate for (default: $WORLD_SIZE or 1)",
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="section.field=value",
        help="config overrides applied to every config, e.g. train.steps=100 quant.preset=w3a3",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse and validate every config, then train them in turn; returns the exit status."""
    import yaml

    from .config import ConfigError, load_config, validate

    args = _parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfgs = [load_config(path, args.overrides) for path in args.config or [None]]
        for cfg in cfgs:
            validate(cfg, world)
        names = [cfg.run_name for cfg in cfgs]
        if len(set(names)) != len(names):
            raise ConfigError(f"run names must differ between the configs, got {names}")
    except ConfigError as err:
        print(f"cage-train: config error: {err}", file=sys.stderr)
        return 2
    if args.check:
        if rank == 0:
            for cfg in cfgs:
                _print_config(cfg, world, yaml)
        return 0

    import warnings

    # torch 2.13 deprecates the c10d name DeepSpeed 0.19.8 still calls every step.
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*deprecated")
    from .loop import train
    from .tracking import format_eval_table

    rows = []
    for cfg in cfgs:
        if rank == 0:
            _print_config(cfg, world, yaml)
        rows.append(train(cfg).row())
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    if rank == 0:
        print("\nvalidation:")
        print(format_eval_table(rows))
        print("run folders: " + " ".join(str(cfg.run_dir) for cfg in cfgs))
        if any(cfg.tracking.enabled for cfg in cfgs):
            from .tracking import default_tracking_uri

            uri = cfgs[0].tracking.tracking_uri or default_tracking_uri()
            ui = f"{sys.executable} -m mlflow ui --backend-store-uri {uri}"
            print(f"MLflow UI: {ui}   (then open http://127.0.0.1:5000)")
    return 0


def _print_config(cfg, world: int, yaml) -> None:
    print(f"# resolved config ({cfg.run_name}, world size {world})")
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())


if __name__ == "__main__":
    sys.exit(main())
