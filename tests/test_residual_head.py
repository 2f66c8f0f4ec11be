"""The residual head on MobileNetV2's maps (visinspect.methods.residual_head)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visinspect.backbones.mobilenet import CHANNELS, MOBILENET_ENV
from visinspect.checkpoint import load_method_checkpoint, save_settings
from visinspect.data.samples import Sample, build_sample_table, load_rgb
from visinspect.errors import ConfigError
from visinspect.methods.registry import backbone_info, make_detector, train_method
from visinspect.methods.residual import residual_maps
from visinspect.methods.residual_head import (
    ResidualHead,
    ResidualHeadConfig,
    head_logits,
    patch_labels,
    train_head,
)
from visinspect.metrics import ranked_auroc
from visinspect.training import TrainConfig, TrainingRun

NAME = "reference-mobilenet+patterns+residual"
SIZE = 64
SQUARE = 24  # the painted defect's side (px)


def test_a_patch_is_defective_when_enough_of_its_pixels_are(tmp_path):
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:16, :16] = 255  # all of cell (0, 0)
    mask[32:48, 32:35] = 255  # 3 of cell (2, 2)'s 16 columns: under a quarter
    mask[32:48, 48:53] = 255  # 5 of cell (2, 3)'s 16 columns: over a quarter
    Image.fromarray(mask).save(tmp_path / "mask.png")
    defect = Sample(tmp_path / "x.png", "p", "test", 1, "crack", tmp_path / "mask.png")
    labels = patch_labels(defect, SIZE, 4, 0.25)
    assert labels.nonzero().tolist() == [[0, 0], [2, 3]]
    mask[:] = 0
    mask[40:42, 8:12] = 255  # a speck: under a quarter of any cell, still its cell's defect
    Image.fromarray(mask).save(tmp_path / "mask.png")
    assert patch_labels(defect, SIZE, 4, 0.25).nonzero().tolist() == [[2, 0]]
    good = Sample(tmp_path / "y.png", "p", "test", 0, "good", None)
    assert not patch_labels(good, SIZE, 4, 0.25).any()


def test_the_head_learns_differences_of_either_sign_that_a_distance_would_miss():
    # Good residuals: noise in every direction. Defective ones: one direction, either sign, no
    # longer than a good one's (a distance cannot tell them apart; a line through 0 cannot either).
    g = torch.Generator().manual_seed(0)

    def residuals(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(2 * n, 8, generator=g)
        sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1
        x[n:] = 0.3 * torch.randn(n, 8, generator=g)
        x[n:, 0] = 2.5 * sign
        return x, torch.cat([torch.zeros(n), torch.ones(n)])

    x, y = residuals(2000)
    head, losses = train_head(x, y, ResidualHeadConfig(hidden=16, epochs=30, batch_size=256))
    assert losses[-1] < losses[0]
    test, truth = residuals(500)
    logits = head_logits(head, test.T[None, :, :, None]).ravel()  # as one map (1, C, P, 1)
    assert ranked_auroc(truth.numpy() == 1, logits.numpy()) > 0.95
    norms = test.norm(dim=1)
    assert ranked_auroc(truth.numpy() == 1, norms.numpy()) < 0.6  # the distance alone misses them


SHARED = Path(__file__).resolve().parents[2] / "shared" / "weights" / "mobilenet_v2_imagenet.pth"


def painted(sample: Sample, out: Path, seed: int) -> Sample:
    """A copy of `sample` with a black or white SQUARE-px square, and its mask."""
    image, mask = load_rgb(sample.path).copy(), np.zeros((SIZE, SIZE), np.uint8)
    y, x = np.random.default_rng(seed).integers(0, SIZE - SQUARE, 2)
    image[y : y + SQUARE, x : x + SQUARE] = 255 * (seed % 2)
    mask[y : y + SQUARE, x : x + SQUARE] = 255
    path, mask_path = out / f"{sample.category}{seed}.png", out / f"{sample.category}{seed}_mask.png"
    Image.fromarray(image).save(path)
    Image.fromarray(mask).save(mask_path)
    return Sample(path, sample.category, "test", 1, "square", mask_path)


@pytest.fixture(scope="module")
def products(tiny_root, tmp_path_factory):
    """Source: round_pill's good images and painted copies of them (masked); target: grain_wood's
    train/ good images, its test/ good images and painted copies of those."""
    out = tmp_path_factory.mktemp("painted")
    samples = build_sample_table(tiny_root).samples
    pills = [s for s in samples if s.category == "round_pill" and s.label == 0]
    source = pills + [painted(s, out, i) for i, s in enumerate(pills)]
    good = [s for s in samples if s.category == "grain_wood" and s.split == "train"]
    test = [s for s in samples if s.category == "grain_wood" and s.split == "test" and s.label == 0]
    return source, good, test + [painted(s, out, 100 + i) for i, s in enumerate(test * 2)]


def test_the_head_learns_on_the_sources_and_a_checkpoint_brings_it_back(products, tmp_path):
    source, good, test = products
    info = backbone_info(SIZE, {"source": "random"})
    detector = make_detector(NAME, None, info, precision="fp32")
    with pytest.raises(ConfigError, match="residual head"):
        detector.adapt(good)  # nothing learnt yet
    learnt = detector.fit_sources(source[:5], source[5:])
    assert learnt["residual_head"]["products"]["round_pill"]["defective"] > 0
    detector.adapt(good)
    assert detector.calibrations["grain_wood"].model == "residual-head:mobilenet_v2"
    scored = detector.score(test)
    path = save_settings(tmp_path / "r.pt", **info, **learnt, method=NAME)
    _, loaded = load_method_checkpoint(path)  # weights_only=True
    again = make_detector(NAME, None, loaded, precision="fp32")
    again.adapt(good)
    np.testing.assert_allclose(again.score(test).scores, scored.scores, rtol=1e-5, atol=1e-6)


def l1_head(channels: int) -> ResidualHead:
    """A head whose logit is the residual's L1 norm: ReLU(r) + ReLU(-r), summed."""
    head = ResidualHead(channels, 2 * channels)
    with torch.no_grad():
        first, second = head.mlp[0], head.mlp[2]
        first.weight.copy_(torch.cat([torch.eye(channels), -torch.eye(channels)]))
        first.bias.zero_()
        second.weight.fill_(1.0)
        second.bias.zero_()
    return head.eval()


