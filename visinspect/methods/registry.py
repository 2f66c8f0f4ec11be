"""Every method by its name: the one list `compare`, `loo`, `train`, `evaluate` and `predict` use.

A new method is a Detector subclass in a module of its own (see visinspect.methods.base) and one line
in METHODS here; if it learns from the labelled source products, its training is one more case
of `compare.train_variant`, or, for what is learnt on top of a trained model, `Detector.fit_sources`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from visinspect.backbones.vgg16 import VGG16CAM, build_model
from visinspect.errors import ConfigError
from visinspect.methods.base import (
    CalibratedClassifier,
    ClassifierDetector,
    Detector,
    FusedDetector,
    FusedMobileNetDetector,
    FusedTopDetector,
    MobileNetReferenceDetector,
    ReferenceDetector,
    TopReferenceDetector,
    reference_samples,
)
from visinspect.methods.binary_patterns import PatternReferenceDetector
from visinspect.methods.learnt_fusion import LearntFusionDetector
from visinspect.methods.pseudo_defects import PseudoDefectDetector
from visinspect.methods.residual import ResidualDetector
from visinspect.methods.simclr.pretrain import LEVER_SETS
from visinspect.utils import set_seed


@dataclass(frozen=True)
class Method:
    """A method by the name its rows carry: the training it needs (a `compare.train_variant`
    variant; None: only the ImageNet backbone) and its detector class."""

    name: str
    trains: str | None
    detector: type[Detector]
    about: str


def _classifier(
    name: str, about: str, calibrated: str = "the same, calibrated on K good images"
) -> tuple[Method, Method]:
    """A trained classifier as two methods: `name` (the threshold from the source validation split)
    and `name calibrated` (threshold and heatmap scale from K good images)."""
    return (Method(name, name, ClassifierDetector, about),
            Method(f"{name} calibrated", name, CalibratedClassifier, calibrated))


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        *_classifier("baseline",
                     "the seed's VGG16-CAM classifier; threshold from the source validation split",
                     "the same classifier; threshold and heatmap scale from K good images"),
        Method("reference", None, ReferenceDetector,
               "nearest good patch (PatchCore idea) against K good images; no training"),
        Method("reference-top5", None, TopReferenceDetector,
               "the same, image score = mean of the 5 % largest patch distances (AnomalyDINO)"),
        Method("fused", "baseline", FusedDetector,
               "baseline and reference, standardised on K good images, averaged"),
        Method("fused-top5", "baseline", FusedTopDetector,
               "the same, the reference part's image score the mean of its 5 % largest patch distances"),
        Method("reference-mobilenet", None, MobileNetReferenceDetector,
               "reference-top5 on MobileNetV2's stride-16 maps instead of VGG16's conv4_3; no training"),
        Method("reference-mobilenet+patterns", None, PatternReferenceDetector,
               "reference-mobilenet, or on binary drawings (PCB scans) the unseen 3x3 pixel patterns"),
        Method("fused-mobilenet", "baseline", FusedMobileNetDetector,
               "fused-top5 with the reference part on MobileNetV2's maps (reference-mobilenet)"),
        Method("fused-learnt", "baseline", LearntFusionDetector,
               "the same, the classifier's weight learnt on the source products' validation images"),
        Method("fused+simclr", "simclr-source+target-good", FusedDetector,
               "fused, with the classifier pre-trained by SimCLR on the source and the target's good images"),
        Method("fused+simclr+l2sp", "simclr+l2sp", FusedDetector,
               "fused, with the classifier pre-trained by SimCLR with the l2sp lever"),
        Method("fused+simclr+defect-negatives", "simclr+defect-negatives", FusedDetector,
               "fused, with the classifier pre-trained by SimCLR with the defect-negatives lever"),
        Method("fused-top5+simclr+defect-negatives", "simclr+defect-negatives", FusedTopDetector,
               "fused-top5, with the classifier pre-trained by SimCLR with the defect-negatives lever"),
        *_classifier("simclr-source", "SimCLR pre-training on the source images, then the seed's classifier"),
        *_classifier("simclr-source+target-good",
                     "SimCLR also on the target's unlabeled good images, then the classifier"),
        Method("residual", "residual", ResidualDetector,
               "the seed's head trained on residuals: features minus their nearest good patch (ResAD)"),
        Method("pseudo-defects", "baseline", PseudoDefectDetector,
               "the baseline fine-tuned on K good images against their pseudo-defects (CutPaste, DRAEM)"),
        *(m for lever in LEVER_SETS for m in _classifier(
            f"simclr+{lever}",
            f"SimCLR on the source and the target's good images with the {lever} lever, then the classifier",
        )),
    )
}
# Chosen once, on the four real targets of docs/results.md (3 seeds, bf16, 224 px), by the highest
# mean image AUROC at K = 20: 0.818, against 0.811 for fused-mobilenet (a tie: 6 of 12 target-seed
# pairs each way) and 0.752 for fused-top5, the recommended method before 2026-12-02. With each
# image standardised first (mobilenet.ImageStandardisation) 0.829, against 0.814 for fused-mobilenet.
# With the pixel-pattern score on binary drawings (visinspect.methods.binary_patterns; it switches on DeepPCB
# alone, 0.511 -> 0.878) 0.921: the same numbers as reference-mobilenet on the other three.
RECOMMENDED = "reference-mobilenet+patterns"


def method(name: str) -> Method:
    """The method of this name, or a one-line error listing them."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


