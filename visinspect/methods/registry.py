"""Every method by its name: the one place that knows what each trains, reads and is called.

A new method is a Detector subclass in a module of its own (methods/base.py says what it does)
and one entry in METHODS here. If it learns from the labelled source products, its entry names
a Training: a function in the method's own module (`fit_baseline`, `fit_residual`,
`SimCLRTraining`), which `train`, `compare` and `loo` all call the same way; what it learns on top
of a trained model (e.g. a fusion weight) is its `Detector.fit_sources`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visinspect.backbones.vgg16 import VGG16CAM, build_model, describe_backbone
from visinspect.calibration import load_calibration
from visinspect.checkpoint import load_method_checkpoint, save_classifier, save_settings
from visinspect.errors import ConfigError
from visinspect.methods.augmented_references import SHIFTS, PosedReferenceDetector
from visinspect.methods.base import Detector, reference_samples
from visinspect.methods.binary_patterns import PatternReferenceDetector
from visinspect.methods.classifier import CalibratedClassifier, ClassifierDetector, fit_baseline
from visinspect.methods.feature_levers import LocalContrastReferenceDetector, TwoLevelReferenceDetector
from visinspect.methods.foreground import ForegroundReferenceDetector
from visinspect.methods.fusion import FusedDetector, FusedMobileNetDetector, FusedTopDetector
from visinspect.methods.learnt_fusion import LearntFusionDetector
from visinspect.methods.nearest_patch import (
    MobileNetReferenceDetector,
    ReferenceDetector,
    TopReferenceDetector,
)
from visinspect.methods.pseudo_defects import PseudoDefectDetector
from visinspect.methods.residual import ResidualDetector, fit_residual
from visinspect.methods.residual_head import ResidualHeadDetector
from visinspect.methods.simclr.checkpoints import load_pretrained_encoder
from visinspect.methods.simclr.levers import LEVER_SETS
from visinspect.methods.simclr.patch_network import ContrastReferenceDetector
from visinspect.methods.simclr.training import SimCLRTraining
from visinspect.training import SourceImages, TrainingRun
from visinspect.utils import set_seed

Fit = Callable[[SourceImages, TrainingRun, "tuple[VGG16CAM, dict] | None"], "tuple[VGG16CAM, dict]"]


@dataclass(frozen=True)
class Training:
    """What some methods learn from the labelled source products, once for all of them: `fit`
    (source images, run, optional SimCLR encoder) -> (model, info). `name` is the trained model's
    (a `loo` train job); `pretrains`: SimCLR pre-training comes first (slower; its settings count)."""

    name: str
    fit: Fit
    pretrains: bool = False


def _simclr(name: str, levers: dict | None = None, with_target_good: bool = True) -> Training:
    return Training(name, SimCLRTraining(name, levers or {}, with_target_good), pretrains=True)


TRAININGS: dict[str, Training] = {
    t.name: t
    for t in (
        Training("baseline", fit_baseline),
        Training("residual", fit_residual),
        _simclr("simclr-source", with_target_good=False),
        _simclr("simclr-source+target-good"),
        *(_simclr(f"simclr+{lever}", overrides) for lever, overrides in LEVER_SETS.items()),
    )
}


@dataclass(frozen=True)
class Method:
    """A method by the name its rows carry: its detector class, what it trains (None: nothing but
    the ImageNet backbone), whether `loo` runs it by default, and one line on what it is."""

    name: str
    detector: type[Detector]
    about: str
    trains: Training | None = None
    default: bool = False  # one of `loo`'s default --models
    calibrated: str | None = None  # a classifier's twin with its threshold from K good images
    options: Mapping[str, Any] = field(default_factory=dict)  # the detector's settings (class attributes)

    @property
    def reads_sources(self) -> bool:
        """Whether it learns anything from the source products' images (a training or fit_sources)."""
        return self.trains is not None or bool(self.detector.learns_on_sources)

    @property
    def min_k(self) -> int:
        """The fewest good images of the product it adapts to."""
        return self.detector.min_good


def _classifier(
    name: str, about: str, calibrated: str = "the same, calibrated on K good images", default: bool = False
) -> tuple[Method, Method]:
    """A trained classifier as two methods: `name` (the threshold from the source validation split)
    and `name calibrated` (threshold and heatmap scale from K good images)."""
    trains, twin = TRAININGS[name], f"{name} calibrated"
    return (Method(name, ClassifierDetector, about, trains, default, calibrated=twin),
            Method(twin, CalibratedClassifier, calibrated, trains, default))