@pytest.mark.skipif(not SHARED.is_file(), reason=f"{SHARED} is absent (the shared ImageNet weights)")
def test_the_head_scores_each_patch_residual_so_a_defect_scores_above_the_good_images(products, monkeypatch):
    # Random MobileNetV2 maps are near constant (residuals ~1e-5): only ImageNet's tell parts apart.
    # The head is fixed (the residual's size) so that this checks the scoring, not the learning.
    monkeypatch.setenv(MOBILENET_ENV, str(SHARED))
    _, good, test = products
    detector = make_detector(NAME, None, backbone_info(SIZE, {}), precision="fp32")
    detector.head = l1_head(CHANNELS)
    detector.adapt(good)
    scored = detector.score(test)
    defective = np.array([s.label == 1 for s in test])
    assert scored.scores[defective].min() > scored.scores[~defective].max()
    bank = detector.banks["grain_wood"]
    l1 = residual_maps(detector.patch_model, bank, test, "fp32").abs().sum(1)
    np.testing.assert_allclose(scored.scores + detector.calibrations["grain_wood"].threshold,
                               bank.image_scores(l1), rtol=1e-5)


def test_training_it_without_source_images_is_refused():
    run = TrainingRun(TrainConfig(image_size=SIZE), weights="random")
    with pytest.raises(ConfigError, match="source products' images"):
        train_method(NAME, None, run)
