"""Tests for visinspect.metrics against scikit-learn and slow reference implementations."""

import itertools
import json
import warnings

import cv2
import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
)

from visinspect.boxes import Box
from visinspect.errors import DataError
from visinspect.metrics import (
    POSITIVE_CLASS,
    aupro,
    auroc_standard_error,
    best_f1_threshold,
    box_hit_rate,
    classification_metrics,
    false_alarm_threshold,
    per_group_metrics,
    pixel_auroc,
    pixel_metrics,
    ranked_auroc,
    seed_spread,
)

LABELS = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0])
SCORES = np.array([-2.0, -1.0, 0.5, 0.0, 1.5, 2.0, -0.5, 3.0, 1.0, 0.5, 4.0, -3.0])


def test_classification_metrics_match_sklearn():
    got = classification_metrics(LABELS, SCORES, threshold=0.5)
    pred = SCORES > 0.5  # 0.5 itself is "good": the rule is strict
    assert got["n_images"] == 12 and got["n_anomalous"] == 6
    assert got["positive_class"] == POSITIVE_CLASS == "anomaly"
    assert got["threshold"] == 0.5
    assert got["accuracy"] == pytest.approx(accuracy_score(LABELS, pred))
    assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(LABELS, pred))
    assert got["precision"] == pytest.approx(precision_score(LABELS, pred))
    assert got["recall"] == pytest.approx(recall_score(LABELS, pred))
    assert got["f1"] == pytest.approx(f1_score(LABELS, pred))
    assert got["image_auroc"] == pytest.approx(roc_auc_score(LABELS, SCORES))
    assert got["average_precision"] == pytest.approx(average_precision_score(LABELS, SCORES))
    assert got["confusion_matrix"] == {"tp": 4, "fn": 2, "fp": 1, "tn": 5}
    assert json.loads(json.dumps(got)) == got  # plain Python numbers only


@pytest.mark.parametrize("threshold", [0.5, 10.0])
@pytest.mark.parametrize("cls", [0, 1])
def test_one_class_gives_none_and_no_warning(cls, threshold):
    labels = np.full(5, cls)
    scores = np.array([-1.0, 0.0, 1.0, 2.0, 3.0])
    pred = scores > threshold
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = classification_metrics(labels, scores, threshold)
    assert got["image_auroc"] is None and got["average_precision"] is None
    assert got["precision"] == pytest.approx(precision_score(labels, pred, zero_division=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns here; we must not
        assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, pred))
    if threshold == 10.0:  # no image predicted anomalous
        assert got["precision"] == got["recall"] == got["f1"] == 0.0


def test_saturated_probabilities_tie_and_lose_auroc():
    # Margins (anomaly logit - good logit) rank every anomaly above every good image, but in
    # fp32 the softmax of margins >= ~17 is exactly 1.0: ties that AUROC counts as half.
    margins = np.array([-2.0, 17.5, 18.0, 20.0, 25.0, 30.0, 40.0, 50.0])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    logits = torch.tensor(np.stack([np.zeros(8), margins], axis=1), dtype=torch.float32)
    probs = torch.softmax(logits, dim=1)[:, 1].numpy()
    assert (probs[1:] == 1.0).all()
    by_margin = classification_metrics(labels, margins, 0.0)["image_auroc"]
    by_prob = classification_metrics(labels, probs, 0.5)["image_auroc"]
    assert by_margin == 1.0
    assert by_prob == pytest.approx(roc_auc_score(labels, probs)) == pytest.approx(10 / 16)
    assert by_prob < by_margin


def test_per_group_metrics():
    groups = ["wood", "bottle", "wood", "bottle"] * 3
    got = per_group_metrics(LABELS, SCORES, groups, threshold=0.5)
    assert list(got) == ["bottle", "wood"]
    for name, metrics in got.items():
        keep = np.array(groups) == name
        assert metrics == classification_metrics(LABELS[keep], SCORES[keep], 0.5)
    only_good = per_group_metrics([0, 0, 1], [0.1, 0.2, 0.9], ["a", "a", "b"], 0.5)
    assert only_good["a"]["image_auroc"] is None and only_good["b"]["recall"] == 1.0
    with pytest.raises(ValueError, match="one group per image"):
        per_group_metrics(LABELS, SCORES, ["a"], 0.5)


