"""`lawder prepare`: raw data -> one HDF5 file + fingerprint + splits."""

from __future__ import annotations

from pathlib import Path

import typer

from lawder_cli.common import err_console, handle_errors, print_json, progress_bar
from lawder_cli.options import FORCE, JSON, SEED, in_range
from lawder_core import numbers


@handle_errors
def prepare(
    source: str = typer.Argument(..., help="kvasir | cvc | folder | kits | synthetic"),
    in_dir: Path | None = typer.Argument(None, help="Raw data folder (not needed for synthetic or folder)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output HDF5 file."),
    images: str | None = typer.Option(None, help="folder: the images folder."),
    masks: str | None = typer.Option(None, help="folder: the masks folder (matched by file stem)."),
    size: int = typer.Option(256, callback=in_range(numbers.PREPARE_SIZE),
                             help="Square output size; 0 keeps the original size (all must match)."),
    resize: str = typer.Option("pad", help="pad: zero-pad to a square, then resize; stretch: plain resize."),
    split: str = typer.Option("0.8,0.1,0.1", help="train,val,test fractions, by case."),
    split_file: Path | None = typer.Option(None, help="Reuse the case split of an earlier *.splits.json."),
    seed: int = SEED,
    n: int = typer.Option(200, callback=in_range(numbers.COUNT), help="synthetic: number of samples."),
    lesion_frac: str | None = typer.Option(None, "--lesion-frac", metavar="LOW,HIGH",
                                           help="synthetic: lesion share of the frame, drawn uniformly per sample "
                                                "(default 0.01,0.20; small lesions: 0.003,0.03)."),
    blobs: int | None = typer.Option(None, "--blobs", callback=in_range(numbers.BLOBS),
                                     help="synthetic: lesions per sample (default: one to three)."),
    window: str = typer.Option("-79,304", help="kits: CT window in HU, LOW,HIGH."),
    empty_share: float = typer.Option(0.1, callback=in_range(numbers.RATIO),
                                      help="kits: share of kidney-free slices to keep (per kidney slice)."),
    jobs: int = typer.Option(1, callback=in_range(numbers.JOBS), help="kits: cases converted in parallel."),
    channels: int = typer.Option(1, callback=in_range(numbers.CHANNELS),
                                 help="kits: 1 (grey) or 3 (grey repeated, for RGB backbones)."),
    skip_incomplete: bool = typer.Option(False, help="kits: leave out cases without segmentation.nii.gz."),
    spacing: float | None = typer.Option(None, metavar="MM", callback=in_range(numbers.SPACING_MM),
                                         help="kits: resample slices to MM mm per pixel "
                                              "(from the NIfTI voxel size) before --size; default: each case's own."),
    compression: str = typer.Option("lzf", help="HDF5 compression: lzf, none (fastest reads) or gzip (smallest)."),
    force: bool = FORCE,
    json_out: bool = JSON,
) -> None:
    """Convert raw data into lawder's HDF5 format, with a case-level split (drawn with --seed) and a fingerprint."""
    from lawder_core.data.sources import SourceOptions, check_source, prepare_source

    extra = SourceOptions(images=images, masks=masks, n=n, lesion_frac=lesion_frac, blobs=blobs, window=window,
                          empty_share=empty_share, jobs=jobs, channels=channels, skip_incomplete=skip_incomplete,
                          spacing=spacing)
    check_source(source, in_dir, extra)  # before numpy and h5py load: a usage error comes back at once
    from lawder_core.data.prepare import PrepareOptions
    from lawder_core.data.splits import parse_fractions

    options = PrepareOptions(size=size or None, resize_mode=resize, fractions=parse_fractions(split), seed=seed or 0,
                             split_file=str(split_file) if split_file else None, force=force,
                             compression=None if compression == "none" else compression)
    with progress_bar(f"prepare {source}", None) as advance:
        fingerprint = prepare_source(source, in_dir, out, options, extra, progress=advance)
    if json_out:
        print_json(fingerprint)
        return
    splits = fingerprint["splits"]
    err_console.print(
        f"wrote {out}: {fingerprint['samples']} samples from {fingerprint['cases']} cases "
        f"(train {splits['train']['samples']}, val {splits['val']['samples']}, test {splits['test']['samples']}), "
        f"{'×'.join(map(str, fingerprint['image_shape']))}"
    )
