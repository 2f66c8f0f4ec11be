"""Fusion with the classifier's weight learnt on the source products (lever 4 of issue #13).

`fused` weighs the classifier's margin and the nearest-good-patch distance equally, because K good
images of a new product cannot say which of the two to trust. The labelled source products can:
each is treated as a new product would be, with K_SOURCE of its good train/ images as the
reference that both scores are standardised on, and the classifier's share w (on the grid
WEIGHTS) that ranks the source validation images best (mean image AUROC over source products) is
kept. On the target nothing changes but w: the same standardisation on its K good images, the
same calibration.

Why it may not carry over: the classifier was trained on these very products' defects, so on
their validation images it is at its best, and w favours it more than an unseen product warrants.
Held-out source *products* would be fairer, at the price of one training per product left out.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from visinspect.calibration import select_good_images
from visinspect.data.samples import Sample
from visinspect.errors import ConfigError, DataError
from visinspect.methods.fusion import FusedDetector
from visinspect.metrics import ranked_auroc

K_SOURCE = 20  # good reference images per source product: the K a user is asked for
WEIGHTS = tuple(float(w) for w in np.round(np.linspace(0.0, 1.0, 21), 2))  # 0: reference alone


def choose_weight(per_product: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[float, dict]:
    """The classifier weight with the best mean image AUROC over products, each given as
    (labels with 1 = anomaly, classifier z-scores, reference z-scores); ties go to the weight
    nearest 0.5 (equal weights), then to the smaller. Returns (weight, mean AUROC by weight)."""
    if not per_product:
        raise DataError(
            "no source product has good and defective validation images to learn a fusion weight from"
        )
    means = {
        w: float(np.mean([ranked_auroc(y, w * zc + (1 - w) * zr) for y, zc, zr in per_product.values()]))
        for w in WEIGHTS
    }
    best = max(means.values())
    weight = min((w for w, m in means.items() if m >= best - 1e-12), key=lambda w: (abs(w - 0.5), w))
    return weight, means


class LearntFusionDetector(FusedDetector):
    """`fused` with the classifier's weight learnt on the source products (`fit_sources`, kept in
    the checkpoint as info["fusion_weight"])."""

    score_name = "weighted z-score (classifier, reference) minus calibrated threshold"

    def __init__(self, model, info: dict, **kwargs) -> None:
        super().__init__(model, info, **kwargs)
        learnt = info.get("fusion_weight")
        self.weight = None if learnt is None else float(learnt["classifier"])

    def fit_sources(self, train: Sequence[Sample], val: Sequence[Sample]) -> dict:
        """Learn the weight on the source products (see the module docstring)."""
        per_product = {}
        for product in sorted({s.category for s in val}):
            group = [s for s in val if s.category == product]
            labels = np.array([s.label for s in group])
            n_good = sum(s.category == product and s.split == "train" and s.label == 0 for s in train)
            if len(set(labels)) < 2 or n_good < 2:
                continue  # nothing to rank, or no reference to standardise on
            fusion, _ = self.standardise(select_good_images(train, product, min(K_SOURCE, n_good), self.seed))
            margins = self.classifier.predictions(group).margins
            distances = self.reference.raw(group).scores
            per_product[product] = (labels, fusion.classifier(margins), fusion.reference(distances))
            del self.reference.banks[product], self.reference.calibrations[product]  # the target's only
        self.weight, means = choose_weight(per_product)
        return {"fusion_weight": {"classifier": self.weight, "k_source": K_SOURCE,
                                  "products": sorted(per_product), "mean_auroc_by_weight": means}}

    def adapt(self, good: Sequence[Sample]) -> None:
        if self.weight is None:
            raise ConfigError(
                f"method {self.name!r} needs the fusion weight learnt on the source products: train it "
                "with `python -m visinspect train --method fused-learnt` (this checkpoint has none)"
            )
        super().adapt(good)
