"""The default experiment on the embedded synthetic dataset, shared by the CLI demo and notebooks.

Unknown context in miniature: train on four synthetic products, test on two it never saw
(one texture, one object). Small settings by default so that it runs in about a minute on a
laptop CPU; `DemoSettings.full()` gives the seed's 224 px recipe. `course_setup` is the one call
with which every course notebook gets its data, split, settings and (when asked) model.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from visinspect.backbones.cam import HeatmapNormalizer
from visinspect.backbones.mobilenet import MOBILENET_ENV, mobilenet_available
from visinspect.backbones.vgg16 import VGG16CAM, WEIGHTS_ENV, describe_backbone, pretrained_available
from visinspect.checkpoint import checkpoint_digest, load_classifier, save_classifier
from visinspect.data.samples import (
    Sample,
    SampleTable,
    build_sample_table,
    default_synthetic_root,
    stratified_split,
    target_test_images,
    unknown_context_split,
)
from visinspect.data.synthetic import data_roots, ensure_synthetic_dataset
from visinspect.errors import CheckpointError
from visinspect.evaluate import (
    DEFAULT_BOX_THRESHOLD,
    DEFAULT_MIN_AREA,
    evaluate_predictions,
    markdown_table,
)
from visinspect.scoring import predict
from visinspect.training import SourceImages, TrainConfig, train_baseline
from visinspect.utils import PRECISION_ENV, resolve_precision, set_seed, write_json
from visinspect.viz.plots import highest_scoring, plot_prediction_grid, save_figure

SOURCE = ("grain_wood", "grain_leather", "round_pill", "bottle_top")
TARGET = ("woven_fabric", "hex_nut")
DATA_ENV = "VISINSPECT_DATA"  # a folder of real data in the MVTec AD layout, for the notebooks


@dataclass(frozen=True)
class DemoSettings:
    """How big the demo is: image size and epochs (the rest is the seed's recipe)."""

    image_size: int = 96
    epochs: int = 6
    seed: int = 0
    val_fraction: float = 0.2

    @classmethod
    def full(cls) -> DemoSettings:
        return cls(image_size=224, epochs=10)

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, image_size=self.image_size, seed=self.seed)


def default_weights_dir() -> Path:
    """`weights/` of the source checkout (git-ignored), where notebooks keep their checkpoints."""
    return default_synthetic_root().parents[1] / "weights"


def checkpoint_line(path: str | Path) -> str:
    """"weights/demo_baseline.pt (weights digest 0123456789ab)": the checkpoint and the digest of
    its weights, as every course notebook that trains or loads it prints it (two notebooks that
    print the same digest use the same model)."""
    path = Path(path)
    return f"{path.parent.name}/{path.name} (weights digest {checkpoint_digest(path)})"


def outputs_not_reproducible() -> str | None:
    """Why this environment cannot reproduce the notebooks' stored outputs, or None if it can.

    They come from one run with the ImageNet weights of VGG16 and MobileNetV2, fp32 and the
    synthetic data (notebooks/clean_notebooks.py --execute, CI's run with ../shared): random
    weights, bf16 or real data change every number the notebooks print."""
    reasons = []
    if not pretrained_available("auto"):
        reasons.append(f"no ImageNet VGG16 weights ({WEIGHTS_ENV} unset and none in the torch hub "
                       "cache): the backbone is random")
    if not mobilenet_available():
        reasons.append(f"no ImageNet MobileNetV2 weights ({MOBILENET_ENV} unset and none in the "
                       "torch hub cache)")
    if (precision := resolve_precision("auto")) != "fp32":
        reasons.append(f"precision {precision}, not fp32 (set {PRECISION_ENV}=fp32)")
    if os.environ.get(DATA_ENV):
        reasons.append(f"{DATA_ENV} is set: the notebooks read real data, not the synthetic set")
    return "; ".join(reasons) or None


def _split(
    samples: Sequence[Sample], source: Sequence[str], target: Sequence[str], settings: DemoSettings
) -> tuple[list[Sample], list[Sample], list[Sample], list[Sample], list[Sample]]:
    """The course's protocol: (source, target, train, validation, test) of one sample table."""
    src, tgt = unknown_context_split(samples, source, target)
    train, val = stratified_split(src, settings.val_fraction, settings.seed)
    return src, tgt, train, val, target_test_images(tgt)


