"""Heatmap -> defect boxes: one box per connected region of above-threshold pixels.

The CAM heatmap is min-max normalised to [0, 1] per image, so the threshold is relative to the
image's own peak: a *higher* threshold keeps fewer pixels and gives *smaller/fewer* boxes.
"""

from __future__ import annotations

from numbers import Real
from typing import Literal, NamedTuple

import cv2
import numpy as np

from visinspect.errors import DataError


class Box(NamedTuple):
    """A box in pixels, end exclusive (x1 = last column + 1, so width = x1 - x0), with a score."""

    x0: int
    y0: int
    x1: int
    y1: int
    score: float

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def area(self) -> int:
        return self.width * self.height

    def iou(self, other: Box) -> float:
        """Intersection over union of the two rectangles (0.0 when both are empty)."""
        inter_w = max(0, min(self.x1, other.x1) - max(self.x0, other.x0))
        inter_h = max(0, min(self.y1, other.y1) - max(self.y0, other.y0))
        inter = inter_w * inter_h
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0


def _binarise(heatmap, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Validate the inputs; return (heat, mask of pixels with heat > threshold)."""
    if not isinstance(threshold, Real) or not 0 <= threshold <= 1:  # also rejects NaN
        raise DataError(
            f"threshold must be in [0, 1] (heatmaps are normalised to that range); got {threshold}"
        )
    if hasattr(heatmap, "detach"):  # torch tensor, possibly on GPU or requiring grad
        heatmap = heatmap.detach().cpu()
    heat = np.asarray(heatmap)
    if heat.ndim != 2:
        raise DataError(f"heatmap must be 2-D (H x W); got shape {heat.shape}")
    if not np.issubdtype(heat.dtype, np.floating):
        heat = heat.astype(np.float64)
    mask = heat > float(threshold)  # strict, as in the seed; NaN compares False
    if mask.any() and np.nanmin(heat) == np.nanmax(heat):
        # A constant map has no structure: min-max normalisation of it is 0/0 (NaN) anyway.
        mask[:] = False
    return heat, mask


def heatmap_to_boxes(
    heatmap,
    threshold: float,
    min_area: int = 16,
    *,
    score: Literal["peak", "mean"] = "peak",
    connectivity: int = 8,
) -> list[Box]:
    """One box per connected region of pixels with heat > threshold, best score first.

    `heatmap` is a 2-D numpy array or torch tensor, normalised to [0, 1]. A higher threshold
    gives smaller/fewer boxes. Regions with fewer than `min_area` pixels are dropped (CAM noise).
    The score is the region's peak or mean heat; ties are broken by larger box area, then y0, x0.
    NaN pixels count as below threshold. An empty, all-NaN or constant heatmap gives [] (a
    constant map has no structure to localise).
    """
    if score not in ("peak", "mean"):
        raise DataError(f"score must be 'peak' or 'mean'; got {score!r}")
    if connectivity not in (4, 8):
        raise DataError(f"connectivity must be 4 or 8; got {connectivity}")
    heat, mask = _binarise(heatmap, threshold)
    if not mask.any():
        return []
    n, labels, stats, _ = cv2.connectedComponentsWithStats(
        mask.astype(np.uint8), connectivity=connectivity
    )
    # Per-component scores in one pass over the above-threshold pixels (label 0 = background).
    region, values = labels[mask], heat[mask].astype(np.float64)
    if score == "peak":
        scores = np.full(n, -np.inf)
        np.maximum.at(scores, region, values)
    else:
        scores = np.bincount(region, weights=values, minlength=n) / np.maximum(
            stats[:, cv2.CC_STAT_AREA], 1
        )
    boxes = [
        Box(int(x), int(y), int(x + w), int(y + h), float(scores[i]))
        for i, (x, y, w, h, area) in enumerate(stats)
        if i > 0 and area >= min_area
    ]
    return sorted(boxes, key=lambda b: (-b.score, -b.area, b.y0, b.x0))


def enclosing_box(heatmap, threshold: float) -> Box | None:
    """The seed's single box around *all* pixels with heat > threshold (None if there are none).

    Kept for teaching/comparison: disjoint blobs get one box. Fixed against the seed: regions at
    the left/top border, empty masks and inclusive end coordinates. Score = peak heat inside.
    """
    heat, mask = _binarise(heatmap, threshold)
    if not mask.any():
        return None
    ys, xs = np.nonzero(mask)
    peak = float(heat[mask].max())
    return Box(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1, peak)
