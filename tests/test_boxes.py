"""Tests for visinspect.boxes: heatmap -> boxes, including the seed's border/empty-mask bugs."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from visinspect.boxes import Box, enclosing_box, heatmap_to_boxes


def blank(h: int = 10, w: int = 12) -> np.ndarray:
    return np.zeros((h, w))


def seed_box(heatmap: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    """The seed's algorithm: project the mask on columns/rows, times the index, min/max of > 0."""
    mask = heatmap > threshold
    x_dim = np.max(mask, axis=0) * np.arange(heatmap.shape[1])
    y_dim = np.max(mask, axis=1) * np.arange(heatmap.shape[0])
    xs, ys = x_dim[x_dim > 0], y_dim[y_dim > 0]
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())  # inclusive


def components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected components by plain flood fill (a reference independent of OpenCV)."""
    seen, found = np.zeros_like(mask), []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        seen[start], stack, pixels = True, [start], []
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for ny in range(max(y - 1, 0), min(y + 2, mask.shape[0])):
                for nx in range(max(x - 1, 0), min(x + 2, mask.shape[1])):
                    if mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        found.append(pixels)
    return found


def test_box_geometry_and_iou():
    a, b = Box(0, 0, 4, 2, 1.0), Box(2, 0, 6, 2, 0.5)
    assert (a.width, a.height, a.area) == (4, 2, 8)
    assert a.iou(a) == 1.0
    assert a.iou(b) == pytest.approx(4 / 12)
    assert a.iou(Box(4, 0, 8, 2, 1.0)) == 0.0  # touching edges: end exclusive, no overlap
    assert Box(1, 1, 1, 1, 0.0).iou(Box(1, 1, 1, 1, 0.0)) == 0.0


def test_end_exclusive_coordinates():
    heat = blank()
    heat[3:6, 2:6] = 0.9  # 3 rows x 4 columns at x = 2..5
    (box,) = heatmap_to_boxes(heat, 0.5, min_area=1)
    assert box == Box(2, 3, 6, 6, 0.9)
    assert (box.width, box.height, box.area) == (4, 3, 12)


@pytest.mark.parametrize(
    "rows, cols, expected",
    [
        (slice(2, 5), slice(0, 3), (0, 2, 3, 5)),  # left border
        (slice(0, 3), slice(4, 7), (4, 0, 7, 3)),  # top border
        (slice(2, 5), slice(9, 12), (9, 2, 12, 5)),  # right border: x1 = W
        (slice(7, 10), slice(4, 7), (4, 7, 7, 10)),  # bottom border: y1 = H
        (slice(0, 1), slice(0, 1), (0, 0, 1, 1)),  # single pixel at (0, 0)
        (slice(2, 8), slice(0, 1), (0, 2, 1, 8)),  # only in column 0 (the seed crashed)
        (slice(0, 1), slice(3, 9), (3, 0, 9, 1)),  # only in row 0
    ],
)
def test_components_at_the_image_border(rows, cols, expected):
    heat = blank()
    heat[rows, cols] = 1.0
    boxes = heatmap_to_boxes(heat, 0.5, min_area=1)
    assert [b[:4] for b in boxes] == [expected]
    assert enclosing_box(heat, 0.5)[:4] == expected


def test_several_blobs_give_several_boxes_sorted_by_score():
    heat = blank(20, 20)
    heat[1:5, 1:5] = 0.6
    heat[10:14, 12:18] = 0.7
    heat[12, 14] = 1.0
    heat[15:19, 1:5] = 0.8
    boxes = heatmap_to_boxes(heat, 0.5)
    assert boxes == [Box(12, 10, 18, 14, 1.0), Box(1, 15, 5, 19, 0.8), Box(1, 1, 5, 5, 0.6)]
    by_mean = heatmap_to_boxes(heat, 0.5, score="mean")
    assert [b.score for b in by_mean] == pytest.approx([0.8, (23 * 0.7 + 1.0) / 24, 0.6])
    assert by_mean[0][:4] == (1, 15, 5, 19)


def test_ties_break_by_area_then_position():
    heat = blank(20, 20)
    heat[10:15, 10:15] = 0.9  # larger box, lower right: first
    heat[0:4, 10:14] = 0.9  # same size: top row first, then left first
    heat[0:4, 0:4] = 0.9
    heat[10:14, 0:4] = 0.9
    boxes = heatmap_to_boxes(heat, 0.5)
    assert [b[:2] for b in boxes] == [(10, 10), (0, 0), (10, 0), (0, 10)]


def test_min_area_filters_small_components():
    heat = blank(20, 20)
    heat[0:3, 0:5] = 0.9  # 15 px
    heat[10:14, 10:14] = 0.8  # 16 px
    assert [b.score for b in heatmap_to_boxes(heat, 0.5)] == [0.8]  # default min_area 16
    assert [b.score for b in heatmap_to_boxes(heat, 0.5, min_area=15)] == [0.9, 0.8]
    assert heatmap_to_boxes(heat, 0.5, min_area=17) == []


def test_threshold_is_strict_and_higher_means_fewer_boxes():
    heat = blank()
    heat[1:3, 1:3] = 0.5
    heat[6:9, 6:9] = 0.9
    assert len(heatmap_to_boxes(heat, 0.4, min_area=1)) == 2
    assert len(heatmap_to_boxes(heat, 0.5, min_area=1)) == 1  # 0.5 > 0.5 is False
    assert heatmap_to_boxes(heat, 0.9, min_area=1) == []


def test_connectivity():
    heat = blank()
    heat[2, 2] = heat[3, 3] = 1.0  # diagonal neighbours
    assert len(heatmap_to_boxes(heat, 0.5, min_area=1)) == 1
    assert len(heatmap_to_boxes(heat, 0.5, min_area=1, connectivity=4)) == 2
    with pytest.raises(ValueError, match="connectivity"):
        heatmap_to_boxes(heat, 0.5, connectivity=6)
    with pytest.raises(ValueError, match="score"):
        heatmap_to_boxes(heat, 0.5, score="max")


@pytest.mark.parametrize(
    "heat, threshold",
    [
        (np.zeros((0, 0)), 0.5),
        (np.zeros((0, 5)), 0.5),
        (np.full((6, 6), np.nan), 0.5),
        (np.full((6, 6), 0.9), 0.5),  # constant above threshold: no structure
        (np.where(np.eye(6, dtype=bool), np.nan, 0.7), 0.5),  # constant apart from NaN
        (np.linspace(0, 1, 36).reshape(6, 6), 1.0),  # nothing strictly above the max
    ],
    ids=["0x0", "0x5", "all-nan", "constant", "constant+nan", "threshold=max"],
)
def test_maps_without_boxes(heat, threshold):
    assert heatmap_to_boxes(heat, threshold, min_area=1) == []
    assert enclosing_box(heat, threshold) is None


def test_nan_pixels_count_as_below_threshold():
    heat = blank()
    heat[2:8, 2:8] = 0.9
    heat[:, 5] = np.nan  # splits the blob in two
    assert [b[:4] for b in heatmap_to_boxes(heat, 0.5, min_area=1)] == [(2, 2, 5, 8), (6, 2, 8, 8)]


@pytest.mark.parametrize("threshold", [-0.1, 1.1, math.nan, math.inf, "0.5"])
def test_threshold_must_be_in_unit_interval(threshold):
    for fn in (heatmap_to_boxes, enclosing_box):
        with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\].*got"):
            fn(blank(), threshold)


def test_threshold_error_names_the_value():
    with pytest.raises(ValueError, match=r"normalised to that range\); got 1.5$"):
        heatmap_to_boxes(blank(), 1.5)


@pytest.mark.parametrize("shape", [(5,), (1, 4, 4), (2, 3, 4, 5)])
def test_non_2d_heatmap_is_rejected(shape):
    for fn in (heatmap_to_boxes, enclosing_box):
        with pytest.raises(
            ValueError, match=rf"2-D.*{shape}".replace("(", r"\(").replace(")", r"\)")
        ):
            fn(np.zeros(shape), 0.5)


def test_torch_input_matches_numpy():
    heat = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    tensor = torch.from_numpy(heat).requires_grad_(True)
    assert heatmap_to_boxes(tensor, 0.7, min_area=1) == heatmap_to_boxes(heat, 0.7, min_area=1)
    assert enclosing_box(tensor, 0.7) == enclosing_box(heat, 0.7)


def test_enclosing_box_fixes_the_seed():
    heat = blank()
    heat[3:6, 2:6] = 0.9
    x0, y0, x1, y1 = seed_box(heat, 0.5)  # interior blob: seed only differs by inclusive ends
    assert enclosing_box(heat, 0.5) == Box(x0, y0, x1 + 1, y1 + 1, 0.9)

    heat[0, 0] = 0.6  # second blob at the border
    assert seed_box(heat, 0.5)[:2] == (2, 3)  # seed bug: index 0 looks inactive
    assert enclosing_box(heat, 0.5) == Box(0, 0, 6, 6, 0.9)  # one box around both blobs
    assert len(heatmap_to_boxes(heat, 0.5, min_area=1)) == 2

    column0 = blank()
    column0[2:5, 0] = 1.0
    with pytest.raises(ValueError):
        seed_box(column0, 0.5)  # seed crash
    assert enclosing_box(column0, 0.5) == Box(0, 2, 1, 5, 1.0)


heatmaps = arrays(
    np.float64,
    st.tuples(st.integers(1, 32), st.integers(1, 32)),
    elements=st.one_of(st.sampled_from([0.0, 0.5, 1.0, math.nan]), st.floats(0, 1)),
)


@settings(max_examples=100, deadline=None)
@given(heatmaps, st.floats(0, 1), st.integers(1, 20), st.sampled_from(["peak", "mean"]))
def test_boxes_are_exactly_the_components(heat, threshold, min_area, score):
    boxes = heatmap_to_boxes(heat, threshold, min_area, score=score)
    mask = heat > threshold
    finite = heat[~np.isnan(heat)]
    if finite.size and finite.min() == finite.max():
        assert boxes == []  # a constant map has no structure
        return
    h, w = heat.shape
    for b in boxes:
        assert 0 <= b.x0 < b.x1 <= w and 0 <= b.y0 < b.y1 <= h
        assert mask[b.y0 : b.y1, b.x0 : b.x1].any()
    assert [b.score for b in boxes] == sorted((b.score for b in boxes), reverse=True)
    expected = []  # one box per component, exactly its bounding box, with its score
    for pixels in components(mask):
        if len(pixels) >= min_area:
            ys, xs = zip(*pixels, strict=True)
            values = [heat[p] for p in pixels]
            value = max(values) if score == "peak" else sum(values) / len(values)
            expected.append((min(xs), min(ys), max(xs) + 1, max(ys) + 1, value))
    got = sorted((b.x0, b.y0, b.x1, b.y1, b.score) for b in boxes)
    assert [g[:4] for g in got] == [e[:4] for e in sorted(expected)]
    assert [g[4] for g in got] == pytest.approx([e[4] for e in sorted(expected)])


@settings(max_examples=100, deadline=None)
@given(heatmaps, st.floats(0, 1), st.floats(0, 1))
def test_higher_threshold_gives_boxes_inside_lower_threshold_boxes(heat, t1, t2):
    low, high = min(t1, t2), max(t1, t2)
    wide = heatmap_to_boxes(heat, low, min_area=1)
    for b in heatmap_to_boxes(heat, high, min_area=1):
        assert any(w.x0 <= b.x0 and w.y0 <= b.y0 and b.x1 <= w.x1 and b.y1 <= w.y1 for w in wide)
    union = enclosing_box(heat, low)
    if not wide:
        assert union is None
    else:
        assert union[:4] == (
            min(b.x0 for b in wide),
            min(b.y0 for b in wide),
            max(b.x1 for b in wide),
            max(b.y1 for b in wide),
        )
