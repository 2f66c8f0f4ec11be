"""Fusion: the classifier's margin and the nearest-good-patch distance, each standardised on the
K good images of the product, averaged; calibrated like any other score."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from visinspect.backbones.cam import upsample
from visinspect.backbones.vgg16 import VGG16CAM
from visinspect.calibration import Calibration, fit_calibration
from visinspect.data.samples import Sample
from visinspect.errors import ConfigError, DataError, VisinspectError
from visinspect.methods.base import Detector, by_product, calibrated_view, product_of
from visinspect.methods.classifier import ClassifierDetector
from visinspect.methods.nearest_patch import (
    MobileNetReferenceDetector,
    ReferenceDetector,
    TopReferenceDetector,
)
from visinspect.scoring import Predictions, ScoredImages


class FusedDetector(Detector):
    """The classifier's margin and the reference distance, each standardised on the K good images
    (reference.fit_fusion), averaged; calibrated like any other score."""

    uses_good = True
    min_good = 2  # its reference part scores each good image against the others
    score_name = "mean z-score (classifier, reference) minus calibrated threshold"
    weight = 0.5  # the classifier's share of the fused score
    reference_detector: type[ReferenceDetector] = ReferenceDetector  # its image score

    def __init__(self, model: VGG16CAM, info: dict, **kwargs) -> None:
        super().__init__(model, info, **kwargs)
        self.classifier = ClassifierDetector(model, info, **kwargs)
        self.reference = self.reference_detector(model, info, **kwargs)
        self.patch_provenance = self.reference.patch_provenance
        self.fusions: dict[str, FusedScorer] = {}
        self.calibrations: dict[str, Calibration] = {}

    def standardise(self, good: Sequence[Sample], weight: float = 0.5) -> tuple[FusedScorer, Predictions]:
        """Both scores standardised on the K good images (the reference adapted to them), and the
        classifier's predictions of those images."""
        self.reference.adapt(good)
        bank, preds = self.reference.banks[product_of(good)], self.classifier.predictions(good)
        return fit_fusion(preds.margins, bank.good_scores, preds.cams, bank.good_maps, weight=weight), preds

    def adapt(self, good: Sequence[Sample]) -> None:
        super().adapt(good)
        product = product_of(good)
        fusion, preds = self.standardise(good, self.weight)
        bank = self.reference.banks[product]
        self.fusions[product] = fusion
        self.calibrations[product] = fit_calibration(
            fusion.score(preds.margins, bank.good_scores), fusion.heatmap(preds.cams, bank.good_maps),
            category=product, images=[s.path for s in good], false_alarm_rate=self.false_alarm_rate,
            model=self.name,
        )

    def score(self, samples: Sequence[Sample]) -> ScoredImages:
        preds = self.classifier.predictions(samples)
        reference = self.reference.raw(samples)
        where = {str(s.path): i for i, s in enumerate(samples)}

        def fuse(fusion: FusedScorer, group: list[Sample]) -> tuple[np.ndarray, torch.Tensor]:
            idx = [where[str(s.path)] for s in group]
            sub = preds.subset(idx)
            ref_scores, ref_maps = reference.scores[idx], reference.maps[idx]
            return fusion.score(sub.margins, ref_scores), fusion.heatmap(sub.cams, ref_maps)

        return calibrated_view(by_product(samples, self.image_size, self.fusions, fuse), self.calibrations)


class FusedTopDetector(FusedDetector):
    """The same fusion with the reference part's image score the mean of its 5 % largest patch
    distances (TopReferenceDetector) instead of the largest one."""

    score_name = "mean z-score (classifier, top-5 % reference) minus calibrated threshold"
    reference_detector = TopReferenceDetector


class FusedMobileNetDetector(FusedDetector):
    """The same fusion with the reference part MobileNetReferenceDetector's: the classifier's
    VGG16 margin and MobileNetV2's nearest good patch."""

    score_name = "mean z-score (classifier, MobileNetV2 top-5 % reference) minus calibrated threshold"
    reference_detector = MobileNetReferenceDetector
    stored_layers = ("conv4_3", "mobilenet_v2")


MIN_STD = 1e-6


