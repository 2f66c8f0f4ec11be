"""Tests for visinspect.experiments.demo: the one setup call every course notebook starts with."""

from dataclasses import dataclass
from pathlib import Path

import pytest

from visinspect.data.samples import build_sample_table, default_synthetic_root
from visinspect.experiments import demo


def test_course_setup_gives_the_course_split(tiny_root, monkeypatch):
    monkeypatch.delenv(demo.DATA_ENV, raising=False)
    course = demo.course_setup(tiny_root, ["grain_wood"], ["round_pill"])
    table = build_sample_table(tiny_root).samples
    assert course.real_data and course.model is None
    assert {s.category for s in course.train + course.val} == {"grain_wood"}
    assert course.test and all(s.category == "round_pill" and s.split == "test" for s in course.test)
    assert course.unlabelled_good and all(s.split == "train" and s.label == 0 for s in course.unlabelled_good)
    parts = [course.train, course.val, course.test, course.unlabelled_good]
    assert sum(map(len, parts)) == len(table)  # every image in exactly one part
    assert course.checkpoint.name == "notebook_real_baseline.pt"
    summary = str(course)
    assert "REAL DATA" in summary and f"test       {len(course.test):>4} images" in summary


def test_course_setup_reads_the_data_folder_from_the_environment(tiny_root, monkeypatch):
    monkeypatch.setenv(demo.DATA_ENV, str(tiny_root))
    course = demo.course_setup(None, ["grain_wood"], ["round_pill"])
    assert course.data_root == tiny_root and course.real_data


@pytest.mark.slow
def test_course_setup_trains_the_model_once_then_loads_it(tiny_root, tmp_path, monkeypatch):
    monkeypatch.delenv(demo.DATA_ENV, raising=False)
    monkeypatch.setattr(demo, "default_weights_dir", lambda: tmp_path)

    @dataclass(frozen=True)
    class Tiny(demo.DemoSettings):  # one epoch at 32 px: seconds, not minutes
        image_size: int = 32
        epochs: int = 1

    monkeypatch.setattr(demo, "DemoSettings", Tiny)
    said = []
    first = demo.course_setup(tiny_root, ["grain_wood"], ["round_pill"], model=True, weights="random",
                              log=said.append)
    assert first.checkpoint.is_file() and said[0].startswith("trained the baseline now")
    again = demo.course_setup(tiny_root, ["grain_wood"], ["round_pill"], model=True, weights="random",
                              log=said.append)
    assert said[3].startswith("loaded the baseline")
    assert again.info["threshold"] == first.info["threshold"]
    # Another split of the data is another model: trained anew, not loaded.
    other = demo.course_setup(tiny_root, ["round_pill"], ["grain_wood"], model=True, weights="random",
                              log=said.append)
    assert said[6].startswith("trained the baseline now")
    assert other.info["train_categories"] == ["round_pill"]


def test_course_names_its_products(tiny_root, monkeypatch):
    monkeypatch.delenv(demo.DATA_ENV, raising=False)
    course = demo.course_setup(tiny_root, ["grain_wood"], ["round_pill"])
    assert (course.source_products, course.target_products) == (["grain_wood"], ["round_pill"])


def test_checkpoint_line_names_the_file_and_the_digest_of_its_weights(tmp_path, pristine_model):
    from visinspect.checkpoint import checkpoint_digest, save_classifier

    path = save_classifier(tmp_path / "weights" / "demo_baseline.pt", pristine_model, threshold=0.0)
    digest = checkpoint_digest(path)
    assert demo.checkpoint_line(path) == f"weights/demo_baseline.pt (weights digest {digest})"


def test_outputs_are_reproducible_only_with_both_imagenet_weights_fp32_and_the_synthetic_data(
        tmp_path, monkeypatch):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")  # only whether a file is there is asked
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("VISINSPECT_BACKBONE_WEIGHTS", str(weights))
    monkeypatch.setenv("VISINSPECT_MOBILENET_WEIGHTS", str(weights))
    monkeypatch.setenv("VISINSPECT_PRECISION", "fp32")
    monkeypatch.delenv(demo.DATA_ENV, raising=False)
    assert demo.outputs_not_reproducible() is None
    monkeypatch.setenv("VISINSPECT_PRECISION", "bf16")
    monkeypatch.setenv(demo.DATA_ENV, str(tmp_path))
    monkeypatch.delenv("VISINSPECT_BACKBONE_WEIGHTS")
    monkeypatch.setenv("VISINSPECT_MOBILENET_WEIGHTS", str(tmp_path / "missing.pth"))
    reasons = demo.outputs_not_reproducible()
    for part in ("no ImageNet VGG16 weights", "no ImageNet MobileNetV2 weights", "precision bf16",
                 demo.DATA_ENV):
        assert part in reasons


def test_a_source_checkout_keeps_its_data_and_weights_in_the_checkout():
    repo = Path(__file__).resolve().parents[1]
    assert default_synthetic_root() == repo / "data" / "synthetic"
    assert demo.default_weights_dir() == repo / "weights"
