"""Benchmark of `predict` at scale: images/s and peak memory, streaming versus a naive baseline.

Writes N small PNGs (64-128 px noise and shapes) to a temporary folder, saves a random-weight
checkpoint (nothing is trained: speed and memory do not depend on the weights), then runs, each in
a fresh process so that peaks are separate:

  - streaming `predict_images` (JSON lines, no overlays) on the first 1,000 and on all N images:
    peak RSS should stay flat as N grows;
  - a naive baseline on 1,000 images: every image read into one list, then predicted (fp32,
    NCHW), every result kept until the end (what a notebook loop does): its memory grows with N;
  - optionally a few hundred images with PNG overlays, to show what drawing them costs.

    python benchmarks/bench_predict.py                    # 5,000 images at 64 px
    python benchmarks/bench_predict.py --n 2000 --image-size 32
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from visinspect.utils import describe_machine

PER_FOLDER = 100  # images are written in folders of 100: a run on n images names n / 100 folders


def write_images(root: Path, n: int, seed: int = 0) -> None:
    """n PNGs of 64-128 px: smooth noise with a few random shapes (fast to make with cv2)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = rng.integers(64, 129, 2)
        image = cv2.resize(rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), np.uint8), (w, h))
        for _ in range(rng.integers(1, 4)):
            centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            cv2.circle(image, centre, int(rng.integers(3, 20)), colour, -1)
        folder = root / f"part_{i // PER_FOLDER:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"img_{i:06d}.png"), image)


def write_checkpoint(path: Path, image_size: int) -> None:
    from visinspect.backbones.vgg16 import build_model
    from visinspect.checkpoint import save_classifier

    torch.manual_seed(0)
    model, backbone = build_model("random")
    save_classifier(path, model, image_size=image_size, threshold=0.0, normalizer=None,
                    backbone=backbone, config={"benchmark": "bench_predict"}, frozen_end=24)


# ----------------------------------------------------------------------------- memory


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux), so that the next peak is the prediction's alone.

    Building a VGG16 allocates its 400 MB dense layers for a moment; that is not prediction.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (VmHWM, or ru_maxrss where there is no /proc)."""
    kb = _status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
        kb = kb / 1024 if sys.platform == "darwin" else kb
    return kb / 1024


# ----------------------------------------------------------------------------- workers


def naive_predict(model, info: dict, inputs: list[Path], out: Path, batch_size: int) -> None:
    """The notebook way: every image into one list, predict, keep every result, write at the end."""
    from visinspect.backbones.cam import anomaly_cam, normalize, upsample
    from visinspect.backbones.vgg16 import logit_margin
    from visinspect.data.samples import list_images, load_rgb, to_tensor

    size = int(info["image_size"])
    paths = list_images(inputs)
    images = [load_rgb(p) for p in paths]
    x = torch.stack([to_tensor(image, size) for image in images])
    logits, heat = [], []
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            maps = model.feature_maps(x[i : i + batch_size])
            logits.append(model.head(maps))
            heat.append(normalize(upsample(anomaly_cam(model, maps), size)))
    margins = logit_margin(torch.cat(logits)).tolist()
    heat = torch.cat(heat)
    rows = [{"path": str(p), "margin": m, "peak": float(h.max())}
            for p, m, h in zip(paths, margins, heat, strict=True)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def worker(args) -> None:
    """One measured run, in this (fresh) process; prints one JSON line."""
    from visinspect.checkpoint import load_classifier
    from visinspect.data.samples import list_images
    from visinspect.methods.registry import load_detector
    from visinspect.predict import predict_images

    naive = args.worker == "naive"
    loaded = load_classifier(args.checkpoint) if naive else load_detector(args.checkpoint)
    inputs = [Path(p) for p in args.inputs]
    n = len(list_images(inputs))
    reset = reset_peak_rss()
    before = (_status_kb("VmRSS") or 0) / 1024
    start = time.perf_counter()
    if naive:
        naive_predict(*loaded, inputs, Path(args.out), args.batch_size)
    else:
        summary = predict_images(loaded, inputs, Path(args.out), batch_size=args.batch_size,
                                 overlays=args.worker == "overlays", progress=False)
        assert summary["n_images"] == n and summary["n_failed"] == 0, summary
    seconds = time.perf_counter() - start
    print(json.dumps({"run": args.worker, "images": n, "seconds": seconds, "images_s": n / seconds,
                      "rss_before_mb": before, "peak_mb": peak_rss_mb(), "peak_reset": reset}))


def run_worker(mode: str, checkpoint: Path, folders: list[Path], out: Path,
               batch_size: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--checkpoint", str(checkpoint),
           "--out", str(out), "--batch-size", str(batch_size), *map(str, folders)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="images in the largest run")
    parser.add_argument("--small", type=int, default=1000,
                        help="images in the small and the naive runs")
    parser.add_argument("--overlays", type=int, default=100,
                        help="images in the run with overlays (0: no such run)")
    parser.add_argument("--image-size", type=int, default=64, help="the checkpoint's input size")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--worker", choices=("stream", "naive", "overlays"), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("inputs", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    for name in ("n", "small", "overlays"):
        if getattr(args, name) % PER_FOLDER:
            parser.error(f"--{name} must be a multiple of {PER_FOLDER}")

    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        write_images(tmp / "images", args.n)
        write_checkpoint(tmp / "random.pt", args.image_size)
        print(f"wrote {args.n} PNGs (64-128 px) and a random-weight checkpoint "
              f"({args.image_size} px) in {time.perf_counter() - start:.0f} s")
        folders = sorted((tmp / "images").iterdir())
        plan = [("stream", args.small), ("stream", args.n), ("naive", args.small)]
        if args.overlays:
            plan.append(("overlays", args.overlays))
        results = []
        for i, (mode, n) in enumerate(plan):
            results.append(run_worker(mode, tmp / "random.pt", folders[: n // PER_FOLDER],
                                      tmp / f"out_{i}", args.batch_size))

    print(f"\n{describe_machine()}, torch {torch.__version__}, batch {args.batch_size}, "
          f"{args.image_size} px; peak RSS is the whole process, 'while predicting' excludes "
          "building the model")
    print("| run | images | seconds | images/s | RSS before (MB) | peak RSS predicting (MB) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        peak = f"{r['peak_mb']:.0f}" if r["peak_reset"] else f"{r['peak_mb']:.0f} (whole process)"
        print(f"| {r['run']} | {r['images']} | {r['seconds']:.1f} | {r['images_s']:.1f} | "
              f"{r['rss_before_mb']:.0f} | {peak} |")
    small, large, naive = results[:3]
    print(f"\nstreaming peak RSS {small['images']} -> {large['images']} images: "
          f"{small['peak_mb']:.0f} -> {large['peak_mb']:.0f} MB "
          f"({large['peak_mb'] - small['peak_mb']:+.0f} MB)")
    print(f"naive at {naive['images']} images: peak {naive['peak_mb']:.0f} MB "
          f"({naive['peak_mb'] - small['peak_mb']:+.0f} MB vs streaming); speed streaming / naive "
          f"= {small['images_s'] / naive['images_s']:.2f}x")


if __name__ == "__main__":
    main()
