"""The training step end to end: FP vs QuEST W4A4 vs CAGE W4A4 under DeepSpeed ZeRO-3, world 1.

    .venv/bin/python benchmarks/train_step.py --preset tiny --device cpu
    python benchmarks/train_step.py --preset 30m --device cuda --out train_step.md

Each arm is cage-train's own Trainer (cage_ds.train.loop) in a process of its own, so peak
memory counters start fresh and nothing of one arm's engine outlives it: the config
(configs/experiments/{fp,quest_w4a4,cage_w4a4}.yaml on the preset, ZeRO stage 3), model,
CageAdamW and engine are the ones a run builds (QuEST and CAGE: cage_ds.zero.initialize, the
quantize-before-gather hooks and the fused ZeRO step; Triton kernels on CUDA, their torch
twins on CPU), and a step is Trainer.train_step. One micro-batch per step (global batch = the
micro-batch, the preset's unless --micro-batch). CAGE runs with lambda active from step 1
(constant schedule, no silence, no min-tokens gate); the worker refuses a CAGE arm whose
timed steps ran with lambda 0.

Per arm: --warmup steps, --steps timed steps (step time = their median, tokens/s = tokens per
step / median), then --profile-steps under torch.profiler: quant ops % = time inside the
cage_kernels.<op> ranges (kernels/profiling.py) other than the fused step / the profiled
steps' wall time, fused step % = the same for cage_adamw_shard_step (AdamW + correction +
q(W H) in one kernel); on CUDA the device time of the kernels the ranges launched, on CPU the
ranges' wall time. Peak memory over warmup + timed steps: CUDA max allocated; on CPU the
process's peak RSS (VmHWM, reset after set-up; interpreter and libraries included).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAGE_ACTIVE = (
    "optim.cage_silence=0",
    "optim.cage_schedule=constant",
    "optim.cage_min_tokens_per_param=null",
)
"""lambda from step 1: no silence, no ramp, no min-tokens gate."""
ARMS = {  # arm -> (label, experiment config, extra overrides)
    "fp": ("FP", "fp.yaml", ()),
    "quest": ("QuEST W4A4", "quest_w4a4.yaml", ()),
    "cage": ("CAGE W4A4", "cage_w4a4.yaml", CAGE_ACTIVE),
}
QAT_TARGET = 1.1
"""QuEST / CAGE step time over FP's."""
CAGE_TARGET = 1.02
"""CAGE step time over QuEST's."""
FUSED_RANGE = "cage_kernels.cage_adamw_shard_step"
COLUMNS = (
    "arm",
    "step ms (median)",
    "tokens/s",
    f"step / FP (target <= {QAT_TARGET})",
    f"step / QuEST (target <= {CAGE_TARGET})",
    "peak memory MiB",
    "quant ops %",
    "fused step %",
)
MEMORY_KIND = {
    "cuda": "CUDA max allocated over warmup + timed steps",
    "cpu": "process peak RSS over warmup + timed steps (VmHWM reset after set-up; interpreter "
    "and libraries included)",
}
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="model preset: tiny, 30m, 1b, ...")
    p.add_argument("--steps", type=int, default=30, help="timed steps per arm")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--profile-steps", type=int, default=3, help="profiled steps after timing")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per step")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="default: cuda when a GPU is visible, else cpu",
    )
    p.add_argument("--out", type=Path, default=None, help="append the dated table to this .md")
    p.add_argument("--machine", default=None, help="machine description for --out")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="section.field=value",
        help="cage-train overrides for every arm, e.g. data.source=corpus.txt",
    )
    p.add_argument("--arm", choices=tuple(ARMS), help=argparse.SUPPRESS)  # worker mode
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return p


# ---------------------------------------------------------------- worker: one arm


