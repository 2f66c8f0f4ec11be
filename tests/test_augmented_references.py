"""Turned and mirrored good references (visinspect.methods.augmented_references): the poses, the
larger bank's leave-one-out, the check on pseudo-defects, the detector."""

import numpy as np
import pytest
import torch

from visinspect.backbones.mobilenet import build_mobilenet
from visinspect.data.samples import build_sample_table
from visinspect.methods.augmented_references import POSES, SHIFTS, augmented_bank, pose, posed_features
from visinspect.methods.memory_bank import PatchMemoryBank
from visinspect.methods.registry import backbone_info, make_detector

SIZE = 64
FP32 = "fp32"


@pytest.fixture(scope="module")
def network():
    return build_mobilenet("random")[0]


@pytest.fixture(scope="module")
def pills(tiny_root):
    samples = build_sample_table(tiny_root).samples
    good = [s for s in samples if s.category == "round_pill" and s.split == "train"][:4]
    test = [s for s in samples if s.category == "round_pill" and s.split == "test"]
    return good, test


def test_the_poses_are_the_eight_symmetries_of_the_square():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    images = [x, *(pose(x, p) for p in POSES)]
    assert len({tuple(i.flatten().tolist()) for i in images}) == 8
    assert torch.equal(pose(pose(x, "rot90"), "rot270"), x)
    assert torch.equal(pose(x, "flip-rot90"), torch.rot90(x.flip(-1), 1, dims=(-2, -1)))


def test_the_shifts_move_the_image_by_half_a_patch_and_the_zoom_enlarges_its_centre():
    x = torch.arange(56.0 * 56).view(1, 1, 56, 56)  # SHIFT of 56 px: 2 px
    right, down, both = (pose(x, p) for p in SHIFTS[:3])
    assert torch.equal(right[..., 2:], x[..., :-2]) and torch.equal(down[..., 2:, :], x[..., :-2, :])
    assert torch.equal(both[..., 2:, 2:], x[..., :-2, :-2])
    assert torch.equal(right[..., :2], x[..., [2, 1]])  # the edge that comes in: reflected
    zoomed, centre = pose(x, "zoom"), x[..., 4:-4, 4:-4]  # ZOOM 7/8: 48 of 56 px, zoomed back to 56
    assert zoomed.shape == x.shape and centre.min() <= zoomed.min() and zoomed.max() <= centre.max()


def test_the_larger_bank_leaves_each_good_image_and_its_poses_out(network, pills):
    good, _ = pills
    bank = PatchMemoryBank.fit(network, good, SIZE, layers=("mobilenet_v2",), max_patches=None,
                               precision=FP32)
    originals, posed = posed_features(network, good, SIZE, "mobilenet_v2", FP32)
    owners = torch.arange(len(good)).repeat(len(POSES))
    bigger = bank.with_patches(posed, owners, originals)
    assert len(bigger.bank) == len(bank.bank) * (1 + len(POSES))
    # More patches of the *other* images can only bring a good patch's nearest one closer ...
    assert (bigger.good_maps <= bank.good_maps + 1e-5).all()
    # ... and the bank's own good scores are those of the originals left out with their poses:
    # scored against a bank without image 0 at all, image 0 gets the same map.
    others = [s for s in good if s != good[0]]
    keep = owners != 0
    without = PatchMemoryBank.fit(network, others, SIZE, layers=("mobilenet_v2",), max_patches=None,
                                  precision=FP32)
    without = without.with_patches(posed[keep], owners[keep] - 1, originals[1:])
    torch.testing.assert_close(without.score_features(originals[:1])[1][0], bigger.good_maps[0])


def test_the_check_keeps_the_bank_that_tells_good_from_pseudo_defects(network, pills):
    good, _ = pills
    bank = PatchMemoryBank.fit(network, good, SIZE, layers=("mobilenet_v2",), max_patches=None,
                               precision=FP32)
    chosen, decision = augmented_bank(bank, network, good, precision=FP32, seed=0)
    assert set(decision) == {"augmented", "separation_plain", "separation_augmented"}
    assert decision["augmented"] == (decision["separation_augmented"] >= decision["separation_plain"])
    assert (len(chosen.bank) > len(bank.bank)) == decision["augmented"]
    always, decision = augmented_bank(bank, network, good, precision=FP32, seed=0, check=False)
    assert decision == {"augmented": True} and len(always.bank) == len(bank.bank) * (1 + len(POSES))


def test_the_detector_scores_with_the_bank_it_chose(pristine_model, pills):
    good, test = pills
    info = backbone_info(SIZE, {"source": "random"})
    detector = make_detector("reference-mobilenet+patterns+poses-always", pristine_model, info,
                             precision=FP32)
    detector.adapt(good)
    assert detector.poses["round_pill"] == {"augmented": True}
    assert "turned and mirrored references: added" in detector.describe()
    scored = detector.score(test)
    assert np.isfinite(scored.scores).all() and len(scored.scores) == len(test)
    checked = make_detector("reference-mobilenet+patterns+poses", pristine_model, info, precision=FP32)
    checked.adapt(good)
    assert "separation_plain" in checked.poses["round_pill"]