def demo_split(
    root: str | Path | None = None, settings: DemoSettings = DemoSettings()
) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """(train, validation, test): source categories split 80/20; the targets' test/ images."""
    root = ensure_synthetic_dataset(default_synthetic_root()) if root is None else Path(root)
    return _split(build_sample_table(root).samples, SOURCE, TARGET, settings)[2:]


def unknown_context_images(
    data: Sequence[str | Path] | None, source: Sequence[str] = (), target: Sequence[str] | None = None
) -> tuple[list[Sample], list[Sample]]:
    """The source and target products' images in the `data` roots. Without `data`: the synthetic
    dataset split as the demo's (SOURCE, TARGET); on real data the source is every category not in
    `target`, and `target` none. What `train` and `pretrain` learn from."""
    table = build_sample_table(data_roots(data))
    if target is None:
        target = () if data else TARGET
    if not source:
        source = [c for c in table.categories if c not in target] if data else SOURCE
    return unknown_context_split(table.samples, source, target)


def source_images(
    data: Sequence[str | Path] | None, categories: Sequence[str] = (), val_fraction: float = 0.2,
    seed: int = 0,
) -> SourceImages:
    """What `train` learns from: the labelled images of `categories` (default as in
    `unknown_context_images`), split into train and validation."""
    source, _ = unknown_context_images(data, categories, target=())
    return SourceImages.split(source, val_fraction, seed)


def target_table(
    data: Sequence[str | Path] | None, categories: Sequence[str] = (), split: str = "all"
) -> SampleTable:
    """What `evaluate` scores: `categories` of the `data` roots; by default every category of real
    data, or the demo's TARGET on the synthetic dataset."""
    return build_sample_table(data_roots(data), categories or (None if data else TARGET), split=split)


def _load_or_train(
    path: Path,
    settings: DemoSettings,
    train: list[Sample],
    val: list[Sample],
    *,
    weights: str | Path | None,
    retrain: bool,
    progress: bool,
) -> tuple[VGG16CAM, dict, bool]:
    """The classifier saved at `path` if it was trained with these settings on these images;
    else one trained now and saved there. The flag says whether it was trained now."""
    if path.is_file() and not retrain:
        try:
            model, info = load_classifier(path)
            # A checkpoint trained from random weights is stale once ImageNet weights are here.
            stale = info["backbone"].get("source") == "random" and pretrained_available(weights)
            same_data = (info.get("train_categories") == sorted({s.category for s in train})
                         and info.get("n_train") == len(train) and info.get("n_val") == len(val))
            if info.get("demo_settings") == asdict(settings) and same_data and not stale:
                return model, info, False
        except CheckpointError:
            pass  # unreadable or foreign: train a fresh one below
    model, info = train_baseline(train, val, settings.train_config(), weights=weights, progress=progress)
    info["demo_settings"] = asdict(settings)
    save_classifier(path, model, **info)
    return model, info, True


def demo_model(
    checkpoint: str | Path | None = None,
    settings: DemoSettings = DemoSettings(),
    *,
    weights: str | Path | None = "auto",
    retrain: bool = False,
    progress: bool = True,
) -> tuple[VGG16CAM, dict]:
    """Load the demo baseline from `checkpoint`, or train and save it there if it is missing
    (or was trained with other settings)."""
    path = Path(checkpoint) if checkpoint else default_weights_dir() / "demo_baseline.pt"
    train, val, _ = demo_split(settings=settings)
    model, info, _ = _load_or_train(
        path, settings, train, val, weights=weights, retrain=retrain, progress=progress
    )
    return model, info


@dataclass
class Course:
    """What a course notebook works on: the data, its unknown-context split, the settings, where
    notebook 02 keeps the baseline and, when asked for, that baseline."""

    data_root: Path
    real_data: bool
    settings: DemoSettings
    source: list[Sample]  # every image of the source products: their labels are used
    target: list[Sample]  # every image of the target products: no label used before testing
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]  # the targets' test/ images: the one test set of the course
    checkpoint: Path
    model: VGG16CAM | None = None
    info: dict | None = None

    @property
    def source_products(self) -> list[str]:
        """The products the model learns on, sorted."""
        return sorted({s.category for s in self.source})

    @property
    def target_products(self) -> list[str]:
        """The new products it is tested on, sorted."""
        return sorted({s.category for s in self.target})

    @property
    def unlabelled_good(self) -> list[Sample]:
        """The targets' train/ images: good parts of the new products, never scored."""
        return [s for s in self.target if s.split == "train"]

    def __str__(self) -> str:
        if self.real_data:
            bar = "!" * 72
            data = f"{bar}\nREAL DATA: this notebook reads the images under {self.data_root}\n{bar}"
        else:
            data = "Data: the embedded SYNTHETIC dataset (made-up images) in data/synthetic/"
        lines = [data, repr(self.settings)]
        for name, part in (("train", self.train), ("validation", self.val), ("test", self.test)):
            products = ", ".join(sorted({s.category for s in part}))
            lines.append(f"{name:<10} {len(part):>4} images, {sum(s.label for s in part):>3} anomalous: "
                         f"{products}")
        lines.append(f"{len(self.unlabelled_good)} good images in the targets' train/ folders are not scored "
                     "(unlabelled good parts of the new products)")
        return "\n".join(lines)


