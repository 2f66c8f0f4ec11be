"""Shared fixtures: one tiny synthetic dataset and one random-weight VGG16-CAM per test session.

Both are read-only for the tests: a test that changes data copies the folder (`writable_root`),
a test that trains a model takes a fresh copy (`fresh_model`).
"""

import copy
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from tiny import TINY, TINY_CATEGORIES

from visinspect.backbones.store import STORE_ENV
from visinspect.backbones.vgg16 import VGG16CAM, build_model
from visinspect.data.synthetic import generate_synthetic_dataset

_STORE_DIR: str | None = None


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: trains or runs the command line end to end (seconds)")
    config.addinivalue_line(
        "markers", "distributed: starts 2 processes in one gloo process group (torchrun or multiprocessing)"
    )
    config.addinivalue_line(
        "markers",
        "precision: checks numbers of a run in the precision that 'auto' resolves to; CI runs these "
        "under VISINSPECT_PRECISION=fp32 and =bf16",
    )
    # The tests (and the notebooks nbval runs, whose kernels inherit the environment) share one
    # temporary feature store, so they never fill or depend on the user's cache.
    global _STORE_DIR
    if STORE_ENV not in os.environ:
        _STORE_DIR = tempfile.mkdtemp(prefix="visinspect-test-store-")
        os.environ[STORE_ENV] = _STORE_DIR


def pytest_unconfigure(config) -> None:
    if _STORE_DIR is not None:
        os.environ.pop(STORE_ENV, None)
        shutil.rmtree(_STORE_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """A tiny synthetic dataset in MVTec layout (64 px, 12 images per category); do not write to it."""
    root = tmp_path_factory.mktemp("tiny") / "synthetic"
    return generate_synthetic_dataset(root, image_size=TINY["image_size"], n_train_good=TINY["n_train_good"],
                                      n_test_good=TINY["n_test_good"],
                                      n_test_per_defect=TINY["n_test_per_defect"],
                                      categories=list(TINY_CATEGORIES))


@pytest.fixture
def writable_root(tiny_root, tmp_path) -> Path:
    """A private copy of the tiny dataset that a test may damage."""
    return Path(shutil.copytree(tiny_root, tmp_path / "data"))


@pytest.fixture(scope="session")
def pristine_model() -> VGG16CAM:
    """A seeded random-weight VGG16-CAM (building one costs seconds: it is built once)."""
    torch.manual_seed(0)
    model, provenance = build_model("random")
    assert provenance["source"] == "random"
    return model.eval()


@pytest.fixture
def fresh_model(pristine_model) -> VGG16CAM:
    """An independent copy of the session's model, free to be trained or changed."""
    return copy.deepcopy(pristine_model)
