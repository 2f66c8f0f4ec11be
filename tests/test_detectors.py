"""The detector interface: every method trains / adapts / scores the same way, and the user's path
(`train --method`, then `predict --reference-dir`) on tiny synthetic data."""

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import visinspect.methods.classifier as classifier
from visinspect.checkpoint import save_classifier
from visinspect.cli import main
from visinspect.data.samples import build_sample_table
from visinspect.errors import ConfigError, DataError
from visinspect.methods.base import reference_samples
from visinspect.methods.registry import (
    METHODS,
    RECOMMENDED,
    TRAININGS,
    backbone_info,
    load_detector,
    make_detector,
)

SIZE = 32


@pytest.fixture(scope="module")
def table(tiny_root):
    return build_sample_table(tiny_root).samples


def good(table, category, k):
    return sorted((s for s in table if s.category == category and s.split == "train" and s.label == 0),
                  key=lambda s: str(s.path))[:k]


def test_every_method_is_named_and_the_recommended_one_exists():
    assert RECOMMENDED in METHODS
    for name, m in METHODS.items():
        assert m.name == name and m.about and (m.trains is None or m.trains is TRAININGS[m.trains.name])
    with pytest.raises(ConfigError, match="unknown method 'magic'"):
        make_detector("magic", None, {"image_size": SIZE})


@pytest.mark.parametrize("name", ["reference", "baseline calibrated"])
def test_adapted_detectors_score_relative_to_their_product(name, table, pristine_model):
    info = backbone_info(SIZE, {"source": "random"}) | {"threshold": 0.5}
    detector = make_detector(name, pristine_model, info, precision="fp32")
    assert detector.uses_good and detector.threshold == 0.0
    test = [s for s in table if s.category == "round_pill" and s.split == "test"]
    with pytest.raises(DataError, match="round_pill"):
        detector.score(test)  # not adapted to that product yet
    detector.adapt(good(table, "round_pill", 3))
    first = detector.score(test)
    assert detector.product == "round_pill" and len(first.scores) == len(test)
    assert np.isfinite(first.scores).all() and first.maps.shape[0] == len(test)
    detector.adapt(good(table, "round_pill", 4))  # another K: the product's calibration changes
    assert not np.array_equal(detector.score(test).scores, first.scores)
    with pytest.raises(DataError, match="one product"):
        detector.adapt(good(table, "round_pill", 2) + good(table, "grain_wood", 2))


def test_classifier_outputs_are_remembered_within_a_bound(table, pristine_model, monkeypatch):
    monkeypatch.setattr(classifier, "MEMORY", 3)
    monkeypatch.setattr(classifier, "_OUTPUTS", {})
    info = backbone_info(SIZE, {"source": "random"})
    detector = make_detector("baseline", pristine_model, info, precision="fp32")
    samples = table[:6]
    first = detector.score(samples)
    assert len(classifier._OUTPUTS) == 3  # memory stays flat however many images are scored
    again = detector.score(samples)
    np.testing.assert_array_equal(first.scores, again.scores)


def test_detectors_of_the_same_weights_run_each_image_once(table, pristine_model, monkeypatch):
    """The baseline, calibrated and fused rows of a split load the same classifier: the images
    run once; other weights run them again."""
    monkeypatch.setattr(classifier, "_OUTPUTS", {})
    calls = []
    real = classifier.predict
    monkeypatch.setattr(classifier, "predict", lambda model, todo, *a, **k: calls.append(len(todo))
                        or real(model, todo, *a, **k))
    info = backbone_info(SIZE, {"source": "random"}) | {"threshold": 0.5}
    samples = [s for s in table if s.category == "round_pill" and s.split == "test"]
    first = make_detector("baseline", pristine_model, info, precision="fp32").score(samples)
    twin = copy.deepcopy(pristine_model)  # loaded again: another object, the same weights
    fused = make_detector("fused", twin, info, precision="fp32")
    np.testing.assert_array_equal(fused.classifier.score(samples).scores, first.scores)
    assert calls == [len(samples)]
    hashed = []
    real_digest = classifier.weights_digest
    monkeypatch.setattr(classifier, "weights_digest", lambda m: hashed.append(1) or real_digest(m))
    fused.classifier.score(samples)
    assert not hashed  # unchanged weights are not hashed again
    with torch.no_grad():
        twin.fc.weight.add_(0.1)  # trained further: its outputs are new
    fused.classifier.score(samples)
    assert calls == [len(samples)] * 2 and hashed == [1]


@pytest.fixture(scope="module")
def recommended(tiny_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("user") / "recommended.pt"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", "--data", str(tiny_root), "--categories", "grain_wood", "--image-size",
                     str(SIZE), "--epochs", "1", "--backbone-weights", "random", "--precision", "fp32",
                     "--out", str(out)]) == 0  # no --method: the recommended one
    return out


