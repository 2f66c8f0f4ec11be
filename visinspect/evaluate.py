"""From predictions to a report: thresholds, image metrics, localisation metrics, a markdown table.

Positive class = anomaly. Scores are logit margins (anomaly minus good); the default decision
threshold 0.0 on the margin is exactly P(anomaly) > 0.5. A threshold chosen on data is chosen on
the validation split (F1-optimal), never on the test images it is evaluated on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from visinspect.backbones.cam import HeatmapNormalizer
from visinspect.boxes import heatmap_to_boxes
from visinspect.errors import ConfigError
from visinspect.metrics import (
    POSITIVE_CLASS,
    best_f1_threshold,
    box_hit_rate,
    classification_metrics,
    per_group_metrics,
    pixel_metrics,
)
from visinspect.scoring import Predictions, ScoredImages

DEFAULT_BOX_THRESHOLD = 0.5
DEFAULT_MIN_AREA = 16


def probability_to_margin(p: float) -> float:
    """The logit-margin threshold equivalent to a P(anomaly) threshold p (0.5 -> 0.0)."""
    if not 0.0 < p < 1.0:
        raise ConfigError(f"a probability threshold must be strictly between 0 and 1; got {p}")
    return math.log(p / (1.0 - p))


def validation_threshold(val: Predictions) -> float:
    """F1-optimal margin threshold on validation predictions (falls back to 0.0, P = 0.5)."""
    labels = val.labels
    if len(set(labels.tolist())) < 2:
        return 0.0
    return float(best_f1_threshold(labels, val.margins))


def localisation_metrics(
    preds: ScoredImages,
    *,
    heat_mode: str = "dataset",
    normalizer: HeatmapNormalizer | None = None,
    box_threshold: float = DEFAULT_BOX_THRESHOLD,
    min_area: int = DEFAULT_MIN_AREA,
) -> dict:
    """Pixel AUROC, AUPRO (FPR <= 0.3) and box hit rate on the images whose masks are known.

    Known masks: every good image (all background) and defective images with a mask file;
    defective images without a mask are skipped. Pixel metrics use the raw map (threshold-free);
    boxes come from the normalised heatmap, for every defective image whatever its predicted label.
    """
    known = [i for i, s in enumerate(preds.samples) if s.label == 0 or s.mask_path is not None]
    defective = [i for i in known if preds.samples[i].label == 1]
    if not defective:
        return {}
    masks = preds.masks(known)  # read once: the defective images' masks are a part of them
    raw = preds.heatmaps(known, mode="raw").numpy()
    out = pixel_metrics(masks, raw, fpr_limit=0.3)
    heat = preds.heatmaps(defective, mode=heat_mode, normalizer=normalizer).numpy()
    boxes = [heatmap_to_boxes(h, box_threshold, min_area) for h in heat]
    where = {i: j for j, i in enumerate(known)}
    hits = box_hit_rate(masks[[where[i] for i in defective]], boxes)
    out.update({k: hits[k] for k in ("box_hit_rate", "mean_iou", "n_regions")})
    out["n_masked_images"] = len(defective)
    return out


def evaluate_scored(
    scored: ScoredImages,
    threshold: float = 0.0,
    *,
    score_name: str = "logit margin (anomaly - good)",
    localisation: bool = True,
    **localisation_kwargs,
) -> dict:
    """Every metric of the report: overall, per category, per defect type, localisation."""
    labels, scores = scored.labels, scored.scores
    report = classification_metrics(labels, scores, threshold)
    report["score"] = score_name
    categories = [s.category for s in scored.samples]
    report["per_category"] = per_group_metrics(labels, scores, categories, threshold)
    types = [f"{s.category}/{s.defect_type}" for s in scored.samples]
    report["per_defect_type"] = per_group_metrics(labels, scores, types, threshold)
    if localisation:
        report.update(localisation_metrics(scored, **localisation_kwargs))
    return report


def evaluate_predictions(preds: Predictions, threshold: float = 0.0, **kwargs) -> dict:
    """The report of a classifier: scores are logit margins, 0.0 is P(anomaly) > 0.5."""
    report = evaluate_scored(preds.scored(), threshold, **kwargs)
    report["threshold_probability"] = round(1.0 / (1.0 + math.exp(-threshold)), 6)
    return report


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def markdown_table(report: dict, title: str = "", per_category: bool = True) -> str:
    """The report as a markdown table a person can read (rounded; positive class stated), and
    below it the table per category unless `per_category` is False."""
    cm = report["confusion_matrix"]
    keys = ["image_auroc", "average_precision", "accuracy", "balanced_accuracy", "precision",
            "recall", "f1", "pixel_auroc", "aupro", "box_hit_rate", "mean_iou"]
    prob = report.get("threshold_probability")
    lines = [
        f"{title}positive class = {POSITIVE_CLASS}; {report['n_images']} images, "
        f"{report['n_anomalous']} anomalous; threshold on the {report.get('score', 'score')} = "
        f"{report['threshold']:.3f}" + (f" (P(anomaly) = {prob:.3f})" if prob is not None else ""),
        "",
        "| metric | value |",
        "| --- | --- |",
    ]
    lines += [f"| {k} | {_fmt(report[k])} |" for k in keys if k in report]
    lines.append(f"| confusion (TP / FN / FP / TN) | {cm['tp']} / {cm['fn']} / {cm['fp']} / {cm['tn']} |")
    if per_category:
        lines += ["", per_group_table(report["per_category"], "category")]
    return "\n".join(lines)


def per_group_table(groups: dict[str, dict], name: str, keys: Sequence[str] = (
        "image_auroc", "average_precision", "balanced_accuracy", "precision", "recall", "f1")) -> str:
    """One row per group (category or defect type) with the main metrics."""
    head = f"| {name} | n | anomalous | " + " | ".join(keys) + " |"
    rows = [head, "|" + " --- |" * (len(keys) + 3)]
    for group, m in groups.items():
        rows.append(
            f"| {group} | {m['n_images']} | {m['n_anomalous']} | "
            + " | ".join(_fmt(m[k]) for k in keys)
            + " |"
        )
    return "\n".join(rows)
