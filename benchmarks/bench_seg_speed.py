"""CPU images/s of the segmenters, eager and in their fastest inference path, in one run.

For mkunet-t, mkunet-t-order, mkunet-base and unet-r34 at 256×256, batch 16: parameters, MACs (convolutions,
matmuls and attention; FLOPs / 2), throughput in every inference mode (best of --repeats timings, so other
load on a shared machine only ever lowers the figures), and whether each fast mode matches eager. Goals (issue 14):
ORDER's fastest path ≥ 5× unet-r34's fastest path and ≤ 2× MK-UNet-T's fastest path's time, where a model's
fastest path is the fastest of its PyTorch modes and ONNX Runtime (`predict --onnx` is an inference path lawder
ships). ONNX Runtime rows (issue 17): every model exported by `lawder export onnx`'s writer, run by ONNX Runtime
with the same batch and threads, against its fastest PyTorch path; goal for ORDER ≥ 1.5×.

Usage: python benchmarks/bench_seg_speed.py [--out benchmarks/results/bench_seg_speed.json] [--no-compile]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from lawder_core.metrics.profile import count_flops, count_params, measure_latency
from lawder_core.models.factory import build_segmenter
from lawder_core.models.fast import optimize_for_inference

MODELS = ["mkunet-t", "mkunet-t-order", "mkunet-base", "unet-r34"]
DEFAULT_OUT = Path(__file__).parent / "results" / "bench_seg_speed.json"
TOLERANCE = 1e-3  # max |fast − eager| on the logits


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to compile on 2 cores)")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime rows")
    return parser.parse_args()


def calibrated(name: str) -> torch.nn.Module:
    """A model with non-trivial BatchNorm statistics, so the BN-folding check means something."""
    torch.manual_seed(0)
    model = build_segmenter(name).train()
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    return model.eval()


def measure_mode(model: torch.nn.Module, mode: str, x: torch.Tensor, reference: torch.Tensor, args) -> dict[str, Any]:
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = optimize_for_inference(model, mode, example=x)
        out = fast(x)
    setup_s = time.perf_counter() - start
    timing = measure_latency(fast, args.size, args.batch, args.repeats, warmup=1)
    error = float((out.float() - reference).abs().max())
    return {
        **timing,
        "setup_s": setup_s,
        "max_abs_error": error,
        "matches_eager": error <= TOLERANCE,
        "ran_as": getattr(fast, "mode", mode),
        "warnings": [str(w.message)[:200] for w in caught if issubclass(w.category, UserWarning)],
    }


def bench_model(name: str, modes: list[str], args) -> dict[str, Any]:
    model = calibrated(name)
    x = torch.randn(args.batch, 3, args.size, args.size)
    with torch.inference_mode():
        reference = model(x).float()
    cost = count_flops(model, size=args.size)
    result: dict[str, Any] = {"params": count_params(model), "macs": cost["macs"], "flops": cost["flops"], "modes": {}}
    for mode in modes:
        result["modes"][mode] = measure_mode(model, mode, x, reference, args)
        r = result["modes"][mode]
        print(f"  {name:15s} {mode:14s} {r['img_per_s']:7.1f} img/s  setup {r['setup_s']:6.1f} s  "
              f"err {r['max_abs_error']:.1e}", flush=True)
    correct_fast = {m: r for m, r in result["modes"].items() if m != "eager" and r["matches_eager"]}
    best = max(correct_fast, key=lambda m: correct_fast[m]["img_per_s"]) if correct_fast else "eager"
    result["fastest_mode"] = best
    result["fastest_img_per_s"] = result["modes"][best]["img_per_s"]
    result["fastest_any_path"], result["fastest_any_img_per_s"] = best, result["fastest_img_per_s"]
    if not args.no_onnx:
        result["onnxruntime"] = measure_onnx(model, x, reference, args)
        r = result["onnxruntime"]
        print(f"  {name:15s} {'onnxruntime':14s} {r['img_per_s']:7.1f} img/s  setup {r['setup_s']:6.1f} s  "
              f"err {r['max_abs_error']:.1e}", flush=True)
        if r["img_per_s"] > result["fastest_img_per_s"]:
            result["fastest_any_path"], result["fastest_any_img_per_s"] = "onnxruntime", r["img_per_s"]
    return result


def measure_onnx(model: torch.nn.Module, x: torch.Tensor, reference: torch.Tensor, args) -> dict[str, Any]:
    """The model as `lawder export onnx` writes it (BatchNorm folded), timed in ONNX Runtime on the same batch."""
    import tempfile

    import onnxruntime as ort

    from lawder_core.export.onnx import onnx_session, write_onnx
    from lawder_core.models.fast import fold_batchnorms

    start = time.perf_counter()
    folded = fold_batchnorms(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        write_onnx(folded, x[:2], path, spatial=False, metadata={"model": "bench"})
        session = onnx_session(path, args.threads)
    name = session.get_inputs()[0].name

    def run(batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: batch.numpy()})[0])

    out = run(x)
    setup_s = time.perf_counter() - start
    timing = measure_latency(run, args.size, args.batch, args.repeats, warmup=1)
    error = float((out - reference).abs().max())
    return {**timing, "setup_s": setup_s, "max_abs_error": error, "matches_eager": error <= TOLERANCE,
            "onnxruntime": ort.__version__, "threads": args.threads}


def ratios(results: dict[str, Any], modes: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    order, tiny, r34 = results.get("mkunet-t-order"), results.get("mkunet-t"), results.get("unet-r34")
    if order and r34:
        out["order_fastest_vs_unet_r34_fastest_speedup"] = (order["fastest_any_img_per_s"]
                                                            / r34["fastest_any_img_per_s"])
        out["order_fastest_pytorch_vs_unet_r34_fastest_pytorch_speedup"] = (order["fastest_img_per_s"]
                                                                            / r34["fastest_img_per_s"])
        out["goal_speedup_at_least"] = 5.0
    if order and tiny:
        out["order_time_vs_mkunet_t_time"] = {
            m: tiny["modes"][m]["img_per_s"] / order["modes"][m]["img_per_s"] for m in modes
        }
        out["order_fastest_time_vs_mkunet_t_fastest_time"] = (tiny["fastest_any_img_per_s"]
                                                              / order["fastest_any_img_per_s"])
        out["order_fastest_pytorch_time_vs_mkunet_t_fastest_pytorch_time"] = (tiny["fastest_img_per_s"]
                                                                              / order["fastest_img_per_s"])
        out["goal_fastest_time_ratio_at_most"] = 2.0
    onnx = {n: r["onnxruntime"]["img_per_s"] / r["fastest_img_per_s"] for n, r in results.items() if "onnxruntime" in r}
    if onnx:
        out["onnxruntime_vs_pytorch_fastest_speedup"] = onnx
        out["goal_onnx_order_speedup_at_least"] = 1.5
    return out


def print_table(results: dict[str, Any], modes: list[str], summary: dict[str, Any]) -> None:
    columns = modes + (["onnxruntime"] if any("onnxruntime" in r for r in results.values()) else [])
    header = f"{'model':16s} {'params':>10s} {'GMACs':>7s} " + " ".join(f"{m:>14s}" for m in columns) + "  fastest"
    print("\n" + header + "\n" + "-" * len(header))
    for name, r in results.items():
        cells = " ".join(f"{r['modes'][m]['img_per_s']:14.1f}" for m in modes)
        onnx = f"{r['onnxruntime']['img_per_s']:14.1f}" if "onnxruntime" in r else ""
        print(f"{name:16s} {r['params']:10,d} {r['macs'] / 1e9:7.3f} {cells}{onnx}  {r['fastest_any_path']}")
    print("(images/s, best of repeats; MACs = conv + matmul + attention FLOPs / 2; fastest = over every path)")
    if "order_fastest_vs_unet_r34_fastest_speedup" in summary:
        print(f"ORDER fastest vs unet-r34 fastest: {summary['order_fastest_vs_unet_r34_fastest_speedup']:.1f}× "
              "(goal ≥ 5×)")
    for mode, ratio in summary.get("order_time_vs_mkunet_t_time", {}).items():
        print(f"ORDER time / MK-UNet-T time ({mode}): {ratio:.2f}")
    if "order_fastest_time_vs_mkunet_t_fastest_time" in summary:
        ratio = summary["order_fastest_time_vs_mkunet_t_fastest_time"]
        print(f"ORDER fastest time / MK-UNet-T fastest time: {ratio:.2f} (goal ≤ 2)")
    for name, ratio in summary.get("onnxruntime_vs_pytorch_fastest_speedup", {}).items():
        print(f"{name}: ONNX Runtime vs fastest PyTorch path: {ratio:.2f}× (goal for ORDER ≥ 1.5×)")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    modes = ["eager", "channels_last"] + ([] if args.no_compile else ["compile"])
    started = time.time()
    load_before = os.getloadavg()
    results = {}
    for name in args.models:
        print(f"== {name}", flush=True)
        results[name] = bench_model(name, modes, args)
    summary = ratios(results, modes)
    print_table(results, modes, summary)
    report = {
        "size": args.size,
        "batch": args.batch,
        "threads": args.threads,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()},
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "wall_s": time.time() - started,
        "models": results,
        "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
