"""MobileNetV2's ImageNet layers as the patch features of the good-reference score.

The nearest-good-patch score (visinspect.methods.memory_bank) only compares features, so it can use any
frozen ImageNet network. Measured on the real targets (docs/experiments.md), MobileNetV2's stride-16
maps (the output of its 13th inverted-residual block: 96 channels, 14 x 14 at 224 px) separate
good from defective parts of new products far better than VGG16's conv4_3, at a sixty-sixth of
its cost (0.42 against 27.9 GFLOP per 224 px image), and better still when each image is first
standardised (ImageStandardisation: lighting matters less). VGG16 stays the classifier's backbone
(the seed's model, its CAM and its training).

Weights, in this order: a file given (or $VISINSPECT_MOBILENET_WEIGHTS), torchvision's
MobileNet_V2_Weights.IMAGENET1K_V1 (hub cache, else a download with a timeout), else random
initialisation with a warning nobody can miss.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch
import torchvision
from torch import nn

from visinspect.backbones.vgg16 import (
    hub_checkpoint,
    imagenet_weights_here,
    read_weights_file,
    sha256_file,
    warn_random_weights,
)
from visinspect.errors import CheckpointError, VisinspectError

MOBILENET_ENV = "VISINSPECT_MOBILENET_WEIGHTS"
MOBILENET_URL = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.url
# torchvision's mobilenet_v2().features[:14] ends with the last 96-channel block, at stride 16.
# Screened on the real targets: its stride-8 block (alone or concatenated) and its stride-32
# blocks scored lower.
BLOCKS = 14
PATCH_END = 2  # features = (the per-image standardisation, MobileNetV2's first BLOCKS blocks)
CHANNELS, STRIDE = 96, 16
STRIDE8_BLOCKS, STRIDE8_CHANNELS = 7, 32  # features[:7] ends with the last 32-channel block, at stride 8
# How an image's lighting is evened out before the network: "image" (ImageStandardisation alone) or
# "local" (LocalContrastNormalisation first, then ImageStandardisation: one more module in features).
CONTRASTS = {"image": PATCH_END, "local": PATCH_END + 1}  # contrast -> the end of its patch layers
LCN_SIGMA = 1 / 8  # LocalContrastNormalisation's Gaussian: its sigma as a share of the image side


class ImageStandardisation(nn.Module):
    """Each image's channels shifted and scaled to mean 0 and standard deviation 1: the score then
    ignores a part's overall brightness and contrast (lighting), not its local changes. Measured on
    the real targets (K = 20, 3 seeds, docs/experiments.md): image AUROC up on all four, magnetic tile
    0.816 -> 0.832 and DeepPCB 0.486 -> 0.510."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Float32 statistics whatever the autocast; a flat channel (or a zero padding image of the
        # store's batches) stays finite.
        x = x.float()
        std = x.std(dim=(2, 3), keepdim=True).clamp_min(1e-3)
        return (x - x.mean(dim=(2, 3), keepdim=True)) / std


class LocalContrastNormalisation(nn.Module):
    """Each pixel minus the Gaussian-weighted mean of its neighbourhood (sigma: `sigma` of the image
    side), divided by their standard deviation, or by its image-wide mean where that is larger (Jarrett
    et al., ICCV 2009): lighting that changes slowly across a part vanishes, local structure stays,
    and flat regions are not blown up into noise."""

    def __init__(self, sigma: float = LCN_SIGMA) -> None:
        super().__init__()
        self.sigma = sigma

    def _blur(self, x: torch.Tensor) -> torch.Tensor:
        # Separable, as two matrix products (rows, then columns) with the reflected border folded
        # into the matrices: ~50x faster on a CPU than a depthwise convolution with this many taps.
        rows, cols = (_gaussian_matrix(n, self.sigma * x.shape[-1], x.device) for n in x.shape[-2:])
        return rows @ x @ cols.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Float32 whatever the autocast: bf16 would round the neighbourhood means of a whole region.
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            centred = x - self._blur(x)
            std = self._blur(centred**2).clamp_min(0).sqrt()
            return centred / torch.maximum(std, std.mean(dim=(2, 3), keepdim=True)).clamp_min(1e-3)


@functools.lru_cache(maxsize=8)  # one pair per image size: not rebuilt for every batch
def _gaussian_matrix(n: int, sigma: float, device: torch.device) -> torch.Tensor:
    """(n, n) matrix M such that M @ v is v (length n) blurred by a Gaussian of `sigma`, truncated at
    3 sigma, with v's ends reflected (no darkened border)."""
    radius = min(int(3 * sigma), n - 1)
    offsets = torch.arange(-radius, radius + 1)
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    taps /= taps.sum()
    where = torch.arange(n)[:, None] + offsets[None, :]  # (n, taps): the positions each output reads
    where = where.abs()  # reflect at 0: -1 -> 1
    where = torch.where(where > n - 1, 2 * (n - 1) - where, where)  # and at n - 1
    matrix = torch.zeros(n, n)
    matrix.scatter_add_(1, where, taps.expand(n, -1).contiguous())
    return matrix.to(device)