BASELINE = TRAININGS["baseline"]
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        *_classifier("baseline",
                     "the seed's VGG16-CAM classifier; threshold from the source validation split",
                     "the same classifier; threshold and heatmap scale from K good images", default=True),
        Method("reference", ReferenceDetector,
               "nearest good patch (PatchCore idea) against K good images; no training", default=True),
        Method("reference-top5", TopReferenceDetector,
               "the same, image score = mean of the 5 % largest patch distances (AnomalyDINO)"),
        Method("fused", FusedDetector,
               "baseline and reference, standardised on K good images, averaged", BASELINE, default=True),
        Method("fused-top5", FusedTopDetector,
               "the same, the reference part's image score the mean of its 5 % largest patch distances",
               BASELINE, default=True),
        Method("reference-mobilenet", MobileNetReferenceDetector,
               "reference-top5 on MobileNetV2's stride-16 maps instead of VGG16's conv4_3; no training",
               default=True),
        Method("reference-mobilenet+patterns", PatternReferenceDetector,
               "reference-mobilenet, or on binary drawings (PCB scans) the unseen 3x3 pixel patterns",
               default=True),
        Method("reference-mobilenet+patterns+poses", PosedReferenceDetector,
               "reference-mobilenet+patterns, the K good images also turned and mirrored where the good "
               "parts say it is safe (AnomalyDINO's augmentation, checked on pseudo-defects)", default=True),
        Method("reference-mobilenet+patterns+poses-always", PosedReferenceDetector,
               "the same, the turned and mirrored good images always added: what the check is worth",
               options={"check": False}, default=True),
        Method("reference-mobilenet+patterns+shifts", PosedReferenceDetector,
               "reference-mobilenet+patterns, the K good images also shifted by half a patch and zoomed in "
               "where the good parts say it is safe (the check of +poses)", options={"augment": SHIFTS},
               default=True),
        Method("reference-mobilenet+patterns+foreground", ForegroundReferenceDetector,
               "reference-mobilenet+patterns, the backdrop's patch distances not counted where the good "
               "parts show an object on a plain background (AnomalyDINO's masking, told by their borders)",
               default=True),
        Method("reference-mobilenet+patterns@256", PatternReferenceDetector,
               "reference-mobilenet+patterns with the images read at 256 px (the data's size), not 224",
               options={"input_size": 256}, default=True),
        Method("reference-mobilenet+patterns+3-nearest", PatternReferenceDetector,
               "reference-mobilenet+patterns, a patch's score its mean distance to its 3 nearest good "
               "patches, not the nearest alone (SPADE's k nearest)", options={"neighbours": 3}, default=True),
        Method("reference-mobilenet+patterns+lcn", LocalContrastReferenceDetector,
               "reference-mobilenet+patterns on images whose local contrast is normalised first (lighting "
               "that changes across a part evened out)", default=True),
        Method("reference-mobilenet+patterns+stride8", TwoLevelReferenceDetector,
               "reference-mobilenet+patterns on MobileNetV2's stride-8 maps with its stride-16 maps "
               "upsampled to them (PatchCore's two levels): finer patches", default=True),
        Method("reference-mobilenet+patterns+simclr", ContrastReferenceDetector,
               "reference-mobilenet+patterns on MobileNetV2 adapted by dense contrast (DenseCL, defect "
               "negatives, L2-SP) on the source products' unlabelled images", default=True),
        Method("reference-mobilenet+patterns+residual", ResidualHeadDetector,
               "reference-mobilenet+patterns, each patch scored by a head trained on the source products' "
               "residuals (patch minus its nearest good patch, ResAD) and masks", default=True),
        Method("fused-mobilenet", FusedMobileNetDetector,
               "fused-top5 with the reference part on MobileNetV2's maps (reference-mobilenet)",
               BASELINE, default=True),
        Method("fused-learnt", LearntFusionDetector,
               "the same, the classifier's weight learnt on the source products' validation images",
               BASELINE),
        Method("fused+simclr", FusedDetector,
               "fused, with the classifier pre-trained by SimCLR on the source and the target's good images",
               TRAININGS["simclr-source+target-good"]),
        Method("fused+simclr+l2sp", FusedDetector,
               "fused, with the classifier pre-trained by SimCLR with the l2sp lever",
               TRAININGS["simclr+l2sp"]),
        Method("fused+simclr+defect-negatives", FusedDetector,
               "fused, with the classifier pre-trained by SimCLR with the defect-negatives lever",
               TRAININGS["simclr+defect-negatives"]),
        Method("fused-top5+simclr+defect-negatives", FusedTopDetector,
               "fused-top5, with the classifier pre-trained by SimCLR with the defect-negatives lever",
               TRAININGS["simclr+defect-negatives"]),
        *_classifier("simclr-source", "SimCLR pre-training on the source images, then the seed's classifier"),
        *_classifier("simclr-source+target-good",
                     "SimCLR also on the target's unlabeled good images, then the classifier"),
        Method("residual", ResidualDetector,
               "the seed's head trained on residuals: features minus their nearest good patch (ResAD)",
               TRAININGS["residual"]),
        Method("pseudo-defects", PseudoDefectDetector,
               "the baseline fine-tuned on K good images against their pseudo-defects (CutPaste, DRAEM)",
               BASELINE),
        *(m for lever in LEVER_SETS for m in _classifier(
            f"simclr+{lever}",
            f"SimCLR on the source and the target's good images with the {lever} lever, then the classifier",
        )),
    )
}
DEFAULT_MODELS = tuple(name for name, m in METHODS.items() if m.default)
# What `train` sets up without --method: the method with the best mean image AUROC over every real
# product of the committed rows (experiments.tables.chosen_on_all_targets on docs/rows/; a test keeps
# the two equal); each product's own headline figure is the method chosen without it (nested).
RECOMMENDED = "reference-mobilenet+patterns+shifts"


