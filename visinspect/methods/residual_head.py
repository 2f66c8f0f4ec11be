"""ResAD's residual idea on the nearest-good-patch score's own maps (MobileNetV2, stride 16).

reference-mobilenet+patterns calls a patch anomalous by its distance to the nearest good patch, every
direction of difference alike. ResAD (Yao et al., NeurIPS 2024) learns on other products which
differences are defects: a patch minus its nearest good patch of its own product (the "residual")
is near zero on good parts whatever the product, so what a head learns on residuals of the source
products carries over to a new one. (`residual` tried this with the seed's classifier on VGG16;
here a small head scores each 96-d MobileNetV2 residual.)

1. `fit_sources`: each source product's K_TRAIN good train/ images (residual.source_references)
   are its bank; every other image of it gives one residual per patch, labelled from its mask: a
   patch is defective when at least DEFECT_SHARE of its pixels are, every patch of a good image is
   good. Left out: defective images without a mask (which of their patches is defective is
   unknown) and products whose references are binary drawings (their targets get the pattern
   score, never the head).
2. A small MLP (ResidualHeadConfig) learns defective against good patches, class-balanced BCE.
3. On a new product: the bank of its K good images, each patch's score the head's logit on its
   residual, the image score the mean of the top 5 %; the threshold from the K good images' own
   residuals, each against the other K - 1. Binary drawings keep the pattern score.

Only products with masked defects teach the head (bottle's defects here have no mask, DeepPCB is a
drawing): against reference-mobilenet+patterns in docs/results.md's Levers table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from visinspect.backbones.vgg16 import VGG16CAM
from visinspect.calibration import fit_calibration
from visinspect.data.samples import Sample, load_mask
from visinspect.errors import ConfigError, DataError
from visinspect.methods.binary_patterns import PatternReferenceDetector, grey, is_binary_drawing
from visinspect.methods.memory_bank import PatchMemoryBank
from visinspect.methods.residual import residual_maps, source_references

# A patch (one cell of the 14 x 14 grid at 224 px) is labelled defective when at least this share of
# its pixels is in the mask: thin defects (scratches, cracks) still mark the cells they cross, while
# a cell a defect barely touches, whose 3x3-averaged feature hardly moves, stays good.
DEFECT_SHARE = 0.25


@dataclass(frozen=True)
class ResidualHeadConfig:
    """Everything that decides the head's training; stored with its weights."""

    hidden: int = 64  # one hidden layer: a residual's defect-ness need not be linear (its sign is not)
    epochs: int = 5  # ~150 000 patches of ~750 images: a few passes settle a head this small
    batch_size: int = 1024
    lr: float = 1e-3  # Adam
    weight_decay: float = 1e-4
    defect_share: float = DEFECT_SHARE
    seed: int = 0


class ResidualHead(nn.Module):
    """Residual (C) -> hidden -> ReLU -> one logit (defective). The residuals are first divided by
    `scale`, their root-mean-square on the source products (a buffer: it travels with the weights),
    so that one learning rate fits any network's feature scale."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.register_buffer("scale", torch.ones(()))

    def forward(self, residuals: torch.Tensor) -> torch.Tensor:
        """Logits (...,) of residual vectors (..., C)."""
        return self.mlp(residuals / self.scale)[..., 0]


def head_logits(head: ResidualHead, residuals: torch.Tensor) -> torch.Tensor:
    """The head's logit of each patch of residual maps (N, C, h, w) -> (N, h, w)."""
    with torch.no_grad():
        return head(residuals.permute(0, 2, 3, 1).float())


def patch_labels(sample: Sample, image_size: int, side: int, share: float) -> torch.Tensor:
    """Defective (1) or good (0) for each cell of a side x side grid over the image: at least `share`
    of its pixels in the mask, or the cell the mask covers most (a defect smaller than `share` of a
    cell still marks one); all 0 for a good image."""
    if sample.label == 0:
        return torch.zeros(side, side)
    mask = torch.from_numpy(load_mask(sample.mask_path, (image_size, image_size))).float()
    covered = F.adaptive_avg_pool2d(mask[None, None], side)[0, 0]
    labels = (covered >= share).float()
    labels.view(-1)[covered.argmax()] = float(covered.max() > 0)
    return labels


