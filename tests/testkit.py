"""Plain helpers shared by tests in every folder (importable as ``testkit``: pytest puts
tests/ on sys.path for the root conftest.py)."""

from __future__ import annotations

import socket
import subprocess


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_llama(seed: int = 0, quant=None, **shape):
    """The tests' tiny Llama, fp32 and untied: d 256, 2 layers of 4 heads, SwiGLU 512, vocab
    512, 64 positions unless ``shape`` overrides a LlamaConfig key. Seeded with ``seed``;
    ``quant`` (a preset name such as "w4a4" or a QuantConfig) prepares it with prepare_model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cage_ds import QuantConfig, prepare_model

    kw = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
              intermediate_size=512, vocab_size=512, max_position_embeddings=64,
              tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**kw, **shape})).float()
    if quant is None:
        return model
    return prepare_model(model, QuantConfig.preset(quant) if isinstance(quant, str) else quant)


DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""torch.distributed's rendezvous variables."""


def child_env() -> dict[str, str]:
    """os.environ for a subprocess that starts its own job: without the rendezvous variables
    that a test which started a process group in this process (DeepSpeed sets them) leaves
    behind, which would point the child at a port this process still holds."""
    import os

    return {k: v for k, v in os.environ.items() if k not in DIST_ENV}


RANK_PRELOAD = ("torch", "deepspeed", "transformers.models.llama.modeling_llama", "cage_ds")
"""What the fork server imports once (about 6 s a process on this VM) before forking."""


