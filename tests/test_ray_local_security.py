"""A local Ray started by lawder is closed to others: token auth, a private temp tree removed on exit (issue 16).

Its listeners are on loopback only: `test_ray_loopback.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.faults

DRIVER = textwrap.dedent("""
    import json, os, stat, sys
    from pathlib import Path
    os.environ.pop("RAY_AUTH_MODE", None)
    os.environ.pop("RAY_AUTH_TOKEN", None)
    import ray
    from lawder_core.distributed.session import ensure_ray
    ensure_ray(None)
    temp = Path(ray._private.worker._global_node.get_temp_dir_path()).parent
    print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "temp": str(temp),
                      "mode": oct(stat.S_IMODE(temp.stat().st_mode)), "auth": os.environ.get("RAY_AUTH_MODE")}),
          flush=True)
    sys.stdin.readline()  # hold the cluster until the test is done probing it
""")

# A process of another user on the same machine, in the same loopback mode (from another machine nothing listens).
INTRUDER = textwrap.dedent("""
    import os, sys
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = "0" * 64
    import ray
    try:
        ray.init(address=sys.argv[1], log_to_driver=False)
        print("JOINED")
    except Exception as err:
        print("REFUSED", type(err).__name__)
""")


@pytest.mark.slow
@pytest.mark.ray
def test_a_local_ray_needs_its_token_and_keeps_its_files_private(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env)
    try:
        info = json.loads(driver.stdout.readline())
        assert info["auth"] == "token"
        assert info["mode"] == "0o700"  # Ray makes its own folder world-writable: lawder's parent is private
        intruder = subprocess.run([sys.executable, "-c", INTRUDER, info["gcs"]], capture_output=True, text=True,
                                  timeout=120, env=env)
        assert "REFUSED" in intruder.stdout, intruder.stdout + intruder.stderr[-2000:]
        assert "InvalidAuthToken" in intruder.stdout + intruder.stderr  # refused for the token, not by chance
    finally:
        driver.communicate("\n", timeout=120)
    assert driver.returncode == 0
    assert not os.path.exists(info["temp"])  # removed when the command exited
