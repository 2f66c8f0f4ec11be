"""Residual learning (the ResAD idea, Yao et al., NeurIPS 2024) on the seed's CAM model.

A classifier trained on other products learns what *those* products look like, and a new product
looks unlike all of them. ResAD's answer: describe each image by what differs from good parts of
its own product. Every conv4_3 patch feature (3x3-averaged, as the good-reference score uses) has
its nearest patch among K good reference images of the same product subtracted; what remains (the
"residual") is near zero wherever the part looks like a good part, whatever the product. The
seed's head (pool4, block 5, global average pooling, dense) is trained on residual maps of the
source products, each against K_TRAIN good images of its own; on a new product the residuals are
taken against its K good images, so the classifier, its CAM and its boxes carry over unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from visinspect.backbones.store import LAYERS, FeatureStore, Network, StoredFeatures
from visinspect.backbones.vgg16 import VGG16CAM, build_model
from visinspect.calibration import fit_calibration
from visinspect.data.samples import Sample
from visinspect.errors import ConfigError, DataError
from visinspect.methods.base import Detector, by_product, calibrated_view
from visinspect.methods.memory_bank import PatchMemoryBank, patch_features
from visinspect.scoring import Predictions, ScoredImages, forward_features
from visinspect.training import SourceImages, TrainConfig, TrainingRun, train_classifier, training_info
from visinspect.utils import model_device, resolve_device, resolve_precision, set_seed

K_TRAIN = 8  # good reference images per source product in training (ResAD trains few-shot too)


def residual_maps(
    model: Network,
    bank: PatchMemoryBank,
    samples: Sequence[Sample],
    precision: str = "auto",
    exclude: Sequence[int] | None = None,
) -> torch.Tensor:
    """Residual maps (N, C, h, w): each 3x3-averaged patch of the bank's layer (conv4_3, or
    MobileNetV2's with that network as `model`) minus its nearest patch of the bank; `exclude[i]`
    leaves the bank's own image i out (for the bank's good images)."""
    layer = bank.layers[0]
    feats = FeatureStore.default().fetch_samples(model, samples, bank.image_size, precision=precision,
                                                 layer=layer)
    out = []
    for i, c4 in enumerate(feats.batches(16)):
        f = patch_features(c4)
        n, c, h, w = f.shape
        patches = f.permute(0, 2, 3, 1).reshape(-1, c)
        owners = None
        if exclude is not None:
            owners = torch.tensor(exclude[16 * i : 16 * i + n]).repeat_interleave(h * w)
        _, nearest = bank.nearest(patches, exclude=owners)
        residual = patches - bank.bank[nearest.to(bank.bank.device)].cpu()
        out.append(residual.view(n, h, w, c).permute(0, 3, 1, 2).contiguous())
    side = LAYERS[layer].side(bank.image_size)
    return torch.cat(out) if out else torch.zeros(0, LAYERS[layer].channels, side, side)


def source_references(samples: Sequence[Sample], seed: int) -> dict[str, list[Sample]]:
    """K_TRAIN good train/ images of each product that has at least two (a seeded choice)."""
    rng = np.random.default_rng(seed)
    refs = {}
    for category in sorted({s.category for s in samples}):
        pool = sorted((s for s in samples if s.category == category and s.split == "train" and s.label == 0),
                      key=lambda s: str(s.path))
        if len(pool) >= 2:
            pick = rng.choice(len(pool), size=min(K_TRAIN, len(pool)), replace=False)
            refs[category] = [pool[i] for i in sorted(pick)]
    return refs


def _residual_predictions(
    model: VGG16CAM, bank_of: dict[str, PatchMemoryBank], samples: Sequence[Sample], image_size: int,
    precision: str,
) -> Predictions:
    """Logits and CAMs of the residual classifier, each sample against its product's bank."""
    logits, cams = torch.zeros(len(samples), 2), None
    for category in sorted({s.category for s in samples}):
        idx = [i for i, s in enumerate(samples) if s.category == category]
        r = residual_maps(model, bank_of[category], [samples[i] for i in idx], precision)
        lg, cm = forward_features(model, r, precision)
        cams = cams if cams is not None else torch.zeros(len(samples), *cm.shape[1:])
        logits[idx], cams[idx] = lg, cm
    return Predictions(list(samples), logits, cams if cams is not None else torch.zeros(0, 1, 1), image_size)


