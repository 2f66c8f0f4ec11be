"""Tests for visinspect.methods.memory_bank: the patch memory bank's nearest-neighbour score and fusion."""

import dataclasses
import json

import cv2
import numpy as np
import pytest
import torch

from visinspect.backbones.cam import anomaly_cam, upsample
from visinspect.backbones.store import FeatureStore
from visinspect.backbones.vgg16 import VGG16CAM
from visinspect.data.drawing import render_sample
from visinspect.data.samples import Sample, model_input, to_tensor
from visinspect.errors import ConfigError, DataError, VisinspectError
from visinspect.methods.fusion import FusedScorer, Standardizer, fit_fusion
from visinspect.methods.memory_bank import PatchMemoryBank, backbone_maps, greedy_coreset, patch_features

SIZE = 64  # conv4_3 maps are 8 x 8
FP32 = {"precision": "fp32"}  # bf16 autocast (on CPUs that have it) would blur the ~0 distances
CATEGORY = "bottle_top"
DEFECTS = ("contamination", "crack", "scratch")


def _write(path, image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), image[..., ::-1])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return VGG16CAM()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Four good train images and, for the first one, its defective twins (same scene)."""
    root = tmp_path_factory.mktemp("twins")
    good = []
    for seed in range(4):
        image, _ = render_sample(CATEGORY, None, seed, SIZE)
        path = root / "train" / "good" / f"{seed:03d}.png"
        _write(path, image)
        good.append(Sample(path, CATEGORY, "train", 0, "good", None))
    defects = {}
    for defect in DEFECTS:
        image, mask = render_sample(CATEGORY, defect, 0, SIZE)
        path = root / "test" / defect / "000.png"
        _write(path, image)
        defects[defect] = (Sample(path, CATEGORY, "test", 1, defect, None), mask)
    return good, defects


@pytest.fixture(scope="module")
def bank(model, data):
    return PatchMemoryBank.fit(
        model, data[0], image_size=SIZE, max_patches=None, batch_size=4, **FP32
    )


def test_an_image_of_the_bank_scores_zero(model, data, bank):
    good, _ = data
    assert bank.bank.shape == (4 * 8 * 8, 512) and bank.bank.dtype == torch.float32
    scores, maps = bank.score(model, good[:2], batch_size=1, **FP32)
    assert maps.shape == (2, 8, 8)
    assert scores.shape == (2,) and np.all(scores < 1e-4)
    # Its leave-one-out score (against the other good images) is clearly above zero.
    assert bank.good_scores.shape == (4,) and bank.good_maps.shape == (4, 8, 8)
    assert np.all(bank.good_scores > 100 * scores.max())
    calib = bank.calibrate()
    assert calib.threshold == bank.good_scores.max() and calib.images == [str(s.path) for s in good]
    assert calib.category == CATEGORY and calib.model == "reference:conv4_3"


def test_a_pasted_defect_raises_the_score_where_it_is(model, data, bank):
    good, defects = data
    clean_score = bank.score(model, good[:1], **FP32)[0][0]
    for defect, (sample, mask) in defects.items():
        (score,), (dist,) = bank.score(model, [sample], **FP32)
        assert score > clean_score + 1e-3, defect
        # Mask cells at conv4_3 resolution (8 x 8 px each); "near" = within one cell.
        cells = cv2.resize(mask.astype(np.float32), (8, 8), interpolation=cv2.INTER_AREA) > 0
        near = cv2.dilate(cells.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        hottest = np.unravel_index(dist.argmax().item(), dist.shape)
        assert near[hottest], defect
        assert dist[torch.from_numpy(cells)].mean() > dist[torch.from_numpy(~near)].mean(), defect


@pytest.mark.precision
def test_subsampling_is_seeded_and_bounded(model, data):
    good, _ = data
    a = PatchMemoryBank.fit(model, good[:2], image_size=SIZE, max_patches=50, seed=3)
    b = PatchMemoryBank.fit(model, good[:2], image_size=SIZE, max_patches=50, seed=3)
    assert a.bank.shape == (50, 512) and torch.equal(a.bank, b.bank)
    assert sorted(a.owners.unique().tolist()) == [0, 1]
    assert np.all(np.isfinite(a.good_scores))


def test_greedy_coreset_covers_rare_points():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 10
    points = centres.repeat_interleave(100, 0) + 0.01 * torch.randn(300, 16, generator=g)
    outlier = torch.full((1, 16), 40.0)  # one rare point: a random subset would likely miss it
    points = torch.cat([points, outlier])
    chosen = greedy_coreset(points, 4, seed=1)
    assert chosen.tolist() == sorted(chosen.tolist()) and 300 in chosen.tolist()
    assert sorted({i // 100 for i in chosen.tolist()}) == [0, 1, 2, 3]  # one per cluster
    assert torch.equal(chosen, greedy_coreset(points, 4, seed=1))


def test_score_features_shares_the_classifier_pass(model, data, tmp_path):
    """One backbone pass gives the classifier's logits and CAM and the reference score."""
    good, defects = data
    layers = ("conv4_3", "conv5_3")
    # A float32 feature store, so that the stored path equals one full pass up to float rounding.
    store = FeatureStore(tmp_path / "store", dtype="float32")
    two = PatchMemoryBank.fit(model, good, image_size=SIZE, layers=layers, max_patches=None, store=store,
                              **FP32)
    assert two.bank.shape[1] == 1024
    sample = defects["crack"][0]
    with torch.inference_mode():
        x = to_tensor(cv2.imread(str(sample.path))[..., ::-1].copy(), SIZE)[None]
        c4, c5 = backbone_maps(model, x)
        logits, cam = model.head(c5), anomaly_cam(model, c5)
        scores, maps = two.score_features(patch_features(c4, c5))
    assert logits.shape == (1, 2) and cam.shape == (1, 4, 4)
    expected_scores, expected_maps = two.score(model, [sample], store=store, **FP32)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-4)
    torch.testing.assert_close(maps, expected_maps, rtol=1e-4, atol=1e-5)
    with pytest.raises(VisinspectError, match="1024"):
        two.score_features(patch_features(c4))


