"""MobileNetV2's patch layers: where their weights come from, what they give, the store's own
layer for them, and the detectors that use them."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torchvision

from visinspect.backbones.mobilenet import (
    CHANNELS,
    MOBILENET_ENV,
    ImageStandardisation,
    LocalContrastNormalisation,
    build_mobilenet,
    stride8_part,
)
from visinspect.backbones.store import FeatureStore
from visinspect.checkpoint import load_checkpoint
from visinspect.cli import main
from visinspect.data.samples import build_sample_table, model_input
from visinspect.errors import CheckpointError, VisinspectError
from visinspect.methods.registry import backbone_info, load_detector, make_detector

SHARED = Path(__file__).resolve().parents[2] / "shared" / "weights" / "mobilenet_v2_imagenet.pth"


@pytest.fixture(scope="module")
def mobilenet_file(tmp_path_factory) -> Path:
    """A torchvision-layout MobileNetV2 file (random weights, classifier included)."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("weights") / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), path)
    return path


@pytest.mark.parametrize("size", [32, 50, 64])
def test_maps_have_96_channels_at_a_sixteenth_of_the_size_rounded_up(size):
    model, provenance = build_mobilenet("random")
    with torch.no_grad():
        maps = model(torch.zeros(2, 3, size, size))
    assert maps.shape == (2, CHANNELS, -(-size // 16), -(-size // 16))
    assert provenance["source"] == "random" and not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_each_image_is_standardised_first_so_lighting_does_not_move_the_maps():
    """A part under other lighting (each channel scaled and shifted) reaches the network as the
    same input; a local change does not; a flat image stays finite."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    gain = torch.tensor([1.7, 0.6, 2.5]).view(1, 3, 1, 1)
    offset = torch.tensor([0.4, -1.0, 2.0]).view(1, 3, 1, 1)
    standardise = ImageStandardisation()
    assert torch.allclose(standardise(x * gain + offset), standardise(x), atol=1e-5)
    marked = x.clone()
    marked[:, :, 10:20, 10:20] += 3.0
    assert (standardise(marked) - standardise(x)).abs().max() > 0.5
    assert standardise(torch.full((1, 3, 8, 8), 0.3)).abs().max() < 1e-3
    model, _ = build_mobilenet("random")
    with torch.no_grad():
        assert torch.equal(model(x), model.blocks(standardise(x)))


def test_local_contrast_normalisation_evens_out_light_that_falls_off_across_a_part():
    """A light gradient across the image barely moves the normalised image away from the borders,
    where the per-image standardisation alone keeps it; a local mark still shows; a flat image stays
    finite; and the store keeps the two networks' features apart (other parameter names)."""
    torch.manual_seed(0)
    x = torch.rand(1, 3, 64, 64)
    lit = x * torch.linspace(0.4, 1.6, 64).view(1, 1, 1, -1) + torch.linspace(0, 2, 64).view(1, 1, -1, 1)
    lcn, standardise = LocalContrastNormalisation(), ImageStandardisation()
    inner = (..., slice(16, 48), slice(16, 48))
    moved = (standardise(lit) - standardise(x))[inner].abs().mean()
    assert (lcn(lit) - lcn(x))[inner].abs().mean() < 0.25 * moved
    marked = x.clone()
    marked[..., 28:36, 28:36] += 2.0
    assert (lcn(marked) - lcn(x))[inner].abs().max() > 1.0
    assert torch.isfinite(lcn(torch.full((1, 3, 32, 32), 0.3))).all()
    local, _ = build_mobilenet("random", contrast="local")
    plain, _ = build_mobilenet("random")
    with torch.no_grad():
        assert torch.equal(local(x), plain(lcn(x)))
    a, b = (FeatureStore(None).namespace(m, 64, "fp32", layer=layer).weights
            for m, layer in ((plain, "mobilenet_v2"), (local, "mobilenet_v2_lcn")))
    assert a != b  # the same weights, other names: the store can never mix the two
    with pytest.raises(VisinspectError, match="contrast must be one of"):
        build_mobilenet("random", contrast="nope")


def test_two_levels_are_the_stride8_maps_with_the_stride16_maps_upsampled_to_them(tmp_path):
    """The stride-8 layer is the same network's earlier block (its own store entry); a bank on both
    levels has four times the patches of 32 + 96 values, each level 3x3-averaged at its own size."""
    from visinspect.data.samples import Sample
    from visinspect.methods.memory_bank import PatchMemoryBank, patch_features

    model, _ = build_mobilenet("random")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(stride8_part(model)(x), model.blocks[:7](model.features[0](x)))
    store = FeatureStore(tmp_path / "store")
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"{i}.png")
        cv2.imwrite(str(paths[-1]), (np.random.default_rng(i).random((64, 64, 3)) * 255).astype(np.uint8))
    good = [Sample(p, "part", "train", 0, "good", None) for p in paths]
    bank = PatchMemoryBank.fit(model, good, 64, layers=("mobilenet_v2_s8", "mobilenet_v2"), max_patches=None,
                               store=store, precision="fp32")
    assert bank.bank.shape == (2 * 8 * 8, 32 + CHANNELS)
    fine = store.fetch_samples(model, good, 64, precision="fp32", layer="mobilenet_v2_s8").batch(slice(None))
    coarse = store.fetch_samples(model, good, 64, precision="fp32", layer="mobilenet_v2").batch(slice(None))
    assert fine.shape[1:] == (32, 8, 8) and coarse.shape[1:] == (CHANNELS, 4, 4)
    expected = patch_features(fine, coarse).permute(0, 2, 3, 1).reshape(-1, 32 + CHANNELS)
    assert torch.allclose(bank.bank, expected, atol=1e-5)


def test_random_weights_are_the_same_every_time_and_leave_the_global_seed_alone():
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    a, _ = build_mobilenet("random")
    assert torch.equal(torch.rand(1), expected)
    b, _ = build_mobilenet("random")
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    assert all(torch.equal(x, y) for x, y in pairs)


def test_a_file_and_the_environment_variable_load_the_weights(mobilenet_file, monkeypatch):
    expected = torch.load(mobilenet_file, weights_only=True)["features.0.0.weight"]
    model, provenance = build_mobilenet(mobilenet_file)
    assert torch.equal(model.blocks[0][0].weight, expected)
    assert provenance["source"] == "file" and len(provenance["sha256"]) == 64
    monkeypatch.setenv(MOBILENET_ENV, str(mobilenet_file))
    model, provenance = build_mobilenet("auto")
    assert provenance["source"] == f"env:{MOBILENET_ENV}"
    assert torch.equal(model.blocks[0][0].weight, expected)


def test_a_wrong_or_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(VisinspectError, match="does not exist"):
        build_mobilenet(tmp_path / "nope.pth")
    vgg = tmp_path / "vgg.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, vgg)
    with pytest.raises(VisinspectError, match=r"vgg\.pth does not hold torchvision MobileNetV2 weights"):
        build_mobilenet(vgg)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(VisinspectError, match="cannot load MobileNetV2 weights"):
        build_mobilenet(junk)


def test_offline_without_weights_warns_and_falls_back_to_random(tmp_path, monkeypatch):
    monkeypatch.delenv(MOBILENET_ENV, raising=False)
    monkeypatch.setenv("VISINSPECT_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    with pytest.warns(UserWarning, match="MobileNetV2 .* RANDOMLY INITIALISED"):
        _, provenance = build_mobilenet("auto")
    assert provenance["source"] == "random"


@pytest.mark.skipif(not SHARED.is_file(), reason=f"{SHARED} is absent (the shared ImageNet weights)")
def test_the_shared_imagenet_file_loads():
    _, provenance = build_mobilenet(SHARED)
    assert provenance["sha256"] == "9a58eafba7067d6b327c1ecdd95d6c5ff612cf1a5cd801b8e4211017c04002b9"


def test_the_store_keeps_mobilenet_maps_in_their_own_namespace(tmp_path, tiny_root, pristine_model):
    samples = build_sample_table(tiny_root).samples[:3]
    store = FeatureStore(tmp_path / "store")
    model, _ = build_mobilenet("random")
    first = store.fetch_samples(model, samples, 64, precision="fp32", layer="mobilenet_v2")
    again = store.fetch_samples(model, samples, 64, precision="fp32", layer="mobilenet_v2")
    vgg = store.fetch_samples(pristine_model, samples, 64, precision="fp32")
    assert first.computed == 3 and again.computed == 0 and vgg.computed == 3
    assert first.batch([0]).shape == (1, CHANNELS, 4, 4)
    assert set(first.identity).isdisjoint(vgg.identity)
    with torch.no_grad():
        direct = model(torch.stack([model_input(s.path, 64) for s in samples[:2]]))
    torch.testing.assert_close(first.batch([0, 1]), direct, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_the_mobilenet_reference_uses_every_patch_and_takes_random_weights_with_a_random_classifier(
    tiny_root, pristine_model, monkeypatch
):
    monkeypatch.setenv("VISINSPECT_OFFLINE", "1")  # a download attempt would fail the test
    samples = build_sample_table(tiny_root).samples
    good = [s for s in samples if s.category == "round_pill" and s.split == "train"]
    test = [s for s in samples if s.category == "round_pill" and s.split == "test"]
    info = backbone_info(64, {"source": "random"})
    detector = make_detector("reference-mobilenet", pristine_model, info, precision="fp32")
    assert detector.patch_provenance["source"] == "random"
    detector.adapt(good)
    bank = detector.banks["round_pill"]
    assert bank.bank.shape == (len(good) * 16, CHANNELS)  # 4 x 4 patches per image, none dropped
    scored = detector.score(test)
    assert scored.maps.shape == (len(test), 4, 4) and np.isfinite(scored.scores).all()


def test_train_and_evaluate_name_the_patch_network(tmp_path, tiny_root, capsys):
    checkpoint = tmp_path / "r.pt"
    assert main(["train", "--method", "reference-mobilenet", "--image-size", "32", "--backbone-weights",
                 "random", "--out", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "trains nothing" in out and "patch features: backbone: MobileNetV2, RANDOM initialisation" in out
    report = tmp_path / "report.json"
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(tiny_root), "--categories",
                 "round_pill", "--calibrate", "2", "--json", str(report)]) == 0
    assert "patch features: backbone: MobileNetV2" in capsys.readouterr().out
    saved = json.loads(report.read_text())
    assert saved["method"] == "reference-mobilenet" and saved["patch_backbone"]["network"] == "MobileNetV2"


def test_the_recommended_methods_checkpoint_keeps_settings_only_and_pins_its_weights(
    mobilenet_file, tmp_path, tiny_root, monkeypatch, capsys
):
    monkeypatch.setenv(MOBILENET_ENV, str(mobilenet_file))
    checkpoint = tmp_path / "r.pt"
    assert main(["train", "--method", "reference-mobilenet", "--image-size", "32",
                 "--out", str(checkpoint)]) == 0
    assert "saved its settings (no weights)" in capsys.readouterr().out
    data = load_checkpoint(checkpoint)
    assert data["kind"] == "settings" and "state_dict" not in data
    assert data["backbone"]["source"] == f"env:{MOBILENET_ENV}" and checkpoint.stat().st_size < 100_000
    good = [tiny_root / "round_pill" / "train" / "good"]
    assert load_detector(checkpoint, reference=good).patch_provenance == data["backbone"]
    # Other MobileNetV2 weights here: scored with them, and a warning names both files.
    other = tmp_path / "other.pth"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), other)
    monkeypatch.setenv(MOBILENET_ENV, str(other))
    with pytest.warns(UserWarning, match="differ from the ones recorded"):
        assert load_detector(checkpoint, reference=good).patch_provenance["path"] == str(other)
    # None at all here: random features would score nothing, so it refuses.
    monkeypatch.delenv(MOBILENET_ENV)
    monkeypatch.setenv("VISINSPECT_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))
    with pytest.warns(UserWarning, match="RANDOM"), pytest.raises(CheckpointError, match=MOBILENET_ENV):
        load_detector(checkpoint, reference=good)
