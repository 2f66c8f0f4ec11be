"""Tests for visinspect.predict: JSON lines, hostile files, overlays, resume after a kill."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_fuzz import png_with_header

from visinspect.backbones.store import FILL_BATCH
from visinspect.checkpoint import save_classifier
from visinspect.data.samples import find_images, list_images
from visinspect.errors import ConfigError, DataError
from visinspect.methods.registry import load_detector
from visinspect.predict import (
    RESULTS_NAME,
    auto_batch_size,
    overlay_names,
    predict_folder,
    predict_images,
)
from visinspect.viz.overlay import MIN_SIDE

IMAGE_SIZE = 32


def rgb(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)


def valid_png_bytes(tmp: Path) -> bytes:
    path = tmp / "valid.png"
    Image.fromarray(rgb(40, 40, 9)).save(path)
    return path.read_bytes()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, pristine_model) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "random.pt"
    save_classifier(path, pristine_model, image_size=IMAGE_SIZE, threshold=0.0, normalizer=None,
                    backbone={"source": "random", "path": None, "sha256": None}, config={},
                    frozen_end=24)
    return path


@pytest.fixture(scope="module")
def loaded(checkpoint) -> tuple:
    """The checkpoint loaded once as a detector (building a VGG16 costs seconds)."""
    return (load_detector(checkpoint),)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, set[str], set[str]]:
    """Good images, every odd-but-valid mode and every broken kind, in nested folders.

    Returns (root, names that must be scored, names that must fail).
    """
    root = tmp_path_factory.mktemp("images") / "in put"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    good = {
        "good_0.png": lambda p: Image.fromarray(rgb(48, 64, 0)).save(p),
        "good_1.jpg": lambda p: Image.fromarray(rgb(64, 64, 1)).save(p),
        "sub/wide 2.PNG": lambda p: Image.fromarray(rgb(20, 90, 2)).save(p, "PNG"),
        "sub/défaut.bmp": lambda p: Image.fromarray(rgb(33, 17, 3)).save(p),
        "sub/deeper/tall.TIF": lambda p: Image.fromarray(rgb(100, 30, 4)).save(p, "TIFF"),
        "gray.png": lambda p: Image.fromarray(rgb(40, 40, 5)[..., 0]).save(p),
        "sixteen.png": lambda p: Image.fromarray(
            np.random.default_rng(6).integers(0, 65536, (40, 36)).astype(np.uint16)).save(p),
        "rgba.png": lambda p: Image.fromarray(
            np.random.default_rng(7).integers(0, 256, (40, 40, 4), np.uint8)).save(p),
        "cmyk.jpeg": lambda p: Image.fromarray(rgb(40, 40, 8)).convert("CMYK").save(p, "JPEG"),
        "palette.png": lambda p: Image.fromarray(rgb(40, 40, 9)).convert("P").save(p),
    }
    valid = valid_png_bytes(root.parent)
    bad = {
        "corrupt.png": lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4),
        "empty.jpg": lambda p: p.write_bytes(b""),
        "truncated.png": lambda p: p.write_bytes(valid[: len(valid) // 2]),
        "sub/huge.png": lambda p: p.write_bytes(png_with_header(20_000, 20_000)),
    }
    for name, write in {**good, **bad}.items():
        write(root / name)
    for name in ("notes.txt", ".DS_Store", "Thumbs.db", "._good_0.png", ".hidden/x.png"):
        (root / name).write_bytes(b"not an image")  # ignored: not images, or hidden
    return root, set(good), set(bad)


def read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / RESULTS_NAME).read_text().splitlines()]


def relative(rows: list[dict], root: Path) -> list[str]:
    return [Path(r["path"]).relative_to(root).as_posix() for r in rows]


@pytest.fixture(scope="module")
def reference(checkpoint, tree, tmp_path_factory) -> tuple[Path, dict]:
    """predict_folder without overlays, one image per batch (numbers independent of batching)."""
    out = tmp_path_factory.mktemp("reference")
    summary = predict_folder(checkpoint, [tree[0]], out, overlays=False, batch_size=1,
                             progress=False)
    return out, summary


def test_one_line_per_image_errors_only_for_broken_files(tree, reference):
    root, good, bad = tree
    out, summary = reference
    rows = read_rows(out)
    names = relative(rows, root)
    assert names == sorted(names, key=lambda n: Path(root, n)) and set(names) == good | bad
    assert {n for n, r in zip(names, rows, strict=True) if "error" in r} == bad
    for name, row in zip(names, rows, strict=True):
        if "error" in row:
            assert name.split("/")[-1] in row["error"] and set(row) == {"path", "error"}
    assert "limit" in next(r for r in rows if r["path"].endswith("huge.png"))["error"]
    assert summary["n_images"] == len(rows) and summary["n_failed"] == len(bad)
    assert summary["n_anomalous"] == sum(r.get("label") == 1 for r in rows)
    assert summary["n_skipped"] == 0
    assert not (out / "overlays").exists() and not any("overlay" in r for r in rows)


def test_scores_and_boxes_in_original_pixels(tree, reference):
    good = tree[1]
    rows = [r for r in read_rows(reference[0]) if "error" not in r]
    assert len(rows) == len(good)
    n_boxes = 0
    for r in rows:
        with Image.open(r["path"]) as img:
            assert (r["width"], r["height"]) == img.size
        assert r["method"] == "baseline" and r["label"] == int(r["score"] > r["threshold"])
        for x0, y0, x1, y1, score in r["boxes"]:
            assert 0 <= x0 < x1 <= r["width"] and 0 <= y0 < y1 <= r["height"]
            assert 0.5 < score <= 1.0  # the peak heat of a region above the box threshold
            n_boxes += 1
    assert n_boxes >= len(rows)  # per-image normalisation puts a hot spot in every image


@pytest.mark.precision
def test_same_input_same_output(loaded, tree, reference, tmp_path):
    predict_images(*loaded, [tree[0]], tmp_path, overlays=False, batch_size=1, progress=False)
    assert (tmp_path / RESULTS_NAME).read_bytes() == (reference[0] / RESULTS_NAME).read_bytes()


def test_overlays_are_named_after_their_images(loaded, tree, tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for name in ("good_0.png", "good_1.jpg", "gray.png", "sub/wide 2.PNG", "corrupt.png"):
        shutil.copy(tree[0] / name, root / name)
    shutil.copy(tree[0] / "good_1.jpg", root / "gray.jpg")  # a second "gray": it gets a suffix
    out = root / "results"  # inside the input folder: its overlays must never be scored
    first = predict_images(*loaded, [root], out, batch_size=2, progress=False)
    again = predict_images(*loaded, [root], out, batch_size=2, resume=True, progress=False)
    assert (first["n_images"], first["n_failed"]) == (6, 1)
    assert (again["n_skipped"], again["n_images"]) == (5, 1)  # only the failure is tried again
    rows = {Path(r["path"]).relative_to(root).as_posix(): r for r in read_rows(out)}
    assert {name: r.get("overlay") for name, r in rows.items()} == {
        "corrupt.png": None,
        "good_0.png": "overlays/good_0.png",
        "good_1.jpg": "overlays/good_1.png",
        "gray.jpg": "overlays/gray.png",  # sorted first: the plain name
        "gray.png": "overlays/gray_2.png",
        "sub/wide 2.PNG": "overlays/sub/wide 2.png",
    }
    written = sorted(p.relative_to(out).as_posix() for p in (out / "overlays").rglob("*.png"))
    assert written == sorted(r["overlay"] for r in rows.values() if "overlay" in r)
    with Image.open(out / rows["sub/wide 2.PNG"]["overlay"]) as img:
        # The 90 x 20 image at its own aspect ratio, enlarged to MIN_SIDE so that its text fits.
        assert img.format == "PNG" and img.mode == "RGB" and img.size == (MIN_SIDE, 57)
    with Image.open(out / rows["good_0.png"]["overlay"]) as img:
        assert img.size == (MIN_SIDE, MIN_SIDE * 48 // 64)


def test_overlay_names_keep_folders_and_resolve_clashes_deterministically():
    found = {Path("in/a/x.png"): Path("a/x.png"), Path("in/a/X.jpg"): Path("a/X.jpg"),
             Path("in/a/x_2.png"): Path("a/x_2.png"), Path("in/b/x.png"): Path("b/x.png"),
             Path("other/x.png"): Path("x.png"), Path("more/x.png"): Path("x.png")}
    names = overlay_names(found)
    assert names == {
        Path("in/a/x.png"): "overlays/a/x.png",
        Path("in/a/X.jpg"): "overlays/a/X_2.png",  # x.png and X.png are one file on macOS
        Path("in/a/x_2.png"): "overlays/a/x_2_2.png",  # its own name was given away just above
        Path("in/b/x.png"): "overlays/b/x.png",
        Path("other/x.png"): "overlays/x.png",
        Path("more/x.png"): "overlays/x_2.png",
    }
    assert overlay_names(dict(reversed(found.items())))[Path("in/a/X.jpg")] == "overlays/a/X.png"
    # Names given by an earlier run (resume) are kept, and not given to anyone else.
    taken = {Path("in/a/X.jpg"): "overlays/a/x.png"}
    again = overlay_names(found, taken)
    assert again[Path("in/a/X.jpg")] == "overlays/a/x.png"
    assert again[Path("in/a/x.png")] == "overlays/a/x_2.png"
    # A name at the file system's limit still fits with its suffix.
    long = {Path(f"{c}{'é' * 126}.jpg"): Path(f"{'é' * 126}.jpg") for c in "ab"}
    assert [len(n.split("/")[-1].encode()) <= 255 for n in overlay_names(long).values()] == [True, True]
    assert len(set(overlay_names(long).values())) == 2


def test_resume_keeps_overlay_names_when_a_clashing_image_is_added(loaded, tree, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    shutil.copy(tree[0] / "good_1.jpg", root / "b.jpg")
    out = tmp_path / "out"
    predict_images(*loaded, [root], out, progress=False)
    first = (out / "overlays" / "b.png").read_bytes()
    shutil.copy(tree[0] / "good_0.png", root / "b.bmp")  # sorts first: would take b.png
    summary = predict_images(*loaded, [root], out, resume=True, progress=False)
    rows = {Path(r["path"]).name: r["overlay"] for r in read_rows(out)}
    assert summary["n_skipped"] == 1 and rows == {"b.jpg": "overlays/b.png", "b.bmp": "overlays/b_2.png"}
    assert (out / "overlays" / "b.png").read_bytes() == first  # b.jpg's overlay is not overwritten


@pytest.mark.precision
@pytest.mark.parametrize("cut", [0.5, 0.0])
def test_resume_after_kill(loaded, tree, reference, tmp_path, cut):
    """Keep the first lines and half the next (a kill mid-write): resume reaches the same rows."""
    ref = (reference[0] / RESULTS_NAME).read_text().splitlines(keepends=True)
    keep = round(len(ref) * cut)
    (tmp_path / RESULTS_NAME).write_text("".join(ref[:keep]) + ref[keep][: len(ref[keep]) // 2])
    kept_ok = sum("error" not in json.loads(line) for line in ref[:keep])

    summary = predict_images(*loaded, [tree[0]], tmp_path, overlays=False, batch_size=1,
                             resume=True, progress=False)
    rows = read_rows(tmp_path)
    assert summary["n_skipped"] == kept_ok and summary["n_images"] == len(ref) - kept_ok
    assert summary["n_failed"] == len(tree[2])  # failed images are tried again (and fail again)
    assert len({r["path"] for r in rows}) == len(rows) == len(ref)  # no duplicates, none lost
    by_path = lambda rows: sorted(rows, key=lambda r: r["path"])  # noqa: E731
    assert by_path(rows) == by_path(map(json.loads, ref))


def test_resume_with_everything_done_scores_nothing(loaded, tree, reference, tmp_path):
    shutil.copy(reference[0] / RESULTS_NAME, tmp_path / RESULTS_NAME)
    summary = predict_images(*loaded, [tree[0]], tmp_path, overlays=False, batch_size=8,
                             resume=True, progress=False)
    assert summary["n_skipped"] == len(tree[1]) and summary["n_images"] == len(tree[2])


def test_list_images(tree, tmp_path):
    root, good, bad = tree
    found = list_images([root])
    assert [p.relative_to(root).as_posix() for p in found] == sorted(
        good | bad, key=lambda n: Path(root, n))
    # Each is mapped to its path under the input that found it first (a file named: its name).
    assert find_images([root / "sub", root]) == {
        **{p: p.relative_to(root / "sub") for p in found if "sub" in p.parts},
        **{p: p.relative_to(root) for p in found if "sub" not in p.parts}}
    assert find_images([root / "good_0.png"]) == {root / "good_0.png": Path("good_0.png")}
    # A file named directly counts whatever its name; duplicates are dropped, input order kept.
    stray = root / "notes.txt"
    again = list_images([stray, root, root / "sub", root / "good_0.png"])
    assert again[0] == stray and again[1:] == found
    assert list_images([root], exclude=root / "sub") == [p for p in found if "sub" not in p.parts]


def test_bad_arguments(loaded, tmp_path):
    with pytest.raises(DataError, match="nope"):
        predict_images(*loaded, [tmp_path / "nope"], tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no images"):
        predict_images(*loaded, [tmp_path / "empty"], tmp_path / "out", progress=False)
    with pytest.raises(ConfigError, match="batch_size"):
        predict_images(*loaded, [tmp_path], tmp_path / "out", batch_size=0, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.precision
@pytest.mark.parametrize(("batch_size", "workers"), [(None, 1), (5, 3)])
def test_same_lines_whatever_the_batches_and_threads(loaded, tree, reference, tmp_path, batch_size, workers):
    predict_images(*loaded, [tree[0]], tmp_path, overlays=False, batch_size=batch_size, workers=workers,
                   progress=False)
    assert (tmp_path / RESULTS_NAME).read_bytes() == (reference[0] / RESULTS_NAME).read_bytes()


def test_overlay_size_and_pipeline_arguments(loaded, tree, tmp_path):
    predict_images(*loaded, [tree[0] / "good_0.png"], tmp_path, overlay_size=100, progress=False)
    with Image.open(tmp_path / "overlays" / "good_0.png") as img:
        assert img.size == (100, 75)  # 64 x 48 drawn with its longest side 100 px
    for bad in ({"workers": 0}, {"overlay_size": 8}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            predict_images(*loaded, [tree[0]], tmp_path / "bad", progress=False, **bad)
    assert auto_batch_size(224) == 32 and auto_batch_size(1024) == FILL_BATCH
    assert all(auto_batch_size(s) % FILL_BATCH == 0 for s in (32, 100, 224, 300, 4096))
