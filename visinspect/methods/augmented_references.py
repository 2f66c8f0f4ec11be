"""K good images seen in eight poses: the references turned and mirrored (AnomalyDINO augments its
few references with rotations), used only where the good parts themselves say it is safe.

With few good images a part lying a little differently, or a texture running the other way, finds
no near good patch and looks anomalous. Adding the square's symmetries (90-degree turns and their
mirror images) to the bank covers such poses, but on a product whose orientation *is* its normal
state (a label that is never upside down) it also covers defects. So the choice is made per product
from its K good images alone, without a defect label:

1. each good image is scored against the *other* good images (leave-one-out), with and without
   their turned and mirrored copies in the bank;
2. so are PSEUDO_PER_IMAGE pseudo-defects drawn on each good image (methods/pseudo_defects: cut and
   pasted patches, scars, stains), each against the other good images;
3. the bank that separates the good parts from the pseudo-defects better (image AUROC of the
   leave-one-out scores) is kept: the augmented one when it lowers the good parts' scores without
   lowering the pseudo-defects' as much, the plain one otherwise.

The same check serves SHIFTS (`+shifts`): the references shifted by half a patch and zoomed in,
for parts that lie a little displaced or closer rather than turned.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from visinspect.backbones.store import FeatureStore, Network, weights_digest
from visinspect.data.samples import Sample, load_rgb, model_input, square_rgb, to_tensor
from visinspect.methods.binary_patterns import PatternReferenceDetector
from visinspect.methods.memory_bank import PatchMemoryBank, patch_features, remember
from visinspect.methods.pseudo_defects import pseudo_defect
from visinspect.metrics import ranked_auroc

# The dihedral group of the square without the identity: three turns, a mirror and its three turns.
POSES = ("rot90", "rot180", "rot270", "flip", "flip-rot90", "flip-rot180", "flip-rot270")
# The same part a little displaced or closer: shifted by SHIFT of the side (half a stride-16 patch at
# 224 px) right, down and both, so that the patch grid meets it at other phases, and its central
# ZOOM zoomed back to the full side (the "small shifts and crops").
SHIFTS = ("shift-right", "shift-down", "shift-both", "zoom")
SHIFT, ZOOM = 1 / 28, 7 / 8
PSEUDO_PER_IMAGE = 2  # pseudo-defects drawn on each good image for the check
_FEATURES: dict[tuple, torch.Tensor] = {}  # the last few products' posed and pseudo-defect features


def pose(images: torch.Tensor, name: str) -> torch.Tensor:
    """Images (N, C, S, S) mirrored left-right ("flip") and/or turned counter-clockwise by 90,
    180 or 270 degrees ("rot90", ...), as named in POSES; or shifted or zoomed, as named in SHIFTS
    (the edge that comes in is the image's own, reflected)."""
    side = images.shape[-1]
    if name.startswith("shift"):
        step = round(SHIFT * side)
        dx, dy = step * (name != "shift-down"), step * (name != "shift-right")
        return F.pad(images, (dx, 0, dy, 0), mode="reflect")[..., :side, :side]
    if name == "zoom":
        lo = round(side * (1 - ZOOM) / 2)
        return F.interpolate(images[..., lo : side - lo, lo : side - lo], size=(side, side), mode="bilinear",
                             align_corners=False)
    if name.startswith("flip"):
        images, name = images.flip(-1), name.removeprefix("flip").lstrip("-")
    turns = {"": 0, "rot90": 1, "rot180": 2, "rot270": 3}[name]
    return torch.rot90(images, turns, dims=(-2, -1))


def _patch_maps(network: Network, images: torch.Tensor, layer: str, precision: str) -> torch.Tensor:
    """Patch features (N, C, h, w) of model inputs made in memory (never stored: no file)."""
    feats = FeatureStore(None).compute(network, images, precision=precision, layer=layer)
    return patch_features(feats.batch(slice(None)))


def _key(network: Network, good: Sequence[Sample], size: int, layer: str, precision: str, what: str) -> tuple:
    # The network by its weights' digest: each `loo` job builds its own copy of the same network,
    # and the copies share what one of them computed.
    return (what, weights_digest(network), layer, size, precision, tuple(str(s.path) for s in good))


def posed_features(network: Network, good: Sequence[Sample], size: int, layer: str,
                   precision: str, poses: Sequence[str] = POSES) -> tuple[torch.Tensor, torch.Tensor]:
    """The patch features of the good images themselves (N, C, h, w) and of their `poses`, pose by
    pose ((len(poses) * N, C, h, w)): computed once per product, K, poses and network."""
    def compute() -> torch.Tensor:
        images = torch.stack([model_input(s.path, size) for s in good])
        return torch.cat([_patch_maps(network, pose(images, p) if p else images, layer, precision)
                          for p in ("", *poses)])

    feats = remember(_FEATURES, _key(network, good, size, layer, precision, f"posed{tuple(poses)}"), compute)
    return feats[: len(good)], feats[len(good):]


def pseudo_features(network: Network, good: Sequence[Sample], size: int, layer: str, precision: str,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch features of PSEUDO_PER_IMAGE pseudo-defects drawn on each good image, and the index of
    the good image each was drawn on."""
    def compute() -> torch.Tensor:
        rng = np.random.default_rng(seed)
        images = []
        for s in good:
            square = square_rgb(load_rgb(s.path), size)
            images += [to_tensor(pseudo_defect(square, rng)[0], size) for _ in range(PSEUDO_PER_IMAGE)]
        return _patch_maps(network, torch.stack(images), layer, precision)

    feats = remember(_FEATURES, _key(network, good, size, layer, precision, f"pseudo{seed}"), compute)
    return feats, torch.arange(len(good)).repeat_interleave(PSEUDO_PER_IMAGE)


def separation(bank: PatchMemoryBank, pseudo: torch.Tensor, owners: torch.Tensor) -> float:
    """How well a bank tells its good images from pseudo-defects, both left out of it: the AUROC
    of their leave-one-out image scores (1: every pseudo-defect above every good part)."""
    scores, _ = bank.left_out_scores(pseudo, owners)
    labels = np.r_[np.zeros(len(bank.good_scores), bool), np.ones(len(scores), bool)]
    return ranked_auroc(labels, np.r_[bank.good_scores, scores])


def augmented_bank(
    bank: PatchMemoryBank,
    network: Network,
    good: Sequence[Sample],
    *,
    precision: str,
    seed: int,
    check: bool = True,
    poses: Sequence[str] = POSES,
) -> tuple[PatchMemoryBank, dict]:
    """`bank` (of `good`, every patch kept) with the good images' `poses` added where it is safe
    (see the module docstring; `check=False`: always), and what was decided, with both banks'
    separations of good parts from pseudo-defects."""
    layer, size = bank.layers[0], bank.image_size
    originals, posed = posed_features(network, good, size, layer, precision, poses)
    owners = torch.arange(len(good)).repeat(len(poses))
    bigger = bank.with_patches(posed, owners, originals)
    if not check:
        return bigger, {"augmented": True}
    pseudo, pseudo_owners = pseudo_features(network, good, size, layer, precision, seed)
    plain, augmented = separation(bank, pseudo, pseudo_owners), separation(bigger, pseudo, pseudo_owners)
    decision = {"augmented": augmented >= plain, "separation_plain": round(plain, 4),
                "separation_augmented": round(augmented, 4)}
    return (bigger if decision["augmented"] else bank), decision


class PosedReferenceDetector(PatternReferenceDetector):
    """reference-mobilenet+patterns whose patch bank also holds the K good images' POSES where the
    good parts say it is safe (`check`, see the module docstring); a binary drawing keeps its
    pattern score."""

    check = True  # False: always add the poses (what the check is worth)
    augment: tuple[str, ...] = POSES  # the poses added (POSES, or SHIFTS: shifted and zoomed)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.poses: dict[str, dict] = {}  # per product: whether the poses were added, and why

    def adapt(self, good: Sequence[Sample]) -> None:
        super().adapt(good)
        product = self.product
        if product not in self.banks:  # a binary drawing: the pattern score, no patch bank
            self.poses.pop(product, None)
            return
        bank, self.poses[product] = augmented_bank(self.banks[product], self.patch_model, good,
                                                   precision=self.precision, seed=self.seed, check=self.check,
                                                   poses=self.augment)
        self.banks[product], self.calibrations[product] = bank, bank.calibrate(self.false_alarm_rate)

    def describe(self) -> str:
        decision = self.poses.get(self.product)
        if decision is None:
            return super().describe()
        added = "added" if decision["augmented"] else "not added (the good parts said it is not safe)"
        why = "" if "separation_plain" not in decision else (
            f"; good parts against pseudo-defects, AUROC {decision['separation_plain']:.3f} without them, "
            f"{decision['separation_augmented']:.3f} with them")
        what = "turned and mirrored" if self.augment == POSES else "shifted and zoomed"
        return super().describe() + f"\n{what} references: {added}{why}"

