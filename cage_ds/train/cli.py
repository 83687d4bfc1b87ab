"""``cage-train`` / ``python -m cage_ds.train``: the command-line entry point.

    cage-train --config configs/experiments/cage_w4a4.yaml train.steps=300 optim.lr=3e-3
    cage-train --config ... --check --world-size 2     # validate only (launch scripts)
    cage-train --config a.yaml --config b.yaml ...     # several runs, one comparison table
    cage-train --config quest_w4a4.yaml --config cage_w4a4.yaml cage_w4a4:optim.cage_lambda=20
                                                       # an override for one config only
    deepspeed --num_accelerators 2 --module cage_ds.train --config ...

Prints each resolved config on rank 0, trains, and ends with the validation table. Every
config is validated before the first run starts, and compared with the config of the
checkpoint it would resume from (cage_ds.train.resume_guard); errors exit with status 2
before any distributed set-up.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import sys
from collections.abc import Sequence
from pathlib import Path

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
    p.add_argument(
        "--reference",
        default=None,
        help="an accuracy study's summary.json (benchmarks/accuracy.py): a single CAGE/QuEST "
        "pair is judged against the seed-to-seed spread the study measured at that length",
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="section.field=value",
        help="config overrides applied to every config, e.g. train.steps=100 quant.preset=w3a3; "
        "prefix one with a config file's name to apply it to that config only, e.g. "
        "cage_w4a4:optim.cage_lambda=20",
    )
    return p


def split_overrides(
    overrides: Sequence[str], config_paths: Sequence[str | None]
) -> list[list[str]]:
    """Per config, the overrides that apply to it: unscoped ones to every config, a scoped
    ``NAME:section.field=value`` (NAME = a config file's stem, the scope sits before the first
    '=') to that config only. ConfigError for a scope that names no config (or several)."""
    from .config import ConfigError

    stems = [Path(p).stem if p is not None else None for p in config_paths]
    per_config: list[list[str]] = [[] for _ in config_paths]
    for text in overrides:
        key = text.partition("=")[0]
        scope, sep, _ = key.partition(":")
        if not sep:
            for bucket in per_config:
                bucket.append(text)
            continue
        matches = [i for i, stem in enumerate(stems) if stem == scope]
        if len(matches) != 1:
            raise ConfigError(
                f"override {text!r}: the scope {scope!r} must name exactly one --config file by "
                f"its name without suffix; the configs are {[s for s in stems if s]}"
            )
        per_config[matches[0]].append(text[len(scope) + 1 :])
    return per_config


def _world_size(arg: int | None) -> int:
    """--world-size if given (0 included, for validate to refuse), else $WORLD_SIZE, else 1."""
    from .config import ConfigError

    if arg is not None:
        return arg
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"$WORLD_SIZE={text!r} is not an int") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Parse and validate every config, then train them in turn; returns the exit status."""
    import yaml

    from .config import ConfigError, load_config
    from .preflight import cuda_available, preflight, validate
    from .recipe import resolve_cage_lambda, total_steps
    from .resume_guard import check_before_resume

    if not faulthandler.is_enabled():  # a native abort (gloo, a kernel) prints every thread's stack
        faulthandler.enable(all_threads=True)
    args = _parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    paths = args.config or [None]
    try:
        world = _world_size(args.world_size)
        per_config = split_overrides(args.overrides, paths)
        cfgs = [load_config(path, ovr) for path, ovr in zip(paths, per_config, strict=True)]
        notes = []
        on_cuda = cuda_available()
        for cfg in cfgs:
            validate(cfg, world)
            preflight(cfg, world, on_cuda)
            resolve_cage_lambda(cfg, total_steps(cfg))
            notes.append(check_before_resume(cfg))
        names = [cfg.run_name for cfg in cfgs]
        if len(set(names)) != len(names):
            raise ConfigError(f"run names must differ between the configs, got {names}")
    except ConfigError as err:
        print(f"cage-train: config error: {err}", file=sys.stderr)
        return 2
    if args.check:
        if rank == 0:
            for cfg, cfg_notes in zip(cfgs, notes, strict=True):
                _print_config(cfg, world, yaml)
                for note in cfg_notes:
                    print(f"# {note}")
        return 0

    import warnings

    # torch 2.13 deprecates the c10d name DeepSpeed 0.19.8 still calls every step.
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*deprecated")
    from .checkpoint import CheckpointError
    from .diskio import DiskFullError
    from .loop import train
    from .recipe import cage_off_reason
    from .report import format_eval_table, paired_report
    from .run_lock import RunLockError
    from .safe_load import UnsafeCheckpointError

    rows, runs = [], []
    try:
        for path, cfg in zip(paths, cfgs, strict=True):
            if rank == 0:
                _print_config(cfg, world, yaml)
            try:
                result = train(cfg)
            except (RunLockError, CheckpointError, UnsafeCheckpointError, DiskFullError) as err:
                if rank == 0 or isinstance(err, UnsafeCheckpointError):  # the others: every rank
                    print(f"cage-train: {err}", file=sys.stderr)
                return 2
            except ConfigError as err:  # found only once the data is read (every rank the same)
                if rank == 0:
                    print(f"cage-train: config error: {err}", file=sys.stderr)
                return 2
            rows.append(result.row())
            name = Path(path).stem if path is not None else cfg.run_name
            runs.append(
                {"name": name, "method": result.method, "quant": result.quant,
                 "steps": result.steps, "seed": result.seed, "val_loss": result.val_loss,
                 "note": cage_off_reason(cfg, result.steps)}
            )  # fmt: skip
    finally:  # gloo aborts a process that exits inside a process group
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        print("\nvalidation:")
        print(format_eval_table(rows))
        if pairs := paired_report(runs, args.reference):
            print("\npaired comparison (same seed: same initialization and data order):")
            print(pairs)
        print("run folders: " + " ".join(str(cfg.run_dir) for cfg in cfgs))
        if any(cfg.tracking.enabled for cfg in cfgs):
            from .tracking import default_tracking_uri

            uri = cfgs[0].tracking.tracking_uri or default_tracking_uri()
            ui = f"{sys.executable} -m mlflow ui --backend-store-uri {uri}"
            print(f"MLflow UI: {ui}   (then open http://127.0.0.1:5000)")
    return 0


def _print_config(cfg, world: int, yaml) -> None:
    from .recipe import cage_off_reason, resolve_cage_lambda, total_steps

    steps = total_steps(cfg)
    print(f"# resolved config ({cfg.run_name}, world size {world})")
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
    if cfg.optim.uses_cage:
        print(f"# CAGE lambda for this run ({steps} steps): {resolve_cage_lambda(cfg, steps):.6g}")
        if reason := cage_off_reason(cfg, steps):
            print(f"# {reason}")


if __name__ == "__main__":
    sys.exit(main())
