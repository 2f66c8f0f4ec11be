"""Tests for visinspect.calibration: good train images only, thresholds, normaliser, JSON files."""

import json

import numpy as np
import pytest
import torch

from visinspect.backbones.cam import HeatmapNormalizer
from visinspect.backbones.vgg16 import VGG16CAM
from visinspect.calibration import (
    BOX_THRESHOLD,
    Calibration,
    calibrate_classifier,
    default_calibration_path,
    fit_calibration,
    fit_good_normalizer,
    good_outliers,
    load_calibration,
    outlier_note,
    save_calibration,
    select_good_images,
)
from visinspect.data.samples import build_sample_table
from visinspect.data.synthetic import generate_synthetic_dataset
from visinspect.errors import CheckpointError, DataError

SIZE = 64
CATEGORIES = ["bottle_top", "grain_wood"]


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = generate_synthetic_dataset(
        tmp_path_factory.mktemp("synth") / "data",
        image_size=SIZE,
        n_train_good=6,
        n_test_good=2,
        n_test_per_defect=2,
        categories=CATEGORIES,
    )
    return build_sample_table(root).samples


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return VGG16CAM()


def _calibration(**overrides) -> Calibration:
    scores = np.arange(10.0)
    cams = torch.rand(10, 4, 4, generator=torch.Generator().manual_seed(0))
    kwargs = {"category": "x", "images": [f"x/train/good/{i:03d}.png" for i in range(10)]}
    return fit_calibration(scores, cams, **(kwargs | overrides))


def test_select_good_images_takes_only_train_good_of_the_category(samples):
    chosen = select_good_images(samples, "bottle_top", k=4, seed=1)
    assert len(chosen) == 4 == len({s.path for s in chosen})
    assert all(s.category == "bottle_top" and s.split == "train" and s.label == 0 for s in chosen)
    assert chosen == select_good_images(samples, "bottle_top", k=4, seed=1)  # seeded
    assert [str(s.path) for s in chosen] == sorted(str(s.path) for s in chosen)
    every = select_good_images(samples, "bottle_top", k=6)
    assert {s.path.parent.name for s in every} == {"good"}
    assert {s.path.parent.parent.name for s in every} == {"train"}


def test_select_good_images_refuses_too_few_or_none(samples):
    with pytest.raises(DataError, match="only 6 good image"):
        select_good_images(samples, "bottle_top", k=7)
    with pytest.raises(DataError, match="no good images in train"):
        select_good_images([s for s in samples if s.split == "test"], "bottle_top", k=1)
    with pytest.raises(DataError, match="at least 1"):
        select_good_images(samples, "bottle_top", k=0)


def test_calibrate_classifier_refuses_test_images(samples, model):
    good = select_good_images(samples, "bottle_top", k=3)
    test_good = next(s for s in samples if s.split == "test" and s.label == 0)
    defect = next(s for s in samples if s.label == 1)
    for intruder in (test_good, defect):
        with pytest.raises(DataError, match="never test images") as err:
            calibrate_classifier(model, [*good, intruder], image_size=SIZE)
        assert str(intruder.path) in str(err.value)
    other = select_good_images(samples, "grain_wood", k=1)
    with pytest.raises(DataError, match="one product"):
        calibrate_classifier(model, [*good, *other], image_size=SIZE)


def test_calibrate_classifier_records_exactly_its_images(samples, model, tmp_path):
    good = select_good_images(samples, "bottle_top", k=3)
    calib = calibrate_classifier(model, good, image_size=SIZE, batch_size=2, precision="fp32")
    assert calib.category == "bottle_top" and calib.k == 3
    assert calib.images == [str(s.path) for s in good]
    path = save_calibration(tmp_path / "model.calib-k3.json", [calib])
    stored = json.loads(path.read_text())["calibrations"]["bottle_top"]["images"]
    assert stored == [str(s.path) for s in good]


def test_quantile_threshold_is_the_expected_order_statistic():
    scores = np.arange(100.0)
    cams = torch.zeros(100, 2, 2)
    images = [str(i) for i in range(100)]
    # 1 % of 100 good images may be flagged: the 2nd largest score (98), so only 99 is above it.
    assert fit_calibration(scores, cams, category="c", images=images).threshold == 98.0
    five = fit_calibration(scores, cams, category="c", images=images, false_alarm_rate=0.05)
    assert five.threshold == 94.0 and (scores > five.threshold).sum() == 5
    # With K = 20 < 1 / 0.01, the quantile rule falls back to the largest good score.
    twenty = fit_calibration(scores[:20], cams[:20], category="c", images=images[:20])
    assert twenty.threshold == 19.0


