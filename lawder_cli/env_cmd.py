"""`lawder env`: the versions and devices a bug report needs."""

from __future__ import annotations

from lawder_cli.common import err_console, handle_errors, print_json
from lawder_cli.options import JSON


@handle_errors
def env(json_out: bool = JSON) -> None:
    """Versions of Python, torch, CUDA, Ray, diffusers, h5py and the GPUs torch can see."""
    from lawder_core.environment import environment_report

    report = environment_report()
    if json_out:
        print_json(report)
        return
    for key, value in report.items():
        err_console.print(f"{key:>22}: {value}", highlight=False)
