"""Atomic, verified, pruned DeepSpeed checkpoints with auto-resume: ``CheckpointManager``.

Layout under ``root`` (a filesystem every rank sees)::

    root/latest                     tag of the newest committed checkpoint (written by us)
    root/step000000120/             one committed checkpoint (DeepSpeed's files + ours)
        cage_manifest.json          written last: every file's size (+ sha256), the step,
                                    the caller's ``meta`` (cage-train: the resolved config)
        cage_rank_state_00000.pt    per-rank RNG states (python, numpy, torch, cuda)
    root/.tmp-step000000140/        a save in progress or one that crashed: never loaded

Notable choices:
- Atomicity: all ranks call ``engine.save_checkpoint(root, tag=".tmp-<tag>",
  save_latest=False)``; then rank 0 fsyncs, writes the manifest, renames the temp dir to
  ``<tag>``, and replaces ``latest`` through a temp file + ``os.replace``. A crash anywhere
  before the rename leaves the previous checkpoint as ``latest``, complete and loadable.
- Verification: a checkpoint is complete iff its manifest exists and every listed file has
  the recorded size (and sha256, when ``checksums``). A damaged newest checkpoint makes
  ``resume`` fall back to the previous complete one with a warning naming the file, or
  raise ``CheckpointError`` when ``strict``. Never a silent partial load.
- Agreement: rank 0 chooses the tag and broadcasts it (errors too), so all ranks load the
  same checkpoint or all raise.
- Client state (step, data position, ...) rides in DeepSpeed's ``client_state``; RNG states
  are per rank, in our own small file, loaded with ``weights_only=True``.
- Safe loading: DeepSpeed's files are read with ``weights_only=True`` plus DeepSpeed's few
  classes (cage_ds.train.safe_load); one holding code is refused unless ``trust_pickles``.
- A full disk (ENOSPC/EDQUOT) while saving raises ``DiskFullError`` on every rank, naming
  the file; the previous checkpoint stays ``latest``.
- Needs DeepSpeed's synchronous checkpoint engine (the default); a decoupled (async) one is
  refused, since the rename must follow the last byte written.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .diskio import DiskFullError, disk_full_guard
from .safe_load import safe_engine_loads

logger = logging.getLogger(__name__)

MANIFEST_NAME = "cage_manifest.json"
LATEST_NAME = "latest"
TMP_PREFIX = ".tmp-"
STEP_KEY = "cage_step"
_TAG_RE = re.compile(r"^step(\d{9,})$")
_FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or damaged (the message names the file)."""


@dataclass
class Resumed:
    """What ``CheckpointManager.resume`` loaded."""

    tag: str
    path: Path
    step: int
    client_state: dict[str, Any]
    meta: dict[str, Any] | None = None
    """The ``meta`` the checkpoint was saved with (None: saved without, or by an older
    version)."""


def tag_for_step(step: int) -> str:
    """``step000000120`` for step 120 (zero-padded so names sort like steps)."""
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"step{step:09d}"


def step_of_tag(tag: str) -> int | None:
    """The step of a tag made by ``tag_for_step``, else None."""
    match = _TAG_RE.match(tag)
    return int(match.group(1)) if match else None


def capture_rng_state() -> dict[str, Any]:
    """RNG states of python, numpy (if installed), torch CPU and CUDA (if available), as
    plain data + tensors (``torch.load(weights_only=True)``-safe)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of ``capture_rng_state``."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rank_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _rank_world()[1] > 1:
        torch.distributed.barrier()


def from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object)."""
    if _rank_world()[1] == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


