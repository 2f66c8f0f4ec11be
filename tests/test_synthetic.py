"""Tests for the embedded synthetic dataset: layout, determinism, exact masks, atomic writing."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from visinspect.data import synthetic
from visinspect.data.drawing import CATEGORIES, OBJECTS, TEXTURES, render_sample
from visinspect.data.synthetic import STAMP_NAME, ensure_synthetic_dataset, generate_synthetic_dataset
from visinspect.errors import DataError, VisinspectError

SMALL = {"image_size": 64, "n_train_good": 2, "n_test_good": 2, "n_test_per_defect": 2}
MVTEC_AD = {"bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
            "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper"}
ALL_DEFECTS = [(c, d) for c, defects in CATEGORIES.items() for d in defects]


def files(root: Path) -> dict[str, bytes]:
    """Every file under root (hidden ones included) by relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    return generate_synthetic_dataset(tmp_path_factory.mktemp("synth") / "data", seed=3, **SMALL)


def test_categories_are_textures_or_objects_and_not_mvtec_names():
    assert set(TEXTURES) | set(OBJECTS) == set(CATEGORIES)
    assert not set(TEXTURES) & set(OBJECTS)
    assert not set(CATEGORIES) & MVTEC_AD
    assert all(len(defects) >= 3 and "good" not in defects for defects in CATEGORIES.values())


def test_layout_and_counts(small_root):
    assert names(small_root) == sorted([*CATEGORIES, "README.md", STAMP_NAME])
    for category, defects in CATEGORIES.items():
        base = small_root / category
        assert names(base) == ["ground_truth", "test", "train"]
        assert names(base / "train") == ["good"]
        assert names(base / "train" / "good") == ["000.png", "001.png"]
        assert names(base / "test") == sorted(["good", *defects])
        assert names(base / "ground_truth") == sorted(defects)  # good images have no masks
        for defect in defects:
            assert names(base / "test" / defect) == ["000.png", "001.png"]
            assert names(base / "ground_truth" / defect) == ["000_mask.png", "001_mask.png"]
            image = cv2.imread(str(base / "test" / defect / "001.png"), cv2.IMREAD_UNCHANGED)
            mask = cv2.imread(str(base / "ground_truth" / defect / "001_mask.png"),
                              cv2.IMREAD_UNCHANGED)
            assert image.shape == (64, 64, 3) and image.dtype == np.uint8
            assert mask.shape == (64, 64) and mask.dtype == np.uint8


def test_readme_and_stamp_describe_the_data(small_root):
    readme = (small_root / "README.md").read_text(encoding="utf-8")
    assert "synthetic" in readme.lower() and "visinspect" in readme
    assert "seed 3" in readme and f"{6 * (2 + 2 + 3 * 2)} images" in readme
    stamp = json.loads((small_root / STAMP_NAME).read_text(encoding="utf-8"))
    assert stamp["seed"] == 3 and stamp["image_size"] == 64
    assert stamp["categories"] == list(CATEGORIES)


def test_masks_are_binary_nonempty_and_small_to_medium(small_root):
    masks = sorted(small_root.glob("*/ground_truth/*/*_mask.png"))
    assert len(masks) == 2 * sum(len(d) for d in CATEGORIES.values())
    for path in masks:
        mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        assert set(np.unique(mask)) == {0, 255}, path
        assert 0.005 <= (mask == 255).mean() <= 0.1, path


def test_same_seed_gives_identical_files_and_another_seed_differs(small_root, tmp_path):
    again = generate_synthetic_dataset(tmp_path / "again", seed=3, **SMALL)
    assert files(again) == files(small_root)
    other = files(generate_synthetic_dataset(tmp_path / "other", seed=4, **SMALL))
    same = files(small_root)
    pngs = [k for k in same if k.endswith(".png") and "ground_truth" not in k]
    assert all(other[k] != same[k] for k in pngs)


def test_images_do_not_depend_on_which_categories_are_generated(small_root, tmp_path):
    alone = generate_synthetic_dataset(tmp_path / "nut", seed=3, categories=["hex_nut"], **SMALL)
    assert files(alone / "hex_nut") == files(small_root / "hex_nut")


