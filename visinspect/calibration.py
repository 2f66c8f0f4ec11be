"""Calibrating a model on a new product from K good images of it, before any defect is labelled.

A classifier trained on other products can rank a new product's images well and still flag most
of its good parts at the default threshold (margin 0). A factory has good parts of a new product
long before it has labelled defects, so we run the model on K of them (from train/good only,
never test images) and set (1) the decision threshold so that at most a chosen share of them
would be flagged and (2) the heatmap normaliser so that good parts stay below the box threshold.
A "good" part that scores far above the others (a defective or odd part among them) is set aside
first, so that one such part does not lift the threshold above the defects (`good_outliers`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from visinspect.backbones.cam import HeatmapNormalizer
from visinspect.backbones.vgg16 import VGG16CAM
from visinspect.data.samples import Sample
from visinspect.errors import CheckpointError, DataError
from visinspect.metrics import false_alarm_threshold
from visinspect.scoring import predict
from visinspect.utils import atomic_path

FORMAT = "visinspect-calibration"
FORMAT_VERSION = 1
DEFAULT_K = 20
RULES = ("fenced", "quantile", "max_margin")
DEFAULT_RULE = RULES[0]
# The "fenced" rule's outliers: good scores above Tukey's upper fence, Q3 + FENCE x IQR (his
# textbook constant), at most OUTLIER_SHARE of the K images, so none with fewer than 10: quartiles
# of a handful of scores say little, and on K = 5 the fence set aside ordinary good parts (bottle's
# calibrated balanced accuracy 0.850 -> 0.775). The cap also matters where scores take few values
# (the pattern score's counts): there the interquartile range can be ~0. Measured with
# reference-mobilenet+patterns on the four real targets (3 seeds; docs/experiments.md): calibrated
# balanced accuracy 0.794 -> 0.823 at K = 20, 0.804 -> 0.844 at K = 50.
FENCE, OUTLIER_SHARE = 1.5, 0.1
BOX_THRESHOLD = 0.5  # the heat above which boxes are drawn (see boxes.heatmap_to_boxes)
GOOD_PERCENTILES = (50.0, 99.9)


def select_good_images(
    samples: Sequence[Sample], category: str, k: int = DEFAULT_K, seed: int = 0
) -> list[Sample]:
    """K good images of `category` from its train split only: sorted, then a seeded choice."""
    if k < 1:
        raise DataError(f"k (the number of good calibration images) must be at least 1; got {k}")
    pool = sorted(
        (s for s in samples if s.category == category and s.split == "train" and s.label == 0),
        key=lambda s: str(s.path),
    )
    if not pool:
        raise DataError(
            f"category {category!r} has no good images in train/: calibration needs good parts "
            f"of the product in {category}/train/good/"
        )
    if len(pool) < k:
        raise DataError(
            f"category {category!r} has only {len(pool)} good image(s) in train/, fewer than "
            f"k={k}: pass k <= {len(pool)} or add good images to {category}/train/good/"
        )
    chosen = np.random.default_rng(seed).choice(len(pool), size=k, replace=False)
    return [pool[i] for i in sorted(chosen)]


def require_good_train_samples(samples: Sequence[Sample]) -> str:
    """Check that every sample is a good train/ image of one category; return that category.

    Calibrating on test images would leak the test set into the threshold and inflate results.
    """
    if not samples:
        raise DataError("need at least one good image to calibrate on; got none")
    for s in samples:
        if s.split != "train" or s.label != 0:
            raise DataError(
                f"{s.path} is a {s.split}/{s.defect_type} image: calibration uses only good "
                "images from train/, never test images"
            )
    categories = sorted({s.category for s in samples})
    if len(categories) > 1:
        raise DataError(
            f"calibration images must all be of one product; got {', '.join(categories)}"
        )
    return categories[0]


def require_leave_one_out_samples(samples: Sequence[Sample]) -> str:
    """require_good_train_samples, and at least 2 of them: a good-reference score measures each
    good image against the others (leave-one-out) to calibrate."""
    category = require_good_train_samples(samples)
    if len(samples) < 2:
        raise DataError(
            f"need at least 2 good images of {category!r} (got {len(samples)}): each one's "
            "reference score is measured against the others (leave-one-out); 20 is a good number"
        )
    return category


def fit_good_normalizer(
    good_cams: torch.Tensor,
    percentiles: tuple[float, float] = GOOD_PERCENTILES,
    box_threshold: float = BOX_THRESHOLD,
) -> HeatmapNormalizer:
    """A heatmap scaling fitted on good parts only: "hot" means hotter than good parts get.

    low = the `percentiles[0]` of good CAM values (median: half of a good part's map is 0), and
    high is set so that heat `box_threshold` falls exactly on the `percentiles[1]` of good CAM
    values (99.9th: only about 1 in 1000 good pixels, before upsampling, reaches a box). Mapping
    the 99.9th percentile to 1.0 instead would put the box threshold halfway between median and
    top, where many good pixels lie. Heat 1.0 is as far above that level as it is above the median.
    """
    if not 0 < box_threshold < 1:
        raise DataError(f"box_threshold must be in (0, 1); got {box_threshold}")
    fitted = HeatmapNormalizer.fit(good_cams, "percentile", percentiles)
    high = fitted.low + (fitted.high - fitted.low) / box_threshold
    return HeatmapNormalizer(fitted.low, high, "good_percentile")


@dataclass
class Calibration:
    """A threshold and heatmap scaling for one product, fitted on K of its good images."""

    category: str
    k: int
    false_alarm_rate: float
    threshold: float  # in the model's score units: the logit margin for the classifier
    rule: str  # one of RULES
    normalizer: HeatmapNormalizer  # fitted on the K good images' raw maps
    images: list[str] = field(default_factory=list)  # the good images it was fitted on
    model: str = ""  # which model/score it belongs to, e.g. "classifier"
    margin: float = 0.0  # added to the max good score by the "max_margin" rule
    outliers: list[str] = field(default_factory=list)  # good images the "fenced" rule set aside

    def to_dict(self) -> dict:
        return {**asdict(self), "normalizer": self.normalizer.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        return cls(
            category=str(d["category"]),
            k=int(d["k"]),
            false_alarm_rate=float(d["false_alarm_rate"]),
            threshold=float(d["threshold"]),
            rule=str(d["rule"]),
            normalizer=HeatmapNormalizer.from_dict(d["normalizer"]),
            images=[str(p) for p in d["images"]],
            model=str(d.get("model", "")),
            margin=float(d.get("margin", 0.0)),
            outliers=[str(p) for p in d.get("outliers", [])],
        )


def good_outliers(scores) -> np.ndarray:
    """Which good images' scores lie above Tukey's upper fence (Q3 + FENCE x IQR), the largest
    first and at most OUTLIER_SHARE of them (none of fewer than 10): parts that score like no
    other good part."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    q1, q3 = np.percentile(s, [25, 75])
    above = np.flatnonzero(s > q3 + FENCE * (q3 - q1))
    outliers = np.zeros(s.size, dtype=bool)
    outliers[above[np.argsort(-s[above], kind="stable")[: int(OUTLIER_SHARE * s.size)]]] = True
    return outliers


def outlier_note(calibration: Calibration) -> str | None:
    """A line for the user about the good images the threshold left out, or None."""
    if not calibration.outliers:
        return None
    n = len(calibration.outliers)
    verb, pronoun = ("scores", "it is") if n == 1 else ("score", "they are")
    return (f"{calibration.category}: {n} of the {calibration.k} good images {verb} far above the "
            f"others, left out of the threshold; check that {pronoun} good: "
            + ", ".join(calibration.outliers))


def fit_calibration(
    good_scores,
    good_cams: torch.Tensor,
    *,
    category: str,
    images: Sequence[str | Path],
    false_alarm_rate: float = 0.01,
    rule: str = DEFAULT_RULE,
    margin: float = 0.0,
    percentiles: tuple[float, float] = GOOD_PERCENTILES,
    model: str = "classifier",
) -> Calibration:
    """Threshold and heatmap normaliser from the scores and raw maps of K good images.

    "fenced" (the default): the "quantile" rule on the good images that are not outliers
    (`good_outliers`). "quantile": the lowest threshold that flags at most `false_alarm_rate` of
    the good images (metrics.false_alarm_threshold; with K < 1 / rate that is their max score).
    "max_margin": max(good score) + margin, a safety margin for the good parts not seen yet.
    """
    scores = np.asarray(good_scores, dtype=np.float64).ravel()
    if not scores.size or not (len(scores) == len(good_cams) == len(images)):
        raise DataError(
            f"need one score, one map and one image path per good image; got {len(scores)} "
            f"scores, {len(good_cams)} maps and {len(images)} paths"
        )
    outliers = np.zeros(scores.size, dtype=bool)
    if rule == "fenced":
        outliers = good_outliers(scores)
        threshold = false_alarm_threshold(scores[~outliers], false_alarm_rate)
    elif rule == "quantile":
        threshold = false_alarm_threshold(scores, false_alarm_rate)
    elif rule == "max_margin":
        threshold = float(np.max(scores) + margin)
    else:
        raise DataError(f"rule must be one of {', '.join(RULES)}; got {rule!r}")
    return Calibration(
        category=category,
        k=len(scores),
        false_alarm_rate=float(false_alarm_rate),
        threshold=float(threshold),
        rule=rule,
        normalizer=fit_good_normalizer(good_cams, percentiles),
        images=[str(p) for p in images],
        model=model,
        margin=float(margin),
        outliers=[str(p) for p, out in zip(images, outliers, strict=True) if out],
    )


def calibrate_classifier(
    model: VGG16CAM,
    good_samples: Sequence[Sample],
    image_size: int = 224,
    false_alarm_rate: float = 0.01,
    batch_size: int = 16,
    precision: str = "auto",
    *,
    rule: str = DEFAULT_RULE,
    margin: float = 0.0,
    model_label: str = "classifier",
) -> Calibration:
    """Calibrate the classifier's logit-margin threshold and CAM scaling on good train images."""
    category = require_good_train_samples(good_samples)
    preds = predict(model, good_samples, image_size, batch_size, precision)
    return fit_calibration(
        preds.margins,
        preds.cams,
        category=category,
        images=[s.path for s in good_samples],
        false_alarm_rate=false_alarm_rate,
        rule=rule,
        margin=margin,
        model=model_label,
    )


# ----------------------------------------------------------------------------- files


def default_calibration_path(checkpoint_path: str | Path, k: int = DEFAULT_K) -> Path:
    """Where a checkpoint's calibration lives: next to it, e.g. model.pt -> model.calib-k20.json."""
    checkpoint_path = Path(checkpoint_path)
    return checkpoint_path.with_name(f"{checkpoint_path.stem}.calib-k{k}.json")


def save_calibration(
    path: str | Path, calibrations: dict[str, Calibration] | Sequence[Calibration]
) -> Path:
    """Write calibrations (one per category) as readable JSON, atomically."""
    items = list(calibrations.values() if isinstance(calibrations, dict) else calibrations)
    by_category: dict[str, dict] = {}
    for c in items:
        if c.category in by_category:
            raise DataError(f"two calibrations for category {c.category!r}: keep one per product")
        by_category[c.category] = c.to_dict()
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, "calibrations": by_category}
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def load_calibration(path: str | Path) -> dict[str, Calibration]:
    """Read a calibration file written by save_calibration: {category: Calibration}."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"calibration file {path} does not exist: make it with K good images of the product "
            "(visinspect.calibration.calibrate_classifier then save_calibration)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read calibration file {path}: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a visinspect calibration file (no format {FORMAT!r})")
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has calibration format version {data.get('format_version')}; this visinspect "
            f"reads version {FORMAT_VERSION}: calibrate again"
        )
    try:
        return {name: Calibration.from_dict(d) for name, d in data["calibrations"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        problem = f"{type(e).__name__}: {e}"
        raise CheckpointError(f"{path} holds a malformed calibration ({problem})") from None
