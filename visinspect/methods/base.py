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

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from visinspect.backbones.cam import HeatmapNormalizer, upsample
from visinspect.backbones.mobilenet import MOBILENET_ENV, MobileNetPatches, build_mobilenet
from visinspect.backbones.store import Network, file_digest, weights_digest
from visinspect.backbones.vgg16 import VGG16CAM
from visinspect.calibration import Calibration, fit_calibration
from visinspect.data.samples import Sample, list_images
from visinspect.errors import CheckpointError, DataError
from visinspect.methods.memory_bank import DEFAULT_MAX_PATCHES, FusedScorer, PatchMemoryBank, fit_fusion
from visinspect.scoring import Predictions, ScoredImages, predict
from visinspect.utils import resolve_precision

# Scores relative to a product's calibrated threshold: 0 is the decision threshold, and maps are
# already on the product's good-image scale, so the "normaliser" is the identity.
IDENTITY = HeatmapNormalizer(0.0, 1.0, "calibrated")
MEMORY = 20_000  # raw classifier outputs kept, all detectors together (~1 KB each at 224 px)
# (weights, image size, precision; image content) -> (logits, CAM): see ClassifierDetector.predictions
_OUTPUTS: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}


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


def _product(good: Sequence[Sample]) -> str:
    categories = sorted({s.category for s in good})
    if len(categories) != 1:
        raise DataError(f"adapt takes good images of one product; got {', '.join(categories) or 'none'}")
    return categories[0]


class Detector:
    """Base class: a model (trained classifier or plain backbone) and how to score with it."""

    uses_good = False  # does `adapt` need K good images of the product (rows are named "k=K")
    score_name = ""
    # The feature-store layers (features.LAYERS) it reads: what `loo`'s frozen pass fills first.
    stored_layers: tuple[str, ...] = ("conv4_3",)

    def __init__(
        self,
        model: VGG16CAM | None,
        info: dict,
        *,
        name: str,
        precision: str = "auto",
        false_alarm_rate: float = 0.01,
        seed: int = 0,
    ) -> None:
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
        self.product = _product(good)

    def score(self, samples: Sequence[Sample]) -> ScoredImages:
        raise NotImplementedError

    def fit_sources(self, train: Sequence[Sample], val: Sequence[Sample]) -> dict:
        """What the method learns from the labelled source products on top of its training (e.g. a
        fusion weight), to keep in the checkpoint's info; most methods learn nothing here."""
        return {}


class ClassifierDetector(Detector):
    """The trained classifier as it is: the logit margin and the CAM, with the threshold and the
    heatmap scale chosen on the source products' validation split."""

    score_name = "logit margin (anomaly - good)"

    def __init__(self, model: VGG16CAM, info: dict, **kwargs) -> None:
        super().__init__(model, info, **kwargs)
        self.threshold = float(info["threshold"])
        norm = info.get("normalizer")
        self.normalizer = HeatmapNormalizer.from_dict(norm) if norm else None
        self._weights: tuple[tuple[int, ...], str] | None = None

    def _weights_key(self) -> str:
        """The model's weights digest with the image size and precision; hashed again only when a
        parameter changed in place since (an optimiser step or load_state_dict bumps its version
        counter), so scoring a stream batch by batch does not hash 60 MB per batch."""
        versions = tuple(p._version for p in self.model.parameters())
        if self._weights is None or self._weights[0] != versions:
            digest = weights_digest(self.model)
            self._weights = (versions, f"{digest}/{self.image_size}/{resolve_precision(self.precision)}")
        return self._weights[1]

    def predictions(self, samples: Sequence[Sample]) -> Predictions:
        """The classifier's logits and CAMs, each image run once per set of weights whichever
        detector asks (the baseline, calibrated and fused rows of a split share them; adapting for
        another K or product costs nothing more); the last MEMORY images are remembered."""
        if not samples:
            return Predictions([], torch.zeros(0, 2), torch.zeros(0, 1, 1), self.image_size)
        # Keyed by the weights' and the images' contents: a model trained further, or a file
        # changed on disk, is run again.
        model = self._weights_key()
        keys = {str(s.path): (model, file_digest(s.path)) for s in samples}
        result = {path: _OUTPUTS.pop(key) for path, key in keys.items() if key in _OUTPUTS}
        todo = list({str(s.path): s for s in samples if str(s.path) not in result}.values())
        if todo:
            new = predict(self.model, todo, self.image_size, precision=self.precision, progress=self.progress)
            result |= {str(s.path): (lg, cam) for s, lg, cam in zip(todo, new.logits, new.cams, strict=True)}
        for path, key in keys.items():  # re-inserted last: the oldest go first, memory stays flat
            _OUTPUTS[key] = result[path]
        while len(_OUTPUTS) > MEMORY:
            _OUTPUTS.pop(next(iter(_OUTPUTS)))
        logits, cams = zip(*(result[str(s.path)] for s in samples), strict=True)
        return Predictions(list(samples), torch.stack(logits), torch.stack(cams), self.image_size)

    def score(self, samples: Sequence[Sample]) -> ScoredImages:
        return self.predictions(samples).scored()


