"""The cage-train loop on a DeepSpeed engine: setup -> (resume) -> train/evaluate/save -> result.

One optimizer step = the rank's micro-batches of TrainBatches.next_step() through
engine.forward/backward/step (DeepSpeed accumulates over gradient_accumulation_steps and
clips at the boundary). The learning rate (warmup then cosine) and the CAGE
lambda (raw or from optim.cage_strength) come from cage_ds.train.recipe.

Per-step record: rank 0 appends every logged metric dict to <run_dir>/metrics.jsonl as one
JSON line {"step": t, "train/loss": ..., ...} (floats round-trip exactly), one write per line
(cage_ds.train.diskio: whole lines or nothing), so the losses of a killed run survive it; each
(re)start first drops a torn last line, then appends
{"event": "start", "step": s, "resumed_from": tag | null, "world_size": n}.
MLflow (rank 0, cage_ds.train.tracking): a run resumed at step s continues the MLflow run
recorded in <run_dir>/mlflow_run.json with the points of steps <= s from metrics.jsonl
(cage_ds.train.run_record). Every exit of Trainer.run closes the MLflow run: FINISHED, KILLED
(KeyboardInterrupt or SIGTERM, cage_ds.train.signals) or FAILED (an exception).

Engines: QuEST-quantized weights under ZeRO 1/2/3 go through cage_ds.zero.initialize (CAGE
hooks, quantize before the all-gather); everything else (no ZeRO, full precision, RTN with
lambda = 0) uses deepspeed.initialize and QuantLinear fake-quantizes in the forward.
backend=fsdp2: cage_ds.fsdp.prepare shards the model and a FsdpEngine (fsdp_engine.py) stands
in for the DeepSpeed engine.
"""

from __future__ import annotations

import functools
import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch

from .config import Config
from .data import TextData, build_data
from .diskio import append_line, disk_full_guard, repair_torn_tail
from .evaluate import evaluate
from .model import build_model, parameter_counts, zero_stage
from .preflight import deepspeed_json, derived_deepspeed_keys, validate
from .recipe import (
    cage_off_reason,
    next_lr_ratio,
    resolve_cage_lambda,
    total_steps,
    warmup_cosine,
)
from .rendezvous import init_loopback_process_group
from .result import RunResult
from .resume_guard import CONFIG_META_KEY, check_config, checkpoint_root
from .run_lock import RunLock, RunLockError
from .run_record import RUN_RECORD, Continuation, lineage_points, read_run_id, retire_fallbacks
from .signals import sigterm_as_exit

