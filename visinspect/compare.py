"""The comparison the project exists for: baseline vs SimCLR vs a few good parts, on one split.

For each seed: the source categories are split 80/20 (train / validation), the target categories
are the unknown products. Models:

- `baseline`: ImageNet VGG16 + the CAM head, trained on the source labels (the seed's recipe);
- `simclr-source`: SimCLR pre-training on the source images (labels ignored), then the same head;
- `simclr-source+target-good`: pre-training also sees the good images of the targets' train/
  split (a factory has good parts of a new product before it has labelled defects);
and, with `calibrate=(K, ...)`, for K good train/ images of each target category:
- `<model> calibrated k=K`: the same model, threshold and heatmap scale fitted on the K images;
- `reference k=K`: nearest-neighbour distance to the K images' conv4_3 patches (PatchCore idea);
- `fused k=K`: baseline and reference, each standardised on the K images, averaged.

Target labels are never used before testing. Every model is scored on the targets' test/ images
only: their train/good images are what SimCLR ("+target-good") and the calibration may use.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from visinspect.calibration import Calibration, calibrate_classifier, fit_calibration, select_good_images
from visinspect.cam import HeatmapNormalizer
from visinspect.data import (
    Sample,
    build_sample_table,
    stratified_split,
    subsample_per_category,
    target_test_images,
    unknown_context_split,
)
from visinspect.evaluate import evaluate_scored
from visinspect.inference import ScoredImages, predict
from visinspect.metrics import seed_spread
from visinspect.models import FROZEN_END, VGG16CAM, build_model
from visinspect.reference import PatchMemoryBank, fit_fusion
from visinspect.simclr import PretrainConfig, build_simclr_model, pretrain, pretrain_samples
from visinspect.train import TrainConfig, train_baseline
from visinspect.utils import resolve_device

VARIANTS = ("baseline", "simclr-source", "simclr-source+target-good")
ROW_KEYS = (
    "image_auroc",
    "average_precision",
    "f1",
    "balanced_accuracy",
    "precision",
    "recall",
    "pixel_auroc",
    "box_hit_rate",
)


@dataclass(frozen=True)
class ComparePreset:
    """Sizes of one comparison: classifier image size and epochs, the pre-training config, the
    numeric precision of every model ("auto": bf16 only where it is fast, see utils), and caps
    on the images per source and per target category (None: all; see subsample_per_category)."""

    name: str
    image_size: int
    epochs: int
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    precision: str = "auto"
    max_source_per_category: int | None = None
    max_test_per_category: int | None = None

    @classmethod
    def demo(cls) -> ComparePreset:
        """For notebooks: 64 px, short pre-training. Measured: ~2.8 min per seed on 2 CPU cores
        with three K values (8 min 19 s for 3 seeds), 23 s for one seed on a GPU machine."""
        return cls("demo", image_size=64, epochs=4, pretrain=PretrainConfig.demo())

    @classmethod
    def full(cls) -> ComparePreset:
        """The seed's 224 px classifier; SimCLR's full preset (~1,000 images in <= 30 min)."""
        return cls("full", image_size=224, epochs=10, pretrain=PretrainConfig.full())

    @classmethod
    def medium(cls) -> ComparePreset:
        """Real data on 2 CPU cores: 128 px classifier; SimCLR at 96 px on 400 images for 4
        epochs; at most ~150 images per source and per target category. Measured: 25-41 min per
        leave-one-out split of ../shared/data (one thread each, two splits at a time)."""
        pretrain = PretrainConfig(image_size=96, epochs=4, max_images=400)
        return cls("medium", 128, 10, pretrain, max_source_per_category=150, max_test_per_category=150)

    @classmethod
    def named(cls, name: str) -> ComparePreset:
        presets = {"demo": cls.demo, "medium": cls.medium, "full": cls.full}
        if name not in presets:
            raise ValueError(f"preset must be one of {', '.join(presets)}; got {name!r}")
        return presets[name]()


@dataclass
class SeedResult:
    """Rows of one seed plus the scored test images of each model (for figures)."""

    rows: list[dict]
    scored: dict[str, ScoredImages]
    normalizers: dict[str, HeatmapNormalizer | None]


def _report_rows(
    model: str,
    seed: int,
    scored: ScoredImages,
    threshold: float,
    normalizer: HeatmapNormalizer | None,
    score_name: str,
) -> list[dict]:
    """One row per target category and one for all of them together."""
    rows = []
    heat = {"heat_mode": "dataset", "normalizer": normalizer} if normalizer else {"heat_mode": "image"}
    groups = {"all": list(range(len(scored.samples)))}
    for i, s in enumerate(scored.samples):
        groups.setdefault(s.category, []).append(i)
    for target, idx in sorted(groups.items(), key=lambda kv: (kv[0] != "all", kv[0])):
        report = evaluate_scored(scored.subset(idx), threshold, score_name=score_name, **heat)
        report.pop("per_category")
        rows.append({"model": model, "seed": seed, "target": target, **report})
    return rows


def calibrated_view(scored: ScoredImages, calibrations: dict[str, Calibration]) -> ScoredImages:
    """Scores and maps relative to each product's good parts: score - its threshold, maps scaled
    by its good-image normaliser (not clipped). Then 0 is every product's decision threshold and
    0..1 its heatmap scale, so products with different thresholds can be pooled."""
    scores = scored.scores.copy()
    maps = scored.maps.clone().float()
    for i, s in enumerate(scored.samples):
        c = calibrations[s.category]
        scores[i] -= c.threshold
        maps[i] = (maps[i] - c.normalizer.low) / (c.normalizer.high - c.normalizer.low)
    return ScoredImages(scored.samples, scores, maps, scored.image_size)


IDENTITY = HeatmapNormalizer(0.0, 1.0, "calibrated")


def _train_variant(
    variant: str,
    train: list[Sample],
    val: list[Sample],
    source: list[Sample],
    target: list[Sample],
    preset: ComparePreset,
    seed: int,
    weights,
    device: torch.device,
    progress: bool,
) -> tuple[VGG16CAM, dict]:
    config = TrainConfig(
        epochs=preset.epochs, image_size=preset.image_size, seed=seed, precision=preset.precision
    )
    if variant == "baseline":
        model, provenance = build_model(weights)
    else:
        pre = PretrainConfig(**{**preset.pretrain.to_dict(), "seed": seed, "precision": preset.precision})
        simclr, provenance = build_simclr_model(pre, weights)
        simclr.to(device)
        images = pretrain_samples(source, target, include_target_good=variant.endswith("target-good"))
        history = pretrain(simclr, images, pre, progress=progress)
        model = simclr.encoder
        model.set_frozen(FROZEN_END)  # downstream: the seed's recipe, whatever pre-training trained
        provenance = {
            "source": f"simclr ({variant})",
            "backbone": provenance,
            "pretrain_images": len(images),
            "pretrain_loss": history["loss"],
        }
    return train_baseline(
        train, val, config, model=model, provenance=provenance, progress=progress, device=device
    )


def run_seed(
    table: Sequence[Sample],
    source_names: Sequence[str],
    target_names: Sequence[str],
    seed: int,
    preset: ComparePreset,
    *,
    calibrate: Sequence[int] = (),
    variants: Sequence[str] = VARIANTS,
    weights: str | Path | None = "auto",
    false_alarm_rate: float = 0.01,
    device: str | torch.device = "auto",
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> SeedResult:
    """Train and score every model of one seed; return its rows (see the module docstring).

    Models train and run on `device` ("auto": a CUDA GPU when there is one, else the CPU).
    """
    device = resolve_device(device)
    precision = preset.precision
    source, target = unknown_context_split(table, source_names, target_names)
    source = subsample_per_category(source, preset.max_source_per_category, seed)
    train, val = stratified_split(source, 0.2, seed)
    ks = sorted(set(calibrate))
    calib = {c: select_good_images(target, c, ks[-1], seed) for c in target_names} if ks else {}
    # The targets' train/good images are the unlabeled good parts a factory has: SimCLR may
    # pre-train on them and calibration draws its K images from them, so none of them is scored.
    test = subsample_per_category(target_test_images(target), preset.max_test_per_category, seed)
    rows, scored, normalizers = [], {}, {}
    size = preset.image_size
    for variant in variants:
        log(f"seed {seed}: {variant} ...")
        model, info = _train_variant(
            variant, train, val, source, target, preset, seed, weights, device, progress
        )
        preds = predict(model, test, size, precision=precision)
        norm = HeatmapNormalizer.from_dict(info["normalizer"]) if info["normalizer"] else None
        scored[variant], normalizers[variant] = preds.scored(), norm
        rows += _report_rows(
            variant, seed, scored[variant], info["threshold"], norm, "logit margin (anomaly - good)"
        )
        for k in ks:
            cals = {
                c: calibrate_classifier(model, calib[c][:k], size, false_alarm_rate, precision=precision)
                for c in target_names
            }
            name = f"{variant} calibrated k={k}"
            view = calibrated_view(scored[variant], cals)
            scored[name], normalizers[name] = view, IDENTITY
            rows += _report_rows(
                name, seed, view, 0.0, IDENTITY, "logit margin minus the product's calibrated threshold"
            )
        if variant == "baseline" and ks:
            rows += _reference_rows(
                model, preds, test, calib, ks, seed, size, precision, false_alarm_rate, scored,
                normalizers, log,
            )
    return SeedResult(rows, scored, normalizers)


def _reference_rows(
    model: VGG16CAM,
    preds,
    test: list[Sample],
    calib: dict[str, list[Sample]],
    ks: Sequence[int],
    seed: int,
    size: int,
    precision: str,
    false_alarm_rate: float,
    scored: dict,
    normalizers: dict,
    log,
) -> list[dict]:
    """Good-reference and fused rows for each K (the baseline's conv4_3 is ImageNet's: frozen)."""
    rows = []
    for k in ks:
        log(f"seed {seed}: reference and fused, k={k} ...")
        ref_scores = np.zeros(len(test))
        ref_maps: torch.Tensor | None = None
        fused_scores = np.zeros(len(test))
        fused_maps: torch.Tensor | None = None
        ref_cal, fused_cal = {}, {}
        for c, good in calib.items():
            idx = [i for i, s in enumerate(test) if s.category == c]
            bank = PatchMemoryBank.fit(model, good[:k], size, seed=seed, precision=precision)
            s_ref, m_ref = bank.score(model, [test[i] for i in idx], precision=precision)
            ref_cal[c] = bank.calibrate(false_alarm_rate)
            good_preds = predict(model, good[:k], size, precision=precision)
            fusion = fit_fusion(good_preds.margins, bank.good_scores, good_preds.cams, bank.good_maps)
            good_fused = fusion.score(good_preds.margins, bank.good_scores)
            fused_cal[c] = fit_calibration(
                good_fused,
                fusion.heatmap(good_preds.cams, bank.good_maps),
                category=c,
                images=[s.path for s in good[:k]],
                false_alarm_rate=false_alarm_rate,
                model="fused",
            )
            sub = preds.subset(idx)
            f_scores = fusion.score(sub.margins, s_ref)
            f_maps = fusion.heatmap(sub.cams, m_ref)
            if ref_maps is None:
                ref_maps = torch.zeros(len(test), *m_ref.shape[1:])
                fused_maps = torch.zeros(len(test), *f_maps.shape[1:])
            ref_scores[idx], ref_maps[idx] = s_ref, m_ref
            fused_scores[idx], fused_maps[idx] = f_scores, f_maps
        for name, s, m, cals, score_name in (
            (f"reference k={k}", ref_scores, ref_maps, ref_cal, "nearest good patch distance"),
            (f"fused k={k}", fused_scores, fused_maps, fused_cal, "mean z-score (classifier, reference)"),
        ):
            view = calibrated_view(ScoredImages(test, s, m, size), cals)
            scored[name], normalizers[name] = view, IDENTITY
            rows += _report_rows(name, seed, view, 0.0, IDENTITY, score_name + " minus calibrated threshold")
    return rows


def run_comparison(
    roots: Sequence[str | Path],
    source: Sequence[str],
    target: Sequence[str],
    *,
    seeds: Sequence[int] = (0,),
    preset: ComparePreset | None = None,
    calibrate: Sequence[int] = (),
    variants: Sequence[str] = VARIANTS,
    weights: str | Path | None = "auto",
    device: str | torch.device = "auto",
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> tuple[list[dict], SeedResult]:
    """All seeds; returns every row and the first seed's result (for the heatmap figure)."""
    preset = preset or ComparePreset.demo()
    table = build_sample_table(roots).samples
    rows, first = [], None
    for seed in seeds:
        result = run_seed(
            table,
            source,
            target,
            seed,
            preset,
            calibrate=calibrate,
            variants=variants,
            weights=weights,
            device=device,
            progress=progress,
            log=log,
        )
        rows += result.rows
        first = first or result
    return rows, first


def _mean_std(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"


def summary_table(rows: Sequence[dict], keys: Sequence[str] = ROW_KEYS) -> str:
    """Markdown: one line per (target, model), mean ± std over seeds; positive class anomaly."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["target"], r["model"]), []).append(r)
    lines = [
        f"positive class = anomaly; {seed_spread([r['seed'] for r in rows])}; threshold from "
        "the source validation split (uncalibrated) or from K good target images (calibrated)",
        "",
        "| target | model | n | " + " | ".join(keys) + " |",
        "|" + " --- |" * (len(keys) + 3),
    ]
    order = sorted(groups, key=lambda tm: (tm[0] != "all", tm[0]))
    for target, model in order:
        g = groups[(target, model)]
        lines.append(
            f"| {target} | {model} | {g[0]['n_images']} | "
            + " | ".join(_mean_std([r.get(k) for r in g]) for k in keys)
            + " |"
        )
    return "\n".join(lines)
