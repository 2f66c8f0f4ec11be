"""Image-level and pixel-level metrics for anomaly detection.

Conventions: label 1 = anomaly (the positive class), 0 = good. Scores are anomaly scores, higher =
more anomalous; for the classifier use the logit margin (anomaly logit - good logit), not
P(anomaly): in fp32 the probability saturates to exactly 1.0 on unfamiliar products, and the ties
wreck AUROC. An image is called anomalous iff score > threshold.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
)

from visinspect.boxes import Box
from visinspect.errors import DataError

POSITIVE_CLASS = "anomaly"


def _scores(scores) -> np.ndarray:
    """Validate scores as a non-empty 1-D float array without NaN/inf."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.size == 0:
        raise DataError("need at least one score; got none")
    if not np.isfinite(s).all():
        raise DataError(f"scores must be finite; got {np.count_nonzero(~np.isfinite(s))} NaN/inf")
    return s


def _labels_scores(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """Validate image labels (0/1) and their scores as 1-D arrays of the same length."""
    y, s = np.asarray(labels).ravel(), _scores(scores)
    if y.size != s.size:
        raise DataError(f"need one label per score; got {y.size} labels and {s.size} scores")
    if not np.isin(y, (0, 1)).all():
        raise DataError(f"labels must be 0 (good) or 1 (anomaly); got values {np.unique(y)}")
    return y.astype(np.int64), s


def classification_metrics(labels, scores, threshold: float) -> dict:
    """Image-level metrics for the decision score > threshold, as plain JSON-ready numbers.

    AUROC and average precision are None when only one class is present (they are undefined).
    """
    y, s = _labels_scores(labels, scores)
    pred = (s > threshold).astype(np.int64)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, pred, labels=[0, 1]).ravel())
    both_classes = 0 < tp + fn < y.size
    # Mean recall over the classes present, as sklearn's balanced_accuracy_score, which would
    # warn on stderr when only one class is present.
    recalls = [hits / total for hits, total in ((tp, tp + fn), (tn, tn + fp)) if total]
    return {
        "n_images": int(y.size),
        "n_anomalous": tp + fn,
        "positive_class": POSITIVE_CLASS,
        "threshold": float(threshold),
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(np.mean(recalls)),
        "precision": float(precision_score(y, pred, zero_division=0)),
        "recall": float(recall_score(y, pred, zero_division=0)),
        "f1": float(f1_score(y, pred, zero_division=0)),
        "image_auroc": float(roc_auc_score(y, s)) if both_classes else None,
        "average_precision": float(average_precision_score(y, s)) if both_classes else None,
        "confusion_matrix": {"tp": tp, "fn": fn, "fp": fp, "tn": tn},
    }


def per_group_metrics(labels, scores, groups: Sequence[str], threshold: float) -> dict[str, dict]:
    """classification_metrics for each group (e.g. category, defect type), sorted by name."""
    y, s = _labels_scores(labels, scores)
    g = np.asarray(groups, dtype=str)
    if g.shape != y.shape:
        raise DataError(f"need one group per image; got {g.size} groups for {y.size} images")
    return {
        name: classification_metrics(y[g == name], s[g == name], threshold)
        for name in sorted(set(g.tolist()))
    }


def seed_spread(seeds: Sequence[int]) -> str:
    """What a number over these seeds is, for titles and table headers: a mean ± std only when
    there are several seeds (one seed has no spread, and saying "mean ± std" would hide that)."""
    seeds = sorted(set(seeds))
    if not seeds:
        return "seed not recorded"
    if len(seeds) == 1:
        return f"one seed ({seeds[0]}), no spread"
    return f"mean ± std over {len(seeds)} seeds {seeds}"


def auroc_standard_error(auroc: float, n_anomalous: int, n_good: int) -> float:
    """The standard error of an image AUROC measured on this many images (Hanley & McNeil,
    Radiology 1982): how far two models' AUROCs on one small test set may differ by chance."""
    if not 0.0 <= auroc <= 1.0:
        raise DataError(f"an AUROC lies in [0, 1]; got {auroc}")
    if n_anomalous < 1 or n_good < 1:
        raise DataError(f"need at least one anomalous and one good image; got {n_anomalous} and {n_good}")
    q1, q2 = auroc / (2 - auroc), 2 * auroc**2 / (1 + auroc)
    variance = (auroc * (1 - auroc) + (n_anomalous - 1) * (q1 - auroc**2)
                + (n_good - 1) * (q2 - auroc**2)) / (n_anomalous * n_good)
    return float(np.sqrt(max(variance, 0.0)))


