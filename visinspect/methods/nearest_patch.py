"""Nearest good patch (PatchCore's idea, AnomalyDINO's top-percent image score): each test
patch's distance to the patches of K good images of the product (memory_bank), no defect label."""

from __future__ import annotations

from collections.abc import Sequence

from visinspect.backbones.mobilenet import mobilenet_for
from visinspect.backbones.store import Network
from visinspect.backbones.vgg16 import VGG16CAM
from visinspect.calibration import Calibration
from visinspect.data.samples import Sample
from visinspect.methods.base import Detector, by_product, calibrated_view
from visinspect.methods.memory_bank import DEFAULT_MAX_PATCHES, PatchMemoryBank
from visinspect.scoring import ScoredImages


class ReferenceDetector(Detector):
    """Nearest good patch: the distance of each test patch to the K good images' patches
    (reference.PatchMemoryBank, the PatchCore idea); needs no defect label at all."""

    uses_good = True
    min_good = 2  # each good image is scored against the others to calibrate
    score_name = "nearest good patch distance minus calibrated threshold"
    top = 0.0  # image score: the largest patch distance (PatchCore); see PatchMemoryBank.top
    layers: tuple[str, ...] = ("conv4_3",)  # the patch features: the model's VGG16 conv4_3
    max_patches: int | None = DEFAULT_MAX_PATCHES  # the bank's coreset size
    neighbours = 1  # a patch's score: mean distance to this many nearest good patches (PatchMemoryBank)

    def __init__(self, model: VGG16CAM, info: dict, **kwargs) -> None:
        super().__init__(model, info, **kwargs)
        self.banks: dict[str, PatchMemoryBank] = {}
        self.calibrations: dict[str, Calibration] = {}
        self.patch_model: Network = model  # the network whose maps are the patch features
        self.patch_provenance: dict = info.get("backbone") or {}  # where its weights came from

    def adapt(self, good: Sequence[Sample]) -> None:
        super().adapt(good)
        bank = PatchMemoryBank.fit(
            self.patch_model, good, self.image_size, layers=self.layers, max_patches=self.max_patches,
            seed=self.seed, precision=self.precision, top=self.top, neighbours=self.neighbours,
        )
        self.banks[bank.category] = bank
        self.calibrations[bank.category] = bank.calibrate(self.false_alarm_rate)

    def raw(self, samples: Sequence[Sample]) -> ScoredImages:
        """Uncalibrated patch distances, each product against its own bank."""
        return by_product(samples, self.image_size, self.banks, lambda bank, group: bank.score(
            self.patch_model, group, precision=self.precision, progress=self.progress))

    def score(self, samples: Sequence[Sample]) -> ScoredImages:
        return calibrated_view(self.raw(samples), self.calibrations)


class TopReferenceDetector(ReferenceDetector):
    """The same nearest good patch, with the image score the mean of its 5 % largest patch
    distances (AnomalyDINO's top-percent mean) instead of the largest: one odd patch of a good
    part weighs less, a defect covering several patches more."""

    score_name = "mean of the 5 % largest nearest-good-patch distances minus calibrated threshold"
    top = 0.05


class MobileNetReferenceDetector(TopReferenceDetector):
    """The same top-5 % nearest good patch on MobileNetV2's stride-16 maps (visinspect.backbones.mobilenet)
    instead of VGG16's conv4_3: the frozen ImageNet features that separated the real targets' good
    and defective parts best (docs/experiments.md). The bank keeps every patch: 196 per image at
    224 px, so even K = 50 searches fewer multiply-adds than conv4_3's 2048-patch coreset."""

    score_name = "mean of the 5 % largest MobileNetV2 good-patch distances minus calibrated threshold"
    layers = stored_layers = ("mobilenet_v2",)
    max_patches = None
    input_size: int | None = None  # the side its images are read at; None: the checkpoint's image_size
    lighting = "image"  # how lighting is evened out before the network (backbones.mobilenet.CONTRASTS)

    def __init__(self, model: VGG16CAM | None, info: dict, **kwargs) -> None:
        super().__init__(model, info, **kwargs)
        self.image_size = self.input_size or self.image_size
        self.patch_model, self.patch_provenance = mobilenet_for(info, self.lighting)
