"""A checkpoint's report on labelled images: what `python -m visinspect evaluate` prints.

Methods that adapt to K good images of a product (and the classifier with `calibrate=K`) take K
good train/ images of each category, which are then left out of the images evaluated; the
calibrations are saved next to the checkpoint. With `calibrate`, the report keeps the
uncalibrated classifier's figures on the same images too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from visinspect.backbones.vgg16 import describe_backbone
from visinspect.calibration import (
    DEFAULT_K,
    default_calibration_path,
    outlier_note,
    save_calibration,
    select_good_images,
)
from visinspect.checkpoint import load_method_checkpoint
from visinspect.data.samples import Sample
from visinspect.errors import ConfigError
from visinspect.evaluate import (
    DEFAULT_BOX_THRESHOLD,
    DEFAULT_MIN_AREA,
    evaluate_scored,
    markdown_table,
    probability_to_margin,
)
from visinspect.methods.base import IDENTITY, Detector
from visinspect.methods.registry import calibrated_twin, make_detector


@dataclass(frozen=True)
class EvaluationSettings:
    """How a checkpoint is evaluated: its method (None: the checkpoint's), the threshold ('val',
    the checkpoint's own, or a P(anomaly) such as '0.5'), K good images to calibrate on, and how
    heatmaps become boxes."""

    method: str | None = None
    threshold: str = "val"
    calibrate: int | None = None
    false_alarm_rate: float = 0.01
    precision: str = "auto"
    heat_mode: str = "dataset"
    box_threshold: float = DEFAULT_BOX_THRESHOLD
    min_area: int = DEFAULT_MIN_AREA
    progress: bool = True


def threshold_margin(value: str, info: dict) -> float:
    """A threshold as a logit margin: 'val' (the checkpoint's) or a P(anomaly) such as 0.5."""
    if value == "val":
        return float(info["threshold"])
    try:
        p = float(value)
    except ValueError:
        raise ConfigError(f"--threshold must be 'val' or a probability such as 0.5; got {value!r}") from None
    return probability_to_margin(p)


def evaluate_checkpoint(
    checkpoint: str | Path,
    samples: Sequence[Sample],
    settings: EvaluationSettings = EvaluationSettings(),
    log: Callable[[str], None] = print,
) -> dict:
    """The report of a checkpoint's method on labelled `samples` (see the module docstring)."""
    model, info = load_method_checkpoint(checkpoint)
    name = settings.method or info.get("method", "baseline")
    detector = make_detector(name, model, info, precision=settings.precision,
                             false_alarm_rate=settings.false_alarm_rate)
    detector.progress = settings.progress
    if not detector.uses_good:
        detector.threshold = threshold_margin(settings.threshold, info)  # checked before the slow part
    samples, calibration, plain = list(samples), None, None
    if settings.calibrate and not detector.uses_good:  # the classifier, and calibrated on K good images
        plain, twin = detector, calibrated_twin(name, "--calibrate")
        detector = make_detector(twin, model, info, precision=settings.precision,
                                 false_alarm_rate=settings.false_alarm_rate)
    if detector.uses_good:
        calibration, samples = _adapt(detector, samples, settings.calibrate or DEFAULT_K, checkpoint,
                                      settings, log)
    report = _report(detector, samples, settings)
    if calibration is not None:
        report["threshold_rule"] = (
            f"calibrated on {calibration['k']} good train/ images per category, rule "
            f"{calibration['rule']!r} (false-alarm rate {settings.false_alarm_rate})"
        )
        report["calibration"] = calibration
    if plain is not None:  # on the same images
        uncalibrated = _report(plain, samples, settings)
        report["uncalibrated"] = {k: v for k, v in uncalibrated.items() if k != "per_defect_type"}
    report["method"] = detector.name
    report["backbone"] = info["backbone"] if model is not None else None  # the VGG16's, if any
    if detector.patch_provenance is not None:  # the network of its nearest-good-patch score
        report["patch_backbone"] = detector.patch_provenance
    report["checkpoint"] = str(checkpoint)
    return report


def _report(detector: Detector, samples: Sequence[Sample], settings: EvaluationSettings) -> dict:
    scored = detector.score(samples)
    heat_mode = settings.heat_mode if detector.normalizer is not None else "image"
    report = evaluate_scored(scored, detector.threshold, score_name=detector.score_name, heat_mode=heat_mode,
                             normalizer=detector.normalizer, box_threshold=settings.box_threshold,
                             min_area=settings.min_area)
    rule = detector.info.get("threshold_rule", "")
    report["threshold_rule"] = rule if settings.threshold == "val" else f"P(anomaly) > {settings.threshold}"
    report["heat_mode"] = "calibrated" if detector.normalizer is IDENTITY else heat_mode
    return report


def _adapt(detector: Detector, samples: list[Sample], k: int, checkpoint: str | Path,
           settings: EvaluationSettings, log: Callable[[str], None]) -> tuple[dict, list[Sample]]:
    """Adapt the detector to K good train/ images of each category; save the calibrations next to
    the checkpoint; return what was used and the images left to evaluate on (never the K)."""
    for category in sorted({s.category for s in samples}):
        detector.adapt(select_good_images(samples, category, k, seed=0))
    by_category = detector.calibrations
    path = save_calibration(default_calibration_path(checkpoint, k), by_category)
    log(f"{detector.name}: adapted to {k} good images per category; calibration saved to {path}")
    for note in filter(None, map(outlier_note, by_category.values())):
        log(note)
    used = {p for c in by_category.values() for p in c.images}
    calibration = {
        "k": k,
        "false_alarm_rate": settings.false_alarm_rate,
        "rule": next(iter(by_category.values())).rule,  # every category: the library's default
        "threshold": {c: cal.threshold for c, cal in by_category.items()},
        "images": {c: cal.images for c, cal in by_category.items()},
        "outliers": {c: cal.outliers for c, cal in by_category.items()},  # left out of the threshold
        "file": str(path),
    }
    return calibration, [s for s in samples if str(s.path) not in used]


def report_markdown(report: dict) -> str:
    """`evaluate_checkpoint`'s report as Markdown tables (before and after calibration when it
    has both) and the networks it read."""
    if "uncalibrated" in report:
        text = (markdown_table(report["uncalibrated"], title="Before calibration (threshold learnt on the "
                               "training products): ") + "\n\n"
                + markdown_table(report, title="After calibration on good images of each product: "))
    else:
        text = markdown_table(report)
    if report["backbone"] is not None:
        text += "\n" + describe_backbone(report["backbone"])
    if (report.get("patch_backbone") or {}).get("network"):  # a patch network other than VGG16
        text += "\npatch features: " + describe_backbone(report["patch_backbone"])
    return text
