"""Tests for the sample table, its errors, image reading, splits and the torch Dataset."""

import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import TINY, TINY_CATEGORIES, TINY_PER_CATEGORY

from visinspect.data import samples as data  # the module itself: tests patch its constants
from visinspect.data.drawing import CATEGORIES
from visinspect.data.samples import (
    DefectDataset,
    Sample,
    build_sample_table,
    denormalize,
    load_mask,
    load_rgb,
    stratified_split,
    subsample_per_category,
    summarize,
    target_test_images,
    to_tensor,
    unknown_context_split,
)
from visinspect.errors import DataError


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def rgb(value: int = 128, size: int = 16) -> np.ndarray:
    return np.full((size, size, 3), value, np.uint8)


def make_category(root: Path, name: str, n_good: int = 2, defects: dict | None = None) -> Path:
    """A hand-made category: n_good train images, and per defect type n images with masks."""
    folder = root / name
    for i in range(n_good):
        write_png(folder / "train" / "good" / f"{i:03d}.png", rgb(10 * i))
    for defect, n in (defects or {}).items():
        for i in range(n):
            write_png(folder / "test" / defect / f"{i:03d}.png", rgb(200))
            mask = np.full((16, 16), 255, np.uint8)
            write_png(folder / "ground_truth" / defect / f"{i:03d}_mask.png", mask)
    return folder


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root with its kind, size and modification time."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.stat()
        out[str(p.relative_to(root))] = (p.is_dir(), st.st_size if p.is_file() else 0, st.st_mtime_ns)
    return out


# ----------------------------------------------------------------------------- the table


def test_table_counts_per_category_split_and_defect_type(tiny_root):
    table = build_sample_table(tiny_root)
    n_per_category = sum(TINY_PER_CATEGORY.values())
    assert len(table) == n_per_category * len(TINY_CATEGORIES)
    assert table.categories == sorted(TINY_CATEGORIES)
    assert table.stray_files == [] and table.missing_masks == []
    n = TINY["n_test_per_defect"]
    for category, s in summarize(table.samples).items():
        assert s["good"] == TINY_PER_CATEGORY["train_good"] + TINY_PER_CATEGORY["test_good"]
        assert s["anomaly"] == s["masks"] == TINY_PER_CATEGORY["anomaly"]
        assert s["defect_types"] == dict.fromkeys(sorted(CATEGORIES[category]), n)
        assert s["splits"] == {
            "train": {"good": TINY_PER_CATEGORY["train_good"], "anomaly": 0},
            "test": {"good": TINY_PER_CATEGORY["test_good"], "anomaly": TINY_PER_CATEGORY["anomaly"]},
        }


def test_table_order_labels_and_mask_pairing(tiny_root):
    samples = build_sample_table(tiny_root).samples
    split_rank = {"train": 0, "test": 1}
    key = [(s.category, split_rank[s.split], s.defect_type, s.path.name) for s in samples]
    assert key == sorted(key)
    assert samples == build_sample_table(tiny_root).samples  # the same table every time
    for s in samples:
        assert s.path.parent == tiny_root / s.category / s.split / s.defect_type
        assert s.label == (0 if s.defect_type == "good" else 1)  # 1 = anomaly
        if s.label == 0:
            assert s.mask_path is None
        else:
            expected = tiny_root / s.category / "ground_truth" / s.defect_type / f"{s.path.stem}_mask.png"
            assert s.mask_path == expected and expected.is_file()


@pytest.mark.parametrize("split", ["train", "test", "all"])
def test_split_selects_the_folder(tiny_root, split):
    samples = build_sample_table(tiny_root, split=split).samples
    per_category = {"train": TINY_PER_CATEGORY["train_good"],
                    "test": TINY_PER_CATEGORY["test_good"] + TINY_PER_CATEGORY["anomaly"],
                    "all": sum(TINY_PER_CATEGORY.values())}[split]
    assert len(samples) == per_category * len(TINY_CATEGORIES)
    assert {s.split for s in samples} == ({"train", "test"} if split == "all" else {split})


def test_bad_split_name(tiny_root):
    with pytest.raises(DataError, match="'validation'"):
        build_sample_table(tiny_root, split="validation")


def test_categories_selects_and_deduplicates(tiny_root):
    table = build_sample_table(tiny_root, categories=["round_pill", "round_pill"])
    assert table.categories == ["round_pill"]
    assert len(table) == sum(TINY_PER_CATEGORY.values())


def test_nothing_under_the_data_root_is_written(tiny_root):
    before = snapshot(tiny_root)
    table = build_sample_table(tiny_root)
    dataset = DefectDataset(table.samples, image_size=32)
    for i in range(len(dataset)):
        dataset[i]
    assert snapshot(tiny_root) == before


