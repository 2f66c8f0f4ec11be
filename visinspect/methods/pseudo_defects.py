"""Pseudo-defects: the seed's CAM head taught on the new product itself, from K good images only.

Self-supervised anomaly detection (CutPaste, Li et al. CVPR 2021; DRAEM, Zavrtanik et al. ICCV
2021; NSA) makes defects where there are none: a patch of the image cut and pasted elsewhere, a
thin "scar" of another colour, or a drawn crack, scratch, stain, hole or contamination (the
synthetic dataset's own defects, visinspect.data.synthetic.draw_defect). Each of the K good images of
the new product gets PER_IMAGE such pseudo-defective copies; the classifier trained on the source
products is then fine-tuned on good (label 0) against pseudo-defective (label 1) images of the new
product, so that what it calls a defect is measured against this product's own appearance. No
real defect of the new product is ever seen.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from visinspect.backbones.store import FeatureStore
from visinspect.backbones.vgg16 import VGG16CAM
from visinspect.calibration import fit_calibration
from visinspect.data.drawing import DEFECT_KINDS, draw_defect
from visinspect.data.samples import Sample, load_rgb, to_tensor
from visinspect.methods.base import Detector, by_product, calibrated_view
from visinspect.scoring import ScoredImages, predict
from visinspect.training import TrainConfig, train_classifier

KINDS = ("cutpaste", "scar", *DEFECT_KINDS)
PER_IMAGE = 4  # pseudo-defective copies of each good image
EPOCHS = 5  # fine-tuning epochs on the new product (the seed's recipe otherwise)


def cut_paste(
    image: np.ndarray, rng: np.random.Generator, scar: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """CutPaste: a patch of the image (2-15 % of its area; a scar: 2-6 % of the side wide and
    10-25 % long, upright or lying) pasted at another place, its brightness jittered by up to
    10 %; returns (image, mask)."""
    n = image.shape[0]
    if scar:
        h, w = max(2, round(n * rng.uniform(0.1, 0.25))), max(1, round(n * rng.uniform(0.02, 0.06)))
        if rng.random() < 0.5:
            h, w = w, h
    else:
        area, aspect = rng.uniform(0.02, 0.15) * n * n, np.exp(rng.uniform(np.log(0.3), np.log(3.3)))
        h = int(np.clip(round(np.sqrt(area * aspect)), 2, n - 1))
        w = int(np.clip(round(np.sqrt(area / aspect)), 2, n - 1))
    y0, x0 = rng.integers(0, n - h + 1), rng.integers(0, n - w + 1)
    y1, x1 = rng.integers(0, n - h + 1), rng.integers(0, n - w + 1)
    patch = image[y0 : y0 + h, x0 : x0 + w].astype(np.float32) * rng.uniform(0.9, 1.1)
    out = image.copy()
    out[y1 : y1 + h, x1 : x1 + w] = np.clip(np.round(patch), 0, 255).astype(np.uint8)
    mask = np.zeros((n, n), bool)
    mask[y1 : y1 + h, x1 : x1 + w] = True
    return out, mask


def pseudo_defect(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One pseudo-defect of a random kind (KINDS) on a square RGB uint8 image: (image, mask)."""
    kind = KINDS[rng.integers(len(KINDS))]
    if kind in ("cutpaste", "scar"):
        return cut_paste(image, rng, scar=kind == "scar")
    return draw_defect(image, kind, rng)


class PseudoDefectDetector(Detector):
    """The source-trained classifier, fine-tuned per product on its K good images against their
    pseudo-defects; threshold and heatmap scale from the K good images (seen in the fine-tuning:
    the threshold is optimistic, the ranking (AUROC) is not affected)."""

    uses_good = True
    score_name = "fine-tuned logit margin minus calibrated threshold"

    def __init__(self, model: VGG16CAM, info: dict, **kwargs) -> None:
        super().__init__(model, info, **kwargs)
        self.models: dict[str, VGG16CAM] = {}
        self.calibrations = {}

    def adapt(self, good: Sequence[Sample]) -> None:
        super().adapt(good)
        product, size = self.product, self.image_size
        rng = np.random.default_rng(self.seed)
        images, samples = [], []
        for s in good:
            square = cv2.resize(load_rgb(s.path), (size, size), interpolation=cv2.INTER_AREA)
            images.append(to_tensor(square, size))
            samples.append(Sample(Path(s.path), product, "train", 0, "good", None))
            for j in range(PER_IMAGE):
                defective, _ = pseudo_defect(square, rng)
                images.append(to_tensor(defective, size))
                samples.append(Sample(Path(f"{s.path}#pseudo{j}"), product, "train", 1, "pseudo", None))
        feats = FeatureStore(None).compute(self.model, torch.stack(images), precision=self.precision)
        model = copy.deepcopy(self.model)
        # Defects are the majority here (PER_IMAGE to 1): weigh the classes to balance them.
        config = TrainConfig(epochs=EPOCHS, image_size=size, seed=self.seed, precision=self.precision,
                             class_weights=(float(PER_IMAGE), 1.0))
        train_classifier(model, samples, config, progress=self.progress, features=feats)
        model.eval()
        preds = predict(model, good, size, precision=self.precision)
        self.models[product] = model
        self.calibrations[product] = fit_calibration(
            preds.margins, preds.cams, category=product, images=[s.path for s in good],
            false_alarm_rate=self.false_alarm_rate, model="pseudo-defects",
        )

    def score(self, samples: Sequence[Sample]) -> ScoredImages:
        def raw(model: VGG16CAM, group: list[Sample]) -> tuple[np.ndarray, torch.Tensor]:
            preds = predict(model, group, self.image_size, precision=self.precision)
            return preds.margins, preds.cams

        return calibrated_view(by_product(samples, self.image_size, self.models, raw), self.calibrations)