def methods_markdown(defaults_only: bool = False) -> str:
    """Every method (or `loo`'s defaults) as a Markdown table: what `python -m visinspect methods`
    prints; the README's method table is the defaults' (a test keeps the two the same)."""
    lines = ["| method | trained on the source products | adapts to K good parts | `loo` default | what it is |",  # noqa: E501
             "| --- | --- | --- | --- | --- |"]
    for m in METHODS.values():
        if defaults_only and not m.default:
            continue
        name = f"**`{m.name}`** (recommended)" if m.name == RECOMMENDED else f"`{m.name}`"
        trains = f"`{m.trains.name}`" if m.trains else (m.detector.learns_on_sources or "no")
        good = f"yes, K ≥ {m.min_k}" if m.detector.uses_good else "no"
        lines.append(f"| {name} | {trains} | {good} | {'yes' if m.default else ''} | {m.about} |")
    return "\n".join(lines)


def method(name: str) -> Method:
    """The method of this name, or a one-line error listing them."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


def calibrated_twin(name: str, option: str) -> str:
    """The form of classifier `name` whose threshold and heatmap scale come from K good images (itself
    if it is one), or a one-line error naming `option`, the command's option that asked for it."""
    chosen = method(name)
    if issubclass(chosen.detector, CalibratedClassifier):
        return name
    if chosen.calibrated is None:
        raise ConfigError(f"method {name!r} has no form calibrated on good images; leave {option} out")
    return chosen.calibrated


def training(name: str) -> Training:
    """The training of this name, or a one-line error listing them."""
    if name not in TRAININGS:
        raise ConfigError(f"unknown training {name!r}; known: {', '.join(TRAININGS)}")
    return TRAININGS[name]


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
    chosen = method(name)
    return chosen.detector(model, info, name=name, precision=precision, false_alarm_rate=false_alarm_rate,
                           seed=seed, options=chosen.options)


def train_method(name: str, source: SourceImages | None, run: TrainingRun,
                 pretrained: str | Path | None = None) -> tuple[VGG16CAM | None, dict]:
    """What method `name` brings to a new product: its training on the labelled source images and
    what it fits on top (from a SimCLR encoder saved by `pretrain` when `pretrained`), or, for a
    method that trains nothing, the backbone it starts from (None: it reads no VGG16)."""
    chosen = method(name)
    size, seed = run.config.image_size, run.config.seed
    if chosen.trains is None and pretrained:
        raise ConfigError(f"method {name!r} trains nothing, so it has no use for a SimCLR encoder "
                          "(--pretrained): leave it out, or choose a method `python -m visinspect methods` "
                          "marks as trained on the source products")
    if chosen.trains is None:
        model, info = untrained(name, size, run.weights, seed)
    else:
        encoder = None
        if pretrained:
            encoder = VGG16CAM()
            encoder = (encoder, load_pretrained_encoder(pretrained, encoder))
        model, info = chosen.trains.fit(source, run, encoder)
    detector = make_detector(name, model, info, precision=run.config.precision, seed=seed)
    if model is None:  # settings only: they record where its own network's weights came from
        info = backbone_info(size, detector.patch_provenance)
    if source is None:
        if chosen.reads_sources:
            raise ConfigError(f"method {name!r} learns from the source products' images: give them")
        return model, info
    return model, info | detector.fit_sources(source.train, source.val)


