"""The comparison the project exists for: baseline vs SimCLR vs a few good parts, on one split.

For each seed: the source categories are split 80/20 (train / validation), the target categories
are the unknown products. Any method of the registry runs here, the same way `loo` runs it
(`train_variant` trains what it needs once per split, `add_detector_rows` scores it); by default:

- `baseline`: ImageNet VGG16 + the CAM head, trained on the source labels (the seed's recipe);
- `simclr-source`: SimCLR pre-training on the source images (labels ignored), then the same head;
- `simclr-source+target-good`: pre-training also sees the good images of the targets' train/
  split (a factory has good parts of a new product before it has labelled defects);
- `simclr+LEVER` (asked for by name, e.g. `simclr+mean-shifted`): the same pre-training with one
  anomaly lever of `visinspect.methods.simclr.levers.LEVER_SETS` switched on;
and, with `calibrate=(K, ...)`, for K good train/ images of each target category:
- `<model> calibrated k=K`: the same model, threshold and heatmap scale fitted on the K images;
- `reference k=K`: nearest-neighbour distance to the K images' conv4_3 patches (PatchCore idea);
- `fused k=K`: baseline and reference, each standardised on the K images, averaged.

Target labels are never used before testing. Every model is scored on the targets' test/ images
only: their train/good images are what SimCLR ("+target-good") and the calibration may use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from visinspect.backbones.cam import HeatmapNormalizer
from visinspect.backbones.vgg16 import VGG16CAM
from visinspect.calibration import select_good_images
from visinspect.data.samples import (
    Sample,
    build_sample_table,
    stratified_split,
    subsample_per_category,
    target_test_images,
    unknown_context_split,
)
from visinspect.data.synthetic import data_roots
from visinspect.evaluate import evaluate_scored
from visinspect.experiments.demo import SOURCE, TARGET
from visinspect.methods.base import Detector
from visinspect.methods.registry import make_detector, method, training, untrained
from visinspect.methods.simclr.pretrain import PretrainConfig
from visinspect.scoring import ScoredImages
from visinspect.training import SourceImages, TrainConfig, TrainingRun
from visinspect.utils import resolve_device
from visinspect.viz.comparisons import plot_metric_bars, plot_metric_vs_k, plot_model_heatmaps
from visinspect.viz.plots import highest_scoring, save_figure

# The default rows: each classifier as it is and calibrated on K good images, and the two scores
# that need no training of their own (their VGG16 is the baseline's frozen ImageNet layers).
MODELS = ("baseline", "baseline calibrated", "reference", "fused", "simclr-source",
          "simclr-source calibrated", "simclr-source+target-good", "simclr-source+target-good calibrated")


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
    def named(cls, name: str, **overrides) -> ComparePreset:
        """The preset of this name with some fields replaced (None values leave a field as it is)."""
        presets = {"demo": cls.demo, "medium": cls.medium, "full": cls.full}
        if name not in presets:
            raise ValueError(f"preset must be one of {', '.join(presets)}; got {name!r}")
        return dataclasses.replace(presets[name](), **{k: v for k, v in overrides.items() if v is not None})


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
    """The split of one seed; K values larger than some target's train/good folder are dropped
    (all of them: the target is adapted to every good image it has, if it has two)."""
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
    if dropped and not ks and available >= 2:  # 2: leave-one-out calibration needs another image
        # A product with fewer good images than every K asked for (MVTec leather here: 4) is
        # adapted to all it has, not left out: its rows say so ("k=4").
        ks = [available]
        log(f"K = {dropped}: a target has only {available} good train/ images; K = {available} instead")
    elif dropped:
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
    """Train one of the registry's trainings (`variant`: its name) on the split's source images.

    With `state` (a path prefix), pre-training and training write resumable states as they go and
    continue from them when they exist.
    """
    config = TrainConfig(
        epochs=preset.epochs, image_size=preset.image_size, seed=split.seed, precision=preset.precision
    )
    train_state = None if state is None else Path(f"{state}.train-state")
    run = TrainingRun(
        config, preset.pretrain, weights, resolve_device(device), progress, state=train_state,
        resume=train_state if train_state is not None and train_state.is_file() else None,
        pretrain_state=None if state is None else Path(f"{state}.pretrain-state"),
    )
    source = SourceImages(split.train, split.val, split.source, split.target)
    return training(variant).fit(source, run, None)


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
    models: Sequence[str] = MODELS,
    weights: str | Path | None = "auto",
    false_alarm_rate: float = 0.01,
    device: str | torch.device = "auto",
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> SeedResult:
    """Train what the `models` need and score them on one seed's split; without K values the
    methods that adapt to good images are left out.

    Models train and run on `device` ("auto": a CUDA GPU when there is one, else the CPU).
    """
    split = make_split(table, source_names, target_names, seed, preset, calibrate, log)
    result = SeedResult()
    trained: dict[str, tuple[VGG16CAM, dict]] = {}
    for name in models:
        chosen = method(name)
        if chosen.detector.uses_good and not split.ks:
            continue
        if chosen.trains is None:
            model, info = untrained(name, preset.image_size, weights, seed)
        else:
            if chosen.trains.name not in trained:
                log(f"seed {seed}: {chosen.trains.name} ...")
                trained[chosen.trains.name] = train_variant(
                    chosen.trains.name, split, preset, weights=weights, device=device, progress=progress)
            model, info = trained[chosen.trains.name]
        detector = make_detector(name, model, info, precision=preset.precision,
                                 false_alarm_rate=false_alarm_rate, seed=seed)
        detector.fit_sources(split.train, split.val)
        add_detector_rows(result, detector, split)
    return result


def run_comparison(
    roots: Sequence[str | Path] | None = None,
    source: Sequence[str] = (),
    target: Sequence[str] = (),
    *,
    seeds: Sequence[int] = (0,),
    preset: ComparePreset | None = None,
    calibrate: Sequence[int] = (),
    models: Sequence[str] = MODELS,
    weights: str | Path | None = "auto",
    device: str | torch.device = "auto",
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> tuple[list[dict], SeedResult]:
    """All seeds on the `roots` (default: the synthetic dataset), from the `source` to the `target`
    categories (default: the demo's); returns every row and the first seed's result (for the
    heatmap figure)."""
    preset = preset or ComparePreset.demo()
    table = build_sample_table(data_roots(roots)).samples
    source, target = list(source or SOURCE), list(target or TARGET)
    rows, first = [], None
    for seed in seeds:
        result = run_seed(
            table,
            source,
            target,
            seed,
            preset,
            calibrate=calibrate,
            models=models,
            weights=weights,
            device=device,
            progress=progress,
            log=log,
        )
        rows += result.rows
        first = first or result
    return rows, first


def draw_figures(
    rows: Sequence[dict], first: SeedResult, calibrate: Sequence[int], out: str | Path
) -> list[Path]:
    """Bar charts per target, metric against K (with several K), and the first seed's heatmaps of
    every model side by side on its two highest-scoring anomalies and good images."""
    out = Path(out)
    paths = []
    if len(calibrate) > 1:
        for metric in ("image_auroc", "balanced_accuracy"):
            paths.append(save_figure(plot_metric_vs_k(rows, metric), out / f"compare_{metric}_vs_k.png"))
    for metric in ("image_auroc", "f1"):
        bars = plot_metric_bars([r for r in rows if r["target"] != "all"], metric)
        paths.append(save_figure(bars, out / f"compare_{metric}.png"))
    base = first.scored["baseline"] if "baseline" in first.scored else next(iter(first.scored.values()))
    picks = [str(base.samples[i].path) for i in highest_scoring(base.labels, base.scores, 2)]
    last = f"k={max(calibrate)}" if calibrate else ""
    shown = {m: s for m, s in first.scored.items() if "k=" not in m or m.endswith(last)}
    figure = plot_model_heatmaps(shown, first.normalizers, picks, rows=first.rows)
    paths.append(save_figure(figure, out / "compare_heatmaps.png"))
    return paths