def train_residual(
    train: Sequence[Sample],
    val: Sequence[Sample],
    config: TrainConfig,
    *,
    weights: str | Path | None = "auto",
    device: str | torch.device = "auto",
    progress: bool = False,
    checkpoint_path: Path | None = None,
    resume: Path | None = None,
) -> tuple[VGG16CAM, dict]:
    """The seed's recipe on residual maps of the source products (see the module docstring).

    Each product's K_TRAIN reference images come out of the training set; products with fewer
    than two good train/ images have no references and are left out (said in the info).
    """
    set_seed(config.seed)
    model, provenance = build_model(weights)
    model.to(resolve_device(device))
    precision = resolve_precision(config.precision)
    refs = source_references(train, config.seed)
    if not refs:
        raise DataError("residual training needs source products with at least 2 good train/ images")
    used = {str(s.path) for group in refs.values() for s in group}
    train = [s for s in train if s.category in refs and str(s.path) not in used]
    val = [s for s in val if s.category in refs]
    banks = {c: PatchMemoryBank.fit(model, group, config.image_size, seed=config.seed, precision=precision)
             for c, group in refs.items()}
    # Residuals depend only on the frozen layers and the references: computed once, in memory.
    maps = torch.zeros(len(train), 512, config.image_size // 8, config.image_size // 8)
    for category, bank in banks.items():
        idx = [i for i, s in enumerate(train) if s.category == category]
        maps[idx] = residual_maps(model, bank, [train[i] for i in idx], precision)
    history = train_classifier(model, train, config, progress=progress, features=StoredFeatures(tensor=maps),
                               checkpoint_path=checkpoint_path, resume=resume)
    model.eval()
    info = training_info(model, config, provenance, history, train,
                         _residual_predictions(model, banks, val, config.image_size, precision))
    info["residual"] = {"k_train": K_TRAIN, "reference_products": sorted(refs)}
    return model, info


class ResidualDetector(Detector):
    """The residual classifier on a new product: residuals against its K good images, the logit
    margin as the score, its CAM as the heatmap; threshold and heatmap scale from the K good
    images, each taken against the other K - 1 (leave-one-out)."""

    uses_good = True
    score_name = "residual classifier's logit margin minus calibrated threshold"

    def __init__(self, model: VGG16CAM, info: dict, **kwargs) -> None:
        super().__init__(model, info, **kwargs)
        self.banks: dict[str, PatchMemoryBank] = {}
        self.calibrations = {}

    def adapt(self, good: Sequence[Sample]) -> None:
        super().adapt(good)
        bank = PatchMemoryBank.fit(
            self.model, good, self.image_size, seed=self.seed, precision=self.precision
        )
        self.banks[bank.category] = bank
        r = residual_maps(self.model, bank, good, self.precision, exclude=list(range(len(good))))
        logits, cams = forward_features(self.model.to(model_device(self.model)), r, self.precision)
        margins = (logits[:, 1] - logits[:, 0]).double().numpy()
        self.calibrations[bank.category] = fit_calibration(
            margins, cams, category=bank.category, images=[s.path for s in good],
            false_alarm_rate=self.false_alarm_rate, model="residual",
        )

    def score(self, samples: Sequence[Sample]) -> ScoredImages:
        raw = by_product(samples, self.image_size, self.banks, self._raw)
        return calibrated_view(raw, self.calibrations)

    def _raw(self, bank: PatchMemoryBank, group: list[Sample]) -> tuple[np.ndarray, torch.Tensor]:
        preds = _residual_predictions(self.model, {bank.category: bank}, group, self.image_size,
                                      self.precision)
        return preds.margins, preds.cams


def fit_residual(
    source: SourceImages, run: TrainingRun, encoder: tuple[VGG16CAM, dict] | None = None
) -> tuple[VGG16CAM, dict]:
    """`train_residual` on the labelled source images: residuals are taken on ImageNet's frozen
    conv4_3, so a SimCLR `encoder` has no place here."""
    if encoder is not None:
        raise ConfigError(
            "--pretrained starts the classifier from SimCLR; the residual method trains from ImageNet"
        )
    return train_residual(source.train, source.val, run.config, weights=run.weights, device=run.device,
                          progress=run.progress, checkpoint_path=run.state, resume=run.resume)
