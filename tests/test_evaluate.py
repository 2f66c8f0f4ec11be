"""Tests for the evaluation report: keys, AUROC on logit margins, thresholds, the markdown table."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from visinspect.backbones.cam import HeatmapNormalizer
from visinspect.data.samples import Sample
from visinspect.errors import ConfigError
from visinspect.evaluate import (
    evaluate_predictions,
    localisation_metrics,
    markdown_table,
    probability_to_margin,
    validation_threshold,
)
from visinspect.metrics import best_f1_threshold
from visinspect.scoring import Predictions
from visinspect.utils import round_floats

SIZE = 32
REQUIRED = {"n_images", "n_anomalous", "positive_class", "threshold", "accuracy", "balanced_accuracy",
            "precision", "recall", "f1", "image_auroc", "average_precision", "confusion_matrix",
            "per_category", "per_defect_type", "pixel_auroc", "aupro", "box_hit_rate"}


def fake_samples(folder: Path) -> list[Sample]:
    """Two categories of 4 good and 4 defective images; one defect per category has no mask."""
    samples = []
    for category in ("cat_a", "cat_b"):
        for i in range(4):
            samples.append(Sample(folder / f"{category}_good_{i}.png", category, "test", 0, "good", None))
        for i, defect in enumerate(("crack", "crack", "dent", "dent")):
            mask = None
            if i < 3:
                m = np.zeros((SIZE, SIZE), np.uint8)
                m[4 + 4 * i : 12 + 4 * i, 8:20] = 255
                mask = folder / f"{category}_{i}_mask.png"
                Image.fromarray(m).save(mask)
            samples.append(Sample(folder / f"{category}_{defect}_{i}.png", category, "test", 1, defect, mask))
    return samples


def fake_predictions(folder: Path, logits: torch.Tensor | None = None, seed: int = 0) -> Predictions:
    samples = fake_samples(folder)
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([s.label for s in samples], dtype=torch.float32)
    if logits is None:  # informative but imperfect scores
        noise = torch.randn(len(samples), generator=g)
        logits = torch.stack([torch.zeros(len(samples)), 2 * labels + noise], 1)
    cams = torch.randn(len(samples), 4, 4, generator=g)
    return Predictions(samples, logits, cams, SIZE)


@pytest.fixture
def preds(tmp_path) -> Predictions:
    return fake_predictions(tmp_path)


def test_report_has_every_required_key(preds):
    normalizer = HeatmapNormalizer.fit(preds.heatmaps(mode="raw"))
    report = evaluate_predictions(preds, normalizer=normalizer)
    assert set(report) >= REQUIRED
    assert report["positive_class"] == "anomaly"
    assert report["n_images"] == 16 and report["n_anomalous"] == 8
    assert set(report["confusion_matrix"]) == {"tp", "fn", "fp", "tn"}
    assert sum(report["confusion_matrix"].values()) == 16
    assert set(report["per_category"]) == {"cat_a", "cat_b"}
    assert set(report["per_defect_type"]) == {"cat_a/good", "cat_a/crack", "cat_a/dent",
                                              "cat_b/good", "cat_b/crack", "cat_b/dent"}
    assert report["n_masked_images"] == 6  # the defects without a mask are skipped
    assert 0.0 <= report["pixel_auroc"] <= 1.0 and 0.0 <= report["aupro"] <= 1.0
    assert report["threshold"] == 0.0 and report["threshold_probability"] == 0.5


def test_auroc_is_computed_on_margins(preds):
    report = evaluate_predictions(preds, localisation=False)
    margins = (preds.logits[:, 1] - preds.logits[:, 0]).numpy()
    assert report["image_auroc"] == pytest.approx(roc_auc_score(preds.labels, margins))
    in_a = np.array([s.category == "cat_a" for s in preds.samples])
    assert report["per_category"]["cat_a"]["image_auroc"] == pytest.approx(
        roc_auc_score(preds.labels[in_a], margins[in_a]))
    assert "pixel_auroc" not in report


def test_margins_rank_images_whose_probability_saturates(tmp_path):
    margins = torch.tensor([17.5, 18.0, 18.5, 19.0, 30.0, 31.0, 32.0, 33.0] * 2)  # good, then defective
    logits = torch.stack([torch.zeros(16), margins], 1)
    preds = fake_predictions(tmp_path, logits)
    assert (preds.probabilities == 1.0).all()
    assert roc_auc_score(preds.labels, preds.probabilities) == 0.5
    assert evaluate_predictions(preds, localisation=False)["image_auroc"] == 1.0


def test_threshold_decides_on_the_margin(preds):
    margins = preds.margins
    threshold = float(np.median(margins))
    cm = evaluate_predictions(preds, threshold, localisation=False)["confusion_matrix"]
    predicted = margins > threshold
    assert cm["tp"] == int((predicted & (preds.labels == 1)).sum())
    assert cm["fp"] == int((predicted & (preds.labels == 0)).sum())


def test_probability_to_margin():
    assert probability_to_margin(0.5) == 0.0
    assert probability_to_margin(0.9) == pytest.approx(math.log(9.0))
    assert probability_to_margin(0.1) == pytest.approx(-math.log(9.0))
    for p in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match="strictly between 0 and 1"):
            probability_to_margin(p)


def test_validation_threshold(preds):
    assert validation_threshold(preds) == best_f1_threshold(preds.labels, preds.margins)
    good_only = preds.subset([i for i, s in enumerate(preds.samples) if s.label == 0])
    assert validation_threshold(good_only) == 0.0


def test_no_masked_defects_means_no_localisation_metrics(preds):
    good_only = preds.subset([i for i, s in enumerate(preds.samples) if s.label == 0])
    assert localisation_metrics(good_only) == {}
    report = evaluate_predictions(good_only)
    assert report["image_auroc"] is None and "pixel_auroc" not in report


def test_markdown_table_states_the_positive_class(preds):
    text = markdown_table(evaluate_predictions(preds, heat_mode="image"), title="Test. ")
    assert text.startswith("Test. positive class = anomaly; 16 images, 8 anomalous")
    assert "| image_auroc |" in text and "| pixel_auroc |" in text
    assert "| cat_a | 8 | 4 |" in text and "| cat_b | 8 | 4 |" in text
    assert "confusion (TP / FN / FP / TN)" in text
    alone = markdown_table(evaluate_predictions(preds, heat_mode="image"), per_category=False)
    assert "| cat_a |" not in alone and alone in text


def test_round_floats():
    assert round_floats({"a": [1.23456789, float("nan")], "b": (2, "x"), "c": float("inf")}, 3) == {
        "a": [1.235, None], "b": [2, "x"], "c": None}