def test_a_patch_scores_its_mean_distance_to_its_k_nearest_good_patches(model, data, bank):
    """neighbours=3 (SPADE's k nearest): each patch's score is the mean of its three smallest
    distances to the bank (leave-one-out for the good images' own maps), never below the nearest."""
    good, defects = data
    three = PatchMemoryBank.fit(model, good, image_size=SIZE, max_patches=None, neighbours=3, **FP32)
    assert torch.equal(three.bank, bank.bank)
    sample = defects["crack"][0]
    _, (one_map,) = bank.score(model, [sample], **FP32)
    _, (three_map,) = three.score(model, [sample], **FP32)
    feats = patch_features(FeatureStore(None).compute(model, model_input(sample.path, SIZE)[None], **FP32)
                           .batch(slice(None)))
    queries = feats.permute(0, 2, 3, 1).reshape(-1, 512)
    expected = torch.cdist(queries, bank.bank).topk(3, dim=1, largest=False).values.mean(1).view(8, 8)
    assert torch.allclose(three_map, expected, atol=1e-3)
    assert torch.all(three_map >= one_map - 1e-4) and torch.any(three_map > one_map + 1e-3)
    assert torch.all(three.good_maps >= bank.good_maps - 1e-4)
    with pytest.raises(VisinspectError, match="neighbours must be at least 1"):
        PatchMemoryBank.fit(model, good, image_size=SIZE, neighbours=0)


def test_fit_refuses_bad_input(model, data):
    good, defects = data
    with pytest.raises(DataError, match="never test images"):
        PatchMemoryBank.fit(model, [good[0], defects["crack"][0]], image_size=SIZE)
    with pytest.raises(DataError, match=r"at least 2 good images of 'bottle_top' \(got 1\)"):
        PatchMemoryBank.fit(model, good[:1], image_size=SIZE)
    with pytest.raises(VisinspectError, match="layers"):
        PatchMemoryBank.fit(model, good, image_size=SIZE, layers=("conv3_3",))


def test_fusion_standardises_on_good_images():
    rng = np.random.default_rng(0)
    cls, ref = rng.normal(5.0, 3.0, 20), rng.normal(40.0, 0.5, 20)
    cams = torch.from_numpy(rng.normal(2.0, 1.0, (20, 4, 4))).float()
    ref_maps = torch.from_numpy(rng.normal(30.0, 4.0, (20, 8, 8))).float()
    fused = fit_fusion(cls, ref, cams, ref_maps)
    z = fused.score(cls, ref)
    assert abs(z.mean()) < 1e-9
    # Each score is on the scale of its good-image spread: +1 std of either moves z by 1/2.
    np.testing.assert_allclose(fused.score(cls + cls.std(ddof=1), ref) - z, 0.5, rtol=1e-9)
    heat = fused.heatmap(cams, ref_maps)
    assert heat.shape == (20, 8, 8) and abs(heat.mean().item()) < 0.05
    with pytest.raises(DataError, match="same good images"):
        fit_fusion(cls, ref[:5])
    with pytest.raises(DataError, match="both"):
        fit_fusion(cls, ref, cams)
    # The classifier's share: 1 is the classifier's z-score alone, and it weighs the maps too.
    alone = fit_fusion(cls, ref, cams, ref_maps, weight=1.0)
    np.testing.assert_allclose(alone.score(cls, ref), alone.classifier(cls))
    assert torch.allclose(alone.heatmap(cams, ref_maps), alone.classifier_map(upsample(cams, (8, 8))))
    with pytest.raises(ConfigError, match=r"in \[0, 1\]; got 1.5"):
        fit_fusion(cls, ref, weight=1.5)


