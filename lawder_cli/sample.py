"""`lawder sample`: synthetic image/mask pairs from a train-law run, conditioned on the masks of an HDF5 file."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import typer

from lawder_cli.common import err_console, handle_errors, print_json, progress_bar, quiet_stdout, setup_logging
from lawder_cli.options import FORCE, GPUS, JSON, RAY_ADDRESS, SEED, WAIT_FOR_RESOURCES, WORKERS, in_range
from lawder_core import numbers


@handle_errors
def sample(
    run: str = typer.Option(..., "--run", help="A `lawder train-law` run folder (its EMA weights are used)."),
    masks: str = typer.Option(..., "--masks", help="Prepared HDF5 file whose masks condition the samples."),
    out: Path = typer.Option(..., "-o", "--out", help="Synthetic HDF5 file to write (a PNG grid goes beside it)."),
    split: str = typer.Option("train", "--split", help="Split of --masks to take the masks from ('all' for all)."),
    n: int = typer.Option(None, "--n", callback=in_range(numbers.COUNT),
                          help="Number of samples (default: one per mask)."),
    mask_aug: bool = typer.Option(False, "--mask-aug",
                                  help="Random flips/90° rotations of the masks (seeded); lets --n exceed the masks."),
    steps: int = typer.Option(50, "--steps", callback=in_range(numbers.SAMPLING_STEPS), help="Sampling steps."),
    scheduler: str = typer.Option("ddim", "--scheduler", help="ddim | dpm"),
    guidance: float = typer.Option(1.0, "--guidance", callback=in_range(numbers.GUIDANCE),
                                   help="Classifier-free guidance scale (1: none)."),
    batch_size: int = typer.Option(16, "--batch-size", callback=in_range(numbers.BATCH),
                                   help="Images per forward pass."),
    lesion_labels: str = typer.Option(None, "--lesion-labels",
                                      help="Labels the synthetic file records as lesion (what mask adherence judges), "
                                           "by name or number, '+'-separated (default: the run's LAW lesion labels; "
                                           "KiTS tumor+cyst, other data every label > 0). Masks keep every label."),
    seed: int = SEED,
    gpus: int = GPUS,
    workers: int = WORKERS,
    ray_address: str = RAY_ADDRESS,
    wait_for_resources: float = WAIT_FOR_RESOURCES,
    force: bool = FORCE,
    json_out: bool = JSON,
) -> None:
    """Generate one synthetic image per mask (or --n) and write them as a lawder HDF5 file with provenance.

    Image i depends only on (--seed, i), so --gpus/--workers change the speed, not the images.
    """
    from lawder_core.distributed.sample import run_sample
    from lawder_core.sample import SampleConfig

    setup_logging()
    cfg = SampleConfig(run=run, masks=masks, out=str(out), split=split, n=n, mask_aug=mask_aug, steps=steps,
                       scheduler=scheduler, guidance=guidance, batch_size=batch_size, seed=seed or 0, gpus=gpus,
                       workers=workers, ray_address=ray_address,
                       wait_for_resources=wait_for_resources, force=force, lesion_labels=lesion_labels)
    with ExitStack() as stack:
        stack.enter_context(quiet_stdout())
        advance: list = []

        def start_bar(total: int) -> None:
            advance.append(stack.enter_context(progress_bar(f"sample {total} images", total)))

        result = run_sample(cfg, progress=lambda k: advance[0](k) if advance else None, on_plan=start_bar)
    if json_out:
        print_json(result)
        return
    err_console.print(f"wrote {result['n']} synthetic pairs ({result['size']}×{result['size']}) to {result['out']} "
                      f"from {result['run']} (step {result['step']}, {result['weighting']}); grid {result['grid']}; "
                      f"{result['images_per_s']:.2f} images/s")
