"""The few-good-parts methods beyond the plain reference score: the top-percent image score,
residual learning, pseudo-defects and the fusion weight learnt on the source products."""

import numpy as np
import pytest
import torch

from visinspect.data.drawing import draw_defect
from visinspect.data.samples import build_sample_table, stratified_split
from visinspect.errors import ConfigError, DataError, VisinspectError
from visinspect.methods.learnt_fusion import WEIGHTS, choose_weight
from visinspect.methods.memory_bank import PatchMemoryBank
from visinspect.methods.pseudo_defects import KINDS, cut_paste, pseudo_defect
from visinspect.methods.registry import backbone_info, make_detector
from visinspect.methods.residual import residual_maps

SIZE = 32


@pytest.fixture(scope="module")
def good(tiny_root):
    samples = build_sample_table(tiny_root).samples
    return [s for s in samples if s.category == "round_pill" and s.split == "train"]


def test_top_fraction_image_score_is_the_mean_of_the_largest_patches():
    bank = PatchMemoryBank(torch.zeros(1, 2), torch.zeros(1), ("conv4_3",), SIZE, "x", top=0.25)
    maps = torch.arange(8.0).view(1, 2, 4)  # patch distances 0..7
    np.testing.assert_allclose(bank.image_scores(maps), [6.5])  # mean of the 2 largest
    bank.top = 0.0
    np.testing.assert_allclose(bank.image_scores(maps), [7.0])  # PatchCore's max


def test_top_fraction_is_checked(pristine_model, good):
    with pytest.raises(VisinspectError, match="top"):
        PatchMemoryBank.fit(pristine_model, good, SIZE, top=1.5, precision="fp32")


def test_residuals_vanish_on_the_bank_and_not_when_the_image_is_left_out(pristine_model, good):
    bank = PatchMemoryBank.fit(pristine_model, good, SIZE, max_patches=None, precision="fp32")
    inside = residual_maps(pristine_model, bank, good, "fp32")
    assert inside.shape == (len(good), 512, SIZE // 8, SIZE // 8)
    assert inside.abs().max() < 1e-5  # each patch's nearest good patch is itself
    out = residual_maps(pristine_model, bank, good, "fp32", exclude=list(range(len(good))))
    assert (out.flatten(1).norm(dim=1) > 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_every_pseudo_defect_changes_the_image_where_its_mask_says(kind):
    rng = np.random.default_rng(0)
    image = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), np.uint8)
    if kind in ("cutpaste", "scar"):
        out, mask = cut_paste(image, rng, scar=kind == "scar")
    else:
        out, mask = draw_defect(image, kind, rng)
    assert out.shape == image.shape and out.dtype == np.uint8 and mask.any()
    assert np.array_equal(out[~mask], image[~mask])  # untouched outside the mask
    assert not np.array_equal(out[mask], image[mask])


def test_pseudo_defects_are_seeded_and_bad_input_is_refused():
    image = np.full((SIZE, SIZE, 3), 128, np.uint8)
    a = pseudo_defect(image, np.random.default_rng(3))
    b = pseudo_defect(image, np.random.default_rng(3))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    with pytest.raises(DataError, match="square RGB uint8"):
        draw_defect(np.zeros((SIZE, SIZE + 1, 3), np.uint8), "crack", np.random.default_rng(0))
    with pytest.raises(DataError, match="unknown defect kind"):
        draw_defect(image, "dent", np.random.default_rng(0))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["residual", "pseudo-defects", "reference-top5", "reference-mobilenet",
                                  "fused-mobilenet"])
def test_each_method_adapts_and_scores_a_new_product(name, tiny_root, pristine_model, good):
    samples = build_sample_table(tiny_root).samples
    test = [s for s in samples if s.category == "round_pill" and s.split == "test"]
    info = backbone_info(SIZE, {"source": "random"})
    detector = make_detector(name, pristine_model, info, precision="fp32")
    detector.adapt(good)
    scored = detector.score(test)
    assert detector.threshold == 0.0 and np.isfinite(scored.scores).all()
    assert scored.maps.shape[0] == len(test) and detector.product == "round_pill"