def train_head(
    residuals: torch.Tensor, labels: torch.Tensor, config: ResidualHeadConfig
) -> tuple[ResidualHead, list[float]]:
    """The head trained on residual vectors (P, C) with labels (P,) 0/1; and its mean loss by epoch.
    Class-balanced: each defective patch weighs (good patches / defective patches)."""
    positives = int(labels.sum())
    if positives == 0 or positives == len(labels):
        raise DataError("the residual head needs defective patches (from masks) and good ones in the "
                        f"source products; got {positives} defective of {len(labels)}")
    torch.manual_seed(config.seed)
    head = ResidualHead(residuals.shape[1], config.hidden)
    head.scale.fill_(residuals.pow(2).mean().sqrt().clamp_min(1e-12).item())
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor((len(labels) - positives) / positives))
    optimiser = torch.optim.Adam(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    order = torch.Generator().manual_seed(config.seed)
    losses = []
    for _ in range(config.epochs):
        total = 0.0
        for batch in torch.randperm(len(labels), generator=order).split(config.batch_size):
            loss = loss_fn(head(residuals[batch]), labels[batch])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += loss.item() * len(batch)
        losses.append(total / len(labels))
    return head.eval(), losses


class ResidualHeadDetector(PatternReferenceDetector):
    """reference-mobilenet+patterns with each patch scored by a head trained on the source products'
    residuals (see the module docstring), kept in the checkpoint's info["residual_head"]."""

    head_config = ResidualHeadConfig()
    learns_on_sources = "a head on patch residuals (minus the nearest good patch), from the masks"
    score_name = ("mean of the 5 % largest residual-head logits of MobileNetV2 patches, or on binary "
                  "drawings the unseen 3x3 pixel patterns; minus calibrated threshold")

    def __init__(self, model: VGG16CAM | None, info: dict, **kwargs) -> None:
        super().__init__(model, info, **kwargs)
        self.head: ResidualHead | None = None
        if "residual_head" in info:
            learnt = info["residual_head"]
            weights = learnt["weights"]
            self.head = ResidualHead(weights["mlp.0.weight"].shape[1], int(learnt["config"]["hidden"]))
            self.head.load_state_dict(weights)
            self.head.eval()

    def fit_sources(self, train: Sequence[Sample], val: Sequence[Sample]) -> dict:
        """Train the head on the source products' residuals (see the module docstring)."""
        config = replace(self.head_config, seed=self.seed)
        refs = {product: group for product, group in source_references(train, self.seed).items()
                if not is_binary_drawing([grey(s) for s in group])}
        used = {str(s.path) for group in refs.values() for s in group}
        residuals, labels, counts = [], [], {}
        for product, group in refs.items():
            images = [s for s in [*train, *val] if s.category == product and str(s.path) not in used
                      and (s.label == 0 or s.mask_path is not None)]
            if images:
                r, y = self._labelled_residuals(group, images, config.defect_share)
                residuals.append(r)
                labels.append(y)
                counts[product] = {"images": len(images), "patches": len(y), "defective": int(y.sum())}
        if not residuals:
            raise DataError("the residual head found no source product with references and other images")
        self.head, losses = train_head(torch.cat(residuals), torch.cat(labels), config)
        weights = {k: v.detach().clone() for k, v in self.head.state_dict().items()}
        return {"residual_head": {"weights": weights, "config": asdict(config), "products": counts,
                                  "loss": losses}}

    def _labelled_residuals(self, refs: list[Sample], images: list[Sample], share: float
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual vectors (P, C) of `images` against the bank of `refs` (one product), and
        their labels (P,) from the masks."""
        bank = PatchMemoryBank.fit(self.patch_model, refs, self.image_size, layers=self.layers,
                                   max_patches=self.max_patches, seed=self.seed, precision=self.precision)
        r = residual_maps(self.patch_model, bank, images, self.precision)
        y = torch.stack([patch_labels(s, self.image_size, r.shape[-1], share) for s in images])
        return r.permute(0, 2, 3, 1).reshape(-1, r.shape[1]), y.flatten()

    def adapt(self, good: Sequence[Sample]) -> None:
        if self.head is None:
            raise ConfigError(
                f"method {self.name!r} needs the residual head learnt on the source products: train it "
                f"with `python -m visinspect train --method {self.name}` (this checkpoint has none)"
            )
        super().adapt(good)
        bank = self.banks.get(self.product)
        if bank is None:  # a binary drawing: the pattern score and its calibration stay
            return
        # Each good image against the other K - 1, as the plain score's bank.good_maps.
        r = residual_maps(self.patch_model, bank, good, self.precision, exclude=list(range(len(good))))
        maps = head_logits(self.head, r)
        self.calibrations[bank.category] = fit_calibration(
            bank.image_scores(maps), maps, category=bank.category, images=bank.images,
            false_alarm_rate=self.false_alarm_rate, model="residual-head:" + "+".join(bank.layers),
        )

    def patch_scores(self, bank: PatchMemoryBank, group: list[Sample]) -> tuple[np.ndarray, torch.Tensor]:
        """The head's logit on each patch's residual; the image score the bank's top 5 % mean."""
        maps = head_logits(self.head, residual_maps(self.patch_model, bank, group, self.precision))
        return bank.image_scores(maps), maps
