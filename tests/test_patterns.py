"""The pixel-pattern score for binary drawings: codes, the drawing rule, the bank's leave-one-out
scores, and the detector that switches to it only on drawings."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visinspect.data.samples import Sample, build_sample_table
from visinspect.errors import DataError
from visinspect.methods.base import by_product
from visinspect.methods.binary_patterns import (
    PATTERN_SIZE,
    STRIDE,
    PatternBank,
    _image_scores,
    binary_share,
    grey,
    ink_shares,
    is_binary_drawing,
    pattern_codes,
)
from visinspect.methods.registry import backbone_info, make_detector


def board(seed: int, speck: tuple[int, int] | None = None) -> np.ndarray:
    """A binary drawing: horizontal tracks 6 px wide at a seeded offset, optionally a 2 x 2
    speck of copper between two tracks."""
    a = np.zeros((PATTERN_SIZE, PATTERN_SIZE), np.uint8)
    offset = seed % 7
    for y in range(offset, PATTERN_SIZE, 20):
        a[y : y + 6] = 255
    if speck is not None:
        y, x = speck
        a[y : y + 2, x : x + 2] = 255
    return a


def write(folder: Path, name: str, image: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / name)
    return folder / name


@pytest.fixture
def drawings(tmp_path) -> tuple[list[Sample], list[Sample]]:
    """Five good boards (train) and a test set: two good boards, two with a speck."""
    good = [Sample(write(tmp_path / "train", f"{i}.png", board(i)), "pcb", "train", 0, "good", None)
            for i in range(5)]
    test = [Sample(write(tmp_path / "test", f"g{i}.png", board(i + 10)), "pcb", "test", 0, "good", None)
            for i in range(2)]
    test += [Sample(write(tmp_path / "test", f"d{i}.png", board(i, speck=(111 + i, 60 + 70 * i))), "pcb",
                    "test", 1, "speck", None) for i in range(2)]
    return good, test


def test_codes_give_each_pixel_its_3x3_binary_neighbourhood():
    black = np.zeros((5, 5), np.float32)
    assert torch.equal(pattern_codes(black), torch.zeros(5, 5, dtype=torch.long))
    assert (pattern_codes(black + 1.0) == 511).all()  # every bit set, the border included
    dot = black.copy()
    dot[2, 2] = 1.0
    codes = pattern_codes(dot)
    assert codes[2, 2] == 16  # the centre bit
    assert codes[1, 1] == 256 and codes[3, 3] == 1  # seen as the bottom-right / top-left neighbour
    assert codes[0, 0] == 0


def test_the_drawing_rule_takes_black_and_white_images_only():
    assert binary_share(board(0) / 255.0) == 1.0
    ramp = np.tile(np.linspace(0, 1, PATTERN_SIZE, dtype=np.float32), (PATTERN_SIZE, 1))
    assert binary_share(ramp) == pytest.approx(0.2, abs=0.01)  # the 10 % at each end
    assert is_binary_drawing([board(i) / 255.0 for i in range(3)])
    assert not is_binary_drawing([ramp, ramp, board(0) / 255.0])  # the median decides
    # A grey part on a black backdrop: 90 % of its pixels are black, none white: a photo, no drawing.
    backdrop = np.zeros((PATTERN_SIZE, PATTERN_SIZE), np.float32)
    backdrop[: PATTERN_SIZE // 10] = 0.5
    assert binary_share(backdrop) >= 0.85 and ink_shares(backdrop)[1] == 0.0
    assert not is_binary_drawing([backdrop] * 3)


def test_the_bank_counts_unseen_patterns_and_scores_good_images_leave_one_out(drawings):
    good, test = drawings
    bank = PatternBank.fit(good)
    assert bank.good_scores.shape == (5,) and (bank.good_scores == 0).all()  # the others' patterns
    assert bank.good_maps.shape == (5, PATTERN_SIZE // STRIDE, PATTERN_SIZE // STRIDE)
    scores, maps = bank.score(test)
    assert (scores[:2] == 0).all() and (scores[2:] > 0).all()
    # The map is hottest where the speck is.
    y, x = np.unravel_index(int(maps[2].argmax()), maps[2].shape)
    assert abs(y * STRIDE - 111) <= 16 and abs(x * STRIDE - 60) <= 16
    # A pattern only one good image has counts as unseen for that image (leave-one-out).
    odd_path = write(good[0].path.parent, "odd.png", board(0, speck=(9, 9)))
    odd = Sample(odd_path, "pcb", "train", 0, "good", None)
    loo = PatternBank.fit([*good, odd])
    assert loo.good_scores[-1] > 0 and (loo.good_scores[:-1] == 0).all()
    # With 6 good images none is set aside as an outlier (calibration.good_outliers): the
    # threshold is the largest leave-one-out score, the odd board's.
    calibration = loo.calibrate(0.01)
    assert calibration.threshold == loo.good_scores.max() and calibration.outliers == []


def test_the_image_score_is_the_densest_cluster_ties_broken_by_the_total():
    scattered = torch.zeros(3, 32, 32, dtype=torch.bool)
    scattered[0, ::6, ::6] = True  # 36 lone unseen pixels
    scattered[1, 10:13, 10:13] = True  # 9 in one 3 x 3 block
    scattered[2, 10:12, 10:12] = True  # 4 in a 2 x 2 block...
    scattered[2, 20, 20] = True  # ... and one more apart
    scores = _image_scores(scattered)
    np.testing.assert_allclose(scores, [1 + 36 / 1024, 9 + 9 / 1024, 4 + 5 / 1024])
    assert scores[1] > scores[2] > scores[0]  # the cluster wins over many scattered pixels


def test_the_bank_refuses_too_few_or_test_images(drawings):
    good, test = drawings
    with pytest.raises(DataError, match="at least 2 good images"):
        PatternBank.fit(good[:1])
    with pytest.raises(DataError, match="never test images"):
        PatternBank.fit([*good, test[0]])
    with pytest.raises(DataError, match="grey images for"):
        PatternBank.fit(good, [grey(good[0])])


def test_maps_of_different_sizes_are_brought_to_the_largest(drawings):
    test = drawings[1]
    other = [Sample(s.path, "other", s.split, s.label, s.defect_type, None) for s in test[:2]]
    states = {"pcb": (np.ones(4), torch.ones(4, 8, 8)), "other": (np.zeros(2), torch.zeros(2, 2, 2))}
    scored = by_product([*other, *test], 32, states, lambda state, group: state)
    assert scored.maps.shape == (6, 8, 8) and list(scored.scores) == [0, 0, 1, 1, 1, 1]


@pytest.mark.slow
def test_the_detector_switches_to_patterns_on_drawings_only(drawings, tiny_root, pristine_model):
    good, test = drawings
    info = backbone_info(64, {"source": "random"})
    detector = make_detector("reference-mobilenet+patterns", pristine_model, info, precision="fp32")
    detector.adapt(good)
    assert "pcb" in detector.patterns and "pcb" not in detector.banks
    scored = detector.score(test)
    assert (scored.scores[2:] > scored.scores[:2]).all() and (scored.scores[2:] > 0).all()
    # A product that is no drawing (the synthetic pills) gets exactly reference-mobilenet's scores.
    samples = build_sample_table(tiny_root).samples
    pills = [s for s in samples if s.category == "round_pill" and s.split == "train"]
    pill_test = [s for s in samples if s.category == "round_pill" and s.split == "test"]
    detector.adapt(pills)
    plain = make_detector("reference-mobilenet", pristine_model, info, precision="fp32")
    plain.adapt(pills)
    assert "round_pill" not in detector.patterns
    np.testing.assert_array_equal(detector.score(pill_test).scores, plain.score(pill_test).scores)
    both = detector.score([*pill_test, *test])  # two products, maps of two sizes
    assert both.maps.shape == (len(pill_test) + len(test), PATTERN_SIZE // STRIDE, PATTERN_SIZE // STRIDE)