class CheckpointManager:
    """Save every ``save_every`` steps and at the end, keep the last ``keep_last``, resume from
    the newest complete checkpoint.

    Example (every rank runs the same calls)::

        ckpt = CheckpointManager("out/ckpt", keep_last=3, save_every=100)
        resumed = ckpt.resume(engine)                 # None on a fresh start
        start = resumed.step if resumed else 0
        for step in range(start + 1, total + 1):
            ...
            if ckpt.should_save(step, final=step == total):
                ckpt.save(engine, step, {"data_position": pos})
    """

    def __init__(
        self,
        root: str | os.PathLike,
        keep_last: int = 3,
        save_every: int = 0,
        *,
        checksums: bool = True,
        strict: bool = False,
        trust_pickles: bool = False,
    ) -> None:
        if keep_last < 1:
            raise ValueError(f"CheckpointManager: keep_last must be >= 1, got {keep_last}")
        if save_every < 0:
            raise ValueError(f"CheckpointManager: save_every must be >= 0, got {save_every}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.save_every = save_every
        self.checksums = checksums
        self.strict = strict
        self.trust_pickles = trust_pickles
        self._last_saved_step: int | None = None

    # ---- saving ----
    def should_save(self, step: int, final: bool = False) -> bool:
        """True every ``save_every`` steps, and at the final step unless just saved."""
        if final:
            return self._last_saved_step != step
        return self.save_every > 0 and step % self.save_every == 0

    def save(
        self,
        engine: Any,
        step: int,
        client_state: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> Path:
        """Collective: save ``engine`` at ``step`` atomically; returns the committed dir.

        ``client_state`` (picklable) comes back from ``resume``; the key ``cage_step`` is ours.
        ``meta`` (JSON-able, rank 0's counts) goes into the manifest: readable without loading
        the checkpoint (``read_meta``) and returned by ``resume``.
        """
        decoupled = getattr(getattr(engine, "checkpoint_engine", None), "is_decoupled", None)
        if decoupled is not None and decoupled():
            raise CheckpointError(
                "CheckpointManager needs DeepSpeed's synchronous checkpoint "
                "engine; the configured one is decoupled (async)"
            )
        client_state = dict(client_state or {})
        if STEP_KEY in client_state:
            raise ValueError(f"client_state key {STEP_KEY!r} is reserved by CheckpointManager")
        client_state[STEP_KEY] = step
        tag = tag_for_step(step)
        tmp_tag = f"{TMP_PREFIX}{tag}"
        rank, world = _rank_world()
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.root / tmp_tag, ignore_errors=True)  # an earlier crash
        _barrier()
        with disk_full_guard(self.root / tmp_tag):
            engine.save_checkpoint(
                str(self.root), tag=tmp_tag, client_state=client_state, save_latest=False
            )
            rank_file = self.root / tmp_tag / f"cage_rank_state_{rank:05d}.pt"
            torch.save(capture_rng_state(), rank_file)
        _barrier()
        error = None
        if rank == 0:
            try:
                with disk_full_guard(self.root / tmp_tag):
                    self._commit(tmp_tag, tag, step, world, meta)
            except DiskFullError as err:
                error = (True, str(err))
            except Exception as err:  # every rank must learn of it, not hang
                error = (False, f"{type(err).__name__}: {err}")
        error = from_rank0(error)
        if error is not None:
            disk_full, text = error
            if disk_full:
                raise DiskFullError(errno.ENOSPC, text)
            raise CheckpointError(f"committing checkpoint {self.root / tag} failed: {text}")
        self._last_saved_step = step
        return self.root / tag

    def _commit(
        self, tmp_tag: str, tag: str, step: int, world: int, meta: Mapping[str, Any] | None
    ) -> None:
        """Rank 0: fsync, manifest, rename, ``latest``, prune."""
        tmp_dir, final_dir = self.root / tmp_tag, self.root / tag
        files = {}
        for path in sorted(p for p in tmp_dir.rglob("*") if p.is_file()):
            _fsync_path(path)
            entry: dict[str, Any] = {"size": path.stat().st_size}
            if self.checksums:
                entry["sha256"] = _sha256(path)
            files[str(path.relative_to(tmp_dir))] = entry
        manifest = {
            "format": _FORMAT_VERSION,
            "tag": tag,
            "step": step,
            "world_size": world,
            "created": datetime.now(timezone.utc).isoformat(),
            "files": files,
        }
        if meta is not None:
            manifest["meta"] = dict(meta)
        _write_atomic(tmp_dir / MANIFEST_NAME, json.dumps(manifest, indent=1))
        if final_dir.exists():  # re-saving a step: move the old one out of the way first
            stale = self.root / f"{TMP_PREFIX}old-{tag}"
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final_dir, stale)
            shutil.rmtree(stale)
        os.replace(tmp_dir, final_dir)
        _fsync_path(self.root)
        _write_atomic(self.root / LATEST_NAME, tag)
        logger.info("checkpoint %s committed (%d files)", final_dir, len(files))
        self._prune()

    def _prune(self) -> None:
        """Keep the newest ``keep_last`` committed checkpoints; drop crashed temp dirs."""
        committed = self.committed_tags()
        for tag in committed[self.keep_last :]:
            shutil.rmtree(self.root / tag)
            logger.info("checkpoint %s pruned (keep_last=%d)", self.root / tag, self.keep_last)
        for path in self.root.glob(f"{TMP_PREFIX}*"):
            if path.is_dir():
                logger.info("removing incomplete checkpoint %s", path)
                shutil.rmtree(path, ignore_errors=True)

    # ---- inspection ----
    def committed_tags(self) -> list[str]:
        """Tags with a manifest, newest step first (not yet verified)."""
        if not self.root.is_dir():
            return []
        tags = [
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and step_of_tag(p.name) is not None and (p / MANIFEST_NAME).exists()
        ]
        return sorted(tags, key=lambda t: step_of_tag(t) or 0, reverse=True)

    def candidates(self) -> list[str]:
        """Committed tags in the order ``select`` tries them: the one ``latest`` names
        first, then newest step first."""
        candidates = self.committed_tags()
        latest = self.root / LATEST_NAME
        if latest.is_file():
            pointed = latest.read_text().strip()
            if pointed in candidates:
                candidates.remove(pointed)
                candidates.insert(0, pointed)
        return candidates

    def read_manifest(self, tag: str) -> dict[str, Any]:
        """The manifest of ``tag`` as written (files not checked; see ``verify``)."""
        directory = self.root / tag
        manifest_path = directory / MANIFEST_NAME
        if not manifest_path.is_file():
            raise CheckpointError(
                f"{manifest_path} is missing: checkpoint {directory} is "
                "incomplete or was not written by CheckpointManager"
            )
        try:
            manifest = json.loads(manifest_path.read_text())
        except ValueError as err:
            raise CheckpointError(f"{manifest_path} is unreadable: {err}") from err
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise CheckpointError(f"{manifest_path} is unreadable: no 'files' mapping")
        return manifest

    def read_meta(self) -> tuple[str, dict[str, Any] | None] | None:
        """(tag, meta) of the checkpoint a resume would try first, cheaply (no file
        verification); None if there is no committed checkpoint."""
        candidates = self.candidates()
        if not candidates:
            return None
        return candidates[0], self.read_manifest(candidates[0]).get("meta")

    def verify(self, tag: str) -> dict[str, Any]:
        """The manifest of ``tag`` if every file matches it, else ``CheckpointError`` naming
        the first missing, resized or (with ``checksums``) altered file."""
        directory = self.root / tag
        manifest_path = directory / MANIFEST_NAME
        manifest = self.read_manifest(tag)
        for name, entry in manifest["files"].items():
            path = directory / name
            if not path.is_file():
                raise CheckpointError(f"{path} is missing (listed in {manifest_path})")
            size = path.stat().st_size
            if size != entry["size"]:
                raise CheckpointError(
                    f"{path} has {size} bytes, the manifest says "
                    f"{entry['size']}: truncated or overwritten"
                )
            if self.checksums and "sha256" in entry and _sha256(path) != entry["sha256"]:
                raise CheckpointError(f"{path} does not match its sha256 in {manifest_path}")
        return manifest

    def select(self) -> str | None:
        """Rank-0 choice: the tag in ``latest`` if complete, else the newest complete one
        (each skipped checkpoint is logged; ``strict`` raises instead). None if there is no
        checkpoint at all; ``CheckpointError`` if there are some but none is complete."""
        candidates = self.candidates()
        for path in self.root.glob(f"{TMP_PREFIX}*") if self.root.is_dir() else []:
            if path.is_dir():
                logger.warning(
                    "ignoring incomplete checkpoint %s (a save that did not finish)", path
                )
        damaged = []
        for tag in candidates:
            try:
                self.verify(tag)
            except CheckpointError as err:
                if self.strict:
                    raise CheckpointError(
                        f"{err} (strict: no fallback to an older checkpoint)"
                    ) from err
                logger.warning(
                    "checkpoint %s is damaged, falling back to the previous one: %s",
                    self.root / tag,
                    err,
                )
                damaged.append(str(err))
                continue
            if damaged:
                logger.warning("resuming from older checkpoint %s", self.root / tag)
            return tag
        if damaged:
            raise CheckpointError(
                f"no complete checkpoint under {self.root}: " + "; ".join(damaged)
            )
        return None

    # ---- loading ----
    def resume(self, engine: Any, **load_kwargs: Any) -> Resumed | None:
        """Collective: load the checkpoint rank 0 selects into ``engine`` (DeepSpeed
        ``load_checkpoint`` with ``load_kwargs``), restore this rank's RNG states, and return
        it; None on a fresh start."""
        rank, _ = _rank_world()
        choice: tuple[str | None, dict[str, Any] | None, str | None] = (None, None, None)
        if rank == 0:
            try:
                tag = self.select()
                meta = self.read_manifest(tag).get("meta") if tag is not None else None
                choice = (tag, meta, None)
            except CheckpointError as err:
                choice = (None, None, str(err))
        tag, meta, error = from_rank0(choice)
        if error is not None:
            raise CheckpointError(error)
        if tag is None:
            logger.info("no checkpoint under %s: starting fresh", self.root)
            return None
        with safe_engine_loads(engine, trust=self.trust_pickles):
            load_path, client_state = engine.load_checkpoint(str(self.root), tag=tag, **load_kwargs)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {self.root / tag}")
        client_state = dict(client_state or {})
        step = client_state.pop(STEP_KEY)
        rank_file = self.root / tag / f"cage_rank_state_{rank:05d}.pt"
        if rank_file.is_file():
            restore_rng_state(torch.load(rank_file, weights_only=True))
        else:
            logger.warning("%s missing (world size changed?): RNG states not restored", rank_file)
        self._last_saved_step = step
        logger.info("resumed from checkpoint %s at step %d", self.root / tag, step)
        return Resumed(
            tag=tag, path=self.root / tag, step=step, client_state=client_state, meta=meta
        )