def test_max_margin_rule_and_bad_rule():
    calib = _calibration(rule="max_margin", margin=0.5)
    assert calib.threshold == 9.5 and calib.rule == "max_margin" and calib.margin == 0.5
    with pytest.raises(DataError, match="rule must be"):
        _calibration(rule="median")
    with pytest.raises(DataError, match="one score, one map and one image path"):
        _calibration(images=["only_one.png"])


def test_the_fenced_rule_sets_aside_good_scores_far_above_the_others():
    cams = torch.zeros(20, 2, 2)
    images = [f"{i}.png" for i in range(20)]
    scores = np.r_[np.linspace(10.0, 13.0, 19), 17.6]  # one "good" part scores like a defect
    fenced = fit_calibration(scores, cams, category="c", images=images)
    assert fenced.rule == "fenced" and fenced.threshold == 13.0 and fenced.outliers == ["19.png"]
    plain = fit_calibration(scores, cams, category="c", images=images, rule="quantile")
    assert plain.threshold == 17.6 and plain.outliers == []
    assert "check that it is good: 19.png" in outlier_note(fenced) and outlier_note(plain) is None
    # Stored and read back; a file written before the rule existed reads as no outliers.
    assert Calibration.from_dict(fenced.to_dict()) == fenced
    older = {k: v for k, v in fenced.to_dict().items() if k != "outliers"}
    assert Calibration.from_dict(older).outliers == []
    # Fewer than 10 good images: their quartiles say little, nothing is set aside.
    assert not good_outliers(np.r_[np.ones(8), 100.0]).any()
    assert good_outliers(np.r_[np.ones(9), 100.0]).tolist() == [False] * 9 + [True]
    # Tied scores (interquartile range 0): at most a tenth of the images, the largest.
    tied = np.r_[np.zeros(16), 1.0, 2.0, 3.0, 4.0]
    assert np.flatnonzero(good_outliers(tied)).tolist() == [18, 19]


def test_good_normalizer_keeps_good_parts_below_the_box_threshold():
    cams = torch.randn(20, 14, 14, generator=torch.Generator().manual_seed(0)).exp()
    norm = fit_good_normalizer(cams)
    heat = norm(cams)
    assert (heat == 0).float().mean() >= 0.5
    # Only about 1 in 1000 good values (the top 0.1 %) reaches the box threshold.
    assert (heat > BOX_THRESHOLD).sum() <= np.ceil(0.001 * heat.numel())
    # The median of good values maps to 0 and their 99.9th percentile to the box threshold.
    levels = torch.quantile(cams.flatten(), torch.tensor([0.5, 0.999]))
    torch.testing.assert_close(norm(levels), torch.tensor([0.0, BOX_THRESHOLD]))
    hotter = cams.max() * 2  # a defect twice as hot as the hottest good pixel stands out
    assert norm(hotter.view(1, 1, 1)).item() > BOX_THRESHOLD


def test_calibration_json_round_trip(tmp_path):
    a, b = _calibration(category="a"), _calibration(category="b", rule="max_margin", margin=1.0)
    path = save_calibration(tmp_path / "sub" / "c.json", {"a": a, "b": b})
    text = path.read_text()
    assert text.startswith("{\n  ")  # indented, human-readable
    loaded = load_calibration(path)
    assert loaded == {"a": a, "b": b}
    assert isinstance(loaded["a"].normalizer, HeatmapNormalizer)
    assert not list(path.parent.glob(".*.tmp"))  # atomic write left no temporary file


def test_load_calibration_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_calibration(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read calibration file"):
        load_calibration(bad)
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="not a visinspect calibration"):
        load_calibration(bad)
    good = save_calibration(tmp_path / "ok.json", [_calibration()])
    data = json.loads(good.read_text())
    del data["calibrations"]["x"]["threshold"]
    bad.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"malformed.*threshold"):
        load_calibration(bad)
    with pytest.raises(DataError, match="two calibrations"):
        save_calibration(tmp_path / "dup.json", [_calibration(), _calibration()])


def test_default_calibration_path_sits_next_to_the_checkpoint(tmp_path):
    assert default_calibration_path(tmp_path / "run" / "model.pt", 20) == (
        tmp_path / "run" / "model.calib-k20.json"
    )
    assert default_calibration_path("best", 5).name == "best.calib-k5.json"