def test_fusion_floors_a_zero_spread_and_round_trips():
    fused = fit_fusion([1.0, 1.0, 1.0], [2.0, 3.0, 4.0])
    assert fused.classifier.std > 0 and np.isfinite(fused.score([1.0], [3.0])).all()
    assert fused.classifier_map is None
    with pytest.raises(VisinspectError, match="without good-image maps"):
        fused.heatmap(torch.zeros(1, 4, 4), torch.zeros(1, 8, 8))
    maps = (Standardizer(5, 6), Standardizer(7, 8))
    full = FusedScorer(Standardizer(1, 2), Standardizer(3, 4), *maps, weight=0.3)
    for scorer in (fused, full):
        d = json.loads(json.dumps(scorer.to_dict()))
        assert FusedScorer.from_dict(d) == scorer


def test_the_model_can_still_be_trained_after_a_bank_is_fitted(data):
    """Fitting and scoring run in inference mode; they must not leave the model's weights as
    inference tensors (a later training step would fail), nor the mode switched on."""
    torch.manual_seed(0)
    model = VGG16CAM()
    bank = PatchMemoryBank.fit(model, data[0], image_size=SIZE, batch_size=4, **FP32)
    bank.score(model, data[0][:1], **FP32)
    assert not torch.is_inference_mode_enabled()
    model.train()
    loss = model(torch.randn(2, 3, SIZE, SIZE)).sum()
    loss.backward()
    assert model.fc.weight.grad is not None


def test_patch_distances_are_computed_once_per_bank_and_images(model, data, bank, monkeypatch):
    """The reference, top-5 % and fused rows of a split score the same images against the same
    bank: the second scoring reuses the distances (and a changed bank does not)."""
    good, defects = data
    tests = [s for s, _ in defects.values()]
    first_scores, first_maps = bank.score(model, tests, **FP32)
    calls = []
    real = PatchMemoryBank.score_features
    monkeypatch.setattr(PatchMemoryBank, "score_features", lambda self, f: calls.append(1) or real(self, f))
    top = dataclasses.replace(bank, top=0.25)  # the same patches, another image score
    scores, maps = top.score(model, tests, **FP32)
    assert not calls
    torch.testing.assert_close(maps, first_maps)
    assert (scores <= first_scores + 1e-6).all()  # a top-25 % mean is at most the largest
    np.testing.assert_allclose(scores, top.image_scores(first_maps))
    maps.zero_()  # a caller's in-place change does not reach the remembered maps
    torch.testing.assert_close(bank.score(model, tests, **FP32)[1], first_maps)
    other = PatchMemoryBank.fit(model, good[:3], image_size=SIZE, max_patches=None, **FP32)
    other.score(model, tests, **FP32)
    assert calls


def test_a_bank_is_built_once_per_good_images_size_and_seed(model, data, monkeypatch):
    """The reference, top-5 % and fused detectors of a product fit the same bank: the second fit
    reuses it (another `top` only changes the image scores); other images or settings do not."""
    good, _ = data
    first = PatchMemoryBank.fit(model, good[:3], image_size=SIZE, max_patches=60, seed=1, **FP32)
    calls = []
    real = PatchMemoryBank.nearest
    monkeypatch.setattr(PatchMemoryBank, "nearest", lambda *a, **k: calls.append(1) or real(*a, **k))
    top = PatchMemoryBank.fit(model, good[:3], image_size=SIZE, max_patches=60, seed=1, top=0.25, **FP32)
    assert not calls
    assert torch.equal(top.bank, first.bank) and torch.equal(top.good_maps, first.good_maps)
    np.testing.assert_allclose(top.good_scores, top.image_scores(first.good_maps))
    top.good_maps.zero_()  # a caller's in-place change does not reach the remembered maps
    again = PatchMemoryBank.fit(model, good[:3], image_size=SIZE, max_patches=60, seed=1, **FP32)
    np.testing.assert_array_equal(again.good_scores, first.good_scores)
    for changed in ({"seed": 2}, {"max_patches": 61}):
        settings = {"max_patches": 60, "seed": 1, **changed}
        PatchMemoryBank.fit(model, good[:3], image_size=SIZE, **settings, **FP32)
        assert len(calls) == 1
        calls.clear()
    PatchMemoryBank.fit(model, good[1:], image_size=SIZE, max_patches=60, seed=1, **FP32)
    assert calls
