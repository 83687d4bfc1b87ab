"""CheckpointManager on a real single-process DeepSpeed engine (CPU, gloo, ZeRO stage 1):
resume restores weights, optimizer, client state and RNG (losses continue bit-exactly);
a crash mid-write keeps the previous checkpoint; keep-last-K; truncated or altered files are
detected (fallback with a warning, or an error when strict)."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import random

import pytest
import torch
from testkit import free_port, run_ranks

from cage_ds.train.checkpoint import (
    LATEST_NAME,
    MANIFEST_NAME,
    TMP_PREFIX,
    CheckpointError,
    CheckpointManager,
    _sha256,
    capture_rng_state,
    restore_rng_state,
    step_of_tag,
    tag_for_step,
)

DS_CONFIG = {
    "train_batch_size": 4,
    "train_micro_batch_size_per_gpu": 4,
    "zero_optimization": {"stage": 1},
    "zero_allow_untested_optimizer": True,
    "gradient_clipping": 1.0,
}


@pytest.fixture(scope="module", autouse=True)
def single_process_dist():
    """One-rank gloo group, as the DeepSpeed launcher would set it up."""
    import deepspeed

    if not torch.distributed.is_initialized():
        port = free_port()
        for key, value in {
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }.items():
            os.environ.setdefault(key, value)
        deepspeed.init_distributed(dist_backend="gloo")
    yield


def _engine(seed: int):
    import deepspeed

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=DS_CONFIG)
    return engine


def _train(engine, steps: int) -> list[float]:
    """``steps`` optimizer steps on batches drawn from the global torch RNG (so a correct
    resume must restore the RNG too)."""
    losses = []
    for _ in range(steps):
        x = torch.randn(4, 7)
        y = torch.randn(4, 3)
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _largest_file(manager: CheckpointManager, tag: str):
    """The biggest DeepSpeed file of ``tag`` (model or optimizer states)."""
    return max((manager.root / tag).glob("*_states.pt"), key=lambda p: p.stat().st_size)


def test_tags_and_rng_round_trip():
    assert tag_for_step(120) == "step000000120" and step_of_tag("step000000120") == 120
    assert step_of_tag("global_step5") is None and step_of_tag(".tmp-step000000001") is None
    with pytest.raises(ValueError, match="step must be >= 0"):
        tag_for_step(-1)
    import numpy as np

    state = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(3)
    restore_rng_state(state)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_resume_continues_bit_exactly(tmp_path):
    seed = random.randrange(1 << 30)
    engine = _engine(seed)
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2, save_every=3)
    assert manager.resume(engine) is None
    torch.manual_seed(seed + 1)
    _train(engine, 3)
    assert manager.should_save(3) and not manager.should_save(4)
    path = manager.save(engine, 3, {"data_position": 1234, "epoch": 1})
    assert path == tmp_path / "ckpt" / "step000000003"
    assert (tmp_path / "ckpt" / LATEST_NAME).read_text() == "step000000003"
    assert not manager.should_save(3, final=True), "the final step was just saved"
    expected = _train(engine, 4)
    expected_weights = [p.detach().clone() for p in engine.module.parameters()]

    fresh = _engine(seed + 2)  # different initial weights
    torch.manual_seed(seed + 3)  # and a different RNG position: both must be restored
    resumed = CheckpointManager(tmp_path / "ckpt", keep_last=2).resume(fresh)
    assert resumed is not None, f"seed={seed}"
    assert (resumed.tag, resumed.step) == ("step000000003", 3)
    assert resumed.client_state["data_position"] == 1234 and resumed.client_state["epoch"] == 1
    assert _train(fresh, 4) == expected, f"seed={seed}"
    for got, want in zip(fresh.module.parameters(), expected_weights, strict=True):
        assert torch.equal(got, want), f"seed={seed}"


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path):
    engine = _engine(0)
    manager = CheckpointManager(tmp_path, keep_last=3)
    _train(engine, 1)
    manager.save(engine, 1, {"data_position": 10})
    weights_at_1 = [p.detach().clone() for p in engine.module.parameters()]
    _train(engine, 1)

    real_save = engine.checkpoint_engine.save
    calls = []

    def save_then_crash(state_dict, path):
        calls.append(path)
        real_save(state_dict, path)
        with open(path, "r+b") as fh:  # a torn write, then the crash
            fh.truncate(os.path.getsize(path) // 2)
        raise OSError("simulated crash: disk full")

    engine.checkpoint_engine.save = save_then_crash
    with pytest.raises(OSError, match="simulated crash"):
        manager.save(engine, 2, {"data_position": 20})
    engine.checkpoint_engine.save = real_save
    assert calls and TMP_PREFIX in calls[0]
    assert (tmp_path / LATEST_NAME).read_text() == "step000000001"
    assert manager.committed_tags() == ["step000000001"]
    assert (tmp_path / f"{TMP_PREFIX}step000000002").is_dir()

    fresh = _engine(5)
    resumed = manager.resume(fresh)
    assert resumed.step == 1 and resumed.client_state["data_position"] == 10
    for got, want in zip(fresh.module.parameters(), weights_at_1, strict=True):
        assert torch.equal(got, want)
    manager.save(fresh, 2, {"data_position": 20})  # the next save clears the torn temp dir
    assert not list(tmp_path.glob(f"{TMP_PREFIX}*"))
    assert manager.committed_tags() == ["step000000002", "step000000001"]


def test_keep_last_k(tmp_path):
    engine = _engine(1)
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in range(1, 5):
        _train(engine, 1)
        manager.save(engine, step)
    assert manager.committed_tags() == ["step000000004", "step000000003"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        "step000000003",
        "step000000004",
    ]
    assert (tmp_path / LATEST_NAME).read_text() == "step000000004"
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        CheckpointManager(tmp_path, keep_last=0)


def test_truncated_newest_falls_back_or_errors(tmp_path, caplog):
    engine = _engine(2)
    manager = CheckpointManager(tmp_path, keep_last=3)
    _train(engine, 1)
    manager.save(engine, 1, {"data_position": 1})
    _train(engine, 1)
    manager.save(engine, 2, {"data_position": 2})
    victim = _largest_file(manager, "step000000002")
    with open(victim, "r+b") as fh:
        fh.truncate(victim.stat().st_size - 7)

    with pytest.raises(CheckpointError, match=rf"{victim}.*truncated.*strict"):
        CheckpointManager(tmp_path, strict=True).resume(_engine(3))
    with caplog.at_level(logging.WARNING, logger="cage_ds.train.checkpoint"):
        resumed = manager.resume(_engine(3))
    assert resumed.step == 1 and resumed.client_state["data_position"] == 1
    assert str(victim) in caplog.text and "falling back" in caplog.text

    # Same size, one byte flipped: only the checksum sees it.
    older = _largest_file(manager, "step000000001")
    data = bytearray(older.read_bytes())
    data[len(data) // 2] ^= 0x01
    older.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"no complete checkpoint.*{older}.*sha256"):
        manager.resume(_engine(3))
    (tmp_path / "step000000001" / MANIFEST_NAME).unlink()
    assert manager.committed_tags() == ["step000000002"]


AGREEMENT_WORKER = '''
"""One rank of a 2-rank ZeRO-2 job: save 2 checkpoints, rank 0 damages rank 1's optimizer
shard of the newest, then every rank resumes (fallback) and resumes strictly (error)."""
import json, os, sys
from pathlib import Path

import deepspeed
import torch

from cage_ds.train.checkpoint import CheckpointError, CheckpointManager

root, out = Path(sys.argv[1]), Path(sys.argv[2])
deepspeed.init_distributed(dist_backend="gloo")
rank = torch.distributed.get_rank()
config = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2,
          "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}


def engine():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 9), torch.nn.Tanh(), torch.nn.Linear(9, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return deepspeed.initialize(model=model, optimizer=opt, config=config)[0]


def train(e):
    torch.manual_seed(rank)
    loss = torch.nn.functional.mse_loss(e(torch.randn(2, 5)), torch.randn(2, 2))
    e.backward(loss)
    e.step()


e, manager = engine(), CheckpointManager(root, keep_last=3)
for step in (1, 2):
    train(e)
    manager.save(e, step, {"data_position": 10 * step})
victim = root / "step000000002" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
if rank == 0:
    with open(victim, "r+b") as fh:
        fh.truncate(victim.stat().st_size // 2)
torch.distributed.barrier()
resumed = manager.resume(engine())
result = {"step": resumed.step, "data_position": resumed.client_state["data_position"]}
try:
    CheckpointManager(root, strict=True).resume(engine())
    result["strict"] = "loaded"
except CheckpointError as err:
    result["strict"] = str(err)
(out / f"rank{rank}.json").write_text(json.dumps({**result, "victim": str(victim)}))
'''


@pytest.mark.slow
def test_two_ranks_agree_on_fallback_and_strict_error(tmp_path):
    (tmp_path / "worker.py").write_text(AGREEMENT_WORKER)
    logs = run_ranks(2, str(tmp_path / "worker.py"), str(tmp_path / "ckpt"), str(tmp_path))
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in results:
        assert result["step"] == 1 and result["data_position"] == 10
        assert result["victim"] in result["strict"] and "strict" in result["strict"]
    assert "falling back" in logs[0]


def test_meta_rides_in_the_manifest_and_comes_back(tmp_path):
    engine = _engine(0)
    manager = CheckpointManager(tmp_path, keep_last=3)
    manager.save(engine, 1)
    meta = {"config": {"optim": {"lr": 0.001, "betas": [0.9, 0.95]}}}
    manager.save(engine, 2, meta=meta)
    assert manager.read_meta() == ("step000000002", meta)  # read without loading
    assert manager.resume(_engine(1)).meta == meta
    (tmp_path / LATEST_NAME).write_text("step000000001")
    assert manager.read_meta() == ("step000000001", None)  # saved without meta
    assert manager.resume(_engine(1)).meta is None
    assert CheckpointManager(tmp_path / "empty").read_meta() is None


class _Touch:
    """A pickle payload that runs code when unpickled: it creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _tamper(manager: CheckpointManager, tag: str, marker) -> pathlib.Path:
    """Add a code-running object to ``tag``'s model states and re-sign the manifest (what an
    attacker with write access would do: the sha256 manifest catches accidents only)."""
    (victim,) = (manager.root / tag).glob("*model_states.pt")
    state = torch.load(victim, weights_only=False)  # our own file, written above
    torch.save({**state, "payload": _Touch(marker)}, victim)
    manifest_path = manager.root / tag / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][victim.name] = {"size": victim.stat().st_size, "sha256": _sha256(victim)}
    manifest_path.write_text(json.dumps(manifest))
    return victim


