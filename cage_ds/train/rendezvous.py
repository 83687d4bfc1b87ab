"""The torch rendezvous of cage-train: a single-node run listens on loopback only.

torch's TCPStore server listens on every interface (``::``) whatever MASTER_ADDR says, so the
env:// rendezvous of a one-node run (MASTER_ADDR 127.0.0.1) is reachable from the network.
When MASTER_ADDR is a loopback address, rank 0 here binds its own socket to
(MASTER_ADDR, MASTER_PORT), hands it to the store (``master_listen_fd``), and every rank joins
the process group through that store; DeepSpeed then finds the group initialized.
Left to the env:// rendezvous: other addresses (multi-node), torchrun's agent store (the agent
owns the port) and an already initialized process group.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from datetime import timedelta

import torch.distributed as dist


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) resolves to a loopback address."""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def loopback_store(host: str, port: int, rank: int, world: int, timeout: timedelta):
    """A TCPStore whose server (rank 0) listens on ``host``:``port`` only; clients elsewhere."""
    if rank != 0:
        return dist.TCPStore(host, port, world, False, timeout=timeout)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(max(128, world))
    except OSError as err:
        sock.close()
        raise OSError(
            err.errno, f"rendezvous: cannot listen on {host}:{port} ({err.strerror}); "
            "another job holds MASTER_PORT: stop it or choose another MASTER_PORT"
        ) from err  # fmt: skip
    return dist.TCPStore(host, port, world, True, timeout=timeout, master_listen_fd=sock.detach())


def init_loopback_process_group(backend: str, timeout: timedelta) -> bool:
    """Initialize the default process group through ``loopback_store`` when this is a
    single-node env:// launch (see the module docstring); returns whether it did."""
    env = os.environ
    host = env.get("MASTER_ADDR", "")
    if (
        dist.is_initialized()
        or env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        or not {"RANK", "WORLD_SIZE", "MASTER_PORT"} <= env.keys()
        or not is_loopback(host)
    ):
        return False
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    store = loopback_store(host, int(env["MASTER_PORT"]), rank, world, timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return True
