"""`lawder prepare`: raw data -> one HDF5 file + fingerprint + splits."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from lawder_cli.common import err_console, handle_errors, print_json, progress_bar
from lawder_core.data.prepare import PrepareOptions
from lawder_core.data.splits import parse_fractions
from lawder_core.errors import UsageError


class Source(str, Enum):
    kvasir = "kvasir"
    cvc = "cvc"
    folder = "folder"
    kits = "kits"
    synthetic = "synthetic"


@handle_errors
def prepare(
    source: Source = typer.Argument(..., help="kvasir | cvc | folder | kits | synthetic"),
    in_dir: Path | None = typer.Argument(None, help="Raw data folder (not needed for synthetic or folder)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output HDF5 file."),
    images: str | None = typer.Option(None, help="folder: the images folder."),
    masks: str | None = typer.Option(None, help="folder: the masks folder (matched by file stem)."),
    size: int = typer.Option(256, help="Square output size; 0 keeps the original size (all must match)."),
    resize: str = typer.Option("pad", help="pad: zero-pad to a square, then resize; stretch: plain resize."),
    split: str = typer.Option("0.8,0.1,0.1", help="train,val,test fractions, by case."),
    split_file: Path | None = typer.Option(None, help="Reuse the case split of an earlier *.splits.json."),
    seed: int = typer.Option(0, help="Seed of the split (and of the synthetic set)."),
    n: int = typer.Option(200, help="synthetic: number of samples."),
    window: str = typer.Option("-79,304", help="kits: CT window in HU, LOW,HIGH."),
    empty_share: float = typer.Option(0.1, help="kits: share of kidney-free slices to keep (per kidney slice)."),
    jobs: int = typer.Option(1, help="kits: cases converted in parallel."),
    channels: int = typer.Option(1, help="kits: 1 (grey) or 3 (grey repeated, for RGB backbones)."),
    skip_incomplete: bool = typer.Option(False, help="kits: leave out cases without segmentation.nii.gz."),
    compression: str = typer.Option("lzf", help="HDF5 compression: lzf, none (fastest reads) or gzip (smallest)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
    json_out: bool = typer.Option(False, "--json", help="Print only the fingerprint as JSON on stdout."),
) -> None:
    """Convert raw data into lawder's HDF5 format, with a case-level split and a fingerprint."""
    if resize not in ("pad", "stretch"):
        raise UsageError(f"--resize must be pad or stretch, not {resize!r}.")
    options = PrepareOptions(size=size or None, resize_mode=resize, fractions=parse_fractions(split), seed=seed,
                             split_file=str(split_file) if split_file else None, force=force,
                             compression=None if compression == "none" else compression)
    with progress_bar(f"prepare {source.value}", None) as advance:
        fingerprint = run_prepare(source, in_dir, out, options, images=images, masks=masks, n=n, window=window,
                                  empty_share=empty_share, jobs=jobs, channels=channels,
                                  skip_incomplete=skip_incomplete, progress=advance)
    if json_out:
        print_json(fingerprint)
        return
    splits = fingerprint["splits"]
    err_console.print(
        f"wrote {out}: {fingerprint['samples']} samples from {fingerprint['cases']} cases "
        f"(train {splits['train']['samples']}, val {splits['val']['samples']}, test {splits['test']['samples']}), "
        f"{'×'.join(map(str, fingerprint['image_shape']))}"
    )


def run_prepare(source: Source, in_dir: Path | None, out: Path, options: PrepareOptions, *, images: str | None,
                masks: str | None, n: int, window: str, empty_share: float, jobs: int, channels: int = 1,
                skip_incomplete: bool = False, progress=None) -> dict:
    if source is Source.synthetic:
        from lawder_core.data.synthetic import prepare_synthetic

        return prepare_synthetic(out, n=n, size=options.size or 128, seed=options.seed, options=options,
                                 progress=progress)
    if source is Source.kits:
        from lawder_core.data.prepare_kits import KitsOptions, prepare_kits

        if in_dir is None:
            raise UsageError("`prepare kits` needs the KiTS folder (with case_XXXXX/ sub-folders).")
        kits = KitsOptions(window=parse_window(window), empty_share=empty_share, jobs=jobs, channels=channels,
                           skip_incomplete=skip_incomplete)
        return prepare_kits(in_dir, out, options, kits, progress=progress)
    from lawder_core.data.prepare_folder import prepare_folder

    if source is not Source.folder and in_dir is None:
        raise UsageError(f"`prepare {source.value}` needs the input folder.")
    return prepare_folder(source.value, in_dir, out, options, images=images, masks=masks, progress=progress)


def parse_window(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError as err:
        raise UsageError(f"--window {text!r} must be LOW,HIGH in HU, e.g. -79,304") from err
    if low >= high:
        raise UsageError(f"--window {text!r}: LOW must be below HIGH.")
    return low, high
