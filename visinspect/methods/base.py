"""One interface for every method: learn from other products, adapt to K good parts, score images.

What a user has on day one of a new product: labelled defects of *other* products (the source) and
a handful of good parts of the new one. Every method of visinspect goes through the same steps:

1. **train** (`train_method`): what it learns from the labelled source products, once — the
   seed's classifier, SimCLR pre-training and then the classifier, ... or nothing at all;
2. **adapt** (`Detector.adapt`): what it takes from K good images of one new product — a decision
   threshold and heatmap scale, a memory bank of good patches, ... — nothing for the plain
   baseline, whose threshold comes from the source validation split;
3. **score** (`Detector.score`): one score per image, higher = more anomalous, anomalous above
   `threshold`, and a heatmap per image, scaled to [0, 1] by `normalizer`.

`compare`, `loo`, `evaluate`, `predict` and the notebooks reach every method through its name
(visinspect.methods.registry), so a new method is one Detector subclass in a module of its own and one line
in `methods.METHODS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visinspect.backbones.cam import HeatmapNormalizer, upsample
from visinspect.backbones.vgg16 import VGG16CAM, describe_backbone
from visinspect.calibration import Calibration, outlier_note
from visinspect.data.samples import Sample, list_images
from visinspect.errors import ConfigError, DataError
from visinspect.scoring import ScoredImages

# Scores relative to a product's calibrated threshold: 0 is the decision threshold, and maps are
# already on the product's good-image scale, so the "normaliser" is the identity.
IDENTITY = HeatmapNormalizer(0.0, 1.0, "calibrated")


def calibrated_view(scored: ScoredImages, calibrations: dict[str, Calibration]) -> ScoredImages:
    """Scores and maps relative to each product's good parts: score - its threshold, maps scaled
    by its good-image normaliser (not clipped). Then 0 is every product's decision threshold and
    0..1 its heatmap scale, so products with different thresholds can be pooled."""
    scores = scored.scores.copy()
    maps = scored.maps.clone().float()
    for i, s in enumerate(scored.samples):
        if s.category not in calibrations:
            raise DataError(
                f"{s.path} is of product {s.category!r}, but the detector was adapted to "
                f"{', '.join(sorted(calibrations)) or 'no product'}: adapt it to K good images of "
                f"{s.category!r} first"
            )
        c = calibrations[s.category]
        scores[i] -= c.threshold
        maps[i] = (maps[i] - c.normalizer.low) / (c.normalizer.high - c.normalizer.low)
    return ScoredImages(scored.samples, scores, maps, scored.image_size)


def product_of(good: Sequence[Sample]) -> str:
    categories = sorted({s.category for s in good})
    if len(categories) != 1:
        raise DataError(f"adapt takes good images of one product; got {', '.join(categories) or 'none'}")
    return categories[0]


class Detector:
    """Base class: a model (trained classifier or plain backbone) and how to score with it."""

    uses_good = False  # does `adapt` need K good images of the product (rows are named "k=K")
    min_good = 1  # the fewest good images `adapt` takes
    score_name = ""
    # The feature-store layers (features.LAYERS) it reads: what `loo`'s frozen pass fills first.
    stored_layers: tuple[str, ...] = ("conv4_3",)
    # What `fit_sources` learns from the source products' images ("" : nothing), for the method table.
    learns_on_sources = ""

    def __init__(
        self,
        model: VGG16CAM | None,
        info: dict,
        *,
        name: str,
        precision: str = "auto",
        false_alarm_rate: float = 0.01,
        seed: int = 0,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        # A method's named settings (registry.Method.options) replace the class's defaults first,
        # so that each subclass's __init__ already sees them.
        for key, value in (options or {}).items():
            if not hasattr(type(self), key) or callable(getattr(type(self), key)):
                raise ConfigError(f"{type(self).__name__} has no setting {key!r}")
            setattr(self, key, value)
        self.model, self.info, self.name = model, info, name
        self.image_size = int(info["image_size"])
        self.precision, self.false_alarm_rate, self.seed = precision, false_alarm_rate, seed
        self.threshold = 0.0
        self.normalizer: HeatmapNormalizer | None = IDENTITY
        self.product: str | None = None  # the product adapted to last
        # Where the weights of a nearest-good-patch score's network came from (None: no such score).
        self.patch_provenance: dict | None = None
        self.progress = False  # progress bars of the feature store and the scoring

    def adapt(self, good: Sequence[Sample]) -> None:
        """Take what the method needs from K good train/ images of one product."""
        self.product = product_of(good)

    def score(self, samples: Sequence[Sample]) -> ScoredImages:
        raise NotImplementedError

    def describe(self) -> str:
        """What it scores with, in lines a person reads: the product it adapted to and its
        threshold, the good images its calibration set aside (to check), its patch network."""
        lines = [f"method {self.name!r}"]
        calibrations = getattr(self, "calibrations", {})  # the methods that adapt keep one per product
        if self.product in calibrations:
            cal = calibrations[self.product]
            lines[0] += f", adapted to {cal.k} good images of {self.product!r}"
        lines += [note for note in map(outlier_note, calibrations.values()) if note]
        if (self.patch_provenance or {}).get("network"):  # a patch network other than VGG16
            lines.append("patch features: " + describe_backbone(self.patch_provenance))
        return "\n".join(lines)

    def fit_sources(self, train: Sequence[Sample], val: Sequence[Sample]) -> dict:
        """What the method learns from the labelled source products on top of its training (e.g. a
        fusion weight), to keep in the checkpoint's info; most methods learn nothing here."""
        return {}


def by_product(
    samples: Sequence[Sample], image_size: int, per_product: dict, score: Callable
) -> ScoredImages:
    """Score each product's samples with its own adapted state (`score(state, samples)` ->
    scores, maps); one ScoredImages in input order. Products whose maps differ in size (one
    method's scores on different products) are upsampled to the largest."""
    scores = np.zeros(len(samples))
    parts: list[tuple[list[int], torch.Tensor]] = []
    for product in sorted({s.category for s in samples}):
        if product not in per_product:
            raise DataError(
                f"no good images of product {product!r} were given: adapt the detector to K good "
                f"images of {product!r} first"
            )
        idx = [i for i, s in enumerate(samples) if s.category == product]
        scores[idx], m = score(per_product[product], [samples[i] for i in idx])
        parts.append((idx, m))
    if not parts:
        return ScoredImages(list(samples), scores, torch.zeros(0, 1, 1), image_size)
    size = max((tuple(m.shape[1:]) for _, m in parts), key=lambda hw: hw[0] * hw[1])
    maps = torch.zeros(len(samples), *size)
    for idx, m in parts:
        maps[idx] = m if tuple(m.shape[1:]) == size else upsample(m, size)
    return ScoredImages(list(samples), scores, maps, image_size)


# ----------------------------------------------------------------------------- a user's files


def unlabelled_sample(path: str | Path, product: str | None) -> Sample:
    """An image to score that is in no labelled table: label -1 (unknown), "test" split."""
    return Sample(Path(path), product or "images", "test", -1, "unlabelled", None)


def reference_samples(paths: Sequence[str | Path], product: str | None = None) -> list[Sample]:
    """The good images of a product given as files or folders: good train/ samples of one product
    (named after the first folder given, or `product`)."""
    files = list_images(paths)
    if not files:
        raise DataError(f"no good reference images found in {', '.join(map(str, paths))}")
    name = product or next((Path(p).name for p in paths if Path(p).is_dir()), "product")
    return [Sample(f, name, "train", 0, "good", None) for f in files]