@pytest.mark.parametrize(("category", "defect"), ALL_DEFECTS)
def test_defect_changes_exactly_the_masked_pixels(category, defect):
    for seed in range(4):
        image, mask = render_sample(category, defect, seed, image_size=64)
        clean, no_mask = render_sample(category, None, seed, image_size=64)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and mask.dtype == bool
        assert not no_mask.any()
        changed = (image != clean).any(axis=-1)
        assert not (changed & ~mask).any(), "defect changed pixels outside its mask"
        assert changed[mask].mean() > 0.9, "most masked pixels must really change"
        near_change = cv2.dilate(changed.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        assert not (mask & ~near_change).any(), "mask reaches more than 1 px past the defect"


def test_good_images_vary_in_pose_and_lighting():
    first, second = (render_sample("hex_nut", None, seed, 64)[0] for seed in (0, 1))
    assert np.abs(first.astype(int) - second.astype(int)).mean() > 5
    assert first.std() > 10  # structured, not a flat colour


def test_mean_colour_does_not_separate_good_from_defective(tmp_path):
    # Measured in-sample AUROC of a logistic regression on mean RGB (seed 0): 0.56–0.66 for
    # every category; a trivially separable dataset would be close to 1.
    root = generate_synthetic_dataset(tmp_path / "d", categories=["grain_wood", "round_pill"])
    for category in ("grain_wood", "round_pill"):
        paths = sorted((root / category / "test").glob("*/*.png"))
        paths += sorted((root / category / "train" / "good").glob("*.png"))
        x = np.array([cv2.imread(str(p)).reshape(-1, 3).mean(0) for p in paths])
        y = np.array([p.parent.name != "good" for p in paths])
        fit = LogisticRegression().fit(x, y)
        assert roc_auc_score(y, fit.predict_proba(x)[:, 1]) < 0.8, category


def test_unknown_names_raise_data_error_listing_the_known_ones(tmp_path):
    with pytest.raises(DataError, match="known: grain_wood, grain_leather"):
        generate_synthetic_dataset(tmp_path / "d", categories=["wood"], **SMALL)
    with pytest.raises(DataError, match="hex_nut"):
        render_sample("metal_nut", None, 0)
    with pytest.raises(DataError, match="known: crack, scratch, stain"):
        render_sample("hex_nut", "hole", 0)
    with pytest.raises(VisinspectError, match="seed"):
        render_sample("hex_nut", None, -1)
    assert names(tmp_path) == []  # nothing written, no temporary folder left behind


def test_refuses_a_non_empty_folder_unless_overwrite(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(VisinspectError, match=r"data.*overwrite=True"):
        generate_synthetic_dataset(out, **SMALL, categories=["round_pill"])
    assert names(out) == ["keep.txt"]
    generate_synthetic_dataset(out, **SMALL, categories=["round_pill"], overwrite=True)
    assert names(out) == sorted(["README.md", STAMP_NAME, "round_pill"])
    assert names(tmp_path) == ["data"]  # no temporary or old folders left behind


def test_an_empty_folder_is_filled_and_a_file_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    generate_synthetic_dataset(tmp_path / "empty", **SMALL, categories=["bottle_top"])
    assert (tmp_path / "empty" / "bottle_top" / "train" / "good" / "000.png").is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(VisinspectError, match="is a file"):
        generate_synthetic_dataset(tmp_path / "file", **SMALL)


def test_interrupted_generation_leaves_no_partial_dataset(tmp_path, monkeypatch):
    real_write, written = synthetic._write_png, []

    def failing_write(path, array):
        if len(written) == 5:
            raise OSError("disk full")
        written.append(path)
        real_write(path, array)

    monkeypatch.setattr(synthetic, "_write_png", failing_write)
    with pytest.raises(OSError, match="disk full"):
        generate_synthetic_dataset(tmp_path / "data", **SMALL)
    assert names(tmp_path) == []


@pytest.fixture
def small_defaults(monkeypatch):
    """Make ensure_synthetic_dataset's default dataset tiny so these tests stay fast."""
    monkeypatch.setitem(synthetic._DEFAULTS, "image_size", 32)
    for key in ("n_train_good", "n_test_good", "n_test_per_defect"):
        monkeypatch.setitem(synthetic._DEFAULTS, key, 1)


def test_ensure_generates_once_then_regenerates_when_stale(tmp_path, small_defaults):
    root = ensure_synthetic_dataset(tmp_path / "data", seed=1)
    image = root / "hex_nut" / "test" / "crack" / "000.png"
    before = image.stat().st_ino, image.read_bytes()
    assert ensure_synthetic_dataset(root, seed=1) == root
    assert image.stat().st_ino == before[0]  # untouched, not rewritten
    ensure_synthetic_dataset(root, seed=2)  # stamp differs: replaced atomically
    assert json.loads((root / STAMP_NAME).read_text())["seed"] == 2
    assert image.read_bytes() != before[1]
    assert names(tmp_path) == ["data"]


def test_ensure_refuses_a_folder_that_is_not_a_synthetic_dataset(tmp_path, small_defaults):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "photo.png").write_bytes(b"x")
    with pytest.raises(VisinspectError, match="not a visinspect synthetic dataset"):
        ensure_synthetic_dataset(tmp_path / "mine")
    assert names(tmp_path / "mine") == ["photo.png"]


def test_ensure_keeps_the_dataset_of_a_concurrent_call_that_finished_first(
        tmp_path, small_defaults, monkeypatch):
    real_build = synthetic._build
    rival: list[int] = []

    def racing_build(out, stamp):
        tmp = real_build(out, stamp)
        if not rival:  # another process publishes while this one is still building
            rival.append(0)
            ensure_synthetic_dataset(out)
            rival.append((out / "README.md").stat().st_ino)
        return tmp

    monkeypatch.setattr(synthetic, "_build", racing_build)
    root = ensure_synthetic_dataset(tmp_path / "data")
    assert (root / "README.md").stat().st_ino == rival[1]  # the winner's files were kept
    assert json.loads((root / STAMP_NAME).read_text())["seed"] == 0
    assert names(tmp_path) == ["data"]  # the loser's temporary folder was removed
