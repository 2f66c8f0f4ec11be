"""Class activation maps (Zhou et al., CVPR 2016) and how to scale them to [0, 1].

CAM_anomaly(x, y) = sum_k w_anomaly,k * A_k(x, y), over the 512 conv5_3 maps A_k, with w the dense
layer's weights for the anomaly class. With global average pooling in front of the dense layer,
mean_xy CAM + bias = anomaly logit exactly, so the map is a true spatial decomposition of the score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from visinspect.backbones.vgg16 import ANOMALY, VGG16CAM


def class_activation_map(
    maps: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Weighted sum of feature maps (N, C, h, w) with class weights (C,) -> CAM (N, h, w).

    With `bias`, it is added at every position so that the CAM's mean equals the class logit.
    """
    cam = torch.einsum("nchw,c->nhw", maps.float(), weight.float())
    return cam if bias is None else cam + bias


def anomaly_cam(model: VGG16CAM, maps: torch.Tensor, include_bias: bool = False) -> torch.Tensor:
    """The anomaly-class CAM (N, h, w) of conv5_3 maps, from the model's dense layer."""
    bias = model.fc.bias[ANOMALY] if include_bias else None
    return class_activation_map(maps, model.fc.weight[ANOMALY], bias)


def upsample(cam: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of low-resolution CAMs (N, h, w) to the input size (N, H, W)."""
    size = (size, size) if isinstance(size, int) else size
    return F.interpolate(cam.unsqueeze(1).float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def minmax_per_image(cam: torch.Tensor) -> torch.Tensor:
    """The seed's normalisation: each map stretched to [0, 1] on its own.

    Every map then has a hot spot, good images included, and "how anomalous" is lost; a constant
    map gives zeros rather than NaN.
    """
    flat = cam.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    span = (hi - lo).clamp_min(1e-12)
    out = (flat - lo[:, None]) / span[:, None]
    out[(hi - lo) <= 1e-12] = 0.0
    return out.view_as(cam)


@dataclass
class HeatmapNormalizer:
    """Dataset-level scaling: one (low, high) pair for all images, fitted on reference CAMs.

    Fitted on validation images (or on a few good images of a new product, see calibration),
    so a good image stays dark and a defect stands out by how hot it is, not just where.
    """

    low: float
    high: float
    method: str = "percentile"

    @classmethod
    def fit(
        cls,
        cams: torch.Tensor,
        method: Literal["minmax", "percentile"] = "percentile",
        percentiles: tuple[float, float] = (1.0, 99.9),
    ) -> HeatmapNormalizer:
        """Fit low/high on a stack of raw CAMs: their min/max, or robust percentiles."""
        values = cams.detach().float().flatten()
        if values.numel() == 0:
            raise ValueError("cannot fit a heatmap normaliser on zero CAMs")
        if method == "minmax":
            low, high = values.min().item(), values.max().item()
        elif method == "percentile":
            # NumPy, not torch.quantile: that refuses more than 2**24 values, i.e. ~330 CAMs at
            # 224 px, fewer than a real validation split has. Same (linear) interpolation.
            low, high = np.percentile(values.double().cpu().numpy(), percentiles).tolist()
        else:
            raise ValueError(f"method must be 'minmax' or 'percentile'; got {method!r}")
        return cls(float(low), float(max(high, low + 1e-6)), method)

    def __call__(self, cam: torch.Tensor) -> torch.Tensor:
        return ((cam.float() - self.low) / (self.high - self.low)).clamp(0.0, 1.0)

    def to_dict(self) -> dict:
        return {"low": self.low, "high": self.high, "method": self.method}

    @classmethod
    def from_dict(cls, d: dict) -> HeatmapNormalizer:
        return cls(float(d["low"]), float(d["high"]), str(d.get("method", "percentile")))


def normalize(
    cam: torch.Tensor,
    mode: Literal["image", "dataset"] = "image",
    normalizer: HeatmapNormalizer | None = None,
) -> torch.Tensor:
    """Scale raw CAMs (N, H, W) to [0, 1]: per image ("image") or with a fitted normaliser."""
    if mode == "image":
        return minmax_per_image(cam)
    if mode == "dataset":
        if normalizer is None:
            raise ValueError("dataset normalisation needs a fitted HeatmapNormalizer")
        return normalizer(cam)
    raise ValueError(f"mode must be 'image' or 'dataset'; got {mode!r}")
