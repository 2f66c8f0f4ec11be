"""Benchmark of the feature store, in one run on this machine:

(a) the frozen pass (conv1_1 .. conv4_3, what the store computes once per image): images/s, its
    GFLOP/s (multiply-adds counted from the layer shapes, x2) and that as a fraction of this
    machine's matrix-multiply peak, measured here in the same precision (the best of a few square
    torch.mm sizes and of a 1x1 convolution, a matrix product in the convolutions' library);
(b) the same leave-one-out three times, each in a fresh process: with the store off (every model
    recomputes the frozen layers, as before the store existed), from an empty store, and with the
    store full; the wall times and their ratios;
(c) a new scoring method with the store full: a reference-only leave-one-out, against the same
    with the store off;
(d) with --dtype-check, the leave-one-out with a float16 store: the largest change of any metric of
    any row between fp16 and fp32 (the default) storage.

    python benchmarks/bench_feature_store.py --data ../shared/data/mvtec_ad ../shared/data/industrial
    python benchmarks/bench_feature_store.py            # the synthetic dataset (no download)
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from torch import nn

from visinspect.backbones.store import FILL_BATCH, FeatureStore
from visinspect.backbones.vgg16 import CONV4_3_END, build_model, describe_backbone
from visinspect.data.synthetic import data_roots
from visinspect.experiments.compare import ComparePreset
from visinspect.experiments.loo import LeaveOneOut
from visinspect.utils import autocast, describe_machine, resolve_precision, set_seed

MODELS = ("baseline", "baseline calibrated", "reference", "fused")
METRICS = ("image_auroc", "average_precision", "f1", "balanced_accuracy", "precision", "recall",
           "pixel_auroc", "box_hit_rate")


def frozen_gflop(model, image_size: int) -> float:
    """GFLOP (2 x multiply-adds) of features[:CONV4_3_END] for one image."""
    total, side = 0, image_size
    for layer in model.features[:CONV4_3_END]:
        if isinstance(layer, nn.Conv2d):
            total += 2 * layer.in_channels * layer.out_channels * layer.kernel_size[0] ** 2 * side * side
        elif isinstance(layer, nn.MaxPool2d):
            side //= 2
    return total / 1e9


def _rate(fn, flop: float, seconds: float) -> float:
    """GFLOP/s of fn() (flop each call), run for about `seconds` after one warm-up call."""
    fn()
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        runs += 1
    return flop * runs / (time.perf_counter() - start) / 1e9


def matmul_peak(precision: str, seconds: float = 2.0) -> float:
    """GFLOP/s of the best of a few square matrix products in `precision` (bf16 or fp32), each
    run both by torch.mm and as a 1x1 convolution: the two can take different libraries (on an
    AMD CPU torch.mm in fp32 measured 215 GFLOP/s where oneDNN's convolutions ran at 390), and the
    frozen pass runs on the convolution one."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    best = 0.0
    for n in (1024, 2048, 4096):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        best = max(best, _rate(lambda a=a, b=b: torch.mm(a, b), 2 * n**3, seconds / 6))
    conv = nn.Conv2d(1024, 1024, 1, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(FILL_BATCH, 1024, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast("cpu", precision):
        best = max(best, _rate(lambda: conv(x), 2 * 1024 * 1024 * FILL_BATCH * 32 * 32, seconds / 2))
    return best


def frozen_pass_rate(model, image_size: int, precision: str, repeats: int) -> float:
    """Images/s of the frozen layers as the store runs them (batches of FILL_BATCH)."""
    layers = model.features[:CONV4_3_END].to(memory_format=torch.channels_last)
    x = torch.randn(FILL_BATCH, 3, image_size, image_size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast("cpu", precision):
        layers(x)
        start = time.perf_counter()
        for _ in range(repeats):
            layers(x)
    return repeats * FILL_BATCH / (time.perf_counter() - start)


def _loo(roots, out: Path, store: FeatureStore, options: dict) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    rows = LeaveOneOut(roots, out, store=store, log=lambda m: None, **options).run()
    return time.perf_counter() - start, rows


def timed_loo(roots, out: Path, store: FeatureStore, **options) -> tuple[float, list[dict]]:
    """Wall time and rows of one leave-one-out, in a fresh process as a user's command runs it:
    nothing a previous run left in memory (remembered banks, distances, outputs) is reused."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_loo, roots, out, store, options).result()


def largest_change(a: list[dict], b: list[dict]) -> tuple[float, str]:
    """Max |difference| of any metric between rows matched by (model, target, seed)."""
    index = {(r["model"], r["target"], r["seed"]): r for r in b}
    worst, where = 0.0, ""
    for r in a:
        other = index[(r["model"], r["target"], r["seed"])]
        for m in METRICS:
            if r.get(m) is not None and other.get(m) is not None:
                d = abs(r[m] - other[m])
                if d > worst:
                    worst, where = d, f"{m} of {r['model']} on {r['target']} (seed {r['seed']})"
    return worst, where


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", help="data roots (default: the synthetic dataset)")
    p.add_argument("--targets", default="bottle,transistor", help="leave-one-out targets (real data)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--source-cap", type=int, default=40, help="images per source category in (b)-(d)")
    p.add_argument("--calibrate", default="5,20")
    p.add_argument("--repeats", type=int, default=4, help="batches timed in (a)")
    p.add_argument("--dtype-check", action="store_true", help="(d): also run with a float16 store")
    args = p.parse_args()
    precision = resolve_precision(args.precision)
    set_seed(0)
    model, provenance = build_model("auto")
    model.eval()
    print(f"machine: {describe_machine()}; torch {torch.__version__}")
    print(describe_backbone(provenance))

    gflop = frozen_gflop(model, args.image_size)
    rate = frozen_pass_rate(model, args.image_size, precision, args.repeats)
    peak = matmul_peak(precision)
    print(f"\n(a) frozen pass at {args.image_size} px ({precision}, batch {FILL_BATCH}, channels_last): "
          f"{rate:.2f} images/s x {gflop:.1f} GFLOP = {rate * gflop:.0f} GFLOP/s; matrix-multiply "
          f"peak here {peak:.0f} GFLOP/s -> {rate * gflop / peak:.0%} of peak")

    roots = data_roots(args.data)
    targets = args.targets.split(",") if args.data else ["hex_nut", "woven_fabric"]
    preset = dataclasses.replace(ComparePreset.full(), image_size=args.image_size, precision=precision,
                                 max_source_per_category=args.source_cap)
    # The four models its documented figures were measured with (loo's default before fused-top5).
    options = {"targets": targets, "seeds": 1, "models": list(MODELS),
               "calibrate": [int(k) for k in args.calibrate.split(",")], "preset": preset, "weights": "auto"}
    print(f"\n(b) leave-one-out: targets {', '.join(targets)}, 1 seed, K {options['calibrate']}, "
          f"{args.image_size} px, <= {args.source_cap} images per source category, models "
          f"{', '.join(MODELS)}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        off, rows_off = timed_loo(roots, tmp / "off", FeatureStore(None), **options)
        empty, rows = timed_loo(roots, tmp / "empty", FeatureStore(tmp / "store"), **options)
        full, rows_full = timed_loo(roots, tmp / "full", FeatureStore(tmp / "store"), **options)
        print(f"  store off (recompute, as before): {off:7.0f} s")
        print(f"  empty store:                      {empty:7.0f} s  ({off / empty:.2f}x faster)")
        print(f"  full store:                       {full:7.0f} s  ({off / full:.2f}x faster)")
        print(f"  same rows with the store off and on: {rows_off == rows == rows_full}")

        ref = {**options, "models": ["reference"]}
        ref_off, _ = timed_loo(roots, tmp / "ref-off", FeatureStore(None), **ref)
        ref_full, _ = timed_loo(roots, tmp / "ref-full", FeatureStore(tmp / "store"), **ref)
        print(f"\n(c) a new scoring method (reference only): store off {ref_off:.0f} s, full store "
              f"{ref_full:.0f} s ({ref_off / ref_full:.1f}x faster)")

        if args.dtype_check:
            _, rows16 = timed_loo(roots, tmp / "fp16", FeatureStore(tmp / "store16", dtype="float16"),
                                  **options)
            worst, where = largest_change(rows16, rows)
            print(f"\n(d) fp16 against fp32 storage: largest change of any metric {worst:.4f} ({where})")


if __name__ == "__main__":
    main()