def backbone_info(image_size: int, provenance: dict) -> dict:
    """The `info` of an untrained backbone (for methods that train nothing)."""
    return {"image_size": image_size, "backbone": provenance, "threshold": 0.0, "normalizer": None}


def untrained_backbone(
    image_size: int, weights: str | Path | None = "auto", seed: int = 0
) -> tuple[VGG16CAM, dict]:
    """A fresh ImageNet VGG16 for methods that train nothing, seeded like a trained baseline's (so
    that with random weights, in tests, its frozen layers match the classifier's)."""
    set_seed(seed)
    model, provenance = build_model(weights)
    return model, backbone_info(image_size, provenance)


def reads_vgg16(name: str) -> bool:
    """Whether method `name` reads the VGG16 model it is given: every one that does reads its
    frozen conv4_3 first (the store's "conv4_3" layer); one that does not (reference-mobilenet) is
    saved by `train` as settings only and runs with model None."""
    return "conv4_3" in method(name).detector.stored_layers


def untrained(
    name: str, image_size: int, weights: str | Path | None = "auto", seed: int = 0
) -> tuple[VGG16CAM | None, dict]:
    """What method `name`, which trains nothing, starts from: a fresh ImageNet VGG16 and its info,
    or, for a method that reads no VGG16, no model and an info that says only whether its network
    is to be random (`weights` "random", as in the tests)."""
    if reads_vgg16(name):
        return untrained_backbone(image_size, weights, seed)
    return None, without_vgg16_info(image_size, weights)


def without_vgg16_info(image_size: int, weights: str | Path | None = "auto") -> dict:
    """The `info` of a method that reads no VGG16: its image size, and whether its own network is
    to be random (when the VGG16 `weights` asked for are)."""
    return backbone_info(image_size, {"source": "random"} if weights in (None, "random") else {})


def make_detector(
    name: str,
    model: VGG16CAM | None,
    info: dict,
    *,
    precision: str = "auto",
    false_alarm_rate: float = 0.01,
    seed: int = 0,
) -> Detector:
    """The detector of method `name` over a model (its training's, or a plain backbone; None for a
    settings checkpoint, which serves only the methods that read no VGG16)."""
    if model is None and reads_vgg16(name):
        raise ConfigError(
            f"method {name!r} needs a VGG16 model, and this checkpoint holds none (`train --method "
            f"{info.get('method')}` keeps only settings): train one with `train --method {name}`"
        )
    return method(name).detector(
        model, info, name=name, precision=precision, false_alarm_rate=false_alarm_rate, seed=seed
    )


def load_detector(
    checkpoint: str | Path,
    *,
    method: str | None = None,
    reference: Sequence[str | Path] | None = None,
    precision: str = "auto",
    false_alarm_rate: float = 0.01,
) -> Detector:
    """A checkpoint (written by `train`) as the detector of its method (or `method`), adapted to
    the good images in `reference` (files or folders) when the method uses them."""
    from visinspect.checkpoint import load_method_checkpoint

    model, info = load_method_checkpoint(checkpoint)
    name = method or info.get("method", "baseline")
    detector = make_detector(name, model, info, precision=precision, false_alarm_rate=false_alarm_rate)
    if detector.uses_good:
        if not reference:
            raise ConfigError(
                f"method {name!r} adapts to K good images of the product: give them with "
                "--reference-dir GOOD_IMAGES/ (or choose --method baseline)"
            )
        detector.adapt(reference_samples(reference))
    elif reference:
        raise ConfigError(f"method {name!r} uses no good reference images; leave --reference-dir out")
    return detector