@pytest.mark.slow
def test_fused_top5_averages_the_classifier_and_top5_reference_z_scores(tiny_root, pristine_model, good):
    samples = build_sample_table(tiny_root).samples
    test = [s for s in samples if s.category == "round_pill" and s.split == "test"]
    # 64 px: 8 x 8 patches, so the 5 % largest are 3 of them (at 32 px, 1: the largest alone).
    info = backbone_info(64, {"source": "random"})
    fused = make_detector("fused-top5", pristine_model, info, precision="fp32")
    top = make_detector("reference-top5", pristine_model, info, precision="fp32")
    fused.adapt(good)
    top.adapt(good)
    bank = top.banks["round_pill"]
    good_margins = fused.classifier.predictions(good).margins
    z = lambda x, ref: (x - ref.mean()) / ref.std(ddof=1)  # noqa: E731
    expected = 0.5 * z(fused.classifier.predictions(test).margins, good_margins) + 0.5 * z(
        top.raw(test).scores, bank.good_scores)
    got = fused.score(test).scores + fused.calibrations["round_pill"].threshold
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)
    plain = make_detector("fused", pristine_model, info, precision="fp32")
    plain.adapt(good)
    assert not np.allclose(plain.score(test).scores, fused.score(test).scores)  # not the max's score


def test_the_fusion_weight_is_the_one_that_ranks_the_source_products_best():
    labels = np.array([0, 0, 1, 1])
    rising, falling = np.arange(4.0), np.arange(4.0)[::-1]
    # The classifier ranks perfectly, the reference backwards: every weight above 0.5 ranks
    # perfectly, and the one nearest equal weights wins.
    weight, means = choose_weight({"a": (labels, rising, falling)})
    assert weight == 0.55 and means[1.0] == 1.0 and means[0.0] == 0.0 and set(means) == set(WEIGHTS)
    # The mean over products decides: here the reference is right on two products of three.
    weight, _ = choose_weight({"a": (labels, rising, falling), "b": (labels, falling, rising),
                               "c": (labels, falling, rising)})
    assert weight == 0.45
    assert choose_weight({"a": (labels, rising, rising)})[0] == 0.5  # no information: equal weights
    with pytest.raises(DataError, match="no source product"):
        choose_weight({})


@pytest.mark.slow
def test_fused_learnt_learns_its_weight_on_the_sources_and_refuses_to_adapt_without_it(
    tiny_root, pristine_model, good
):
    samples = build_sample_table(tiny_root, split="all").samples
    source = [s for s in samples if s.category != "round_pill"]
    train, val = stratified_split(source, 0.4, 1)  # 3 good train/ images left to reference
    info = backbone_info(SIZE, {"source": "random"})
    detector = make_detector("fused-learnt", pristine_model, info, precision="fp32")
    with pytest.raises(ConfigError, match="--method fused-learnt"):
        detector.adapt(good)
    learnt = detector.fit_sources(train, val)["fusion_weight"]
    assert learnt["classifier"] in WEIGHTS and learnt["products"] == sorted({s.category for s in source})
    assert detector.weight == learnt["classifier"] and not detector.reference.banks  # sources forgotten
    detector.adapt(good)
    test = [s for s in samples if s.category == "round_pill" and s.split == "test"]
    assert np.isfinite(detector.score(test).scores).all()
    assert detector.fusions["round_pill"].weight == detector.weight
    # A checkpoint's info carries the weight: a detector made from it adapts at once.
    again = make_detector("fused-learnt", pristine_model, info | {"fusion_weight": learnt}, precision="fp32")
    again.adapt(good)
    np.testing.assert_allclose(again.score(test).scores, detector.score(test).scores)
