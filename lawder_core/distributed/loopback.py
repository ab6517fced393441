"""A local Ray, and the training processes it starts, listening on loopback only.

Three kinds of servers run under a local Ray training:
- Ray's own (GCS, raylet, the agents, every worker's gRPC server): Ray's single-machine mode puts them on
  127.0.0.1 (`loopback_only`);
- PyTorch's rendezvous store (a TCPStore, hosted by rank 0 of `init_process_group`), which binds every interface
  whatever address the ranks meet at: rank 0 here hands it a socket already bound to loopback
  (`bind_store_to_loopback`);
- gloo's and NCCL's connections between the ranks: their interface is named `lo` (unless the user named one).

A joined cluster (`--ray-address`) is none of this module's business: its operator decides where it listens.
"""

from __future__ import annotations

import importlib
import ipaddress
import os
import socket
import sys
from typing import Any

# Ray's single-machine mode (the one it uses on macOS and Windows), read when `ray` is imported
# (`ray._private.ray_constants.ENABLE_RAY_CLUSTER`): with "0" the node address is 127.0.0.1 and GCS, the raylet,
# the agents and every worker listen there only. Ray's processes inherit it from this environment.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# The interface gloo (CPU workers) and NCCL (GPU workers) connect the ranks over, on one machine.
INTERFACE_ENV = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
LOOPBACK_INTERFACE = "lo"


def loopback_only() -> None:
    """Switch on Ray's single-machine mode for the Ray this process is about to start, and name the loopback
    interface for the ranks' connections (a value the user set is kept).

    Call it before `ray` is first imported; where something imported it earlier, its flag is set as the import
    would have set it (Ray reads the module attribute each time it picks the node address).
    """
    os.environ[LOOPBACK_ENV] = "0"
    for name in INTERFACE_ENV:
        os.environ.setdefault(name, LOOPBACK_INTERFACE)
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def bind_store_to_loopback() -> None:
    """In a training worker: when the ranks meet at a loopback address (a local Ray), rank 0 hosts PyTorch's
    rendezvous store on a socket bound to that address instead of every interface. Idempotent; other addresses
    (a joined cluster) keep PyTorch's own store."""
    from torch.distributed import TCPStore

    # the module, not the function `torch.distributed.rendezvous` that shadows its name
    rendezvous = importlib.import_module("torch.distributed.rendezvous")
    create = rendezvous._create_c10d_store
    if getattr(create, "lawder_loopback", False):
        return

    def create_store(hostname: str, port: int, rank: int, world_size: int, timeout: Any, *args: Any,
                     **kwargs: Any) -> Any:
        if rank != 0 or not is_loopback(hostname):
            return create(hostname, port, rank, world_size, timeout, *args, **kwargs)
        family = socket.AF_INET6 if ":" in hostname else socket.AF_INET
        server = socket.create_server((hostname, port), family=family, backlog=max(128, world_size))
        return TCPStore(hostname, port, world_size, is_master=True, timeout=timeout, multi_tenant=True,
                        master_listen_fd=server.detach())

    create_store.lawder_loopback = True  # type: ignore[attr-defined]
    rendezvous._create_c10d_store = create_store


def loopback_torch_config(backend: str) -> Any:
    """Ray Train's TorchConfig for a local Ray: each worker binds the rendezvous store to loopback before Ray
    Train sets up the process group."""
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend

    class LoopbackTorchBackend(_TorchBackend):
        def on_start(self, worker_group: Any, backend_config: Any) -> None:
            worker_group.execute(bind_store_to_loopback)
            super().on_start(worker_group, backend_config)

    class LoopbackTorchConfig(TorchConfig):
        @property
        def backend_cls(self) -> type:
            return LoopbackTorchBackend

    return LoopbackTorchConfig(backend=backend)