def save_method(path: str | Path, name: str, model: VGG16CAM | None, info: dict) -> Path:
    """`train_method`'s result as a checkpoint of method `name`: settings alone when it reads no
    VGG16 (the patch network's weights are ImageNet's, recorded by digest), else the model too."""
    if model is None:
        return save_settings(path, **info, method=name)
    return save_classifier(path, model, **info, method=name)


def training_summary(name: str, model: VGG16CAM | None, info: dict) -> str:
    """What `train_method` gave method `name`, in a few lines a person reads."""
    chosen = method(name)
    lines = [f"method {name!r}: {chosen.about}"]
    if chosen.trains is None:
        kept = "settings (no weights)" if model is None else "settings and VGG16 backbone"
        lines += [f"it trains nothing (it learns from the K good images given to `predict`); saved its "
                  f"{kept}",
                  "patch features: " + describe_backbone(info["backbone"])]
    else:
        h = info["history"]
        lines += [describe_backbone(info["backbone"]),
                  f"{h['epochs_run']} epochs, final train loss {h['loss'][-1]:.4f}, accuracy "
                  f"{h['accuracy'][-1]:.3f}; validation threshold (logit margin) {info['threshold']:.3f}"]
    if "fusion_weight" in info:
        w = info["fusion_weight"]
        lines.append(f"fusion weight learnt on {', '.join(w['products'])}: classifier {w['classifier']:.2f}, "
                     f"reference {1 - w['classifier']:.2f}")
    return "\n".join(lines)


def train_to_file(path: str | Path, name: str, source: SourceImages | None, run: TrainingRun,
                  pretrained: str | Path | None = None, log: Callable[[str], None] = print
                  ) -> tuple[VGG16CAM | None, dict]:
    """What `train` runs: `train_method` (`source` None for a method that trains nothing), saved as
    checkpoint `path`; the run's resumable state goes once it is written. Logs what it trains on
    and `training_summary`."""
    if source is not None:
        log(source.describe())
    model, info = train_method(name, source or SourceImages([], []), run, pretrained)
    save_method(path, name, model, info)
    if run.state is not None:
        run.state.unlink(missing_ok=True)
    log(training_summary(name, model, info))
    log(f"saved {path}")
    return model, info


def load_detector(
    checkpoint: str | Path,
    *,
    method: str | None = None,
    reference: Sequence[str | Path] | None = None,
    calibration: str | Path | None = None,
    category: str | None = None,
    precision: str = "auto",
    false_alarm_rate: float = 0.01,
) -> Detector:
    """A checkpoint (written by `train`) as the detector of its method (or `method`), adapted to
    the good images in `reference` (files or folders) when the method uses them, or, for a
    classifier, to a product's `calibration` file (written by `evaluate --calibrate K`)."""
    model, info = load_method_checkpoint(checkpoint)
    name = method or info.get("method", "baseline")
    if calibration is not None:
        return _calibrated_classifier(name, model, info, calibration, category, precision)
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


def _calibrated_classifier(name: str, model: VGG16CAM | None, info: dict, calibration: str | Path,
                           category: str | None, precision: str) -> CalibratedClassifier:
    """Classifier `name` as its calibrated twin, with one product's threshold and heatmap scale from
    its calibration file instead of the ones learnt on other products."""
    twin = calibrated_twin(name, "--calibration")
    calibrations = load_calibration(calibration)
    if category is None and len(calibrations) == 1:
        category = next(iter(calibrations))
    if category not in calibrations:
        raise ConfigError(
            f"{calibration} holds calibrations for {', '.join(sorted(calibrations))}: name the product "
            "of these images with --category"
        )
    detector = make_detector(twin, model, info, precision=precision)
    detector.calibrations[category], detector.product = calibrations[category], category
    return detector