def best_f1_threshold(labels, scores) -> float:
    """The threshold t that maximises F1 for the rule score > t.

    The best cut "score >= c" comes from sklearn's precision_recall_curve; we return the midpoint
    between c and the next lower distinct score, so that ">" keeps exactly the same images. When c
    is the lowest score (everything anomalous is best) we return c - 1e-6 * max(1, |c|).
    """
    y, s = _labels_scores(labels, scores)
    for cls, name in ((1, "anomalous"), (0, "good")):
        if not (y == cls).any():
            raise DataError(
                f"validation split has no {name} images: cannot choose an "
                "F1-optimal threshold; use the default"
            )
    precision, recall, cuts = precision_recall_curve(y, s)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    cut = cuts[np.argmax(f1[: len(cuts)])]  # the last (P=1, R=0) entry has no cut
    lower = s[s < cut]
    if lower.size == 0:
        return float(cut - 1e-6 * max(1.0, abs(cut)))
    below = lower.max()
    mid = (below + cut) / 2
    return float(mid if mid < cut else below)  # adjacent floats: the midpoint may round up to cut


def false_alarm_threshold(good_scores, false_alarm_rate: float = 0.01) -> float:
    """The lowest threshold with at most that share of the given good scores above it.

    With n good scores and k = floor(rate * n), it is the (k+1)-th largest score, so at most k of
    them are > threshold (fewer when scores tie). rate = 0 gives the max good score.
    """
    if not 0 <= false_alarm_rate < 1:
        raise DataError(f"false_alarm_rate must be in [0, 1); got {false_alarm_rate}")
    s = np.sort(_scores(good_scores))
    k = int(np.floor(false_alarm_rate * s.size))
    return float(s[s.size - 1 - k])


def _masks_maps(masks, heatmaps=None) -> tuple[np.ndarray, np.ndarray | None]:
    """Validate N x H x W ground-truth masks (bool or 0/1) and, if given, same-shape heatmaps."""
    m = np.asarray(masks)
    if m.ndim != 3:
        raise DataError(f"masks must be N x H x W; got shape {m.shape}")
    if m.dtype != bool:
        if not np.isin(m, (0, 1)).all():
            raise DataError(
                f"masks must be boolean or 0/1; got values up to {m.max()} "
                "(use mask > 0 for 0/255 PNG masks)"
            )
        m = m.astype(bool)
    if heatmaps is None:
        return m, None
    h = np.asarray(heatmaps, dtype=np.float32)
    if h.shape != m.shape:
        raise DataError(f"masks and heatmaps must have the same shape; got {m.shape} and {h.shape}")
    if not np.isfinite(h).all():
        raise DataError("heatmaps contain NaN/inf (a constant CAM min-max normalises to NaN)")
    return m, h