def course_setup(
    data_root: str | Path | None = None,
    source: Sequence[str] = SOURCE,
    target: Sequence[str] = TARGET,
    *,
    full: bool = False,
    model: bool = False,
    weights: str | Path | None = "auto",
    log: Callable[[str], None] = print,
) -> Course:
    """The start of every course notebook: seed, data, split, settings and, with `model=True`,
    the baseline that notebook 02 saved (trained and saved here first if it is missing).

    - `data_root`: a folder of real images in the MVTec AD layout (then every notebook says loudly
      that it reads real data); None reads the environment variable VISINSPECT_DATA, else uses
      the embedded synthetic dataset (made-up images, generated into data/synthetic/ on first use).
    - `source`, `target`: the products the model learns on and the new products it is tested on
      (with real data: your categories, e.g. ("bottle",) and ("pill",)).
    - `full`: the seed's settings (224 px, 10 epochs) instead of the course's small ones: slow on
      a CPU.
    """
    settings = DemoSettings.full() if full else DemoSettings()
    set_seed(settings.seed)
    data_root = data_root or os.environ.get(DATA_ENV)
    real_data = data_root is not None
    root = Path(data_root) if real_data else ensure_synthetic_dataset(default_synthetic_root())
    name = "notebook_real_baseline.pt" if real_data else "demo_baseline.pt"
    src, tgt, train, val, test = _split(build_sample_table(root).samples, source, target, settings)
    course = Course(root, real_data, settings, src, tgt, train, val, test, default_weights_dir() / name)
    if model:
        course.model, course.info, trained = _load_or_train(
            course.checkpoint, settings, train, val, weights=weights, retrain=False, progress=True
        )
        where = checkpoint_line(course.checkpoint)
        log(f"trained the baseline now and saved it to {where} (notebook 02 had not)" if trained
            else f"loaded the baseline that notebook 02 saved: {where}")
        log(f"backbone weights: {course.info['backbone']['source']}")
        log(f"decision threshold (logit margin): {course.info['threshold']:.3f}")
    return course


def run_demo(
    out: str | Path,
    settings: DemoSettings = DemoSettings(),
    *,
    weights: str | Path | None = "auto",
    precision: str = "auto",
    box_threshold: float = DEFAULT_BOX_THRESHOLD,
    min_area: int = DEFAULT_MIN_AREA,
) -> tuple[str, list[Path]]:
    """The quick start: train the baseline on the synthetic source products, evaluate it on the
    unknown ones, draw its most telling predictions; returns the metrics table and the files."""
    out = Path(out)
    model, info = demo_model(out / "baseline.pt", settings, weights=weights, retrain=True)
    _, _, test = demo_split(settings=settings)
    preds = predict(model, test, settings.image_size, precision=precision)
    normalizer = HeatmapNormalizer.from_dict(info["normalizer"])
    threshold = float(info["threshold"])
    report = evaluate_predictions(preds, threshold, normalizer=normalizer, box_threshold=box_threshold,
                                  min_area=min_area)
    report["backbone"] = info["backbone"]
    title = (f"Unknown context: trained on {', '.join(SOURCE)}; tested on {', '.join(TARGET)} "
             f"(synthetic, {settings.image_size} px). ")
    table = markdown_table(report, title=title) + "\n\n" + describe_backbone(info["backbone"])
    (out / "metrics.md").write_text(table + "\n")
    write_json(out / "metrics.json", report, digits=6)
    picks = highest_scoring(preds.labels, preds.margins, per_class=6)
    fig = plot_prediction_grid(preds, picks, threshold, normalizer=normalizer, box_threshold=box_threshold,
                               min_area=min_area, ncols=4)
    save_figure(fig, out / "predictions.png")
    return table, [out / "baseline.pt", out / "metrics.md", out / "metrics.json", out / "predictions.png"]
