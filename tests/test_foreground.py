"""The foreground mask from the K good parts (visinspect.methods.foreground): switched on for an
object on a plain background, off for a texture (scores unchanged), and the backdrop not counted."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visinspect.data.samples import Sample
from visinspect.methods import foreground
from visinspect.methods.memory_bank import PatchMemoryBank
from visinspect.methods.registry import backbone_info, make_detector

SIZE = 320  # 20 x 20 patch maps: the random network's reach around the object leaves a backdrop
FP32 = "fp32"
PLAIN, MASKED = "reference-mobilenet+patterns", "reference-mobilenet+patterns+foreground"
_Y, _X = np.mgrid[:SIZE, :SIZE] / SIZE


def _disc(rng: np.random.Generator, noise: float, dust: float = 0.0, shadow: float = 0.0) -> np.ndarray:
    """A striped disc in the middle of a grey backdrop with sensor noise, dust in its top-left
    corner and/or a soft shadow falling on that corner."""
    img = np.full((SIZE, SIZE, 3), 0.5) + rng.normal(0, noise, (SIZE, SIZE, 1))
    corner = (_X < 0.2) & (_Y < 0.2)
    img[corner] += rng.normal(0, dust, (int(corner.sum()), 1))
    img -= shadow * np.exp(-(_X**2 + _Y**2) / 0.03)[..., None]
    disc = np.hypot(_Y - 0.5, _X - 0.5) < 0.15
    stripes = np.sin((_X - 0.5) * 80) > 0
    img[disc] = np.where(stripes[disc, None], [0.9, 0.2, 0.1], [0.1, 0.3, 0.9])
    return img


def _blocks(rng: np.random.Generator) -> np.ndarray:
    """A texture: random colours in 16-px blocks, all over the image."""
    return np.kron(rng.random((SIZE // 16, SIZE // 16, 3)), np.ones((16, 16, 1)))


def _samples(folder: Path, images: list[np.ndarray], product: str, split: str = "train") -> list[Sample]:
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for i, img in enumerate(images):
        path = folder / f"{product}_{split}_{i}.png"
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)
        samples.append(Sample(path, product, split, 0, "good", None))
    return samples


def _detector(name: str, good: list[Sample]):
    detector = make_detector(name, None, backbone_info(SIZE, {"source": "random"}), precision=FP32)
    detector.adapt(good)
    return detector


@pytest.fixture(scope="module")
def discs(tmp_path_factory) -> list[Sample]:
    rng = np.random.default_rng(0)
    # Backdrops of different noise: the border patches' spread is the backdrop's.
    images = [_disc(rng, noise) for noise in np.linspace(0.01, 0.05, 5)]
    return _samples(tmp_path_factory.mktemp("discs"), images, "disc")


def test_ring_and_grow():
    assert foreground.ring(4, 5).sum() == 4 * 5 - 2 * 3
    spot = torch.zeros(1, 5, 5, dtype=torch.bool)
    spot[0, 0, 0] = True
    grown = foreground.grow(spot)[0]
    assert grown[:2, :2].all() and grown.sum() == 4


def test_an_object_on_a_plain_background_gets_a_mask(discs):
    detector = _detector(MASKED, discs)
    decision = detector.masking["disc"]
    assert decision["masked"] and decision["consistent"] == 1.0
    assert foreground.MIN_FOREGROUND <= decision["foreground"] <= 0.5
    mask = detector.foregrounds["disc"]
    # The middle (the disc) is counted in every good image, the corners (the backdrop) in none.
    assert mask.good_counted[:, 8:12, 8:12].all()
    assert not mask.good_counted[:, :3, :3].any() and not mask.good_counted[:, -3:, -3:].any()
    assert 0.1 < mask.expected.float().mean() < 0.6
    # The threshold is set on the masked leave-one-out maps.
    bank = detector.banks["disc"]
    assert not bank.good_maps[~mask.good_counted].any()
    np.testing.assert_allclose(bank.good_scores, bank.image_scores(bank.good_maps))
    assert "foreground mask: used" in detector.describe()


def test_a_texture_gets_no_mask_and_the_plain_scores(tmp_path):
    rng = np.random.default_rng(1)
    good = _samples(tmp_path, [_blocks(rng) for _ in range(5)], "blocks")
    test = _samples(tmp_path, [_blocks(rng) for _ in range(2)], "blocks", "test")
    masked, plain = _detector(MASKED, good), _detector(PLAIN, good)
    assert not masked.masking["blocks"]["masked"] and "blocks" not in masked.foregrounds
    assert "foreground mask: not used" in masked.describe()
    assert masked.calibrations["blocks"] == plain.calibrations["blocks"]
    ours, theirs = masked.score(test), plain.score(test)
    np.testing.assert_array_equal(ours.scores, theirs.scores)
    torch.testing.assert_close(ours.maps, theirs.maps, rtol=0, atol=0)


@pytest.mark.parametrize("change", [{"dust": 0.05}, {"shadow": 0.08}])
def test_a_change_of_the_backdrop_alone_is_not_counted(discs, tmp_path, change):
    clean = _disc(np.random.default_rng(9), 0.03)
    changed = _disc(np.random.default_rng(9), 0.03, **change)
    test = _samples(tmp_path, [clean, changed], "disc", "test")
    plain, masked = _detector(PLAIN, discs).raw(test).scores, _detector(MASKED, discs).raw(test).scores
    # Without the mask the dusty or shadowed corner raises the score; with it, not (1 %: the
    # image's standardisation shifts every patch a little).
    assert plain[1] > 1.1 * plain[0]
    assert masked[1] < 1.01 * masked[0]


def test_a_change_unlike_the_backdrop_still_counts(discs, tmp_path):
    # Dirt far from anything the good parts' borders show is foreground: the mask hides no defect.
    images = [_disc(np.random.default_rng(9), 0.03, dust=d) for d in (0.0, 0.1)]
    test = _samples(tmp_path, images, "disc", "test")
    scores = _detector(MASKED, discs).raw(test).scores
    assert scores[1] > 1.5 * scores[0]


def test_a_binary_drawing_keeps_its_pattern_score(tmp_path):
    rng = np.random.default_rng(2)
    drawings = [np.kron(rng.random((10, 10, 1)) > 0.5, np.ones((32, 32, 3))) for _ in range(3)]
    detector = _detector(MASKED, _samples(tmp_path, drawings, "board"))
    assert "board" in detector.patterns and "board" not in detector.masking
    assert "foreground mask" not in detector.describe()


def test_a_map_without_an_inside_gets_no_mask():
    k, h, w = 3, 2, 2
    bank = PatchMemoryBank(torch.randn(k * h * w, 8), torch.arange(k).repeat_interleave(h * w),
                           ("mobilenet_v2",), 32, "tiny", good_maps=torch.zeros(k, h, w))
    assert foreground.fit_foreground(bank) == (None, {"masked": False, "foreground": 0.0, "consistent": 0.0})
