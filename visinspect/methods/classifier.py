"""The seed's method as a detector: the trained VGG16-CAM classifier's logit margin and CAM,
with its threshold from the source validation split or from K good images of the product."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from visinspect.backbones.cam import HeatmapNormalizer
from visinspect.backbones.store import file_digest, weights_digest
from visinspect.backbones.vgg16 import VGG16CAM
from visinspect.calibration import Calibration, fit_calibration
from visinspect.data.samples import Sample
from visinspect.methods.base import IDENTITY, Detector, calibrated_view, product_of
from visinspect.scoring import Predictions, ScoredImages, predict
from visinspect.training import SourceImages, TrainingRun, train_baseline
from visinspect.utils import resolve_precision

MEMORY = 20_000  # raw classifier outputs kept, all detectors together (~1 KB each at 224 px)


# (weights, image size, precision; image content) -> (logits, CAM): see ClassifierDetector.predictions
_OUTPUTS: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}


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
        self.calibrations[product_of(good)] = fit_calibration(
            preds.margins, preds.cams, category=product_of(good), images=[s.path for s in good],
            false_alarm_rate=self.false_alarm_rate,
        )

    def score(self, samples: Sequence[Sample]) -> ScoredImages:
        return calibrated_view(super().score(samples), self.calibrations)


def fit_baseline(
    source: SourceImages, run: TrainingRun, encoder: tuple[VGG16CAM, dict] | None = None
) -> tuple[VGG16CAM, dict]:
    """The seed's recipe on the labelled source images, from ImageNet's VGG16 or from `encoder`
    (a SimCLR-pre-trained backbone and its provenance)."""
    model, provenance = encoder or (None, None)
    return train_baseline(
        source.train, source.val, run.config, weights=run.weights, model=model, provenance=provenance,
        progress=run.progress, checkpoint_path=run.state, resume=run.resume, device=run.device,
    )
