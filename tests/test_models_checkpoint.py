"""Tests for the VGG16-CAM model, where its backbone weights come from, and safe checkpoints."""

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from visinspect.backbones import vgg16
from visinspect.backbones.vgg16 import (
    CLASS_NAMES,
    OFFLINE_ENV,
    TORCHVISION_URL,
    VGG16CAM,
    WEIGHTS_ENV,
    load_backbone_weights,
    logit_margin,
)
from visinspect.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    load_checkpoint,
    load_classifier,
    save_checkpoint,
    save_classifier,
)
from visinspect.errors import CheckpointError, VisinspectError

# Parameters of conv1_1 .. conv4_3 (frozen) and of conv5_1 .. conv5_3 + the dense layer (trained).
N_FROZEN = 7_635_264
N_TRAINABLE = 3 * (512 * 512 * 9 + 512) + 512 * 2 + 2


class WritesMarker:
    """A pickle payload that creates a file when unpickled: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def one_line_naming(err: pytest.ExceptionInfo, path: Path) -> bool:
    return str(path) in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- the model


def test_frozen_and_trainable_parameters(pristine_model):
    trainable = {n for n, p in pristine_model.named_parameters() if p.requires_grad}
    assert trainable == {f"features.{i}.{w}" for i in (24, 26, 28) for w in ("weight", "bias")} | {
        "fc.weight", "fc.bias"}
    params = list(pristine_model.parameters())
    assert sum(p.numel() for p in params if not p.requires_grad) == N_FROZEN
    assert sum(p.numel() for p in params if p.requires_grad) == N_TRAINABLE
    assert len(pristine_model.frozen) == vgg16.FROZEN_END
    assert isinstance(pristine_model.trainable[0], nn.Conv2d)  # conv5_1 starts the trainable part


def test_set_frozen_range(fresh_model):
    fresh_model.set_frozen(0)
    assert all(p.requires_grad for p in fresh_model.parameters())
    with pytest.raises(ValueError, match="frozen_end"):
        fresh_model.set_frozen(31)


def test_feature_map_shape(pristine_model):
    with torch.no_grad():
        maps = pristine_model.feature_maps(torch.randn(1, 3, 112, 112))
        logits = pristine_model(torch.randn(1, 3, 112, 112))
    assert maps.shape == (1, 512, 7, 7)  # 224 px would give 14 x 14: the last max-pool is dropped
    assert (maps >= 0).all()  # conv5_3 is followed by its ReLU
    assert logits.shape == (1, len(CLASS_NAMES))


def test_logit_margin_is_the_log_odds():
    logits = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    p = torch.softmax(logits, dim=1)[:, 1]
    torch.testing.assert_close(logit_margin(logits).double(), torch.log(p / (1 - p)), rtol=1e-5, atol=1e-5)


def test_logit_margin_keeps_order_where_probability_saturates():
    logits = torch.tensor([[0.0, 20.0], [0.0, 25.0], [1.0, 40.0]])
    p = torch.softmax(logits, dim=1)[:, 1]
    assert (p == 1.0).all()  # float32 cannot tell these images apart
    margins = logit_margin(logits)
    assert margins.tolist() == [20.0, 25.0, 39.0]


# ----------------------------------------------------------------------------- backbone weights


@pytest.fixture(scope="module")
def donor_features(pristine_model) -> dict[str, torch.Tensor]:
    """Conv weights that differ from the session model's, as a file would hold them."""
    return {k: v + 1.0 for k, v in pristine_model.features.state_dict().items()}


@pytest.fixture(scope="module")
def features_file(donor_features, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "vgg16_features.pth"
    torch.save({f"features.{k}": v for k, v in donor_features.items()}, path)
    return path


def assert_loaded(model: VGG16CAM, donor: dict[str, torch.Tensor]) -> None:
    for k, v in model.features.state_dict().items():
        assert torch.equal(v, donor[k]), k


def test_random_weights_leave_the_model_alone(fresh_model, pristine_model):
    assert load_backbone_weights(fresh_model, "random") == {"source": "random", "path": None, "sha256": None}
    assert torch.equal(fresh_model.features[0].weight, pristine_model.features[0].weight)


def test_features_only_file(fresh_model, donor_features, features_file):
    provenance = load_backbone_weights(fresh_model, features_file)
    assert_loaded(fresh_model, donor_features)
    assert provenance == {"source": "file", "path": str(features_file),
                          "sha256": hashlib.sha256(features_file.read_bytes()).hexdigest()}


def test_torchvision_style_full_file(fresh_model, donor_features, tmp_path):
    path = tmp_path / "vgg16-full.pth"
    full = {f"features.{k}": v for k, v in donor_features.items()}
    full |= {"classifier.0.weight": torch.zeros(4, 8), "classifier.0.bias": torch.zeros(4)}
    torch.save(full, path)
    load_backbone_weights(fresh_model, path)
    assert_loaded(fresh_model, donor_features)


def test_file_with_wrong_keys(fresh_model, tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)}, path)
    with pytest.raises(VisinspectError, match="torchvision layout") as err:
        load_backbone_weights(fresh_model, path)
    assert one_line_naming(err, path)


