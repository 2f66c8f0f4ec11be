"""SimCLR where the recommended method looks: dense contrastive adaptation of the nearest-good-patch
network (MobileNetV2's stride-16 maps) on unlabelled images of the source products.

The question the project asks is whether contrastive self-supervision helps in an unknown context.
The classifier's SimCLR (pretrain.py) adapts VGG16, which the nearest-good-patch score does not
read; here the patch network itself is adapted, and the nearest-good-patch score is compared with
and without it (`reference-mobilenet+patterns+simclr` against `reference-mobilenet+patterns`):

- DenseCL's loss (Wang et al., CVPR 2021; `loss.dense_nt_xent_loss`): every map position of one
  view must be closer to its matching position of the other view than to the other positions of
  the batch, its own part's included, so that a patch unlike the rest of its part stands out;
- defect negatives (CutPaste, Li et al. CVPR 2021, as `loss.defect_views`): the positions of a
  pseudo-defect drawn on view 2 join every anchor's negatives: the features must not be invariant
  to local defects, the very thing the score measures;
- L2-SP (Li et al., ICML 2018) and a short schedule keep the network close to ImageNet's, whose
  features are what made the score work; only the last blocks train, batch norm keeps ImageNet's
  statistics (the network stays in eval mode).
Every default is a named field of PatchContrastConfig.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from visinspect.backbones.mobilenet import CHANNELS, STRIDE, MobileNetPatches
from visinspect.backbones.vgg16 import VGG16CAM
from visinspect.data.samples import Sample, load_rgb
from visinspect.methods.binary_patterns import PatternReferenceDetector
from visinspect.methods.simclr.augment import SimCLRTransform
from visinspect.methods.simclr.loss import defect_views, dense_nt_xent_loss, l2sp_penalty
from visinspect.methods.simclr.model import DenseProjectionHead
from visinspect.methods.simclr.pretrain import subset
from visinspect.utils import autocast, set_seed


@dataclass(frozen=True)
class PatchContrastConfig:
    """Everything that decides an adaptation; stored with the adapted weights."""

    epochs: int = 1  # a short schedule: the network should stay close to ImageNet's
    batch_size: int = 16
    lr: float = 1e-4  # AdamW; a tenth of a from-scratch rate: the network starts from ImageNet
    temperature: float = 0.2  # DenseCL's
    trainable_from: int = 11  # MobileNetV2 blocks 11-13 (its last 96-channel stage) train
    l2sp_weight: float = 0.01  # l2sp_weight / 2 * sum ||w - w_ImageNet||^2
    defect_negatives: bool = True
    max_images: int = 128  # source images used (seeded draw), whatever their label: ~1 min on 2 cores
    image_size: int = 224
    head_dim: int = 128  # DenseCL's dense projection, from a hidden layer of 256
    seed: int = 0
    precision: str = "auto"


def adapt_patch_network(
    network: MobileNetPatches,
    images: Sequence[np.ndarray],
    config: PatchContrastConfig = PatchContrastConfig(),
    log: Callable[[str], None] | None = None,
) -> MobileNetPatches:
    """A copy of `network` adapted by dense contrast on `images` (RGB uint8 arrays, any size);
    `network` itself is left as it was."""
    set_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    net = copy.deepcopy(network).eval()  # eval: batch norm keeps ImageNet's statistics
    frozen, trained = net.features[0], net.blocks
    trainable = [p for b in trained[config.trainable_from:] for p in b.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    start = [p.detach().clone() for p in trainable]
    head = DenseProjectionHead(CHANNELS, 256, config.head_dim)
    optimiser = torch.optim.AdamW([{"params": trainable, "weight_decay": 0.0},
                                   {"params": head.parameters(), "weight_decay": 1e-4}], lr=config.lr)
    transform = SimCLRTransform.inspection(config.image_size)
    early, late = trained[: config.trainable_from], trained[config.trainable_from:]
    for epoch in range(config.epochs):
        order = torch.randperm(len(images)).tolist()
        losses = []
        for i in range(0, len(order) - 1, config.batch_size):
            batch = [images[j] for j in order[i : i + config.batch_size]]
            v1, v2 = torch.stack([transform(b) for b in batch]), torch.stack([transform(b) for b in batch])
            views = [v1, v2]
            if config.defect_negatives:
                views.append(defect_views(v2, rng))
            with torch.no_grad(), autocast("cpu", config.precision):
                x = early(frozen(torch.cat(views)))
            with autocast("cpu", config.precision):
                f = late(x)
                d = head(f)
            f, d = f.float(), d.float()
            n = len(batch)
            extra = None
            if config.defect_negatives:
                # The defect's positions: where the drawn defect changed the view, at the map's grid.
                changed = (views[2] - v2).abs().amax(1, keepdim=True) > 0
                where = F.max_pool2d(changed.float(), STRIDE)[:, 0].flatten() > 0
                extra = d[2 * n :].permute(0, 2, 3, 1).reshape(-1, d.shape[1])[where]
            loss = dense_nt_xent_loss(d[:n], d[n : 2 * n], f[:n], f[n : 2 * n], config.temperature, extra)
            loss = loss + config.l2sp_weight / 2 * l2sp_penalty(trainable, start)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
        if log:
            log(f"patch contrast epoch {epoch + 1}/{config.epochs}: loss {np.mean(losses):.4f}")
    for p in trainable:
        p.requires_grad_(False)
    return net.eval()


def adapted_state(network: MobileNetPatches, config: PatchContrastConfig) -> dict:
    """What a checkpoint keeps of an adaptation: the trained blocks' weights and the config."""
    prefix = tuple(f"{i}." for i in range(config.trainable_from, len(network.blocks)))
    weights = {k: v.detach().cpu().clone() for k, v in network.blocks.state_dict().items()
               if k.startswith(prefix)}
    return {"blocks": weights, "config": asdict(config)}


def load_adapted(network: MobileNetPatches, state: dict) -> MobileNetPatches:
    """`network` (ImageNet's) with the trained blocks of `adapted_state` put back."""
    network.blocks.load_state_dict({**network.blocks.state_dict(), **state["blocks"]})
    return network.eval()


class ContrastReferenceDetector(PatternReferenceDetector):
    """reference-mobilenet+patterns on a patch network adapted by dense contrast on the source
    products' images (`fit_sources`; labels unused), kept in the checkpoint's info."""

    contrast = PatchContrastConfig()
    learns_on_sources = "its patch network, by dense contrast (labels unused)"

    def __init__(self, model: VGG16CAM | None, info: dict, **kwargs) -> None:
        super().__init__(model, info, **kwargs)
        if "patch_contrast" in info:
            self.patch_model = load_adapted(self.patch_model, info["patch_contrast"])

    def fit_sources(self, train: Sequence[Sample], val: Sequence[Sample]) -> dict:
        config = replace(self.contrast, seed=self.seed, image_size=self.image_size, precision=self.precision)
        images = [load_rgb(s.path) for s in subset([*train, *val], config.max_images, config.seed)]
        self.patch_model = adapt_patch_network(self.patch_model, images, config)
        return {"patch_contrast": adapted_state(self.patch_model, config)}