class CalibratedClassifier(ClassifierDetector):
    """The same classifier, with each product's threshold (at most `false_alarm_rate` of its K good
    images above it) and heatmap scale (calibration.fit_calibration) from K good images."""

    uses_good = True
    score_name = "logit margin minus the product's calibrated threshold"

    def __init__(self, model: VGG16CAM, info: dict, **kwargs) -> None:
        super().__init__(model, info, **kwargs)
        self.threshold, self.normalizer = 0.0, IDENTITY
        self.calibrations: dict[str, Calibration] = {}

    def adapt(self, good: Sequence[Sample]) -> None:
        super().adapt(good)
        preds = self.predictions(good)
        self.calibrations[_product(good)] = fit_calibration(
            preds.margins, preds.cams, category=_product(good), images=[s.path for s in good],
            false_alarm_rate=self.false_alarm_rate,
        )

    def score(self, samples: Sequence[Sample]) -> ScoredImages:
        return calibrated_view(super().score(samples), self.calibrations)


class ReferenceDetector(Detector):
    """Nearest good patch: the distance of each test patch to the K good images' patches
    (reference.PatchMemoryBank, the PatchCore idea); needs no defect label at all."""

    uses_good = True
    score_name = "nearest good patch distance minus calibrated threshold"
    top = 0.0  # image score: the largest patch distance (PatchCore); see PatchMemoryBank.top
    layers: tuple[str, ...] = ("conv4_3",)  # the patch features: the model's VGG16 conv4_3
    max_patches: int | None = DEFAULT_MAX_PATCHES  # the bank's coreset size

    def __init__(self, model: VGG16CAM, info: dict, **kwargs) -> None:
        super().__init__(model, info, **kwargs)
        self.banks: dict[str, PatchMemoryBank] = {}
        self.calibrations: dict[str, Calibration] = {}
        self.patch_model: Network = model  # the network whose maps are the patch features
        self.patch_provenance: dict = info.get("backbone") or {}  # where its weights came from

    def adapt(self, good: Sequence[Sample]) -> None:
        super().adapt(good)
        bank = PatchMemoryBank.fit(
            self.patch_model, good, self.image_size, layers=self.layers, max_patches=self.max_patches,
            seed=self.seed, precision=self.precision, top=self.top,
        )
        self.banks[bank.category] = bank
        self.calibrations[bank.category] = bank.calibrate(self.false_alarm_rate)

    def raw(self, samples: Sequence[Sample]) -> ScoredImages:
        """Uncalibrated patch distances, each product against its own bank."""
        return by_product(samples, self.image_size, self.banks, lambda bank, group: bank.score(
            self.patch_model, group, precision=self.precision, progress=self.progress))

    def score(self, samples: Sequence[Sample]) -> ScoredImages:
        return calibrated_view(self.raw(samples), self.calibrations)


class TopReferenceDetector(ReferenceDetector):
    """The same nearest good patch, with the image score the mean of its 5 % largest patch
    distances (AnomalyDINO's top-percent mean) instead of the largest: one odd patch of a good
    part weighs less, a defect covering several patches more."""

    score_name = "mean of the 5 % largest nearest-good-patch distances minus calibrated threshold"
    top = 0.05


class MobileNetReferenceDetector(TopReferenceDetector):
    """The same top-5 % nearest good patch on MobileNetV2's stride-16 maps (visinspect.backbones.mobilenet)
    instead of VGG16's conv4_3: the frozen ImageNet features that separated the real targets' good
    and defective parts best (docs/results.md). The bank keeps every patch: 196 per image at
    224 px, so even K = 50 searches fewer multiply-adds than conv4_3's 2048-patch coreset."""

    score_name = "mean of the 5 % largest MobileNetV2 good-patch distances minus calibrated threshold"
    layers = stored_layers = ("mobilenet_v2",)
    max_patches = None

    def __init__(self, model: VGG16CAM | None, info: dict, **kwargs) -> None:
        super().__init__(model, info, **kwargs)
        self.patch_model, self.patch_provenance = mobilenet_for(info)


class FusedDetector(Detector):
    """The classifier's margin and the reference distance, each standardised on the K good images
    (reference.fit_fusion), averaged; calibrated like any other score."""

    uses_good = True
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
        bank, preds = self.reference.banks[_product(good)], self.classifier.predictions(good)
        return fit_fusion(preds.margins, bank.good_scores, preds.cams, bank.good_maps, weight=weight), preds

    def adapt(self, good: Sequence[Sample]) -> None:
        super().adapt(good)
        product = _product(good)
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


def mobilenet_for(info: dict) -> tuple[MobileNetPatches, dict]:
    """The MobileNetV2 of the nearest-good-patch score for a model or checkpoint with this `info`:
    ImageNet weights ("auto"), random exactly when its backbone is (tests, the offline demo).

    When `info` records MobileNetV2's own weights (a settings checkpoint of `train`), the weights
    found here must be ImageNet's too: scoring with random features would mean nothing."""
    recorded = info.get("backbone") or {}
    model, found = build_mobilenet("random" if recorded.get("source") == "random" else "auto")
    if recorded.get("network") == "MobileNetV2" and recorded.get("sha256") != found["sha256"]:
        if found["source"] == "random":
            raise CheckpointError(
                f"this method was set up with ImageNet MobileNetV2 weights ({recorded.get('path')}, "
                f"sha256 {str(recorded.get('sha256'))[:12]}...) and none are found here: set "
                f"{MOBILENET_ENV}=FILE to that file (or let torchvision download its own)"
            )
        warnings.warn(
            f"MobileNetV2 weights differ from the ones recorded at training ({recorded.get('path')}, "
            f"sha256 {str(recorded.get('sha256'))[:12]}...): using {found['path']} "
            f"(sha256 {str(found['sha256'])[:12]}...)",
            stacklevel=2,
        )
    return model, found


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