@dataclass
class Standardizer:
    """z = (x - mean) / std, with mean and std measured on good images."""

    mean: float
    std: float

    @classmethod
    def fit(cls, values) -> Standardizer:
        v = np.asarray(values, dtype=np.float64).ravel()
        if v.size == 0 or not np.isfinite(v).all():
            raise DataError(f"need finite good-image values to standardise; got {v.size} values")
        mean = float(v.mean())
        std = float(v.std(ddof=1)) if v.size > 1 else 0.0
        # One image, or identical scores, would divide by zero: floor the spread.
        return cls(mean, max(std, MIN_STD, 1e-3 * abs(mean)))

    def __call__(self, x):
        return (x - self.mean) / self.std

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std}

    @classmethod
    def from_dict(cls, d: dict) -> Standardizer:
        return cls(float(d["mean"]), float(d["std"]))


@dataclass
class FusedScorer:
    """A weighted mean of the classifier's and the reference's z-scores, each measured on good images.

    Standardising puts a logit margin and a feature distance on one scale ("how many good-image
    standard deviations above normal"). By default both weigh the same, because with only good
    images of the product there is nothing to learn better weights from; `weight` (the
    classifier's share) can be learnt on the source products (visinspect.methods.learnt_fusion).
    Calibrate the fused score like any other (calibration.fit_calibration on the good images'
    fused scores and maps).
    """

    classifier: Standardizer
    reference: Standardizer
    classifier_map: Standardizer | None = None
    reference_map: Standardizer | None = None
    weight: float = 0.5

    def score(self, classifier_scores, reference_scores) -> np.ndarray:
        """Fused image scores (N,) from logit margins and reference scores."""
        c = np.asarray(classifier_scores, dtype=np.float64)
        r = np.asarray(reference_scores, dtype=np.float64)
        if c.shape != r.shape:
            raise DataError(
                f"need one classifier and one reference score per image; got shapes {c.shape} "
                f"and {r.shape}"
            )
        return self.weight * self.classifier(c) + (1 - self.weight) * self.reference(r)

    def heatmap(self, cams: torch.Tensor, reference_maps: torch.Tensor) -> torch.Tensor:
        """Fused maps (N, h, w) at the reference maps' resolution (CAMs upsampled to it)."""
        if self.classifier_map is None or self.reference_map is None:
            raise VisinspectError(
                "this fusion was fitted without good-image maps: pass them to fit_fusion"
            )
        cams = upsample(cams, tuple(reference_maps.shape[-2:]))
        return self.weight * self.classifier_map(cams) + (1 - self.weight) * self.reference_map(
            reference_maps.float()
        )

    def to_dict(self) -> dict:
        parts = ("classifier", "reference", "classifier_map", "reference_map")
        return {"method": "mean_z", "weight": self.weight} | {
            p: None if getattr(self, p) is None else getattr(self, p).to_dict() for p in parts
        }

    @classmethod
    def from_dict(cls, d: dict) -> FusedScorer:
        def part(name: str) -> Standardizer | None:
            return None if d.get(name) is None else Standardizer.from_dict(d[name])

        return cls(
            part("classifier"), part("reference"), part("classifier_map"), part("reference_map"),
            float(d.get("weight", 0.5)),
        )


def fit_fusion(
    good_classifier_scores,
    good_reference_scores,
    good_cam_maps: torch.Tensor | None = None,
    good_ref_maps: torch.Tensor | None = None,
    weight: float = 0.5,
) -> FusedScorer:
    """Standardise both scores (and maps, if given) on the same K good images; `weight` is the
    classifier's share of the fused score (0: the reference alone, 1: the classifier alone).

    Pass the memory bank's leave-one-out `good_scores` / `good_maps`, not scores of the bank's
    own images (those are ~0 and would make every new good part look anomalous).
    """
    c = np.asarray(good_classifier_scores, dtype=np.float64).ravel()
    r = np.asarray(good_reference_scores, dtype=np.float64).ravel()
    if c.size != r.size:
        raise DataError(f"need both scores of the same good images; got {c.size} and {r.size}")
    if (good_cam_maps is None) != (good_ref_maps is None):
        raise DataError("pass both good-image maps (classifier CAMs and reference maps) or neither")
    if not 0.0 <= weight <= 1.0:
        raise ConfigError(f"the classifier's fusion weight must be in [0, 1]; got {weight}")
    fused = FusedScorer(Standardizer.fit(c), Standardizer.fit(r), weight=weight)
    if good_cam_maps is not None:
        cams = upsample(good_cam_maps, tuple(good_ref_maps.shape[-2:]))
        fused.classifier_map = Standardizer.fit(cams)
        fused.reference_map = Standardizer.fit(good_ref_maps.float())
    return fused
