"""Running a VGG16-CAM model over samples: logits, logit margins and low-resolution CAMs.

The frozen layers' output comes from the feature store (computed once per image); block 5 and
the head run in inference mode (no autograd bookkeeping), channels_last memory layout (oneDNN's
preferred layout for convolutions) and, where the CPU has native bf16, bf16 autocast.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from visinspect.backbones.cam import HeatmapNormalizer, anomaly_cam, normalize, upsample
from visinspect.backbones.store import FeatureStore
from visinspect.backbones.vgg16 import VGG16CAM, logit_margin
from visinspect.data.samples import Sample, load_mask
from visinspect.utils import autocast, model_device, resolve_precision


def sample_labels(samples: Sequence[Sample]) -> np.ndarray:
    """Labels (N,) int64 of samples: 1 = anomaly, 0 = good."""
    return np.array([s.label for s in samples], dtype=np.int64)


@dataclass
class ScoredImages:
    """Anomaly scores (higher = more anomalous) and raw low-resolution maps for some samples.

    What every model produces, whatever its score means: the classifier's logit margin and CAM,
    the good-reference distance and its patch-distance map, or their fusion.
    """

    samples: list[Sample]
    scores: np.ndarray  # (N,) float64
    maps: torch.Tensor  # (N, h, w) raw maps at the model's own resolution
    image_size: int

    @property
    def labels(self) -> np.ndarray:
        return sample_labels(self.samples)

    def subset(self, indices: Sequence[int]) -> ScoredImages:
        idx = list(indices)
        return ScoredImages([self.samples[i] for i in idx], self.scores[idx], self.maps[idx], self.image_size)

    def heatmaps(
        self,
        indices: Sequence[int] | None = None,
        mode: str = "dataset",
        normalizer: HeatmapNormalizer | None = None,
    ) -> torch.Tensor:
        """Upsampled maps (n, S, S): "raw", or scaled to [0, 1] per "image" or per "dataset"."""
        maps = self.maps if indices is None else self.maps[list(indices)]
        up = upsample(maps, self.image_size)
        return up if mode == "raw" else normalize(up, mode, normalizer)

    def masks(self, indices: Sequence[int] | None = None) -> np.ndarray:
        """Ground-truth masks (n, S, S) bool; zeros for good images and images without a mask."""
        idx = range(len(self.samples)) if indices is None else indices
        size = (self.image_size, self.image_size)
        return np.stack(
            [
                load_mask(self.samples[i].mask_path, size)
                if self.samples[i].mask_path is not None
                else np.zeros(size, bool)
                for i in idx
            ]
        )


class Predictions(ScoredImages):
    """What a VGG16-CAM classifier said about a list of samples, in the samples' order: scores
    its logit margins, maps its raw anomaly CAMs (conv5_3 resolution, no bias), and its logits."""

    def __init__(self, samples: Sequence[Sample], logits: torch.Tensor, cams: torch.Tensor, image_size: int):
        # Margins, not P(anomaly), rank: see backbones.vgg16.logit_margin.
        super().__init__(list(samples), logit_margin(logits).numpy().astype(np.float64), cams, image_size)
        self.logits = logits  # (N, 2) float32: good, anomaly

    @property
    def margins(self) -> np.ndarray:
        """Anomaly minus good logit: the ranking score."""
        return self.scores

    @property
    def cams(self) -> torch.Tensor:
        return self.maps

    @property
    def probabilities(self) -> np.ndarray:
        """P(anomaly) — for display; rank and threshold on `margins`."""
        return torch.softmax(self.logits.float(), dim=1)[:, 1].numpy().astype(np.float64)

    def scored(self) -> ScoredImages:
        """The classifier's view as generic scores, without the logits."""
        return ScoredImages(self.samples, self.scores, self.maps, self.image_size)

    def subset(self, indices: Sequence[int]) -> Predictions:
        idx = list(indices)
        return Predictions([self.samples[i] for i in idx], self.logits[idx], self.maps[idx], self.image_size)


@torch.inference_mode()
def forward_features(
    model: VGG16CAM, conv4_3: torch.Tensor, precision: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, 2) and raw anomaly CAMs (N, h, w) from stored conv4_3 maps (N, 512, S/8, S/8).

    Block 5 runs channels_last (and in bf16 where that is fast) on the model's device; the head
    and the CAM run in fp32 on the maps: they are cheap and keep the logit margin exact. Both come
    back on the CPU.
    """
    device = model_device(model)
    with autocast(device, precision):
        maps = model.maps_from_conv4_3(conv4_3.to(device, memory_format=torch.channels_last))
    maps = maps.float()
    return model.head(maps).cpu(), anomaly_cam(model, maps).cpu()


def predict(
    model: VGG16CAM,
    samples: Sequence[Sample],
    image_size: int = 224,
    batch_size: int = 16,
    precision: str = "auto",
    progress: bool = False,
    store: FeatureStore | None = None,
) -> Predictions:
    """Logits and raw anomaly CAMs for every sample: the frozen layers' output from the feature
    store (computed there once per image), then block 5 and the head."""
    precision = resolve_precision(precision)
    # Re-layout the weights outside inference mode: inside it they would become inference
    # tensors, and the model could no longer be trained afterwards.
    model = model.eval().to(memory_format=torch.channels_last)
    feats = (store or FeatureStore.default()).fetch_samples(
        model, samples, image_size, precision=precision, progress=progress
    )
    logits, cams = [], []
    for c4 in feats.batches(batch_size):
        batch_logits, batch_cams = forward_features(model, c4, precision)
        logits.append(batch_logits)
        cams.append(batch_cams)
    if not logits:
        return Predictions([], torch.zeros(0, 2), torch.zeros(0, 1, 1), image_size)
    return Predictions(list(samples), torch.cat(logits).float(), torch.cat(cams), image_size)