# ----------------------------------------------------------------------------- layout errors


def test_missing_root_names_it_and_says_how_to_get_data(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        build_sample_table(missing)
    assert str(missing) in str(err.value)
    assert "visinspect synth" in str(err.value) and "download" in str(err.value)


def test_root_without_categories(tmp_path):
    (tmp_path / "cache").mkdir()
    with pytest.raises(DataError, match="no category folder"):
        build_sample_table(tmp_path)


def test_unknown_category_lists_available_ones(tiny_root):
    with pytest.raises(DataError) as err:
        build_sample_table(tiny_root, categories=["bottle"])
    assert "bottle" in str(err.value)
    assert all(c in str(err.value) for c in TINY_CATEGORIES)


def test_empty_category(tmp_path):
    make_category(tmp_path, "full", defects={"crack": 1})
    (tmp_path / "empty" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match=r"'empty'.*has no images"):
        build_sample_table(tmp_path)


def test_category_in_two_roots(tmp_path):
    make_category(tmp_path / "a", "widget", defects={"crack": 1})
    make_category(tmp_path / "b", "widget", defects={"crack": 1})
    with pytest.raises(DataError, match="'widget' exists in two data roots"):
        build_sample_table([tmp_path / "a", tmp_path / "b"])


def test_two_roots_are_merged(tmp_path):
    make_category(tmp_path / "a", "widget", defects={"crack": 1})
    make_category(tmp_path / "b", "gadget", defects={"dent": 2})
    table = build_sample_table([tmp_path / "a", tmp_path / "b"])
    assert table.categories == ["gadget", "widget"]
    assert len(table) == 2 + 2 + 2 + 1


def test_defect_folder_inside_train(tmp_path):
    folder = make_category(tmp_path, "widget", defects={"crack": 1})
    write_png(folder / "train" / "crack" / "000.png", rgb())
    with pytest.raises(DataError, match="defect folder inside train"):
        build_sample_table(tmp_path)


def test_defective_image_without_mask_is_kept_warned_and_counted(tmp_path):
    folder = make_category(tmp_path, "widget", defects={"crack": 2})
    (folder / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.warns(UserWarning, match="1 defective image"):
        table = build_sample_table(tmp_path)
    unmasked = folder / "test" / "crack" / "001.png"
    assert table.missing_masks == [unmasked]
    assert [s.mask_path for s in table.samples if s.path == unmasked] == [None]
    assert summarize(table.samples)["widget"] | {"splits": None} == {
        "good": 2, "anomaly": 2, "masks": 1, "defect_types": {"crack": 2}, "splits": None}


def test_stray_files_are_ignored_and_counted(tmp_path):
    folder = make_category(tmp_path, "widget", defects={"crack": 1})
    strays = [
        folder / "test" / "crack" / "notes.txt",
        folder / "test" / "crack" / ".hidden.png",
        folder / "test" / "readme.md",  # a file where defect folders are expected
        folder / "ground_truth" / "crack" / "009_mask.png",  # a mask without an image
    ]
    for p in strays:
        p.write_bytes(b"x")
    table = build_sample_table(tmp_path)
    assert sorted(table.stray_files) == sorted(strays)
    assert len(table) == 3 and all(s.path not in strays for s in table.samples)


# ----------------------------------------------------------------------------- reading images


def test_mask_of_another_size_is_resized_nearest(tmp_path):
    mask = np.zeros((8, 8), np.uint8)
    mask[:, :4] = 255  # left half
    path = write_png(tmp_path / "m.png", mask)
    out = load_mask(path, (32, 48))
    assert out.shape == (32, 48) and out.dtype == bool
    assert out[:, :24].all() and not out[:, 24:].any()


def test_dataset_resizes_masks_to_the_image_size(tmp_path):
    folder = make_category(tmp_path, "widget", defects={"crack": 1})
    write_png(folder / "ground_truth" / "crack" / "000_mask.png", np.full((7, 5), 255, np.uint8))
    item = DefectDataset(build_sample_table(tmp_path, split="test").samples, image_size=32)[0]
    assert item["mask"].shape == (1, 32, 32) and bool(item["mask"].all())


def test_grayscale_is_converted_to_rgb(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    out = load_rgb(write_png(tmp_path / "g.png", gray))
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    assert all(np.array_equal(out[..., c], gray) for c in range(3))


def test_rgba_composites_transparent_pixels_on_black(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255  # red everywhere, but opaque only in the first row
    rgba[0, :, 3] = 255
    out = load_rgb(write_png(tmp_path / "a.png", rgba))
    assert out.shape == (4, 4, 3)
    assert (out[0] == [255, 0, 0]).all() and (out[1:] == 0).all()


def test_palette_image_with_transparency(tmp_path):
    img = Image.new("P", (4, 2), 1)
    img.putpalette([0, 0, 0, 0, 0, 255, 0, 255, 0] + [0] * (768 - 9))
    img.putpixel((0, 0), 2)
    img.save(tmp_path / "p.png", transparency=2)
    out = load_rgb(tmp_path / "p.png")
    assert out.shape == (2, 4, 3)
    assert (out[0, 0] == 0).all()  # the transparent palette entry (green) becomes black
    assert (out[1, 1] == [0, 0, 255]).all()


def test_16_bit_image_uses_its_full_range(tmp_path):
    a = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 1000 + 5000).astype(np.uint16)
    out = load_rgb(write_png(tmp_path / "d.png", a))
    assert out.shape == (4, 4, 3) and out.dtype == np.uint8
    assert out.min() == 0 and out.max() == 255  # scaled, not clipped to white
    assert (np.diff(out[..., 0].ravel().astype(int)) > 0).all()


def test_cmyk_image(tmp_path):
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.tif")
    out = load_rgb(tmp_path / "c.tif")
    assert out.shape == (4, 4, 3)
    assert (out == [255, 0, 0]).all()


@pytest.mark.parametrize("content", ["corrupt", "truncated", "empty"])
def test_unreadable_image_names_the_file(tmp_path, content):
    good = write_png(tmp_path / "good.png", np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    raw = {"corrupt": os.urandom(500), "truncated": good.read_bytes()[: good.stat().st_size // 2],
           "empty": b""}[content]
    bad = tmp_path / f"{content}.png"
    bad.write_bytes(raw)
    with pytest.raises(DataError) as err:
        load_rgb(bad)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_missing_image_and_mask(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_rgb(tmp_path / "gone.png")
    with pytest.raises(DataError, match="does not exist"):
        load_mask(tmp_path / "gone_mask.png", (8, 8))


def test_too_large_image(tmp_path, monkeypatch):
    path = write_png(tmp_path / "big.png", rgb(size=16))
    monkeypatch.setattr(data, "MAX_PIXELS", 100)
    with pytest.raises(DataError, match="16x16 pixels"):
        load_rgb(path)


def test_dataset_item_shapes_and_normalisation(tiny_root):
    samples = build_sample_table(tiny_root, categories=["grain_wood"], split="test").samples
    dataset = DefectDataset(samples, image_size=32)
    defective = next(i for i, s in enumerate(samples) if s.label == 1)
    item = dataset[defective]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (1, 32, 32) and item["has_mask"] is True
    assert item["label"] == 1 and item["category"] == "grain_wood" and item["index"] == defective
    assert item["mask"].sum() > 0
    # ImageNet normalisation: undoing it gives back the resized image.
    resized = np.asarray(Image.fromarray(load_rgb(samples[defective].path)).resize((32, 32), Image.BILINEAR))
    np.testing.assert_allclose(denormalize(item["image"]), resized / 255.0, atol=1e-5)
    good = dataset[next(i for i, s in enumerate(samples) if s.label == 0)]
    assert good["label"] == 0 and good["has_mask"] is False and good["mask"].sum() == 0


def test_to_tensor_channel_statistics():
    x = to_tensor(np.full((8, 8, 3), 255, np.uint8), 32)
    expected = (1 - torch.tensor(data.IMAGENET_MEAN)) / torch.tensor(data.IMAGENET_STD)
    torch.testing.assert_close(x.mean((1, 2)), expected)


def test_dataset_refuses_tiny_images(tiny_root):
    with pytest.raises(DataError, match="at least 32"):
        DefectDataset([], image_size=16)


# ----------------------------------------------------------------------------- splits


def test_stratified_split_is_deterministic_stratified_and_disjoint(tiny_root):
    samples = build_sample_table(tiny_root).samples
    train, val = stratified_split(samples, 0.25, seed=3)
    assert (train, val) == stratified_split(samples, 0.25, seed=3)
    assert not set(train) & set(val)
    assert sorted(train + val, key=str) == sorted(samples, key=str)
    strata = Counter((s.category, s.defect_type) for s in samples)
    val_strata = Counter((s.category, s.defect_type) for s in val)
    train_strata = Counter((s.category, s.defect_type) for s in train)
    for key, n in strata.items():
        assert val_strata[key] == max(1, round(n * 0.25))
        assert train_strata[key] == n - val_strata[key]


def test_subsample_per_category_caps_big_categories_and_keeps_every_defect_type(tiny_root):
    samples = build_sample_table(tiny_root).samples
    per_category = Counter(s.category for s in samples)
    cap = min(per_category.values()) - 2
    kept = subsample_per_category(samples, cap, seed=1)
    assert kept == subsample_per_category(samples, cap, seed=1)
    assert set(kept) <= set(samples)
    counts = Counter(s.category for s in kept)
    for category in per_category:
        # stratified rounding: within one image per defect type of the cap
        n_types = len({s.defect_type for s in samples if s.category == category})
        assert abs(counts[category] - cap) <= n_types
    assert {(s.category, s.defect_type) for s in kept} == {(s.category, s.defect_type) for s in samples}
    assert subsample_per_category(samples, None) == sorted(samples, key=lambda s: (s.category, str(s.path)))
    with pytest.raises(DataError, match="max_per_category"):
        subsample_per_category(samples, 0)


def test_stratified_split_keeps_one_training_image_per_stratum(tiny_root):
    samples = build_sample_table(tiny_root).samples
    train, _ = stratified_split(samples, 0.9)
    assert {(s.category, s.defect_type) for s in train} == {(s.category, s.defect_type) for s in samples}


def test_stratified_split_depends_on_the_seed(tiny_root):
    samples = build_sample_table(tiny_root).samples
    splits = {tuple(s.path for s in stratified_split(samples, 0.5, seed)[1]) for seed in range(5)}
    assert len(splits) > 1


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_stratified_split_bad_fraction(tiny_root, fraction):
    with pytest.raises(DataError, match="val_fraction"):
        stratified_split(build_sample_table(tiny_root).samples, fraction)


def test_unknown_context_split(tiny_root):
    samples = build_sample_table(tiny_root).samples
    src, tgt = unknown_context_split(samples, ["grain_wood"], ["round_pill"])
    assert {s.category for s in src} == {"grain_wood"} and {s.category for s in tgt} == {"round_pill"}
    assert len(src) + len(tgt) == len(samples)


def test_the_test_set_is_the_targets_test_folders(tiny_root):
    samples = build_sample_table(tiny_root).samples
    _, tgt = unknown_context_split(samples, ["grain_wood"], ["round_pill"])
    test = target_test_images(tgt)
    assert test and all(s.split == "test" and s.category == "round_pill" for s in test)
    assert {s.path for s in tgt} - {s.path for s in test} == {s.path for s in tgt if s.split == "train"}
    assert test == target_test_images(list(reversed(tgt)))  # sorted, whatever the input order


def test_unknown_context_split_refuses_overlap(tiny_root):
    samples = build_sample_table(tiny_root).samples
    with pytest.raises(DataError, match="grain_wood are both source and target"):
        unknown_context_split(samples, ["grain_wood", "round_pill"], ["grain_wood"])


def test_unknown_context_split_unknown_names(tiny_root):
    samples = build_sample_table(tiny_root).samples
    with pytest.raises(DataError, match="bottle are not in the table; available: grain_wood, round_pill"):
        unknown_context_split(samples, ["grain_wood"], ["bottle"])


def test_single_class_source_categories_are_dropped_with_a_warning(tiny_root):
    # round_pill with only its defects, as a partial download would give.
    samples = [s for s in build_sample_table(tiny_root).samples
               if s.category == "grain_wood" or s.label == 1]
    with pytest.warns(UserWarning, match=r"single class.*round_pill"):
        src, _ = unknown_context_split(samples, ["grain_wood", "round_pill"], [])
    assert {s.category for s in src} == {"grain_wood"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept, _ = unknown_context_split(samples, ["grain_wood", "round_pill"], [],
                                        allow_single_class_sources=True)
    assert {s.category for s in kept} == {"grain_wood", "round_pill"}
    with pytest.warns(UserWarning), pytest.raises(DataError, match="no source images left"):
        unknown_context_split(samples, ["round_pill"], ["grain_wood"])


def test_summarize_counts_hand_made_samples():
    samples = [
        Sample(Path("a/train/good/0.png"), "a", "train", 0, "good", None),
        Sample(Path("a/test/crack/0.png"), "a", "test", 1, "crack", Path("m0.png")),
        Sample(Path("a/test/crack/1.png"), "a", "test", 1, "crack", None),
        Sample(Path("a/test/dent/0.png"), "a", "test", 1, "dent", Path("m1.png")),
    ]
    assert summarize(samples) == {"a": {
        "good": 1, "anomaly": 3, "masks": 2, "defect_types": {"crack": 2, "dent": 1},
        "splits": {"train": {"good": 1, "anomaly": 0}, "test": {"good": 0, "anomaly": 3}},
    }}
