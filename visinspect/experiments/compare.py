"""The comparison the project exists for: baseline vs SimCLR vs a few good parts, on one split.

For each seed: the source categories are split 80/20 (train / validation), the target categories
are the unknown products. Models:

- `baseline`: ImageNet VGG16 + the CAM head, trained on the source labels (the seed's recipe);
- `simclr-source`: SimCLR pre-training on the source images (labels ignored), then the same head;
- `simclr-source+target-good`: pre-training also sees the good images of the targets' train/
  split (a factory has good parts of a new product before it has labelled defects);
- `simclr+LEVER` (asked for by name, e.g. `simclr+mean-shifted`): the same pre-training with one
  anomaly lever of `visinspect.methods.simclr.pretrain.LEVER_SETS` switched on;
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

import torch

from visinspect.backbones.cam import HeatmapNormalizer
from visinspect.backbones.vgg16 import FROZEN_END, VGG16CAM, build_model
from visinspect.calibration import select_good_images
from visinspect.data.samples import (
    Sample,
    build_sample_table,
    stratified_split,
    subsample_per_category,
    target_test_images,
    unknown_context_split,
)
from visinspect.errors import ConfigError
from visinspect.evaluate import evaluate_scored
from visinspect.methods.base import Detector
from visinspect.methods.registry import make_detector
from visinspect.methods.residual import train_residual
from visinspect.methods.simclr.pretrain import (
    LEVER_SETS,
    PretrainConfig,
    build_simclr_model,
    pretrain,
    pretrain_samples,
)
from visinspect.metrics import seed_spread
from visinspect.scoring import ScoredImages
from visinspect.training import TrainConfig, train_baseline
from visinspect.utils import resolve_device, set_seed

VARIANTS = ("baseline", "simclr-source", "simclr-source+target-good")
# SimCLR with one anomaly lever of visinspect.methods.simclr.pretrain: on the source and the target's
# good images, like the last variant, which is these rows' plain SimCLR.
LEVER_VARIANTS = tuple(f"simclr+{name}" for name in LEVER_SETS)
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

    rows: list[dict] = field(default_factory=list)
    scored: dict[str, ScoredImages] = field(default_factory=dict)
    normalizers: dict[str, HeatmapNormalizer | None] = field(default_factory=dict)

    def add(
        self,
        model: str,
        seed: int,
        scored: ScoredImages,
        threshold: float,
        normalizer: HeatmapNormalizer | None,
        score_name: str,
    ) -> None:
        """Rows of one model (one per target category and one for all of them together)."""
        self.scored[model], self.normalizers[model] = scored, normalizer
        heat = {"heat_mode": "dataset", "normalizer": normalizer} if normalizer else {"heat_mode": "image"}
        groups: dict[str, list[int]] = {}
        for i, s in enumerate(scored.samples):
            groups.setdefault(s.category, []).append(i)
        reports = {}
        for target, idx in sorted(groups.items()):
            reports[target] = evaluate_scored(scored.subset(idx), threshold, score_name=score_name, **heat)
        # All target products together; with one product that is the product's own report.
        everything = list(range(len(scored.samples)))
        reports["all"] = (
            next(iter(reports.values())) if len(groups) == 1
            else evaluate_scored(scored.subset(everything), threshold, score_name=score_name, **heat)
        )
        for target in sorted(reports, key=lambda t: (t != "all", t)):
            report = {k: v for k, v in reports[target].items() if k != "per_category"}
            self.rows.append({"model": model, "seed": seed, "target": target, **report})


@dataclass
class Split:
    """One unknown-context split of one seed: what every model of it trains and is scored on.

    `train`/`val`: the source categories split 80/20 (after the preset's per-category cap);
    `test`: the targets' test/ images; `good`: per target, the largest K of its train/good images
    (a seeded choice; smaller K take its first K); `ks`: the K values every target has.
    """

    seed: int
    source: list[Sample]
    target: list[Sample]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    good: dict[str, list[Sample]]
    ks: list[int]

    @property
    def targets(self) -> list[str]:
        return sorted({s.category for s in self.target})


def make_split(
    table: Sequence[Sample],
    source_names: Sequence[str],
    target_names: Sequence[str],
    seed: int,
    preset: ComparePreset,
    calibrate: Sequence[int] = (),
    log: Callable[[str], None] = print,
) -> Split:
    """The split of one seed; K values larger than some target's train/good folder are dropped."""
    source, target = unknown_context_split(table, source_names, target_names)
    source = subsample_per_category(source, preset.max_source_per_category, seed)
    train, val = stratified_split(source, 0.2, seed)
    # The targets' train/good images are the unlabeled good parts a factory has: SimCLR may
    # pre-train on them and calibration draws its K images from them, so none of them is scored.
    test = subsample_per_category(target_test_images(target), preset.max_test_per_category, seed)
    available = min(
        (sum(s.category == c and s.split == "train" and s.label == 0 for s in target) for c in target_names),
        default=0,
    )
    ks = sorted(k for k in set(calibrate) if k <= available)
    dropped = sorted(set(calibrate) - set(ks))
    if dropped:
        log(f"K = {dropped} left out: a target has only {available} good train/ images")
    good = {c: select_good_images(target, c, ks[-1], seed) for c in target_names} if ks else {}
    return Split(seed, source, target, train, val, test, good, ks)


def train_variant(
    variant: str,
    split: Split,
    preset: ComparePreset,
    *,
    weights: str | Path | None = "auto",
    device: str | torch.device = "auto",
    progress: bool = False,
    state: Path | None = None,
) -> tuple[VGG16CAM, dict]:
    """Train one classifier variant (see the module docstring) on the split's source images.

    With `state` (a path prefix), pre-training and training write resumable states after every
    epoch and continue from them when they exist.
    """
    device = resolve_device(device)
    config = TrainConfig(
        epochs=preset.epochs, image_size=preset.image_size, seed=split.seed, precision=preset.precision
    )
    train_state = None if state is None else Path(f"{state}.train-state")
    resume = train_state if train_state is not None and train_state.is_file() else None
    if variant == "residual":
        return train_residual(split.train, split.val, config, weights=weights, device=device,
                              progress=progress, checkpoint_path=train_state, resume=resume)
    if variant == "baseline":
        set_seed(config.seed)  # the dense layer starts from seeded weights
        model, provenance = build_model(weights)
    elif variant in VARIANTS or variant in LEVER_VARIANTS:
        levers = LEVER_SETS.get(variant.removeprefix("simclr+"), {})
        pre = PretrainConfig(
            **{**preset.pretrain.to_dict(), **levers, "seed": split.seed, "precision": preset.precision}
        )
        simclr, provenance = build_simclr_model(pre, weights)
        simclr.to(device)
        with_good = variant != "simclr-source"
        images = pretrain_samples(split.source, split.target, include_target_good=with_good)
        pre_state = None if state is None else Path(f"{state}.pretrain-state")
        history = pretrain(
            simclr, images, pre, progress=progress, checkpoint_path=pre_state,
            resume=pre_state if pre_state is not None and pre_state.is_file() else None,
        )
        model = simclr.encoder
        model.set_frozen(FROZEN_END)  # downstream: the seed's recipe, whatever pre-training trained
        provenance = {
            "source": f"simclr ({variant})",
            "backbone": provenance,
            "pretrain_images": len(images),
            "pretrain_loss": history["loss"],
        }
    else:
        raise ConfigError(
            f"unknown training {variant!r}; known: {', '.join(VARIANTS + LEVER_VARIANTS)}, residual"
        )
    return train_baseline(
        split.train, split.val, config, model=model, provenance=provenance, progress=progress,
        device=device, checkpoint_path=train_state, resume=resume,
    )


def add_detector_rows(result: SeedResult, detector: Detector, split: Split) -> None:
    """Rows of one method on a split: as it is, or adapted to the first K good images of each
    target for every K of the split (rows named "<method> k=K")."""
    if not detector.uses_good:
        result.add(detector.name, split.seed, detector.score(split.test), detector.threshold,
                   detector.normalizer, detector.score_name)
        return
    for k in split.ks:
        for good in split.good.values():
            detector.adapt(good[:k])
        result.add(f"{detector.name} k={k}", split.seed, detector.score(split.test), detector.threshold,
                   detector.normalizer, detector.score_name)


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
    split = make_split(table, source_names, target_names, seed, preset, calibrate, log)
    result = SeedResult()
    for variant in variants:
        log(f"seed {seed}: {variant} ...")
        model, info = train_variant(variant, split, preset, weights=weights, device=device, progress=progress)
        names = [variant]
        if split.ks:
            # The baseline's conv4_3 is ImageNet's (frozen): the reference score can share it.
            names += [f"{variant} calibrated"] + (["reference", "fused"] if variant == "baseline" else [])
        for name in names:
            detector = make_detector(name, model, info, precision=preset.precision,
                                     false_alarm_rate=false_alarm_rate, seed=seed)
            add_detector_rows(result, detector, split)
    return result


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


def _mean_std(values: list[float | None], seeds: int = 1) -> str:
    """Mean ± std of one cell; a cell over fewer seeds than its table's others says how many (a
    run that added a method for one seed only, say), so that no number passes for more than it is."""
    vals = [v for v in values if v is not None]
    fewer = f" ({len(values)} seed{'s' * (len(values) > 1)})" if len(values) < seeds else ""
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.3f}{fewer}"
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}{fewer}"


def pivot_table(rows: Sequence[dict], metric: str = "image_auroc") -> str:
    """Markdown: targets down, models across, mean ± std of one metric over seeds (K-dependent
    models are named with their K)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["target"], r["model"]), []).append(r)
    targets = sorted({t for t, _ in groups}, key=lambda t: (t == "all", t))
    models = list(dict.fromkeys(r["model"] for r in rows))
    lines = [
        f"{metric}, positive class = anomaly",
        "",
        "| target | n | " + " | ".join(models) + " |",
        "|" + " --- |" * (len(models) + 2),
    ]
    seeds = max(len(g) for g in groups.values())
    for t in targets:
        n = next(g[0]["n_images"] for (tt, _), g in groups.items() if tt == t)
        cells = [_mean_std([r.get(metric) for r in groups.get((t, m), [])], seeds) for m in models]
        lines.append(f"| {t} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    seeds = max((len(g) for g in groups.values()), default=1)
    for target, model in order:
        g = groups[(target, model)]
        lines.append(
            f"| {target} | {model} | {g[0]['n_images']} | "
            + " | ".join(_mean_std([r.get(k) for r in g], seeds) for k in keys)
            + " |"
        )
    return "\n".join(lines)
