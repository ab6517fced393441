"""Is the run folder the same folder on every machine of a joined Ray cluster?

Workers write the run folder (rank 0 its checkpoints and metrics, sweep trials their own folders) and the driver
reads it afterwards. On a cluster of several machines that only works when the folder is on storage they all
mount (NFS); otherwise each machine writes a private copy and the driver finds nothing, silently. So before any
training the driver writes a marker with a random token into the folder, and every worker must read that token
there before it starts (`EnvironmentProblem`, exit 4, otherwise).
"""

from __future__ import annotations

import secrets
import socket
import time
from pathlib import Path

from lawder_core.errors import EnvironmentProblem
from lawder_core.files import write_text

MARKER = ".lawder-shared-storage"
# NFS can show a file written on another client a moment late (attribute and directory caches): wait this long
WAIT_S = 15.0


def write_marker(folder: str | Path) -> str:
    """The driver's side: a fresh token in `folder`; returns it for the workers to look for."""
    token = secrets.token_hex(16)
    Path(folder).mkdir(parents=True, exist_ok=True)
    write_text(Path(folder) / MARKER, token)
    return token


def check_marker(folder: str | Path, token: str, wait_s: float = WAIT_S) -> None:
    """A worker's side: the driver's token must be in `folder` here, within `wait_s` seconds."""
    path = Path(folder) / MARKER
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if path.read_text().strip() == token:
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    raise EnvironmentProblem(
        f"the run folder {folder} is not shared with the Ray worker on {socket.gethostname()}: it does not see "
        "what the driver wrote there, so its results would never reach the driver.",
        "A run on several machines needs --out (and --storage) on storage every machine mounts at the same path "
        "(NFS); or drop --ray-address to train on this machine.")


def remove_marker(folder: str | Path) -> None:
    (Path(folder) / MARKER).unlink(missing_ok=True)