def _fork(fn, args: tuple, env: dict, out: str, err: str, cwd: str | None = None,
          replace_env: bool = False):  # fmt: skip
    """Start ``fn(*args)`` in a process forked from multiprocessing's forkserver after it
    imported RANK_PRELOAD. The server never runs a torch op or joins a process group, so each
    child starts clean; ``env`` is set in the child before ``fn`` runs. What the preloaded
    modules read at import (DS_ACCELERATOR, HF_HUB_OFFLINE, ...) comes from the environment
    pytest had when the server started (tests/conftest.py sets cage-train's values). stdout
    and stderr go to the files ``out`` and ``err``."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(RANK_PRELOAD))
    proc = ctx.Process(target=_forked_entry, args=(fn, args, env, out, err, cwd, replace_env))
    proc.start()
    return proc


def _forked_entry(fn, args, env, out, err, cwd, replace_env) -> None:
    import atexit
    import os

    if replace_env:
        os.environ.clear()
    os.environ.update(env)
    if "OMP_NUM_THREADS" in env:  # the server's torch read the variable at import
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    if cwd is not None:
        os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), fd)
    try:
        fn(*args)
    finally:  # what the interpreter does at exit; multiprocessing's child ends with os._exit
        atexit._run_exitfuncs()


def spawn_ranks(fn, args: tuple = (), world: int = 2, env: dict | None = None,
                timeout: float = 900) -> list[str]:  # fmt: skip
    """``fn(rank, *args)`` in ``world`` processes, like ``torch.multiprocessing.spawn``, but
    forked (``_fork``): a rank starts in a fraction of a second instead of importing torch,
    DeepSpeed and transformers anew. ``fn`` must be importable (a module-level function). If
    a rank fails, the others are stopped and AssertionError shows the failing ranks' output;
    else returns each rank's output (stdout and stderr). Tests of launching itself start real
    launchers instead."""
    import tempfile
    import time
    from pathlib import Path

    logs = Path(tempfile.mkdtemp(prefix="cage-ranks-"))
    procs = [_fork(fn, (rank, *args), env or {}, *[str(logs / f"{rank}.log")] * 2)
             for rank in range(world)]  # fmt: skip
    deadline = time.monotonic() + timeout
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        if any(p.exitcode not in (None, 0) for p in procs):
            break
        time.sleep(0.05)
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    failed = {r: p.exitcode for r, p in enumerate(procs) if p.exitcode != 0}
    if failed:
        logs_of = {r: logs / f"{r}.log" for r in failed}  # a rank killed early wrote none
        tails = "\n".join(f"--- rank {r} (exit {code}) ---\n"
                          + (logs_of[r].read_text(errors="replace")[-6000:]
                             if logs_of[r].exists() else "(no output)")
                          for r, code in failed.items())  # fmt: skip
        late = " (timed out)" if time.monotonic() >= deadline else ""
        raise AssertionError(f"ranks failed{late}: {failed}\n{tails}")
    return [(logs / f"{r}.log").read_text(errors="replace") for r in range(world)]


def run_python(*args: str, env: dict | None = None, cwd=None, timeout: float = 600):
    """``subprocess.run([python, *args], env=env, cwd=cwd, capture_output=True, text=True,
    timeout=timeout)`` for ``args`` = ``-m MODULE ...``, ``-c CODE ...`` or ``SCRIPT ...``
    (``env`` defaults to child_env()), forked (``_fork``) with exactly ``env`` as its
    environment: the code runs as __main__ from its first line on, without the interpreter
    start and the imports. Returns a CompletedProcess; raises subprocess.TimeoutExpired like
    subprocess.run."""
    import os
    import tempfile

    with tempfile.TemporaryDirectory(prefix="cage-python-") as logs:
        out, err = os.path.join(logs, "out"), os.path.join(logs, "err")
        full_env = child_env() if env is None else dict(env)
        cwd = None if cwd is None else os.fspath(cwd)
        proc = _fork(_python_main, args, full_env, out, err, cwd, replace_env=True)
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(list(args), timeout)
        with open(out, errors="replace") as fo, open(err, errors="replace") as fe:
            return subprocess.CompletedProcess(list(args), proc.exitcode, fo.read(), fe.read())


def _python_main(*args: str) -> None:
    """What ``python *args`` runs: sys.argv and sys.path[0] as the interpreter sets them."""
    import os
    import runpy
    import sys

    if args[0] == "-m":
        sys.argv = [args[1], *args[2:]]  # run_module puts the module's path in argv[0]
        sys.path.insert(0, os.getcwd())
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    elif args[0] == "-c":
        sys.argv = ["-c", *args[2:]]
        sys.path.insert(0, "")
        exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})
    else:
        sys.argv = list(args)
        sys.path.insert(0, os.path.dirname(os.path.abspath(args[0])))
        runpy.run_path(args[0], run_name="__main__")


def cage_train(*argv, cache=None, env: dict | None = None, cwd=None, timeout: float = 600):
    """cage-train (``python -m cage_ds.train``) on ``argv``, forked (run_python), in the
    tests' environment: one thread, DeepSpeed's CPU accelerator, no MLflow telemetry, no
    FutureWarnings, the tokenizer cache in ``cache`` when given, then ``env``. Returns the
    CompletedProcess."""
    return run_python("-m", "cage_ds.train", *map(str, argv), env=cli_env(cache, **(env or {})),
                      cwd=cwd, timeout=timeout)  # fmt: skip


def cli_env(cache=None, **extra: str) -> dict[str, str]:
    """child_env() for a cage-train process of the tests: one thread, DeepSpeed's CPU
    accelerator, no MLflow telemetry, no FutureWarnings, the tokenizer cache in ``cache``
    when given, then ``extra``."""
    env = {**child_env(), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "MLFLOW_DISABLE_TELEMETRY": "true",
           "PYTHONWARNINGS": "ignore::FutureWarning"}  # fmt: skip
    if cache is not None:
        env["CAGE_DS_CACHE"] = str(cache)
    return {**env, **extra}


def run_ranks(world: int, script: str, *argv: str, env: dict | None = None,
              timeout: float = 900) -> list[str]:  # fmt: skip
    """Run ``script`` as ``world`` CPU ranks of one gloo job, as torchrun would (RANK,
    LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, sys.argv, the script's
    folder on sys.path, run as __main__), through spawn_ranks."""
    port = free_port()
    try:
        return spawn_ranks(_run_script, (world, port, script, argv),
                           world, {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})},
                           timeout)  # fmt: skip
    finally:
        release_shm(port, world)


def release_shm(port: int, world: int) -> None:
    """Remove the /dev/shm files of a finished DeepSpeed CPU job on 127.0.0.1:``port``: its
    shm all-reduce (deepspeed/ops/csrc/cpu/comm/shm.cpp) creates one 69 MB file per rank and
    never unlinks it, so a day of test runs once filled /dev/shm (16 GB) and the VM thrashed.
    cage_ds.zero.cpu_shm unlinks them after init; this also covers a rank that died before."""
    import os
    from pathlib import Path

    for rank in range(world):
        name = f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{rank}"
        Path("/dev/shm", name).unlink(missing_ok=True)


def _run_script(rank: int, world: int, port: int, script: str, argv: tuple) -> None:
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    _python_main(script, *argv)


NATIVE_ABORT = "Signal 6 (SIGABRT)"


def torchrun(world: int, *args: str, env: dict | None = None, cwd=None,
             timeout: float = 900) -> subprocess.CompletedProcess:  # fmt: skip
    """A real ``torchrun`` launch of ``args`` (``script ...`` or ``-m module ...``) on ``world``
    CPU ranks (fresh interpreters: own hash seed, own allocator; env: child_env() with one
    thread and DeepSpeed's CPU accelerator, then ``env``). Returns the CompletedProcess;
    raises AssertionError with the output's tail on failure.

    One relaunch, with a warning carrying the first output, when a rank died of SIGABRT in
    native code: a 2-rank gloo job aborted that way once in CI (2026-12-07, "terminate called
    without an active exception", no Python frame) and never in 18 local repeats. A failure
    that repeats, or any other failure, still fails. cage-train enables faulthandler, so the
    warning shows where the rank was."""
    import os
    import sys
    import warnings

    full_env = {**child_env(), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", **(env or {})}
    torchrun_bin = os.path.join(os.path.dirname(sys.executable), "torchrun")

    def launch() -> subprocess.CompletedProcess:
        cmd = [torchrun_bin, f"--nproc_per_node={world}", f"--master_port={free_port()}", *args]
        return subprocess.run(cmd, env=full_env, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip

    def tail(proc: subprocess.CompletedProcess) -> str:
        return f"rc {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"

    proc = launch()
    if proc.returncode != 0 and NATIVE_ABORT in proc.stderr:
        warnings.warn(f"torchrun: a rank aborted in native code, relaunching once; {tail(proc)}",
                      stacklevel=2)  # fmt: skip
        proc = launch()
    if proc.returncode != 0:
        raise AssertionError(f"launch failed ({tail(proc)}")
    return proc