def test_tampered_checkpoint_is_refused_unless_trusted(tmp_path):
    """A model-states pickle that runs code is refused on resume (file and opt-out named, the
    code never runs); with trust_pickles it loads (and runs)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from cage_ds.train.safe_load import UnsafeCheckpointError, safe_zero_to_fp32_loads

    manager = CheckpointManager(tmp_path / "ckpt")
    engine = _engine(0)
    _train(engine, 1)
    manager.save(engine, 1)
    with safe_zero_to_fp32_loads():  # export path: DeepSpeed's files load with the allow-list
        clean = get_fp32_state_dict_from_zero_checkpoint(str(manager.root), tag="step000000001")
    assert torch.equal(clean["0.weight"], engine.module[0].weight)
    marker = tmp_path / "pwned"
    victim = _tamper(manager, "step000000001", marker)
    with pytest.raises(UnsafeCheckpointError) as refused:
        manager.resume(_engine(1))
    message = str(refused.value)
    assert str(victim) in message and "checkpoint.trust_pickles=true" in message
    assert "refusing to load" in message and "\n" not in message
    with pytest.raises(UnsafeCheckpointError), safe_zero_to_fp32_loads():
        get_fp32_state_dict_from_zero_checkpoint(str(manager.root), tag="step000000001")
    assert not marker.exists()
    trusted = CheckpointManager(tmp_path / "ckpt", trust_pickles=True).resume(_engine(1))
    assert trusted.step == 1 and marker.exists()


def test_disk_full_while_saving_names_it_and_keeps_latest(tmp_path, monkeypatch):
    import errno

    from cage_ds.train.diskio import DiskFullError

    manager = CheckpointManager(tmp_path / "ckpt")
    engine = _engine(0)
    manager.save(engine, 1)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(DiskFullError, match=f"disk full .* writing {tmp_path / 'ckpt'}/"):
        manager.save(engine, 2)
    assert (tmp_path / "ckpt" / LATEST_NAME).read_text() == "step000000001"
