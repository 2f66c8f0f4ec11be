"""The comparison end to end on tiny synthetic data, and the calibration CLI."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from visinspect import cli
from visinspect.backbones.cam import HeatmapNormalizer
from visinspect.calibration import Calibration, load_calibration, save_calibration
from visinspect.data.samples import build_sample_table
from visinspect.errors import ConfigError
from visinspect.experiments import compare
from visinspect.experiments.compare import ComparePreset, run_comparison
from visinspect.experiments.tables import pivot_table, summary_table
from visinspect.methods.base import calibrated_view
from visinspect.methods.simclr import training as simclr_training
from visinspect.methods.simclr.levers import LEVER_SETS, LEVERS
from visinspect.methods.simclr.pretrain import PretrainConfig
from visinspect.scoring import ScoredImages

TINY_PRESET = ComparePreset(
    "tiny", image_size=32, epochs=1,
    pretrain=PretrainConfig.demo(epochs=1, image_size=32, batch_size=4, max_images=8),
)


@pytest.fixture(scope="module")
def comparison(tiny_root):
    return run_comparison([tiny_root], ["grain_wood"], ["round_pill"], seeds=[0], preset=TINY_PRESET,
                          calibrate=[2], weights="random", log=lambda m: None)


@pytest.mark.slow
def test_comparison_rows_cover_every_model_and_target(comparison):
    rows, first = comparison
    models = {r["model"] for r in rows}
    assert models == {
        "baseline", "simclr-source", "simclr-source+target-good",
        "baseline calibrated k=2", "simclr-source calibrated k=2",
        "simclr-source+target-good calibrated k=2", "reference k=2", "fused k=2",
    }
    assert {r["target"] for r in rows} == {"all", "round_pill"}
    for r in rows:
        assert r["positive_class"] == "anomaly"
        assert 0.0 <= r["image_auroc"] <= 1.0
        assert {"f1", "balanced_accuracy", "precision", "recall", "average_precision"} <= set(r)
    # Every model is scored on the same images: the targets' test/ folder, never train/good
    # (which SimCLR and the calibration may use).
    paths = {name: [str(s.path) for s in sc.samples] for name, sc in first.scored.items()}
    assert len({tuple(p) for p in paths.values()}) == 1
    test_paths = next(iter(paths.values()))
    assert all("/test/" in p for p in test_paths)
    n_test = {r["n_images"] for r in rows if r["target"] == "round_pill"}
    assert n_test == {2 + 6}  # round_pill's test/: 2 good and 2 of each of its 3 defect types


@pytest.mark.slow
def test_summary_table_states_positive_class_and_all_models(comparison):
    rows, _ = comparison
    table = summary_table(rows + [{**r, "seed": 1} for r in rows])
    assert "positive class = anomaly" in table
    assert "± 0.000" in table  # two identical seeds: zero spread
    assert table.count("| round_pill |") == len({r["model"] for r in rows})


def test_tables_say_when_a_cell_has_fewer_seeds():
    """A method added to a run for one seed must not pass for a mean over all of them."""
    row = {"target": "bottle", "n_images": 10, "image_auroc": 0.5}
    rows = [{**row, "model": "baseline", "seed": s, "image_auroc": 0.5 + s / 10} for s in range(3)]
    rows.append({**row, "model": "residual", "seed": 0})
    pivot = pivot_table(rows)
    assert "| bottle | 10 | 0.600 ± 0.100 | 0.500 (1 seed) |" in pivot
    by_model = pivot_table(rows, by_model=True)  # methods down, targets across: narrow
    assert "| method | bottle (10) |" in by_model
    assert "| baseline | 0.600 ± 0.100 |" in by_model and "| residual | 0.500 (1 seed) |" in by_model
    summary = summary_table(rows, ["image_auroc"])
    assert "| bottle | baseline | 10 | 0.600 ± 0.100 |" in summary
    assert "| bottle | residual | 10 | 0.500 (1 seed) |" in summary


def test_calibrated_view_shifts_scores_and_scales_maps(tiny_root):
    from visinspect.data.samples import build_sample_table

    samples = build_sample_table(tiny_root).samples[:4]
    scored = ScoredImages(samples, np.array([1.0, 2.0, 3.0, 4.0]), torch.ones(4, 2, 2) * 3.0, 64)
    cals = {
        c: Calibration(c, 2, 0.01, threshold=1.5, rule="quantile",
                       normalizer=HeatmapNormalizer(1.0, 5.0))
        for c in {s.category for s in samples}
    }
    view = calibrated_view(scored, cals)
    np.testing.assert_allclose(view.scores, [-0.5, 0.5, 1.5, 2.5])
    torch.testing.assert_close(view.maps, torch.full((4, 2, 2), 0.5))


def test_preset_names():
    sizes = [ComparePreset.named(n).image_size for n in ("demo", "medium", "full")]
    assert sizes == sorted(sizes) and sizes[-1] == 224
    assert ComparePreset.named("full").max_source_per_category is None  # full: every image
    with pytest.raises(ValueError, match="preset"):
        ComparePreset.named("huge")


@pytest.mark.slow
def test_compare_cli_writes_json_rows(tiny_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compare.ComparePreset, "demo", classmethod(lambda cls: TINY_PRESET))
    out = tmp_path / "rows.json"
    code = cli.main(["compare", "--data", str(tiny_root), "--source", "grain_wood", "--target",
                     "round_pill", "--json", str(out), "--backbone-weights", "random",
                     "--figures", str(tmp_path / "fig")])
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert {"model", "seed", "target", "image_auroc", "f1"} <= set(rows[0])
    # No K values: only the methods that use no good images.
    assert {r["model"] for r in rows} == {"baseline", "simclr-source", "simclr-source+target-good"}
    assert "positive class = anomaly" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "fig").iterdir()) == [
        "compare_f1.png", "compare_heatmaps.png", "compare_image_auroc.png"]


@pytest.mark.precision
@pytest.mark.slow
def test_evaluate_calibrate_uses_only_good_train_images(tiny_root, tmp_path, capsys):
    ckpt = tmp_path / "m.pt"
    assert cli.main(["train", "--data", str(tiny_root), "--categories", "grain_wood", "--method", "baseline",
                     "--image-size", "32",
                     "--epochs", "1", "--backbone-weights", "random", "--out", str(ckpt)]) == 0
    out = tmp_path / "e.json"
    assert cli.main(["evaluate", "--checkpoint", str(ckpt), "--data", str(tiny_root), "--categories",
                     "round_pill", "--calibrate", "3", "--json", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    cal = report["calibration"]
    assert cal["k"] == 3 and cal["false_alarm_rate"] == 0.01
    images = cal["images"]["round_pill"]
    assert len(images) == 3 and all("/train/good/" in p for p in images)
    assert cal["outliers"] == {"round_pill": []}  # none with fewer than 10 good images
    assert cal["rule"] == "fenced" and "rule 'fenced'" in report["threshold_rule"]
    assert report["n_images"] == 12 - 3 and report["uncalibrated"]["n_images"] == 12 - 3
    assert {"threshold", "f1", "balanced_accuracy"} <= set(report["uncalibrated"])
    saved = load_calibration(cal["file"])
    assert saved["round_pill"].images == images
    # predict with that calibration scores relative to the product's threshold
    images_dir = tiny_root / "round_pill" / "test" / "good"
    code = cli.main(["predict", "--checkpoint", str(ckpt), str(images_dir), "--out", str(tmp_path / "pred"),
                     "--no-overlays", "--calibration", cal["file"]])
    assert code == 0
    assert cli.main(["predict", "--checkpoint", str(ckpt), str(images_dir), "--out", str(tmp_path / "plain"),
                     "--no-overlays", "--method", "baseline"]) == 0

    def rows(folder):
        return [json.loads(x) for x in (tmp_path / folder / "predictions.jsonl").read_text().splitlines()]

    threshold = saved["round_pill"].threshold
    for cal_row, plain in zip(rows("pred"), rows("plain"), strict=True):
        assert cal_row["method"] == "baseline calibrated" and cal_row["threshold"] == 0.0
        assert cal_row["score"] == pytest.approx(plain["score"] - threshold, abs=2e-4)
        assert cal_row["label"] == int(cal_row["score"] > 0)
    # a calibration file that set a good image aside names it again when predict reads it
    odd = tmp_path / "odd.json"
    save_calibration(odd, [dataclasses.replace(saved["round_pill"], outliers=[images[0]])])
    capsys.readouterr()
    assert cli.main(["predict", "--checkpoint", str(ckpt), str(images_dir), "--out", str(tmp_path / "odd"),
                     "--no-overlays", "--calibration", str(odd)]) == 0
    assert f"check that it is good: {images[0]}" in capsys.readouterr().out


@pytest.fixture(scope="module")
def split(tiny_root):
    """A split of the tiny data, built once for the tests that only need one to train from."""
    table = build_sample_table([tiny_root]).samples
    return compare.make_split(table, ["grain_wood"], ["round_pill"], 0, TINY_PRESET, (), lambda m: None)


class _Stop(Exception):
    """Raised by a stand-in for pretrain once it has seen what it was asked to do."""


@pytest.mark.parametrize("lever", sorted(LEVER_SETS))
def test_lever_variants_pretrain_with_their_lever_on_the_target_good_images(lever, split, monkeypatch):
    seen = {}

    def record(model, images, config, **kwargs):
        seen.update(images=images, config=config)
        raise _Stop

    monkeypatch.setattr(simclr_training, "pretrain", record)
    with pytest.raises(_Stop):
        compare.train_variant(f"simclr+{lever}", split, TINY_PRESET, weights="random")
    config = seen["config"]
    assert {k: getattr(config, k) for k in LEVER_SETS[lever]} == LEVER_SETS[lever]
    others = [k for k in LEVERS if k not in LEVER_SETS[lever]]
    assert all(getattr(config, k) == getattr(TINY_PRESET.pretrain, k) for k in others)  # one lever only
    # The unknown-context setting of plain "simclr-source+target-good": the target's good train images.
    assert {(s.category, s.split, s.label) for s in seen["images"] if s.category == "round_pill"} == {
        ("round_pill", "train", 0)}


def test_unknown_training_names_the_lever_variants(split):
    with pytest.raises(ConfigError, match="simclr\\+mean-shifted"):
        compare.train_variant("simclr+nothing", split, TINY_PRESET, weights="random")


def test_a_product_with_fewer_good_images_than_every_k_uses_all_it_has(tiny_root):
    """K values above a target's good train/ images are dropped; when none is left (MVTec leather:
    4 good images against K = 5, 20, 50) the target is adapted to all of them instead."""
    table = build_sample_table([tiny_root]).samples
    have = sum(s.category == "round_pill" and s.split == "train" and s.label == 0 for s in table)
    said = []
    split = compare.make_split(table, ["grain_wood"], ["round_pill"], 0, TINY_PRESET, (have + 1, have + 5),
                               said.append)
    assert split.ks == [have] and len(split.good["round_pill"]) == have
    assert f"K = {have} instead" in said[0]
    split = compare.make_split(table, ["grain_wood"], ["round_pill"], 0, TINY_PRESET, (2, have + 1),
                               said.append)
    assert split.ks == [2] and "left out" in said[-1]  # a K that fits: the larger one is only dropped
