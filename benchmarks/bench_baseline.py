"""Benchmark of the VGG16-CAM baseline on this machine: inference speed and whole-training time.

Reports, in one run:
  (a) images/s of a naive forward (eager, fp32, NCHW, autograd on — as the seed's evaluate did)
      of the full model with its CAM,
  (b) images/s of visinspect's path (inference mode, channels_last, bf16 where the CPU has it),
      and the ratio b / a,
  (c) the wall time of a whole baseline training (frozen-feature cache included) on N images,
  (d) images/s of the good-reference score against a memory bank of K good images (backbone pass
      to conv4_3 + nearest-neighbour search), and of the search alone.

    python benchmarks/bench_baseline.py                       # 224 px, 1,200 training images
    python benchmarks/bench_baseline.py --train-images 300    # quicker
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from visinspect.backbones.cam import anomaly_cam, upsample
from visinspect.backbones.store import FeatureStore
from visinspect.backbones.vgg16 import CONV4_3_END, build_model, describe_backbone
from visinspect.calibration import select_good_images
from visinspect.data.drawing import CATEGORIES
from visinspect.data.samples import DefectDataset, build_sample_table
from visinspect.data.synthetic import generate_synthetic_dataset
from visinspect.methods.memory_bank import PatchMemoryBank, backbone_maps, patch_features
from visinspect.scoring import forward_features
from visinspect.training import TrainConfig, train_classifier
from visinspect.utils import autocast, describe_machine, resolve_precision, set_seed


def naive_cam(model, x: torch.Tensor) -> torch.Tensor:
    """The seed's way: eval mode but autograd on, NCHW, fp32, CAM computed after the forward."""
    maps = model.feature_maps(x)
    logits = model.head(maps)
    cam = upsample(anomaly_cam(model, maps), x.shape[-1])
    return torch.softmax(logits, 1), cam


def fast_cam(model, x: torch.Tensor, precision: str) -> torch.Tensor:
    """visinspect's path on an image the feature store has not seen: the frozen layers in
    inference mode, channels_last (what the store runs), then inference.forward_features."""
    with torch.inference_mode(), autocast(x.device, precision):
        c4 = model.features[:CONV4_3_END](x.contiguous(memory_format=torch.channels_last))
    logits, cam = forward_features(model, c4, precision)
    return torch.softmax(logits, 1), upsample(cam, x.shape[-1])


def images_per_second(fn, x: torch.Tensor, repeats: int) -> float:
    fn(x)  # warm-up: oneDNN builds its kernels on the first call
    start = time.perf_counter()
    for _ in range(repeats):
        fn(x)
    return repeats * len(x) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-images", type=int, default=1200)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--reference-k", type=int, default=50, help="good images in the memory bank")
    args = parser.parse_args()
    set_seed(0)
    precision = resolve_precision(args.precision)
    model, provenance = build_model("auto")
    model.eval().to(memory_format=torch.channels_last)
    print(f"machine: {describe_machine()}; torch {torch.__version__}")
    print(describe_backbone(provenance))
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)

    naive = images_per_second(lambda b: naive_cam(model, b), x, args.repeats)
    fast = images_per_second(lambda b: fast_cam(model, b, precision), x, args.repeats)
    with torch.inference_mode():
        p_naive, cam_naive = naive_cam(model, x)
        p_fast, cam_fast = fast_cam(model, x, precision)
    print(f"\nCAM inference at {args.image_size} px, batch {args.batch_size}:")
    print(f"  (a) naive eager fp32 NCHW with autograd: {naive:6.2f} images/s")
    print(f"  (b) visinspect ({precision}, channels_last, inference mode): {fast:6.2f} images/s")
    print(f"  ratio b / a: {fast / naive:.2f}x; max |dP| {float((p_naive - p_fast).abs().max()):.2e}, "
          f"max |dCAM| / max |CAM| {float((cam_naive - cam_fast).abs().max() / cam_naive.abs().max()):.2e}")

    per_category = max(8, args.train_images // len(CATEGORIES))
    n_defect = max(1, per_category // 10)
    n_types = 3
    with tempfile.TemporaryDirectory() as tmp:
        root = generate_synthetic_dataset(
            Path(tmp) / "synthetic", seed=0, image_size=args.image_size,
            n_train_good=per_category - 1 - n_types * n_defect, n_test_good=1,
            n_test_per_defect=n_defect,
        )
        samples = build_sample_table(root).samples
        # Empty feature stores: the frozen pass is part of what is timed.
        bench_reference(model, samples, args.image_size, args.reference_k, precision,
                        FeatureStore(Path(tmp) / "store-reference"))
        config = TrainConfig(image_size=args.image_size, precision=precision)
        start = time.perf_counter()
        history = train_classifier(model.train(), samples, config, progress=False,
                                   store=FeatureStore(Path(tmp) / "store-train"))
        seconds = time.perf_counter() - start
    print(f"\nwhole baseline training on {len(samples)} images at {args.image_size} px "
          f"(frozen pass + {history['epochs_run']} epochs, batch {config.batch_size}): {seconds:.0f} s "
          f"({seconds / 60:.1f} min); epochs took {history['seconds']} s")


def bench_reference(model, samples, image_size: int, k: int, precision: str, store: FeatureStore,
                    n_test: int = 32) -> None:
    """(d): a K-image bank of one product's good train images scores n_test of its images."""
    category = samples[0].category
    good = select_good_images(samples, category, k)
    test = [s for s in samples if s.category == category and s not in good][:n_test]
    start = time.perf_counter()
    bank = PatchMemoryBank.fit(model, good, image_size, precision=precision, store=store)
    fit = time.perf_counter() - start
    start = time.perf_counter()
    bank.score(model, test, precision=precision, store=store)
    total = len(test) / (time.perf_counter() - start)
    with torch.inference_mode():
        x = torch.stack([DefectDataset(test, image_size)[i]["image"] for i in range(len(test))])
        feats = patch_features(backbone_maps(model, x, conv5_3=False)[0])
    start = time.perf_counter()
    bank.score_features(feats)
    search = len(test) / (time.perf_counter() - start)
    mib = bank.bank.element_size() * bank.bank.nelement() / 2**20
    print(f"\ngood-reference score at {image_size} px, bank of K = {k} images ({len(bank.bank)} "
          f"patches, {mib:.1f} MiB, fitted in {fit:.1f} s): {total:.2f} images/s end to end, "
          f"{search:.2f} images/s for the nearest-neighbour search alone")


if __name__ == "__main__":
    main()
