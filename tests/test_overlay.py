"""Tests for visinspect.viz.overlay: sizes, and that the heat, the boxes and the verdict show."""

import numpy as np
import pytest
from PIL import Image

from visinspect.boxes import Box
from visinspect.viz.overlay import (
    BOX_BGR,
    MAX_SIDE,
    MIN_SIDE,
    VERDICT_BGR,
    draw_overlay,
    fit_image,
    overlay_size,
    save_overlay,
)


@pytest.mark.parametrize(("shape", "size", "expected"), [
    ((256, 212), None, (256, 212)),  # its own resolution
    ((20, 90), None, (57, MIN_SIDE)),  # enlarged so that the text fits, aspect ratio kept
    ((6000, 3000), None, (MAX_SIDE, MAX_SIDE // 2)),  # a huge photo shrunk
    ((256, 212), 512, (512, 424)),  # a chosen longest side
])
def test_overlay_size(shape, size, expected):
    assert overlay_size(*shape, size) == expected
    rgb = np.zeros((*shape, 3), np.uint8)
    assert fit_image(rgb, size).shape == (*expected, 3)


def test_heat_boxes_and_verdict_are_drawn(tmp_path):
    grey = np.full((200, 300, 3), 128, np.uint8)
    heat = np.zeros((32, 32), np.float32)
    heat[4:12, 20:28] = 1.0  # hot in the top right (x 187..262, y 25..75 in the image)
    box = Box(180, 20, 270, 80, 1.0)
    out = draw_overlay(grey, heat, [box], "ANOMALY  score 1.23", anomalous=True)
    assert out.shape == (200, 300, 3) and out.dtype == np.uint8
    assert np.array_equal(out[150, 150], [128, 128, 128])  # cold: the image as it is
    assert not np.array_equal(out[50, 225], [128, 128, 128])  # hot: coloured
    assert tuple(out[50, box.x0]) == BOX_BGR and tuple(out[box.y1 - 1, 225]) == BOX_BGR
    assert tuple(out[1, 1]) == VERDICT_BGR[1]  # the verdict's corner, red for an anomaly
    good = draw_overlay(grey, heat, [], "good  score -0.50", anomalous=False)
    assert tuple(good[1, 1]) == VERDICT_BGR[0] and tuple(good[50, box.x0]) != BOX_BGR
    save_overlay(tmp_path / "a" / "o.png", grey, heat, [box], "ANOMALY", anomalous=True)
    with Image.open(tmp_path / "a" / "o.png") as img:
        assert img.format == "PNG" and img.size == (300, 200)
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["o.png"]  # no temporary file left