@pytest.mark.slow
def test_the_users_path_train_then_predict_with_good_images(recommended, tiny_root, tmp_path, capsys):
    reference = tiny_root / "round_pill" / "train" / "good"
    out = tmp_path / "pred"
    code = main(["predict", "--checkpoint", str(recommended), "--reference-dir", str(reference),
                 str(tiny_root / "round_pill" / "test"), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 + 6  # round_pill's test/ folder
    for r in rows:
        assert r["method"] == RECOMMENDED and r["threshold"] == 0.0  # scores relative to the product
        # The label is decided on the unrounded score; the JSON rounds it (to 6 decimals).
        assert r["label"] == int(r["score"] > r["threshold"]) or abs(r["score"] - r["threshold"]) < 1e-6
        assert (out / r["overlay"]).is_file()
    # The same detector through the library.
    detector = load_detector(recommended, reference=[reference], precision="fp32")
    assert detector.name == RECOMMENDED and detector.product == "good"


def test_predict_names_a_reference_image_unlike_the_others(recommended, tiny_root, tmp_path, capsys):
    """Ten copies of one good part and a black image as the reference: the black one scores far
    above the others' leave-one-out scores (calibration's fenced rule) and predict names it."""
    from PIL import Image

    good = sorted((tiny_root / "round_pill" / "train" / "good").iterdir())[0]
    reference = tmp_path / "good"
    reference.mkdir()
    for i in range(10):
        (reference / f"copy_{i}.png").write_bytes(good.read_bytes())
    Image.new("RGB", (SIZE, SIZE)).save(reference / "odd.png")
    code = main(["predict", "--checkpoint", str(recommended), "--reference-dir", str(reference), str(good),
                 "--out", str(tmp_path / "pred"), "--no-overlays"])
    out = capsys.readouterr().out
    assert code == 0
    assert "1 of the 11 good images scores far above the others" in out
    assert out.rstrip().count("odd.png") == 1 and "copy_" not in out


def test_predict_takes_non_square_scans_and_names_too_few_good_images(recommended, tiny_root, tmp_path,
                                                                       capsys):
    """Good images and images to score of any size and aspect ratio (scans wider than high, a
    portrait photo); one good image is too few, and the error says how many to give."""
    from PIL import Image

    sources = sorted((tiny_root / "round_pill" / "train" / "good").iterdir())[:3]
    reference, scans = tmp_path / "good", tmp_path / "scans"
    reference.mkdir()
    scans.mkdir()
    for i, (path, size) in enumerate(zip(sources, [(150, 40), (40, 150), (97, 61)], strict=True)):
        Image.open(path).convert("RGB").resize(size).save(reference / f"{i}.png")
        Image.open(path).convert("RGB").resize(size[::-1]).save(scans / f"{i}.png")
    code = main(["predict", "--checkpoint", str(recommended), "--reference-dir", str(reference), str(scans),
                 "--out", str(tmp_path / "pred")])
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(isinstance(r["score"], float) and r["label"] in (0, 1) for r in rows)
    one = tmp_path / "one"
    one.mkdir()
    (one / "0.png").write_bytes((reference / "0.png").read_bytes())
    code = main(["predict", "--checkpoint", str(recommended), "--reference-dir", str(one), str(scans),
                 "--out", str(tmp_path / "pred1")])
    err = capsys.readouterr().err
    assert code == 2 and "need at least 2 good images" in err and "(got 1)" in err


def test_predict_refuses_a_missing_or_useless_reference(
    recommended, pristine_model, tiny_root, tmp_path, capsys
):
    images = str(tiny_root / "round_pill" / "test" / "good")
    code = main(["predict", "--checkpoint", str(recommended), images, "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert code == 2 and "--reference-dir" in err and err.count("\n") == 1
    code = main(["predict", "--checkpoint", str(recommended), "--method", "baseline", images,
                 "--out", str(tmp_path / "b")])  # the recommended method's checkpoint keeps no VGG16
    assert code == 2 and "needs a VGG16 model" in capsys.readouterr().err
    classifier = save_classifier(tmp_path / "baseline.pt", pristine_model, **backbone_info(SIZE, {}))
    code = main(["predict", "--checkpoint", str(classifier), "--reference-dir", images, images,
                 "--out", str(tmp_path / "c")])
    assert code == 2 and "leave --reference-dir out" in capsys.readouterr().err
    with pytest.raises(DataError, match="no good reference images"):
        reference_samples([tmp_path])


@pytest.mark.slow
def test_a_method_that_trains_nothing_saves_its_backbone(tiny_root, tmp_path, capsys):
    out = tmp_path / "reference.pt"
    assert main(["train", "--method", "reference", "--image-size", str(SIZE), "--backbone-weights", "random",
                 "--out", str(out)]) == 0
    assert "trains nothing" in capsys.readouterr().out
    detector = load_detector(out, reference=[tiny_root / "round_pill" / "train" / "good"], precision="fp32")
    assert detector.name == "reference" and len(detector.banks) == 1
    code = main(["train", "--method", "simclr-source", "--out", str(tmp_path / "x.pt")])
    assert code == 2 and "pretrain" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("name", ["residual", "fused-learnt"])
def test_train_then_predict_with_the_methods_that_learn_more_than_the_classifier(
    name, tiny_root, tmp_path, capsys
):
    out = tmp_path / f"{name}.pt"
    assert main(["train", "--data", str(tiny_root), "--method", name, "--image-size", str(SIZE),
                 "--epochs", "1", "--backbone-weights", "random", "--precision", "fp32",
                 "--val-fraction", "0.4", "--out", str(out)]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert f"method {name!r}" in printed
    assert ("fusion weight learnt on" in printed) == (name == "fused-learnt")
    reference = tiny_root / "round_pill" / "train" / "good"
    detector = load_detector(out, reference=[reference], precision="fp32")
    scored = detector.score(reference_samples([tiny_root / "round_pill" / "test"], product=detector.product))
    assert detector.name == name and np.isfinite(scored.scores).all()
