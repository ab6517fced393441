"""Every server of a local Ray that lawder starts listens on loopback only; a joined cluster is left alone.

The listening sockets are read from /proc (the kernel's own table), for the driver and every process under it:
GCS, raylet, the agents and the workers all descend from the command that started Ray.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lawder_core.distributed import train
from lawder_core.distributed.train import LOOPBACK_ENV
from lawder_core.distributed.train import ensure_ray as real_ensure_ray  # before conftest's guard replaces it

pytestmark = pytest.mark.faults

# The driver starts lawder's local Ray, starts a worker process (an actor) and holds everything until told.
DRIVER = textwrap.dedent("""
    import json, os, sys
    from lawder_core.distributed.train import ensure_ray
    ensure_ray(None)
    import ray

    @ray.remote(num_cpus=0)
    class Worker:
        def pid(self):
            return os.getpid()

    worker = Worker.remote()
    print(json.dumps({"worker": ray.get(worker.pid.remote()),
                      "mode": os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}), flush=True)
    sys.stdin.readline()  # hold the cluster until the test has read the sockets
""")

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
def test_every_listener_of_a_local_ray_is_on_loopback():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env)
    try:
        info = json.loads(driver.stdout.readline())
        tree = descendants(driver.pid)
        rows = listeners(tree)
        who = names(tree)
    finally:
        driver.communicate("\n", timeout=120)
    assert info["mode"] == "0"
    assert info["worker"] in tree  # the worker processes are among those read
    listening = {who.get(pid, "?") for _, _, pid in rows}
    assert {"gcs_server", "raylet"} <= listening, rows  # the servers were found, so the check below means something
    outside = [(host, port, who.get(pid, "?")) for host, port, pid in rows if not on_loopback(host)]
    assert outside == [], f"listening beyond loopback: {outside}"
    assert driver.returncode == 0


def test_a_joined_cluster_keeps_its_operators_network_set_up(monkeypatch):
    """--ray-address: lawder neither sets the loopback mode nor changes what the operator set."""
    import ray
    import ray._private.ray_constants as constants

    joined = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: joined.append(kwargs["address"]))
    monkeypatch.setattr(constants, "ENABLE_RAY_CLUSTER", True)
    monkeypatch.setenv(LOOPBACK_ENV, "1")
    monkeypatch.delenv(LOOPBACK_ENV)  # recorded as set, so it is restored after the test
    real_ensure_ray("head:6379")
    assert joined == ["head:6379"]
    assert LOOPBACK_ENV not in os.environ and constants.ENABLE_RAY_CLUSTER is True
    monkeypatch.setenv(LOOPBACK_ENV, "1")
    real_ensure_ray("auto")
    assert os.environ[LOOPBACK_ENV] == "1"


def test_the_loopback_mode_reaches_a_ray_imported_earlier(monkeypatch):
    """A process that imported Ray before lawder starts one (a notebook, a test) still gets the loopback mode."""
    import ray._private.ray_constants as constants
    from ray._private import services

    monkeypatch.setattr(constants, "ENABLE_RAY_CLUSTER", True)
    monkeypatch.setenv(LOOPBACK_ENV, "1")  # recorded, so the test leaves the environment as it found it
    train.loopback_only()
    assert os.environ[LOOPBACK_ENV] == "0"
    assert services.get_node_ip_address() == "127.0.0.1"  # what GCS, raylet and workers are told to bind to
