"""Benchmark of the pixel metrics on a test set of real size, against scikit-learn in the same run.

A leave-one-out scores every method's heatmaps of every test image with pixel AUROC and AUPRO:
on 100 images at 224 px that is 5 million pixels per row. This prints the time of
scikit-learn's roc_auc_score (the naive path: it builds the whole ROC curve), of
visinspect's pixel_auroc (each defect pixel counted against the sorted good pixels), and of
pixel_metrics (pixel AUROC and AUPRO from one sort of the good pixels), with their values.

    python benchmarks/bench_metrics.py
    python benchmarks/bench_metrics.py --images 200 --size 256
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.metrics import roc_auc_score

from visinspect.metrics import aupro, pixel_auroc, pixel_metrics
from visinspect.utils import describe_machine


def maps(images: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Masks with a rectangle on 40 % of the images and float32 heatmaps a little higher there."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((images, size, size), dtype=bool)
    for i in range(int(0.4 * images)):
        y, x = rng.integers(0, size * 4 // 5, 2)
        masks[i, y : y + rng.integers(5, size // 3), x : x + rng.integers(5, size // 3)] = True
    return masks, (rng.normal(size=masks.shape) + masks).astype(np.float32)


def best_of(repeats: int, fn, *args) -> tuple[float, object]:
    """(fastest wall time, value) of `repeats` calls."""
    best, value = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn(*args)
        best = min(best, time.perf_counter() - start)
    return best, value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    masks, heat = maps(args.images, args.size)
    print(f"machine: {describe_machine()}; {masks.size / 1e6:.1f} M pixels, "
          f"{masks.mean():.1%} of them defect (positive class = anomaly); best of {args.repeats}")
    naive, expected = best_of(args.repeats, lambda m, h: roc_auc_score(m.ravel(), h.ravel()), masks, heat)
    counted, value = best_of(args.repeats, pixel_auroc, masks, heat)
    alone, pro = best_of(args.repeats, aupro, masks, heat)
    both, values = best_of(args.repeats, pixel_metrics, masks, heat)
    print(f"  scikit-learn roc_auc_score: {naive:6.3f} s  pixel AUROC {expected:.6f}")
    print(f"  pixel_auroc:                {counted:6.3f} s  pixel AUROC {value:.6f}  "
          f"({naive / counted:.1f}x faster)")
    print(f"  aupro alone:                {alone:6.3f} s  AUPRO {pro:.6f}")
    print(f"  pixel_metrics (both):       {both:6.3f} s  ({(counted + alone) / both:.2f}x the two alone)")
    assert abs(value - expected) < 1e-9 and values == {"pixel_auroc": value, "aupro": pro}


if __name__ == "__main__":
    main()