class MobileNetPatches(nn.Module):
    """Each image standardised (`contrast` "local": its local contrast normalised first), then
    MobileNetV2's layers up to its stride-16 block, frozen and in eval mode (batch norm uses ImageNet's
    statistics): images (N, 3, S, S) -> maps (N, 96, S/16, S/16)."""

    def __init__(self, contrast: str = "image") -> None:
        super().__init__()
        if contrast not in CONTRASTS:
            raise VisinspectError(f"contrast must be one of {', '.join(CONTRASTS)}; got {contrast!r}")
        # One Sequential, so that the feature store runs exactly this (features[:CONTRASTS[contrast]]);
        # its parameter names (features.1.*, features.2.* with "local") differ from those of the network
        # without these steps, so the store can never serve features computed without them.
        blocks = torchvision.models.mobilenet_v2().features[:BLOCKS]
        lighting = [LocalContrastNormalisation()] if contrast == "local" else []
        self.features = nn.Sequential(*lighting, ImageStandardisation(), blocks)
        self.requires_grad_(False)
        self.eval()

    @property
    def blocks(self) -> nn.Sequential:
        """The MobileNetV2 part (its modules), numbered as torchvision's `features`."""
        return self.features[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def stride8_part(model: MobileNetPatches) -> nn.Sequential:
    """The same network up to its stride-8 block (32 channels, S/8 x S/8): finer patches, with the
    weights of `model` itself (its parameter names are the full network's first ones, so the feature
    store keeps them apart from the stride-16 maps by digest)."""
    return nn.Sequential(*model.features[:-1], model.blocks[:STRIDE8_BLOCKS])


def _load_file(model: MobileNetPatches, path: Path) -> None:
    raw = read_weights_file(path, "MobileNetV2", MOBILENET_ENV)
    expected = model.blocks.state_dict()
    # torchvision's file holds the whole network: keep its first BLOCKS blocks, drop the rest.
    raw = raw if isinstance(raw, dict) else {}
    state = {k: raw[f"features.{k}"] for k in expected if f"features.{k}" in raw}
    wrong = sorted(k for k in expected if k not in state or state[k].shape != expected[k].shape)
    if wrong:
        raise VisinspectError(
            f"{path} does not hold torchvision MobileNetV2 weights (features.{wrong[0]} is missing or "
            "has another shape): give the file of torchvision's mobilenet_v2 (MobileNet_V2_Weights)"
        )
    model.blocks.load_state_dict(state)


def _provenance(source: str, path: Path | None) -> dict:
    return {"network": "MobileNetV2", "source": source, "path": path and str(path),
            "sha256": path and sha256_file(path)}


def mobilenet_available() -> bool:
    """Whether `build_mobilenet("auto")` would find ImageNet weights without downloading."""
    return imagenet_weights_here(MOBILENET_ENV, MOBILENET_URL)


def build_mobilenet(
    weights: str | Path | None = "auto", *, timeout: float = 20.0, contrast: str = "image"
) -> tuple[MobileNetPatches, dict]:
    """MobileNetV2's patch layers (`contrast`: see MobileNetPatches) with ImageNet weights, and where
    they came from (network, source, path, sha256). "auto": $VISINSPECT_MOBILENET_WEIGHTS, else
    torchvision's (cache or download), else random; "random" skips it all (tests). Random weights
    are seeded: the same every time."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = MobileNetPatches(contrast)
    if weights is None or weights == "random":
        return model, _provenance("random", None)
    env = os.environ.get(MOBILENET_ENV)
    if weights != "auto" or env:
        path = Path(weights if weights != "auto" else env).expanduser()
        _load_file(model, path)
        return model, _provenance("file" if weights != "auto" else f"env:{MOBILENET_ENV}", path)
    try:
        path = hub_checkpoint(MOBILENET_URL, timeout)
        _load_file(model, path)
    except (OSError, RuntimeError) as e:
        warn_random_weights("MobileNetV2 of the good-reference score", e, MOBILENET_URL,
                            f"set {MOBILENET_ENV}=FILE")
        return model, _provenance("random", None)
    return model, _provenance("torchvision", path)


def mobilenet_for(info: dict, contrast: str = "image") -> tuple[MobileNetPatches, dict]:
    """The MobileNetV2 of the nearest-good-patch score (`contrast`: see MobileNetPatches) for a model
    or checkpoint with this `info`: ImageNet weights ("auto"), random exactly when its backbone is
    (tests, the offline demo).

    When `info` records MobileNetV2's own weights (a settings checkpoint of `train`), the weights
    found here must be ImageNet's too: scoring with random features would mean nothing."""
    recorded = info.get("backbone") or {}
    weights = "random" if recorded.get("source") == "random" else "auto"
    model, found = build_mobilenet(weights, contrast=contrast)
    if recorded.get("network") == "MobileNetV2" and recorded.get("sha256") != found["sha256"]:
        if found["source"] == "random":
            raise CheckpointError(
                f"this method was set up with ImageNet MobileNetV2 weights ({recorded.get('path')}, "
                f"sha256 {str(recorded.get('sha256'))[:12]}...) and none are found here: set "
                f"{MOBILENET_ENV}=FILE to that file (or let torchvision download its own)"
            )
        warnings.warn(
            f"MobileNetV2 weights differ from the ones recorded at training ({recorded.get('path')}, "
            f"sha256 {str(recorded.get('sha256'))[:12]}...): using {found['path']} "
            f"(sha256 {str(found['sha256'])[:12]}...)",
            stacklevel=2,
        )
    return model, found