def _regions(mask: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """8-connected defect regions of a mask: (count + 1, label image, cv2 stats); 0 = good."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return n, labels, stats


def _auroc_sorted(negative_sorted: np.ndarray, positive: np.ndarray) -> float:
    """AUROC as the Mann-Whitney statistic, the chance that a random positive scores above a
    random negative (ties count half), from the negatives' scores sorted ascending: each positive
    counts the negatives below it and those equal to it by binary search. Only the negatives are
    sorted, and on pixels they are the ones a heatmap metric sorts anyway (AUPRO's FPR axis)."""
    positive = np.sort(positive)  # sorted keys: numpy's binary search reuses the last bound
    below = np.searchsorted(negative_sorted, positive, side="left").sum(dtype=np.int64)
    not_above = np.searchsorted(negative_sorted, positive, side="right").sum(dtype=np.int64)
    return float((below + not_above) / 2 / (positive.size * negative_sorted.size))


def ranked_auroc(positive: np.ndarray, scores: np.ndarray) -> float:
    """AUROC of scores for the positives marked True, by counting (_auroc_sorted) where
    scikit-learn's roc_auc_score builds the whole ROC curve: on the millions of pixels of a test
    set it is many times faster (same value; tests check it against scikit-learn)."""
    y = np.asarray(positive, dtype=bool).ravel()
    s = np.asarray(scores).ravel()
    return _auroc_sorted(np.sort(s[~y]), s[y])


def _both_kinds(masks, heatmaps) -> tuple[np.ndarray, np.ndarray] | None:
    """Validated masks and heatmaps (_masks_maps), or None without both defect and good pixels:
    then no pixel metric is defined."""
    m, h = _masks_maps(masks, heatmaps)
    return None if m.all() or not m.any() else (m, h)


def pixel_auroc(masks, heatmaps) -> float | None:
    """AUROC over all pixels (defect pixels positive); None without both kinds of pixel."""
    pixels = _both_kinds(masks, heatmaps)
    return None if pixels is None else ranked_auroc(*pixels)


def aupro(
    masks, heatmaps, fpr_limit: float = 0.3, num_thresholds: int | None = None
) -> float | None:
    """Area under the per-region-overlap (PRO) curve up to fpr_limit, normalised to [0, 1].

    As in the MVTec AD paper: for a threshold t, the PRO is the share of each 8-connected
    ground-truth region with heat > t, averaged over all regions of all images; the x axis is the
    false positive rate on all good pixels. The curve is integrated up to fpr_limit (the point at
    exactly fpr_limit is interpolated) and divided by fpr_limit, so a perfect heatmap scores 1.0
    and a random one about fpr_limit / 2. With num_thresholds=None the curve is exact; an int
    samples that many thresholds evenly spaced in FPR (good pixels' order statistics).
    None when there is no defect pixel or no good pixel.
    """
    _check_pro_curve(fpr_limit, num_thresholds)
    pixels = _both_kinds(masks, heatmaps)
    if pixels is None:
        return None
    m, h = pixels
    return _aupro_sorted(m, h, np.sort(h[~m]), fpr_limit, num_thresholds)


def pixel_metrics(
    masks, heatmaps, fpr_limit: float = 0.3, num_thresholds: int | None = None
) -> dict[str, float | None]:
    """Pixel AUROC and AUPRO (see `aupro`) of the same heatmaps, validating them and sorting the
    good pixels once for both: on a real test set (millions of pixels) that sort is most of the
    cost of either."""
    _check_pro_curve(fpr_limit, num_thresholds)
    pixels = _both_kinds(masks, heatmaps)
    if pixels is None:
        return {"pixel_auroc": None, "aupro": None}
    m, h = pixels
    good = np.sort(h[~m])
    return {
        "pixel_auroc": _auroc_sorted(good, h[m]),
        "aupro": _aupro_sorted(m, h, good, fpr_limit, num_thresholds),
    }


def _check_pro_curve(fpr_limit: float, num_thresholds: int | None) -> None:
    if not 0 < fpr_limit <= 1:
        raise DataError(f"fpr_limit must be in (0, 1]; got {fpr_limit}")
    if num_thresholds is not None and num_thresholds < 2:
        raise DataError(f"num_thresholds must be at least 2 (or None); got {num_thresholds}")


def _aupro_sorted(
    m: np.ndarray, h: np.ndarray, good: np.ndarray, fpr_limit: float, num_thresholds: int | None
) -> float:
    """aupro of validated masks m and heatmaps h, given the good pixels' heat sorted ascending."""
    # PRO(t) is linear in the pixels: a defect pixel weighs 1 / (its region's size), so each
    # region weighs 1 and the PRO is the weight above t divided by the number of regions.
    defect_scores, defect_weights = [], []
    for mask, heat in zip(m, h, strict=True):
        if not mask.any():  # a good image: no region
            continue
        _, labels, stats = _regions(mask)
        defect_scores.append(heat[mask])
        defect_weights.append(1.0 / stats[labels[mask], cv2.CC_STAT_AREA])
    defects, weights = np.concatenate(defect_scores), np.concatenate(defect_weights)
    # Cuts: the distinct good scores from the highest down to the one where the FPR crosses the
    # limit (at most k good scores lie above the k-th largest one): the distinct values of `top`.
    # `good` is sorted, so each one's count of good pixels above it is read off its place.
    n_good = good.size
    last = min(int(np.floor(fpr_limit * n_good)), n_good - 1)
    top = good[n_good - 1 - last :]
    new = np.concatenate([[True], top[1:] != top[:-1]])
    first = np.flatnonzero(new)  # where each distinct value starts in `top`
    n_ge = top.size - first
    n_ge[0] = n_good - np.searchsorted(good, top[0], side="left")  # its ties may go on below `top`
    n_gt = top.size - np.append(first[1:], top.size)
    if num_thresholds is not None:  # the distinct values at evenly spaced ranks from the top
        ranks = np.linspace(0, last, num_thresholds).astype(np.int64)
        chosen = np.unique((np.cumsum(new) - 1)[top.size - 1 - ranks])
        first, n_ge, n_gt = first[chosen], n_ge[chosen], n_gt[chosen]
    cuts = top[first]
    # The defect weight above each cut: each defect pixel counts for the cuts below it (a
    # histogram over the cuts, summed from the top), without sorting the defect pixels.
    n_cuts = cuts.size

    def weight_above(side: str) -> np.ndarray:
        bins = np.bincount(np.searchsorted(cuts, defects, side=side), weights, minlength=n_cuts + 1)
        tail = np.cumsum(bins[::-1])[::-1]  # tail[j]: the weight of the defects in bins j, j + 1, ...
        return tail[1:] / tail[0]

    # At each cut c the curve goes from "heat > c" to "heat >= c": good pixels equal to c move
    # the FPR, defect pixels equal to c the PRO. Between cuts it is vertical (or, when sampled,
    # approximated by a straight line). From the highest cut down:
    fpr_gt, fpr_ge = n_gt[::-1] / n_good, n_ge[::-1] / n_good
    pro_gt, pro_ge = weight_above("left")[::-1], weight_above("right")[::-1]
    fpr = np.concatenate([[0.0], np.column_stack([fpr_gt, fpr_ge]).ravel(), [1.0]])
    pro = np.concatenate([[0.0], np.column_stack([pro_gt, pro_ge]).ravel(), [1.0]])
    # Close the curve at exactly fpr_limit, on the segment that crosses it (not on a vertical
    # step, which np.interp over the whole curve could pick).
    i = np.searchsorted(fpr, fpr_limit, side="right")
    x = np.append(fpr[:i], fpr_limit)
    y = np.append(pro[:i], np.interp(fpr_limit, fpr[i - 1 : i + 1], pro[i - 1 : i + 1]))
    return float(np.trapezoid(y, x) / fpr_limit)


def box_hit_rate(masks, boxes_per_image: Sequence[Sequence[Box]]) -> dict:
    """How well predicted boxes find the ground-truth defect regions (8-connected).

    box_hit_rate: share of regions with at least one pixel inside a box of their image.
    mean_iou: per region, the best IoU between its bounding box and a predicted box (0 without
    boxes), averaged over regions. Both are None when the masks have no defect region.
    """
    m, _ = _masks_maps(masks)
    if len(boxes_per_image) != len(m):
        raise DataError(
            f"need one list of boxes per mask; got {len(boxes_per_image)} lists for {len(m)} masks"
        )
    hits, ious = [], []
    for mask, boxes in zip(m, boxes_per_image, strict=True):
        n, labels, stats = _regions(mask)
        touched = set()
        for b in boxes:  # clip: a negative start would wrap around in numpy slicing
            touched.update(
                np.unique(labels[max(b.y0, 0) : max(b.y1, 0), max(b.x0, 0) : max(b.x1, 0)])
            )
        for region in range(1, n):
            x, y, w, h, _ = stats[region]
            truth = Box(int(x), int(y), int(x + w), int(y + h), 1.0)
            hits.append(region in touched)
            ious.append(max((truth.iou(b) for b in boxes), default=0.0))
    if not hits:
        return {"box_hit_rate": None, "mean_iou": None, "n_regions": 0}
    return {
        "box_hit_rate": float(np.mean(hits)),
        "mean_iou": float(np.mean(ious)),
        "n_regions": len(hits),
    }