def arm_config(arm: str, args: argparse.Namespace, output_dir: str):
    """The arm's cage-train Config: its experiment file on the preset with args.overrides, then
    ZeRO-3, one micro-batch per step, args.warmup + args.steps + args.profile_steps steps, no
    tracking or progress (these win over args.overrides)."""
    from cage_ds.train.config import load_config

    _, experiment, extra = ARMS[arm]
    steps = args.warmup + args.steps + args.profile_steps
    overrides = [
        *args.overrides,
        f"model.preset={args.preset}",
        "deepspeed.stage=3",
        f"train.steps={steps}",
        "train.tokens_per_param=null",
        "train.progress=false",
        "tracking.enabled=false",
        f"train.output_dir={output_dir}",
        *extra,
    ]
    if args.micro_batch is not None:
        overrides.append(f"train.micro_batch_size={args.micro_batch}")
    cfg = load_config(ROOT / "configs/experiments" / experiment, overrides)
    train = cfg.train.model_copy(update={"global_batch_size": cfg.train.micro_batch_size})
    return cfg.model_copy(update={"train": train})


def _vm_hwm_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def _reset_peak_memory(on_cuda: bool) -> None:
    import torch

    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM <- current RSS


def _peak_memory(on_cuda: bool) -> int:
    import torch

    return torch.cuda.max_memory_allocated() if on_cuda else _vm_hwm_bytes()


def _device_name(on_cuda: bool) -> str:
    import torch

    if on_cuda:
        return torch.cuda.get_device_name()
    models = re.findall(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    return f"{models[0] if models else 'CPU'} ({os.cpu_count()} cores)"


def range_shares(prof, wall_s: float, on_cuda: bool) -> tuple[float, float]:
    """(quant ops, fused step) time in the cage_kernels ranges of a profile / wall_s."""
    from cage_kernels.profiling import RANGE_PREFIX
    from torch.autograd import DeviceType

    quant = fused = 0.0
    for e in prof.events():
        if e.device_type != DeviceType.CPU or not e.name.startswith(RANGE_PREFIX):
            continue
        us = e.device_time_total if on_cuda else e.cpu_time_total
        if e.name == FUSED_RANGE:
            fused += us
        else:
            quant += us
    return quant * 1e-6 / wall_s, fused * 1e-6 / wall_s


def run_arm(arm: str, args: argparse.Namespace) -> dict:
    """Train the arm (module docstring) and return its measurements."""
    import warnings

    import torch
    from torch.profiler import ProfilerActivity, profile

    from cage_ds.train.loop import Trainer
    from cage_ds.zero import attachment

    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*deprecated")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible; use --device cpu")
    trainer = Trainer(arm_config(arm, args, str(args.result.parent)))  # writes nothing there
    on_cuda = trainer.on_cuda
    attached = attachment(trainer.engine) is not None
    if trainer.stage != 3 or attached != (arm != "fp"):
        raise RuntimeError(
            f"{arm}: engine {trainer.initializer} at ZeRO stage {trainer.stage}, "
            f"cage_ds.zero attached={attached}: not the path this benchmark "
            "measures"
        )

    def step() -> float:
        loss = trainer.train_step()
        if on_cuda:
            torch.cuda.synchronize()
        return loss

    _reset_peak_memory(on_cuda)
    times, lambdas = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            lambdas.append(float(trainer.optimizer.last_lambda))
    peak = _peak_memory(on_cuda)
    if arm == "cage" and min(lambdas) <= 0:
        raise RuntimeError(
            f"cage: a timed step ran with lambda {min(lambdas)}; the correction "
            "must be active for the whole timing"
        )
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(args.profile_steps):
            step()
        wall = time.perf_counter() - t0
    quant, fused = range_shares(prof, wall, on_cuda)
    import deepspeed

    cfg = trainer.cfg
    return {
        "arm": arm,
        "step_times_s": times,
        "tokens_per_step": cfg.train.global_batch_size * cfg.data.seq_len,
        "peak_memory_bytes": peak,
        "quant_share": quant,
        "fused_share": fused,
        "lambda_min": min(lambdas),
        "final_loss": loss,
        "engine": trainer.initializer,
        "device": _device_name(on_cuda),
        "memory_kind": MEMORY_KIND["cuda" if on_cuda else "cpu"],
        "versions": f"torch {torch.__version__}, deepspeed {deepspeed.__version__}",
        "seq_len": cfg.data.seq_len,
        "micro_batch": cfg.train.micro_batch_size,
    }


