"""Every server of a local Ray that lawder starts listens on loopback only; a joined cluster is left alone.

The listening sockets are read from /proc (the kernel's own table), for the driver and every process under it:
GCS, raylet, the agents and the workers all descend from the command that started Ray.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lawder_core.distributed import loopback
from lawder_core.distributed.loopback import LOOPBACK_ENV
from lawder_core.distributed.session import ensure_ray as real_ensure_ray  # before conftest's guard replaces it

pytestmark = pytest.mark.faults

# `lawder train-order` on two Ray CPU workers: Ray's servers, its workers and PyTorch's rendezvous store and gloo
# connections between the two ranks.
COMMAND = "import sys; from lawder_cli.main import app; sys.argv[0] = 'lawder'; app()"

TCP_LISTEN = "0A"


def descendants(root: int) -> set[int]:
    """`root` and every process under it, from the parent ids in /proc/PID/stat."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # ended meanwhile
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, grew = {root}, True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return tree


def socket_inodes(pids: set[int]) -> dict[str, int]:
    """inode -> pid of every socket those processes hold open."""
    found = {}
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                found[target[8:-1]] = pid
    return found


def address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """/proc/net/tcp's local address: host-order 32-bit words in hex."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(words)


def listeners(pids: set[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket in LISTEN state that those processes hold."""
    inodes = socket_inodes(pids)
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == TCP_LISTEN and inode in inodes:
                host, port = local.split(":")
                rows.append((str(address(host)), int(port, 16), inodes[inode]))
    return rows


def on_loopback(host: str) -> bool:
    ip = ipaddress.ip_address(host)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def names(pids: set[int]) -> dict[int, str]:
    out = {}
    for pid in pids:
        try:
            out[pid] = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            pass
    return out


@pytest.mark.slow
@pytest.mark.ray
def test_every_listener_of_a_local_ray_training_is_on_loopback(tmp_path):
    from lawder_core.data.prepare import PrepareOptions
    from lawder_core.data.synthetic import prepare_synthetic

    prepare_synthetic(tmp_path / "s.h5", n=24, size=32, seed=0, options=PrepareOptions(size=32))
    env = {k: v for k, v in os.environ.items() if k not in (LOOPBACK_ENV, *loopback.INTERFACE_ENV)}
    args = ["train-order", "--data", str(tmp_path / "s.h5"), "--out", str(tmp_path / "run"), "--model", "mkunet-t",
            "--size", "32", "--epochs", "2", "--batch-size", "4", "--workers", "2"]
    command = subprocess.Popen([sys.executable, "-c", COMMAND, *args], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env)
    seen: dict[tuple[str, int], str] = {}
    while command.poll() is None:  # read the sockets over the whole run: servers come and go
        tree = descendants(command.pid)
        who = names(tree)
        for host, port, pid in listeners(tree):
            seen[(host, port)] = who.get(pid, "?")
        time.sleep(0.1)
    output = command.stdout.read()
    assert command.returncode == 0, output[-3000:]
    listening = set(seen.values())
    # the servers were found, so the check below means something: Ray's and the rank-0 worker's (rendezvous store)
    assert {"gcs_server", "raylet"} <= listening and any("RayTrainWo" in name for name in listening), seen
    outside = {address: name for address, name in seen.items() if not on_loopback(address[0])}
    assert outside == {}, f"listening beyond loopback: {outside}"


def test_a_joined_cluster_keeps_its_operators_network_set_up(monkeypatch):
    """--ray-address: lawder neither sets the loopback mode nor changes what the operator set."""
    import ray
    import ray._private.ray_constants as constants

    joined = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: joined.append(kwargs["address"]))
    monkeypatch.setattr(constants, "ENABLE_RAY_CLUSTER", True)
    for name in (LOOPBACK_ENV, *loopback.INTERFACE_ENV):
        monkeypatch.setenv(name, "1")
        monkeypatch.delenv(name)  # recorded as set, so it is restored after the test
    real_ensure_ray("head:6379")
    assert joined == ["head:6379"]
    assert LOOPBACK_ENV not in os.environ and constants.ENABLE_RAY_CLUSTER is True
    assert all(name not in os.environ for name in loopback.INTERFACE_ENV)
    monkeypatch.setenv(LOOPBACK_ENV, "1")
    real_ensure_ray("auto")
    assert os.environ[LOOPBACK_ENV] == "1"


def test_the_loopback_mode_reaches_a_ray_imported_earlier(monkeypatch):
    """A process that imported Ray before lawder starts one (a notebook, a test) still gets the loopback mode."""
    import ray._private.ray_constants as constants
    from ray._private import services

    monkeypatch.setattr(constants, "ENABLE_RAY_CLUSTER", True)
    monkeypatch.setenv(LOOPBACK_ENV, "1")  # recorded, so the test leaves the environment as it found it
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth7")  # the user's choice of interface is kept
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "x")
    monkeypatch.delenv("NCCL_SOCKET_IFNAME")
    loopback.loopback_only()
    assert os.environ["GLOO_SOCKET_IFNAME"] == "eth7" and os.environ["NCCL_SOCKET_IFNAME"] == "lo"
    assert os.environ[LOOPBACK_ENV] == "0"
    assert services.get_node_ip_address() == "127.0.0.1"  # what GCS, raylet and workers are told to bind to