def test_file_with_wrong_shapes(fresh_model, donor_features, tmp_path):
    path = tmp_path / "narrow.pth"
    torch.save({k: v[..., :1] if v.ndim == 4 else v for k, v in donor_features.items()}, path)
    with pytest.raises(VisinspectError, match="other shapes") as err:
        load_backbone_weights(fresh_model, path)
    assert one_line_naming(err, path)


@pytest.mark.parametrize("content", ["tensor", "garbage"])
def test_file_that_is_not_a_state_dict(fresh_model, tmp_path, content):
    path = tmp_path / "weights.pth"
    if content == "tensor":
        torch.save(torch.zeros(3), path)
    else:
        path.write_bytes(os.urandom(300))
    with pytest.raises(VisinspectError) as err:
        load_backbone_weights(fresh_model, path)
    assert str(path) in str(err.value)


def test_missing_weights_file(fresh_model, tmp_path):
    with pytest.raises(VisinspectError, match="does not exist") as err:
        load_backbone_weights(fresh_model, tmp_path / "nope.pth")
    assert one_line_naming(err, tmp_path / "nope.pth")


def test_environment_variable_is_honoured(fresh_model, donor_features, features_file, monkeypatch):
    monkeypatch.setenv(WEIGHTS_ENV, str(features_file))
    provenance = load_backbone_weights(fresh_model, "auto")
    assert provenance["source"] == f"env:{WEIGHTS_ENV}" and provenance["path"] == str(features_file)
    assert_loaded(fresh_model, donor_features)


@pytest.fixture
def empty_hub(tmp_path, monkeypatch) -> Path:
    """No environment variable, offline, and a torch hub cache with nothing in it."""
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setenv(OFFLINE_ENV, "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download while offline")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    return tmp_path / "hub"


def test_auto_offline_without_weights_falls_back_to_random(fresh_model, pristine_model, empty_hub):
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        provenance = load_backbone_weights(fresh_model, "auto")
    assert provenance["source"] == "random"
    assert torch.equal(fresh_model.features[0].weight, pristine_model.features[0].weight)


def test_auto_uses_the_torch_hub_cache(fresh_model, donor_features, features_file, empty_hub):
    cached = empty_hub / "checkpoints" / Path(TORCHVISION_URL).name
    cached.parent.mkdir(parents=True)
    cached.symlink_to(features_file)
    provenance = load_backbone_weights(fresh_model, "auto")
    assert provenance["source"] == "torchvision" and provenance["path"] == str(cached)
    assert_loaded(fresh_model, donor_features)


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def classifier_file(pristine_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    return save_classifier(path, pristine_model, image_size=64, threshold=np.float64(0.25),
                           normalizer={"low": 0.0, "high": 1.0, "method": "minmax"})


def test_classifier_round_trip_gives_identical_predictions(pristine_model, classifier_file):
    model, info = load_classifier(classifier_file, image_size=64)
    saved, original = model.state_dict(), pristine_model.state_dict()
    assert saved.keys() == original.keys()
    assert all(torch.equal(saved[k], original[k]) for k in saved)  # every weight, bit for bit
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # Other tests may have laid the shared model out channels_last (the feature store and
        # predict do): oneDNN then picks another algorithm, equal up to float rounding.
        torch.testing.assert_close(model(x), pristine_model(x), rtol=1e-5, atol=1e-6)
    assert not model.training
    assert info["kind"] == "classifier" and info["class_names"] == ["good", "anomaly"]
    assert info["threshold"] == 0.25 and type(info["threshold"]) is float  # numpy scalars become plain
    assert info["format_version"] == FORMAT_VERSION and info["versions"]["torch"] == torch.__version__
    assert [p.requires_grad for p in model.parameters()] == [
        p.requires_grad for p in pristine_model.parameters()]


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    save_checkpoint(path, {"kind": "test", "value": torch.arange(3)})
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary file left
    before = path.read_bytes()

    def dies_half_way(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"kind": "test", "value": torch.arange(5)})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path, kind="test")["value"], torch.arange(3))