METRICS_LOG = "metrics.jsonl"
"""Per-step metrics of a run, under its run_dir (see the module docstring)."""


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one whole JSON line in one write (survives a kill -9; a full disk
    leaves no partial line and raises DiskFullError)."""
    append_line(path, json.dumps(record))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str = "deepspeed") -> tuple[int, int]:
    """deepspeed.init_distributed (backend fsdp2: torch's process group, nccl on CUDA, gloo
    on CPU) with single-process defaults (RANK 0 of WORLD_SIZE 1 on a free loopback port)
    when no launcher set the environment; a single-node rendezvous listens on loopback only
    (cage_ds.train.rendezvous); DeepSpeed's CPU shm all-reduce files are unlinked once
    mapped (cage_ds.zero.cpu_shm). Returns (rank, world)."""
    from deepspeed.constants import default_pg_timeout

    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if backend == "fsdp2":
        comm = "nccl" if torch.cuda.is_available() else "gloo"
        init_loopback_process_group(comm, default_pg_timeout)
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group(comm, timeout=default_pg_timeout)
    else:
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        from cage_ds.zero.cpu_shm import unlink_allreduce_buffer

        comm = get_accelerator().communication_backend_name()
        init_loopback_process_group(comm, default_pg_timeout)
        deepspeed.init_distributed(dist_backend=comm)
        unlink_allreduce_buffer()
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def deepspeed_config(cfg: Config, world: int, on_cuda: bool) -> dict[str, Any]:
    """The JSON of cfg.deepspeed (checked by preflight.deepspeed_json) with batch,
    accumulation and clipping filled from cfg."""
    return {**deepspeed_json(cfg, world, on_cuda), **derived_deepspeed_keys(cfg, world)}


def uses_cage_zero(cfg: Config, stage: int) -> bool:
    """Whether the engine comes from cage_ds.zero.initialize: QuEST-quantized weights under
    ZeRO 1/2/3 (the sharded quantize-before-gather path). Otherwise deepspeed.initialize
    and QuantLinear fake-quantizes in the forward."""
    weight = cfg.quant.to_quant_config().weight if cfg.quant.enabled else None
    return stage > 0 and weight is not None and weight.method == "quest"


def build_optimizer(
    cfg: Config, model: torch.nn.Module, steps: int, stage: int, cage_lambda: float
):
    """CageAdamW over cage_param_groups (decay on linear weights, CAGE on quantized ones).

    Under ZeRO without cage_ds.zero (RTN weights; validate() ensures lambda = 0 there) the
    groups carry no quantizer: the optimizer then sees flat partitions, and with lambda = 0
    CageAdamW is exactly AdamW, so the STE of the fake-quant forward is all RTN-STE needs.
    """
    from cage_ds.nn import cage_param_groups
    from cage_ds.optim import CageAdamW

    o = cfg.optim
    cage = {
        "cage_lambda": cage_lambda,
        "cage_silence": o.cage_silence,
        "cage_schedule": o.cage_schedule,
        "cage_variant": o.cage_variant,
        "total_steps": steps,
    }
    groups = cage_param_groups(model, o.weight_decay, o.cage_targets, **cage)
    if stage > 0 and not uses_cage_zero(cfg, stage):
        groups = [{**g, "quant": None} for g in groups]
    next_lr = None
    if o.cage_lr_order == "next":
        next_lr = functools.partial(next_lr_ratio, steps, o.warmup_fraction, o.min_lr_ratio)
    return CageAdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                     next_lr_ratio=next_lr, **cage)  # fmt: skip


def initialize_engine(cfg: Config, model, optimizer, scheduler, ds_config: dict[str, Any]):
    """(engine, which initialize was used); see uses_cage_zero. backend=fsdp2: a FsdpEngine
    over the model cage_ds.fsdp.prepare sharded (cage_ds.train.fsdp_engine)."""
    if cfg.backend == "fsdp2":
        from .fsdp_engine import FsdpEngine

        c = cfg.checkpoint
        accumulation = cfg.grad_accumulation(torch.distributed.get_world_size())
        engine = FsdpEngine(
            model, optimizer, scheduler, grad_clip=cfg.optim.grad_clip,
            accumulation=accumulation, trust_pickles=c.trust_pickles,
        )  # fmt: skip
        return engine, "cage_ds.fsdp.prepare"
    if uses_cage_zero(cfg, zero_stage(ds_config)):
        from cage_ds.zero import initialize

        name = "cage_ds.zero.initialize"
    else:
        from deepspeed import initialize

        name = "deepspeed.initialize"
    engine, *_ = initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine, name


def quant_metrics(engine, stage: int) -> dict[str, float]:
    """Quantization telemetry (keys of cage_ds.nn.quant_stats). An engine from
    cage_ds.zero.initialize: cage_ds.zero.quant_stats, the latent weights' errors and masks
    from the sharded quantizations (one small all-reduce, no weight gather; collective: every
    rank calls this at the same steps). Otherwise cage_ds.nn.quant_stats of the fake-quant
    model (ZeRO-3 gathers the partitioned weights of its weight-quantized layers)."""
    from cage_ds.nn import quant_stats, quantized_modules
    from cage_ds.zero import attachment

    from .fsdp_engine import FsdpEngine

    if isinstance(engine, FsdpEngine):  # cage_ds.fsdp.quant_stats: local rows, one all-reduce
        return engine.quant_stats()
    if attachment(engine) is not None:
        from cage_ds.zero import quant_stats as sharded_quant_stats

        return sharded_quant_stats(engine)
    layers = [layer for _, layer in quantized_modules(engine.module)]
    fake = [x.weight for x in layers if x.weight_quantizer is not None]
    if stage == 3 and fake:  # fake-quant layers read their (partitioned) weights
        import deepspeed

        with deepspeed.zero.GatheredParameters(fake, modifier_rank=None):
            return quant_stats(engine.module)
    return quant_stats(engine.module)


class Trainer:
    """Everything one run holds; ``run()`` trains to the end and returns the RunResult."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.rank, self.world = init_distributed(cfg.backend)
        validate(cfg, self.world)
        self.on_cuda = torch.cuda.is_available()
        if self.on_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        self.steps = total_steps(cfg)
        # resolved once, before build_model (a live ZeRO-3 HF config makes model builds costly)
        self.cage_off_reason = cage_off_reason(cfg, self.steps)
        self.cage_lambda = resolve_cage_lambda(cfg, self.steps)
        self.data = self._load_data()
        fsdp2 = cfg.backend == "fsdp2"
        self.ds_config = {} if fsdp2 else deepspeed_config(cfg, self.world, self.on_cuda)
        torch.manual_seed(cfg.train.seed)
        model, self._hf_ds_keep_alive = build_model(
            cfg, self.ds_config, self.data.tokenizer.eos_token_id
        )
        self.params = parameter_counts(model)
        if fsdp2:
            from .fsdp_engine import shard_model

            model = shard_model(model, self.on_cuda)
        optimizer = build_optimizer(
            cfg, model, self.steps, zero_stage(self.ds_config), self.cage_lambda
        )
        o = cfg.optim
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda k: warmup_cosine(k + 1, self.steps, o.warmup_fraction, o.min_lr_ratio)
        )
        self.optimizer = optimizer
        self.engine, self.initializer = initialize_engine(
            cfg, model, optimizer, scheduler, self.ds_config
        )
        self.stage = zero_stage(self.ds_config)
        self.batches = self.data.train_batches(
            cfg.train.global_batch_size, cfg.train.micro_batch_size, self.rank, self.world
        )
        self.val = self.data.val_batches(cfg.train.micro_batch_size, self.rank, self.world)
        self.checkpoints = self._checkpoint_manager()
        self.resumed_from: str | None = None

    def _barrier(self) -> None:
        torch.distributed.barrier()

    def _load_data(self) -> TextData:
        """Rank 0 first (trains/caches the tokenizer and tokenized corpus), then the others."""
        if self.rank != 0:
            self._barrier()
            return build_data(self.cfg.data, self.cfg.train.seed)
        try:
            return build_data(self.cfg.data, self.cfg.train.seed)
        finally:  # release the other ranks even on failure (they then fail the same way)
            self._barrier()

    def _checkpoint_manager(self):
        root = checkpoint_root(self.cfg)
        if root is None:
            return None
        from .checkpoint import CheckpointManager

        c = self.cfg.checkpoint
        return CheckpointManager(
            root, keep_last=c.keep_last, save_every=c.every, trust_pickles=c.trust_pickles
        )

    def _tracker(self, start: int):
        """The run's tracker (rank 0); resumed at ``start`` > 0, it continues the recorded
        MLflow run with the local record of steps 1..start (cage_ds.train.run_record)."""
        from .tracking import NullTracker, Tracker, default_tracking_uri

        t, d = self.cfg.tracking, self.cfg.run_dir
        if not t.enabled or self.rank != 0:
            return NullTracker()
        uri, fallback_dir = t.tracking_uri or default_tracking_uri(), d / "mlflow-fallback"
        continuation = None
        if start > 0:
            run_id = read_run_id(d / RUN_RECORD, uri, t.experiment)
            continuation = Continuation(run_id, lineage_points(d / METRICS_LOG, start), start)
            for path in retire_fallbacks(fallback_dir, run_id):
                print(f"cage-train ({self.cfg.run_name}): {path} recovered on resume", flush=True)
        return Tracker(
            t.experiment,
            self.cfg.run_name,
            tracking_uri=uri,
            system_metrics=t.system_metrics,
            fallback_dir=fallback_dir,
            run_record=d / RUN_RECORD,
            continuation=continuation,
        )

    def _mean(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.engine.device)  # NCCL: GPU
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.world

    def train_step(self) -> float:
        """One optimizer step over this rank's micro-batches; the loss averaged over ranks."""
        losses = []
        for batch in self.batches.next_step():
            batch = batch.to(self.engine.device)
            loss = self.engine(input_ids=batch, labels=batch).loss
            self.engine.backward(loss)
            self.engine.step()
            losses.append(float(loss.detach()))
        return self._mean(sum(losses) / len(losses))

    def _log_step(
        self, step: int, loss: float, lr: float, step_time: float, with_quant: bool
    ) -> dict[str, float]:
        """Log this step's metrics; the quantization telemetry (collective under ZeRO)
        only ``with_quant``."""
        tokens = self.cfg.train.global_batch_size * self.cfg.data.seq_len
        metrics = {
            "train/loss": loss,
            "train/lr": lr,
            "train/lambda": float(self.optimizer.last_lambda),
            "train/step_time_s": step_time,
            "train/tokens_per_s": tokens / step_time,
        }
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        if with_quant:
            metrics.update(quant_metrics(self.engine, self.stage))
        self._log_metrics(metrics, step)
        return metrics

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """To the tracker and, on rank 0, to <run_dir>/metrics.jsonl."""
        self.tracker.log_metrics(metrics, step=step)
        if self.rank == 0:
            append_jsonl(self.cfg.run_dir / METRICS_LOG, {"step": step, **metrics})

    def _evaluate(self, step: int) -> tuple[float, float]:
        loss = evaluate(self.engine, self.val)
        ppl = math.exp(min(loss, 50.0))
        self._log_metrics({"val/loss": loss, "val/ppl": ppl}, step)
        return loss, ppl

    def _save(self, step: int) -> None:
        self.checkpoints.save(
            self.engine,
            step,
            {"data": self.batches.state_dict()},
            meta={CONFIG_META_KEY: self.cfg.to_dict()},
        )

    def _resume(self) -> int:
        if self.checkpoints is None or self.cfg.checkpoint.resume == "never":
            return 0
        resumed = self.checkpoints.resume(self.engine)
        if resumed is None:
            return 0
        for note in check_config(self.cfg, resumed.meta, resumed.path):
            if self.rank == 0:
                print(f"cage-train ({self.cfg.run_name}): {note}", flush=True)
        self.batches.load_state_dict(resumed.client_state["data"])
        self.resumed_from = resumed.tag
        return resumed.step

    def run(self) -> RunResult:
        """Resume, then train to the end under the run's tracker, which closes on every exit:
        FINISHED, KILLED (KeyboardInterrupt, SIGTERM), FAILED (an error; tracking.exit_status).
        What it could not deliver stays in metrics.jsonl and its fallback file."""
        start = self._resume()
        if self.rank == 0:
            self.cfg.run_dir.mkdir(parents=True, exist_ok=True)
            repair_torn_tail(self.cfg.run_dir / METRICS_LOG)
        with sigterm_as_exit(), self._tracker(start) as self.tracker:
            return self._train(start)

    def _train(self, start: int) -> RunResult:
        """Steps start+1..steps with evaluation and checkpoints; writes the result files."""
        cfg, rank0 = self.cfg, self.rank == 0
        if rank0:
            start_record = {"event": "start", "step": start, "resumed_from": self.resumed_from}
            append_jsonl(self.cfg.run_dir / METRICS_LOG, {**start_record, "world_size": self.world})
            self._write_run_files()
            if reason := self.cage_off_reason:
                print(f"cage-train ({cfg.run_name}): {reason}", flush=True)
        bar = None
        if rank0 and cfg.train.progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=self.steps, initial=start, desc=cfg.run_name, unit="step", dynamic_ncols=True
            )
        history: dict[str, list[tuple[int, float]]] = {"train/loss": [], "val/loss": []}
        t0 = time.perf_counter()
        loss = float("nan")
        val_loss = val_ppl = float("nan")
        quant_err = None
        self.engine.train()
        for step in range(start + 1, self.steps + 1):
            lr = float(self.engine.get_lr()[0])  # the lr this step uses
            ts = time.perf_counter()
            loss = self.train_step()
            step_time = time.perf_counter() - ts
            if not math.isfinite(loss):
                raise FloatingPointError(f"training loss is {loss} at step {step} ({cfg.run_name})")
            last = step == self.steps
            telemetry = step % cfg.train.log_every == 0 or last or step == start + 1
            metrics = self._log_step(step, loss, lr, step_time, with_quant=telemetry)
            quant_err = metrics.get("quant/rel_error", quant_err)
            history["train/loss"].append((step, loss))
            if bar is not None:
                bar.set_postfix(
                    loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{metrics['train/tokens_per_s']:.0f}"
                )
            if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or last:
                val_loss, val_ppl = self._evaluate(step)
                history["val/loss"].append((step, val_loss))
                if bar is not None:
                    bar.write(f"step {step}: val loss {val_loss:.4f}, ppl {val_ppl:.2f}")
            if self.checkpoints is not None and self.checkpoints.should_save(
                step, final=last and cfg.checkpoint.save_final
            ):
                self._save(step)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        if not history["val/loss"]:  # resumed at the end: nothing trained, still report
            val_loss, val_ppl = self._evaluate(self.steps)
        result = RunResult(
            run=cfg.run_name,
            quant=cfg.quant.preset,
            method=cfg.method,
            steps=self.steps,
            val_loss=val_loss,
            val_ppl=val_ppl,
            train_loss=loss,
            quant_rel_error=quant_err,
            tokens=(self.steps - start) * cfg.train.global_batch_size * cfg.data.seq_len,
            time_s=time.perf_counter() - t0,
            seed=cfg.train.seed,
            history=history,
        )
        if rank0:
            self._write_result(result)
        return result

    def _write_run_files(self) -> None:
        import yaml

        d = self.cfg.run_dir
        with disk_full_guard(d):
            (d / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
            if self.ds_config:  # backend=fsdp2: none
                (d / "deepspeed.json").write_text(json.dumps(self.ds_config, indent=2) + "\n")
        self.tracker.log_params(self.cfg.to_dict())
        self.tracker.set_tags(
            {
                "world_size": self.world,
                "initializer": self.initializer,
                "params_total": self.params["total"],
                "params_non_embedding": self.params["non_embedding"],
                "cage_lambda_resolved": self.cage_lambda,
                "cage_off_reason": self.cage_off_reason or "",
            }
        )
        self.tracker.log_artifact(d / "config.yaml")
        if self.ds_config:
            self.tracker.log_artifact(d / "deepspeed.json")

    def _write_result(self, result: RunResult) -> None:
        from .report import save_eval_table, save_loss_curve

        d = self.cfg.run_dir
        data = {
            **result.__dict__,
            "history": {k: list(map(list, v)) for k, v in result.history.items()},
        }
        with disk_full_guard(d):
            (d / "result.json").write_text(json.dumps(data, indent=2) + "\n")
            self.tracker.log_artifact(save_eval_table([result.row()], d / "eval_table.md"))
            self.tracker.log_artifact(save_loss_curve(result.history, d / "loss_curve.png"))
        self.tracker.log_artifact(d / "result.json")


def lock_run_dir(cfg: Config, rank: int) -> RunLock | None:
    """Rank 0 takes the run dir's lock (announcing a stale one taken over); RunLockError on
    every rank when another run holds it. Returns the held lock on rank 0, else None."""
    from .checkpoint import from_rank0

    lock, error = (RunLock(cfg.run_dir), None) if rank == 0 else (None, None)
    if lock is not None:
        try:
            lock.acquire()
        except RunLockError as err:
            error = str(err)
    error = from_rank0(error)
    if error is not None:
        raise RunLockError(error)
    if lock is not None and lock.note:
        print(f"cage-train ({cfg.run_name}): {lock.note}", flush=True)
    return lock


def train(cfg: Config) -> RunResult:
    """Run ``cfg`` to the end on this process's rank (see Trainer), holding the run dir's
    lock (cage_ds.train.run_lock) from before the set-up to the end; SIGTERM releases it
    (cage_ds.train.signals)."""
    with sigterm_as_exit():
        rank, _ = init_distributed(cfg.backend)
        lock = lock_run_dir(cfg, rank)
        try:
            return Trainer(cfg).run()
        finally:
            if lock is not None:
                lock.release()