@pytest.mark.parametrize(
    "labels, scores, message",
    [
        ([0, 1], [0.1], "one label per score"),
        ([], [], "at least one score"),
        ([0, 2], [0.1, 0.2], "labels must be 0"),
        ([0, 1], [0.1, np.nan], "finite"),
    ],
)
def test_bad_labels_or_scores(labels, scores, message):
    with pytest.raises(ValueError, match=message):
        classification_metrics(labels, scores, 0.5)


def max_f1(labels, scores) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore"):
        return float(np.nanmax(2 * precision * recall / (precision + recall)))


@pytest.mark.parametrize("seed", range(8))
def test_best_f1_threshold_reproduces_sklearn_max_f1(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    labels[:2] = [0, 1]
    scores = rng.normal(size=60) + labels
    if seed % 2:
        scores = np.round(scores, 1)  # ties
    t = best_f1_threshold(labels, scores)
    assert f1_score(labels, scores > t) == pytest.approx(max_f1(labels, scores))


def test_best_f1_threshold_edge_cases():
    # Everything anomalous is best: the threshold sits just below the lowest score.
    labels, scores = np.array([1, 1, 1, 0]), np.array([0.1, 0.2, 0.3, 0.4])
    t = best_f1_threshold(labels, scores)
    assert 0.1 - 1e-5 < t < 0.1 and f1_score(labels, scores > t) == pytest.approx(6 / 7)
    # Adjacent floats: the midpoint rounds, ">" must still separate them.
    scores = np.array([1.0, np.nextafter(1.0, 0.0)])
    assert ((scores > best_f1_threshold([1, 0], scores)) == [True, False]).all()
    assert best_f1_threshold([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9]) == pytest.approx(0.45)
    with pytest.raises(ValueError, match=r"no anomalous images.*use the default"):
        best_f1_threshold([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="no good images"):
        best_f1_threshold([1, 1], [0.1, 0.2])


@pytest.mark.parametrize("rate", [0.0, 0.01, 0.05, 0.1, 0.29, 0.5, 0.99])
@pytest.mark.parametrize("n", [1, 7, 100, 1000])
def test_false_alarm_threshold_guarantee(rate, n):
    rng = np.random.default_rng(n)
    for good in (rng.normal(size=n), rng.integers(0, 5, n).astype(float)):  # with ties
        t = false_alarm_threshold(good, rate)
        k = int(np.floor(rate * n))
        assert np.count_nonzero(good > t) <= k <= rate * n
        assert np.count_nonzero(good >= t) > k  # lowest such threshold: one notch lower breaks it
        assert t in good


def test_false_alarm_threshold_rate_must_be_in_unit_interval():
    assert false_alarm_threshold([3.0, 1.0, 2.0], 0.0) == 3.0
    for rate in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match=r"false_alarm_rate must be in \[0, 1\)"):
            false_alarm_threshold([1.0, 2.0], rate)


def small_maps(seed: int, levels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Three 8x8 masks with a few defect regions (one image good) and noisy heatmaps."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((3, 8, 8), dtype=bool)
    masks[0, 1:3, 1:4] = masks[0, 5:7, 5:7] = masks[0, 7, 0] = True
    masks[2, 3:8, 2:4] = True
    heat = rng.random(masks.shape) + 0.6 * masks
    if levels:
        heat = np.round(heat * levels) / levels  # many ties
    return masks, heat.astype(np.float32)


@pytest.mark.parametrize("levels", [None, 4, 1])
def test_pixel_auroc_matches_sklearn(levels):
    # levels=1: scores of only two values, ties everywhere (each tie must count half)
    masks, heat = small_maps(0, levels)
    assert pixel_auroc(masks, heat) == pytest.approx(roc_auc_score(masks.ravel(), heat.ravel()), abs=1e-12)
    assert pixel_auroc(masks.astype(np.uint8), heat) == pixel_auroc(masks, heat)
    assert pixel_auroc(np.zeros_like(masks), heat) is None
    assert pixel_auroc(np.ones_like(masks), heat) is None


@pytest.mark.parametrize("seed", range(5))
def test_ranked_auroc_matches_sklearn_on_random_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(2000) < rng.uniform(0.01, 0.5)
    s = np.round(rng.normal(size=2000) + y, rng.integers(0, 3))
    assert ranked_auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_map_validation():
    masks, heat = small_maps(0)
    with pytest.raises(ValueError, match=r"same shape; got \(3, 8, 8\) and \(3, 8, 7\)"):
        pixel_auroc(masks, heat[:, :, :7])
    with pytest.raises(ValueError, match=r"N x H x W; got shape \(8, 8\)"):
        aupro(masks[0], heat[0])
    with pytest.raises(ValueError, match="0/255"):
        pixel_auroc(masks * 255, heat)
    heat[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        aupro(masks, heat)
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(masks, np.zeros(masks.shape), fpr_limit=0.0)


def slow_aupro(masks: np.ndarray, heat: np.ndarray, fpr_limit: float) -> float:
    """The PRO curve at every distinct score, with explicit loops, trapezoids cut at the limit."""
    regions = []
    for image, mask in enumerate(masks):
        n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        regions += [(image, labels == r) for r in range(1, n)]
    good = heat[~masks]
    points = []
    for t in [np.inf, *sorted(set(heat.ravel().tolist()), reverse=True), -np.inf]:
        overlaps = [np.mean(heat[image][region] > t) for image, region in regions]
        points.append((np.mean(good > t), np.mean(overlaps)))
    area = 0.0
    for (f0, p0), (f1, p1) in itertools.pairwise(points):
        if f0 >= fpr_limit:
            break
        if f1 > fpr_limit:
            p1, f1 = p0 + (p1 - p0) * (fpr_limit - f0) / (f1 - f0), fpr_limit
        area += (f1 - f0) * (p0 + p1) / 2
    return area / fpr_limit


@pytest.mark.parametrize("levels", [None, 4, 10])
@pytest.mark.parametrize("fpr_limit", [0.05, 0.25, 0.3, 1.0])
def test_aupro_matches_slow_reference(levels, fpr_limit):
    for seed in range(3):
        masks, heat = small_maps(seed, levels)
        expected = slow_aupro(masks, heat, fpr_limit)
        assert aupro(masks, heat, fpr_limit) == pytest.approx(expected, abs=1e-12)
        # Enough samples to hit every good pixel's rank: the sampled curve is the exact one.
        assert aupro(masks, heat, fpr_limit, num_thresholds=200) == pytest.approx(expected)


@pytest.mark.parametrize("levels", [None, 4])
def test_pixel_metrics_are_pixel_auroc_and_aupro(levels):
    # One validation and one sort of the good pixels for both: the values of each function alone.
    masks, heat = small_maps(2, levels)
    both = pixel_metrics(masks, heat, fpr_limit=0.25)
    assert both == {"pixel_auroc": pixel_auroc(masks, heat), "aupro": aupro(masks, heat, 0.25)}
    assert pixel_metrics(np.zeros_like(masks), heat) == {"pixel_auroc": None, "aupro": None}
    with pytest.raises(DataError, match="fpr_limit"):
        pixel_metrics(masks, heat, fpr_limit=1.5)


def test_aupro_sampled_is_close_to_exact():
    rng = np.random.default_rng(0)
    masks = np.zeros((10, 32, 32), dtype=bool)
    masks[:5, 4:12, 4:20] = masks[:5, 20:30, 25:28] = True
    heat = rng.random(masks.shape) + 0.3 * masks
    exact = aupro(masks, heat)
    assert 0.3 < exact < 0.9
    assert aupro(masks, heat, num_thresholds=200) == pytest.approx(exact, abs=1 / 199)


def test_aupro_known_values():
    masks, heat = small_maps(1)
    assert aupro(masks, masks.astype(float)) == 1.0  # perfect
    assert aupro(masks, 1.0 - masks) == 0.0  # every good pixel ranks above every defect
    # A constant map ties everything: the curve is the straight line PRO = FPR from (0, 0) to
    # (1, 1), so the normalised area up to the limit is fpr_limit / 2.
    for limit in (0.1, 0.3, 1.0):
        assert aupro(masks, np.full(masks.shape, 0.4), limit) == pytest.approx(limit / 2)
    assert aupro(np.zeros_like(masks), heat) is None
    assert aupro(np.ones_like(masks), heat) is None


def test_aupro_step_exactly_at_the_limit():
    # 16 good pixels, 4 of them at 0.9 (FPR 0.25), and a 2x2 region half at 0.5, half at 0.05:
    # the curve goes (0, 0) -> (0.25, 0), then straight up to PRO 0.5 *at* FPR 0.25.
    masks = np.zeros((1, 4, 5), dtype=bool)
    masks[0, 2:4, 3:5] = True
    heat = np.full(masks.shape, 0.1)
    heat[0, 0, :4] = 0.9
    heat[0, 2:4, 3] = 0.5
    heat[0, 2:4, 4] = 0.05
    for limit, expected in ((0.25, 0.0), (0.5, 0.25)):
        assert aupro(masks, heat, limit) == pytest.approx(expected)
        assert slow_aupro(masks, heat.astype(np.float32), limit) == pytest.approx(expected)


def test_aupro_weighs_regions_equally():
    # One big region fully found and one small region missed: PRO = 1/2, not 60/61 (pixel TPR).
    masks = np.zeros((1, 20, 20), dtype=bool)
    masks[0, 0:6, 0:10] = True
    masks[0, 15, 15] = True
    heat = np.where(masks, 1.0, 0.5)
    heat[0, 15, 15] = 0.0
    assert aupro(masks, heat, fpr_limit=0.3) == pytest.approx(0.5)


def test_box_hit_rate_on_hand_made_masks():
    masks = np.zeros((3, 10, 10), dtype=bool)
    masks[0, 1:3, 1:3] = True  # region A
    masks[0, 5:8, 5:9] = True  # region B, missed
    masks[2, 0:4, 0] = masks[2, 3, 0:4] = True  # region C, an L shape
    masks[2, 6, 6] = masks[2, 7, 7] = True  # region D: diagonal pixels are one region
    boxes = [
        [Box(0, 0, 2, 2, 0.9)],  # touches A's pixel (1, 1); IoU with A's box = 1 / 7
        [Box(0, 0, 5, 5, 0.8)],  # false alarm on a good image: no region to find
        [Box(2, 0, 4, 2, 0.7), Box(-5, -5, 1, 1, 0.6), Box(6, 6, 8, 8, 0.5)],
    ]
    # C is touched by the box with negative coordinates (its pixel (0, 0)), not by the one in
    # its concave corner; that one overlaps C's bounding box though: IoU 4 / 16.
    got = box_hit_rate(masks, boxes)
    assert got["n_regions"] == 4
    assert got["box_hit_rate"] == pytest.approx(3 / 4)
    assert got["mean_iou"] == pytest.approx((1 / 7 + 0 + 4 / 16 + 1) / 4)
    assert box_hit_rate(masks, [[], [], []]) == {
        "box_hit_rate": 0.0,
        "mean_iou": 0.0,
        "n_regions": 4,
    }
    corner_only = box_hit_rate(masks[2:], [[Box(2, 0, 4, 2, 0.7)]])
    assert corner_only["box_hit_rate"] == 0.0 and corner_only["mean_iou"] == pytest.approx(2 / 16)


def test_box_hit_rate_without_regions():
    got = box_hit_rate(np.zeros((2, 5, 5), dtype=bool), [[Box(0, 0, 2, 2, 1.0)], []])
    assert got == {"box_hit_rate": None, "mean_iou": None, "n_regions": 0}
    with pytest.raises(ValueError, match="one list of boxes per mask"):
        box_hit_rate(np.zeros((2, 5, 5), dtype=bool), [[]])


def test_auroc_standard_error_matches_the_bootstrap():
    # Hanley & McNeil's formula against a bootstrap of one test set of the size notebook 06 scores.
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(36), np.zeros(20)].astype(int)
    scores = rng.normal(size=56) + 1.2 * labels
    auroc = roc_auc_score(labels, scores)
    boot = []
    for _ in range(400):
        pos = rng.choice(np.flatnonzero(labels == 1), 36)
        neg = rng.choice(np.flatnonzero(labels == 0), 20)
        idx = np.r_[pos, neg]
        boot.append(roc_auc_score(labels[idx], scores[idx]))
    se = auroc_standard_error(auroc, 36, 20)
    assert 0.7 < se / np.std(boot) < 1.3, (se, np.std(boot))
    assert auroc_standard_error(auroc, 360, 200) < se  # ten times the images: a smaller error
    assert auroc_standard_error(1.0, 36, 20) == 0.0
    with pytest.raises(DataError, match="at least one"):
        auroc_standard_error(0.7, 0, 20)


def test_seed_spread_says_mean_and_std_only_over_several_seeds():
    assert seed_spread([0]) == "one seed (0), no spread"
    assert seed_spread([2, 0, 1, 0]) == "mean ± std over 3 seeds [0, 1, 2]"
    assert seed_spread([]) == "seed not recorded"