def test_optimizer_state_survives_a_checkpoint(tmp_path):
    weight = nn.Parameter(torch.ones(3))
    optimizer = torch.optim.Adam([weight], lr=0.1)
    weight.sum().backward()
    optimizer.step()
    save_checkpoint(tmp_path / "opt.pt", {"kind": "test", "optimizer": optimizer.state_dict()})
    again = torch.optim.Adam([weight], lr=0.1)
    again.load_state_dict(load_checkpoint(tmp_path / "opt.pt")["optimizer"])
    assert torch.equal(again.state[weight]["exp_avg"], optimizer.state[weight]["exp_avg"])


def test_unsupported_objects_are_refused_when_saving(tmp_path):
    with pytest.raises(TypeError, match="object"):
        save_checkpoint(tmp_path / "x.pt", {"kind": "test", "thing": object()})


@pytest.fixture
def small_checkpoint(tmp_path) -> Path:
    return save_checkpoint(tmp_path / "small.pt", {"kind": "classifier", "value": torch.arange(1000)})


def test_truncated_file(small_checkpoint, tmp_path):
    path = tmp_path / "truncated.pt"
    path.write_bytes(small_checkpoint.read_bytes()[: small_checkpoint.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint") as err:
        load_classifier(path)
    assert one_line_naming(err, path)


@pytest.mark.parametrize("content", [b"", b"my notes\n", os.urandom(64), bytes(range(256)) * 4])
def test_random_bytes(tmp_path, content):
    path = tmp_path / "noise.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_classifier(path)
    assert one_line_naming(err, path)


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_pickle_that_runs_code_is_refused_and_not_run(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if writer == "torch":
        torch.save({"format": FORMAT, "kind": "classifier", "x": WritesMarker(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(WritesMarker(marker), protocol=2))
    with pytest.raises(CheckpointError) as err:
        load_classifier(path)
    assert one_line_naming(err, path)
    assert not marker.exists()
    if writer == "torch":  # the payload is real: an unsafe load would have run it
        torch.load(path, weights_only=False)
        assert marker.read_text() == "code ran"


def test_plain_state_dict_without_the_format_marker(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 512)}}, path)
    with pytest.raises(CheckpointError, match="not a visinspect checkpoint") as err:
        load_classifier(path)
    assert one_line_naming(err, path)


def test_checkpoint_of_another_kind(tmp_path):
    path = save_checkpoint(tmp_path / "state.pt", {"kind": "train-state"})
    with pytest.raises(CheckpointError, match="'train-state' checkpoint, but a 'classifier'") as err:
        load_classifier(path)
    assert one_line_naming(err, path)


def test_newer_format_version(tmp_path):
    path = tmp_path / "future.pt"
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION + 1, "kind": "classifier"}, path)
    with pytest.raises(CheckpointError, match="upgrade visinspect") as err:
        load_classifier(path)
    assert one_line_naming(err, path)


def test_other_architecture(fresh_model, tmp_path):
    fresh_model.fc = nn.Linear(512, 3)
    path = save_classifier(tmp_path / "three.pt", fresh_model, image_size=64)
    with pytest.raises(CheckpointError, match=r"'fc\.weight'") as err:
        load_classifier(path)
    assert one_line_naming(err, path)


def test_wrong_image_size_request(classifier_file):
    with pytest.raises(CheckpointError, match="trained at 64 px, but 32 px") as err:
        load_classifier(classifier_file, image_size=32)
    assert one_line_naming(err, classifier_file)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as err:
        load_classifier(tmp_path / "missing.pt")
    assert one_line_naming(err, tmp_path / "missing.pt")


def test_checkpoint_digest_follows_the_weights_not_the_file(tmp_path):
    """Two saves of the same weights (other settings) share a digest; other weights do not."""
    from visinspect.backbones.vgg16 import VGG16CAM
    from visinspect.checkpoint import checkpoint_digest, save_classifier

    torch.manual_seed(0)
    model = VGG16CAM()
    a = save_classifier(tmp_path / "a.pt", model, threshold=0.0)
    b = save_classifier(tmp_path / "b.pt", model, threshold=1.5)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    c = save_classifier(tmp_path / "c.pt", model, threshold=0.0)
    assert checkpoint_digest(a) == checkpoint_digest(b) != checkpoint_digest(c)
    assert len(checkpoint_digest(a)) == 12
