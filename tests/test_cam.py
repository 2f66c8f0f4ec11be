"""Tests for class activation maps: the weighted sum, its exact link to the logit, and scaling."""

import numpy as np
import pytest
import torch

from visinspect.backbones.cam import (
    HeatmapNormalizer,
    anomaly_cam,
    class_activation_map,
    minmax_per_image,
    normalize,
    upsample,
)
from visinspect.backbones.vgg16 import ANOMALY


def test_cam_is_the_weighted_sum_of_feature_maps():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(2, 3, 2, 4, generator=g)
    weight = torch.tensor([0.5, -2.0, 3.0])
    expected = torch.zeros(2, 2, 4)
    for n in range(2):
        for y in range(2):
            for x in range(4):
                for k in range(3):
                    expected[n, y, x] += weight[k] * maps[n, k, y, x]
    torch.testing.assert_close(class_activation_map(maps, weight), expected)
    torch.testing.assert_close(class_activation_map(maps, weight, bias=1.5), expected + 1.5)


def test_mean_cam_plus_bias_is_the_anomaly_logit(pristine_model):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        maps = pristine_model.feature_maps(x)
        logits = pristine_model.head(maps)
        with_bias = anomaly_cam(pristine_model, maps, include_bias=True)
        without = anomaly_cam(pristine_model, maps)
    assert maps.shape == (2, 512, 4, 4) and with_bias.shape == (2, 4, 4)
    torch.testing.assert_close(with_bias.mean((1, 2)), logits[:, ANOMALY], rtol=1e-4, atol=1e-5)
    bias = pristine_model.fc.bias[ANOMALY].detach()
    torch.testing.assert_close(without.mean((1, 2)) + bias, logits[:, ANOMALY], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(with_bias - without, bias.expand(2, 4, 4))


def test_gap_head_is_exactly_the_cam_of_each_class(pristine_model):
    # Global average pooling commutes with the dense layer: logit_c = mean(sum_k w_ck A_k) + b_c.
    maps = torch.rand(3, 512, 5, 5, generator=torch.Generator().manual_seed(2))
    fc = pristine_model.fc
    with torch.no_grad():
        logits = pristine_model.head(maps)
        for c in range(2):
            cam = class_activation_map(maps, fc.weight[c], fc.bias[c])
            torch.testing.assert_close(cam.mean((1, 2)), logits[:, c], rtol=1e-4, atol=1e-5)


def test_upsample_shape_and_mean():
    cam = torch.rand(4, 7, 7, generator=torch.Generator().manual_seed(3))
    assert upsample(cam, 32).shape == (4, 32, 32)
    assert upsample(cam, (16, 24)).shape == (4, 16, 24)
    up = upsample(cam, 56)
    torch.testing.assert_close(up.mean((1, 2)), cam.mean((1, 2)), atol=1e-3, rtol=0)
    assert up.min() >= cam.min() - 1e-6 and up.max() <= cam.max() + 1e-6  # bilinear never overshoots


def test_minmax_per_image_range_and_independence():
    cam = torch.stack([torch.arange(9.0).view(3, 3), -5 * torch.arange(9.0).view(3, 3)])
    out = minmax_per_image(cam)
    assert out.shape == cam.shape
    for img in out:
        assert img.min() == 0.0 and img.max() == 1.0
    torch.testing.assert_close(out[0], torch.arange(9.0).view(3, 3) / 8)
    torch.testing.assert_close(out[1], 1 - torch.arange(9.0).view(3, 3) / 8)


def test_minmax_per_image_constant_map_gives_zeros():
    cam = torch.stack([torch.full((4, 4), 3.0), torch.rand(4, 4)])
    out = minmax_per_image(cam)
    assert not torch.isnan(out).any()
    assert (out[0] == 0).all() and out[1].max() == 1.0


def test_normalizer_fit_minmax_and_percentile():
    cams = torch.linspace(-2.0, 8.0, 1001).view(1, 7, 143)
    mm = HeatmapNormalizer.fit(cams, method="minmax")
    assert (mm.low, mm.high) == pytest.approx((-2.0, 8.0)) and mm.method == "minmax"
    pc = HeatmapNormalizer.fit(cams, method="percentile", percentiles=(10.0, 90.0))
    expected = np.percentile(cams.numpy().astype(np.float64), [10.0, 90.0])
    assert (pc.low, pc.high) == pytest.approx(tuple(expected), abs=1e-5)
    assert pc.method == "percentile"


def test_normalizer_clips_to_unit_range():
    norm = HeatmapNormalizer(low=1.0, high=3.0)
    out = norm(torch.tensor([[0.0, 1.0, 2.0, 3.0, 10.0]]))
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 0.5, 1.0, 1.0]]))
    torch.testing.assert_close(normalize(torch.tensor([[2.0]]), "dataset", norm), torch.tensor([[0.5]]))


def test_normalizer_on_constant_cams_does_not_divide_by_zero():
    norm = HeatmapNormalizer.fit(torch.full((2, 3, 3), 4.0), method="minmax")
    assert norm.high > norm.low
    assert not torch.isnan(norm(torch.full((1, 3, 3), 4.0))).any()


def test_normalizer_dict_round_trip():
    norm = HeatmapNormalizer.fit(torch.rand(2, 8, 8), method="percentile")
    again = HeatmapNormalizer.from_dict(norm.to_dict())
    assert again == norm
    assert HeatmapNormalizer.from_dict({"low": 0, "high": 1}).method == "percentile"


def test_normalizer_errors():
    with pytest.raises(ValueError, match="'median'"):
        HeatmapNormalizer.fit(torch.rand(1, 4, 4), method="median")
    with pytest.raises(ValueError, match="zero CAMs"):
        HeatmapNormalizer.fit(torch.zeros(0, 4, 4))
    with pytest.raises(ValueError, match="fitted HeatmapNormalizer"):
        normalize(torch.rand(1, 4, 4), "dataset")
    with pytest.raises(ValueError, match="'pixel'"):
        normalize(torch.rand(1, 4, 4), "pixel")


def test_normalizer_fits_a_real_validation_split_at_224_px():
    """400 upsampled 224-px CAMs are 20 million values, more than torch.quantile accepts (2**24):
    the real-data comparison failed on this before the percentiles moved to NumPy."""
    cams = (torch.arange(400 * 224 * 224) % 1001).float().view(400, 224, 224)
    norm = HeatmapNormalizer.fit(cams, "percentile", (0.0, 50.0))
    assert (norm.low, norm.high) == pytest.approx((0.0, 500.0), abs=0.5)