# ---------------------------------------------------------------- driver: the three arms


def _arm_env(device: str) -> dict[str, str]:
    """A single-process rendezvous of its own (no launcher variables) on the chosen device."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["DS_ACCELERATOR"] = device
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_arms(args: argparse.Namespace, argv: Sequence[str]) -> list[dict]:
    """Each arm in its own worker process (this script with --arm); their results in order."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for arm in ARMS:
            result, log = Path(tmp) / f"{arm}.json", Path(tmp) / f"{arm}.log"
            worker = ["--device", args.device, "--arm", arm, "--result", str(result)]
            cmd = [sys.executable, __file__, *argv, *worker]
            print(f"train_step: {ARMS[arm][0]} ...", file=sys.stderr, flush=True)
            with open(log, "w") as fh:
                code = subprocess.call(
                    cmd, env=_arm_env(args.device), stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT
                )
            if code != 0:
                tail = "\n".join(log.read_text().splitlines()[-40:])
                raise SystemExit(f"train_step: the {arm} arm failed (exit {code}):\n{tail}")
            results.append(json.loads(result.read_text()))
    return results


def _ratio(x: float, target: float) -> str:
    return f"{x:.3f} ({'met' if x <= target else 'missed'})"


def format_table(results: list[dict]) -> str:
    """The markdown table (COLUMNS) of the arms' results, FP first."""
    median = {r["arm"]: statistics.median(r["step_times_s"]) for r in results}
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---" * len(COLUMNS) + "|"]
    for r in results:
        t = median[r["arm"]]
        cells = [
            ARMS[r["arm"]][0],
            f"{t * 1e3:.1f}",
            f"{r['tokens_per_step'] / t:.0f}",
            "1.000" if r["arm"] == "fp" else _ratio(t / median["fp"], QAT_TARGET),
            _ratio(t / median["quest"], CAGE_TARGET) if r["arm"] == "cage" else "-",
            f"{r['peak_memory_bytes'] / 2**20:.0f}",
            f"{100 * r['quant_share']:.1f}",
            f"{100 * r['fused_share']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(args: argparse.Namespace, argv: Sequence[str], results: list[dict]) -> str:
    """Dated section: command, machine, set-up, the table."""
    r0 = results[0]
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{args.machine} ({r0['device']})" if args.machine else r0["device"]
    engines = ", ".join(f"{ARMS[r['arm']][0]} {r['engine']}" for r in results)
    losses = ", ".join(f"{r['final_loss']:.4f}" for r in results)
    timed = "device time of their kernels" if args.device == "cuda" else "their CPU wall time"
    lines = [
        f"## train_step: {args.preset} on {args.device}, {when}",
        "",
        f"- Command: `python benchmarks/train_step.py {shlex.join(argv)}`",
        f"- Machine: {machine}; {r0['versions']}",
        f"- Per arm: DeepSpeed ZeRO-3, world size 1, {r0['micro_batch']} x {r0['seq_len']} "
        f"tokens per step, {args.warmup} warmup + {args.steps} timed steps (median), "
        f"{args.profile_steps} profiled; engines: {engines}",
        f"- CAGE lambda in the timed steps: >= {results[-1]['lambda_min']:g}; last losses: "
        + losses,
        f"- Peak memory: {r0['memory_kind']}",
        "- quant ops % / fused step %: share of the profiled steps' wall time inside the "
        f"cage_kernels op ranges ({timed}); fused step = cage_adamw_shard_step (AdamW + "
        "CAGE correction + q(W H) in one kernel)",
        "",
        format_table(results),
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_intermixed_args(argv)
    if min(args.steps, args.profile_steps) < 1 or args.warmup < 0:
        raise SystemExit("train_step: --steps and --profile-steps must be >= 1, --warmup >= 0")
    if args.arm is not None:  # worker
        args.result.write_text(json.dumps(run_arm(args.arm, args)))
        return 0
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    results = run_arms(args, argv)
    text = report(args, argv, results)
    print(text)
    if args.out is not None:
        gap = "\n" if args.out.is_file() and args.out.stat().st_size else ""
        with open(args.out, "a") as fh:
            fh.write(gap + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
