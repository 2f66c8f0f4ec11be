"""The feature store: keys that never serve stale features, atomic and concurrent writes, damaged
entries recomputed, the user's view (info, clear) and the same numbers with the store on or off."""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import visinspect.backbones.store as features
from visinspect.backbones.store import MARKER, STORE_ENV, FeatureStore, default_store_root
from visinspect.data.samples import build_sample_table, model_input
from visinspect.errors import ConfigError
from visinspect.scoring import predict

SIZE = 32


@pytest.fixture
def samples(tiny_root):
    return build_sample_table(tiny_root).samples[:6]


def fetch(store, model, samples, **kw):
    return store.fetch_samples(model, samples, SIZE, precision="fp32", **kw)


def test_second_fetch_hits_and_returns_the_same_features(tmp_path, pristine_model, samples):
    store = FeatureStore(tmp_path / "store")
    first = fetch(store, pristine_model, samples)
    again = fetch(store, pristine_model, samples)
    assert first.computed == len(samples) and again.computed == 0
    a, b = first.batch(range(len(samples))), again.batch(range(len(samples)))
    assert a.shape == (len(samples), 512, SIZE // 8, SIZE // 8) and a.dtype == torch.float32
    assert torch.equal(a, b)
    # Stored entries are what the frozen layers give in fp32 (the default dtype), up to the last
    # bits that oneDNN's choice of algorithm for another batch size and layout changes.
    with torch.no_grad():
        x = torch.stack([model_input(s.path, SIZE) for s in samples[:2]])
        direct = pristine_model.features[: features.CONV4_3_END](x)
    torch.testing.assert_close(a[:2], direct, rtol=1e-3, atol=1e-4)


def test_a_changed_image_file_misses(writable_root, pristine_model, tmp_path):
    samples = build_sample_table(writable_root).samples[:3]
    store = FeatureStore(tmp_path / "store")
    before = fetch(store, pristine_model, samples).batch([0])
    path = samples[0].path
    image = np.asarray(Image.open(path).convert("RGB")).copy()
    image[:8, :8] = 255 - image[:8, :8]  # same name, same size, other bytes
    Image.fromarray(image).save(path)
    after = fetch(store, pristine_model, samples)
    assert after.computed == 1  # only the changed file
    assert not torch.equal(after.batch([0]), before)


@pytest.mark.parametrize(
    "change",
    ["image_size", "preprocessing", "weights", "precision", "dtype"],
)
def test_every_other_key_part_misses(change, tmp_path, pristine_model, fresh_model, samples, monkeypatch):
    store = FeatureStore(tmp_path / "store")
    first = fetch(store, pristine_model, samples[:2])
    assert first.computed == 2
    model, size, precision = pristine_model, SIZE, "fp32"
    if change == "image_size":
        size = 2 * SIZE
    elif change == "preprocessing":
        monkeypatch.setattr(features, "PREPROCESSING", "another-resize/v2")
    elif change == "weights":
        with torch.no_grad():
            fresh_model.features[0].weight.add_(0.01)
        model = fresh_model
    elif change == "precision":
        precision = "bf16"
    else:
        store = FeatureStore(tmp_path / "store", dtype="float16")
    again = store.fetch_samples(model, samples[:2], size, precision=precision)
    assert again.computed == 2
    # The in-memory banks and distances (visinspect.methods.memory_bank) are keyed by the identity: it
    # must change with every part of the key, not only with the images.
    assert again.identity != first.identity
    assert len(list((tmp_path / "store").glob("*/meta.json"))) == 2
    # ... and the first namespace is still served unchanged.
    assert fetch(FeatureStore(tmp_path / "store"), pristine_model, samples[:2]).computed == 0


def test_store_off_gives_the_same_numbers_and_writes_nothing(tmp_path, pristine_model, samples, monkeypatch):
    monkeypatch.setenv(STORE_ENV, "off")
    off = FeatureStore.default()
    assert not off.enabled and default_store_root() is None
    memory = fetch(off, pristine_model, samples)
    assert memory.computed == len(samples)
    disk = fetch(FeatureStore(tmp_path / "store"), pristine_model, samples)
    assert torch.equal(memory.batch(range(len(samples))), disk.batch(range(len(samples))))
    monkeypatch.chdir(tmp_path)
    fetch(off, pristine_model, samples)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_default_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(STORE_ENV, str(tmp_path / "mine"))
    assert default_store_root() == tmp_path / "mine"
    monkeypatch.delenv(STORE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_store_root() == tmp_path / "cache" / "visinspect" / "features"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_store_root() == Path.home() / ".cache" / "visinspect" / "features"


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "other_shape"])
def test_a_damaged_entry_is_recomputed_with_a_warning(damage, tmp_path, pristine_model, samples):
    store = FeatureStore(tmp_path / "store")
    good = fetch(store, pristine_model, samples[:2]).batch([0, 1])
    entry = sorted((tmp_path / "store").glob("*/*/*.npy"))[0]
    if damage == "truncate":
        entry.write_bytes(entry.read_bytes()[:200])
    elif damage == "garbage":
        entry.write_bytes(b"\x93NUMPY garbage" * 10)
    elif damage == "empty":
        entry.write_bytes(b"")
    else:
        np.save(entry, np.zeros((3, 2, 2), np.float16))
    with pytest.warns(UserWarning, match="damaged"):
        again = fetch(store, pristine_model, samples[:2])
    assert again.computed == 1
    assert torch.equal(again.batch([0, 1]), good)


def test_entries_are_written_atomically(tmp_path, pristine_model, samples, monkeypatch):
    """A write that fails half-way leaves no entry under its final name (and no temporary file)."""
    store = FeatureStore(tmp_path / "store")

    def crash(file, array):
        file.write(b"\x93NUMPY half an entry")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        fetch(store, pristine_model, samples[:1])
    assert not list((tmp_path / "store").glob("*/*/*"))
    monkeypatch.undo()
    assert fetch(store, pristine_model, samples[:1]).computed == 1


FILL = textwrap.dedent(
    """
    import sys, torch
    from visinspect.data.samples import build_sample_table
    from visinspect.backbones.store import FeatureStore
    from visinspect.backbones.vgg16 import build_model
    torch.manual_seed(0)
    model, _ = build_model("random")
    samples = build_sample_table(sys.argv[1]).samples
    FeatureStore(sys.argv[2]).fetch_samples(model, samples, 32, precision="fp32")
    """
)


@pytest.mark.slow
def test_two_processes_fill_one_store_without_torn_entries(tmp_path, tiny_root, pristine_model):
    root = tmp_path / "store"
    env_cmd = [sys.executable, "-c", FILL, str(tiny_root), str(root)]
    procs = [subprocess.Popen(env_cmd, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    samples = build_sample_table(tiny_root).samples
    assert len(list(root.glob("*/meta.json"))) == 1  # the same key in both processes
    assert not list(root.rglob("*.tmp"))
    # Every entry is whole and equals a computation in this process.
    stored = fetch(FeatureStore(root), pristine_model, samples)
    assert stored.computed == 0
    fresh = fetch(FeatureStore(None), pristine_model, samples)
    assert torch.equal(stored.batch(range(len(samples))), fresh.batch(range(len(samples))))


def test_info_counts_entries_per_dataset(tmp_path, pristine_model, samples):
    store = FeatureStore(tmp_path / "store")
    fetch(store, pristine_model, samples)
    info = store.info()
    (ns,) = info["namespaces"]
    assert info["entries"] == ns["entries"] == len(samples)
    assert ns["image_size"] == SIZE and ns["precision"] == "fp32" and ns["dtype"] == "float32"
    per = {c: sum(s.category == c for s in samples) for c in {s.category for s in samples}}
    assert {d: v["entries"] for d, v in ns["datasets"].items()} == per
    assert info["bytes"] == sum(f.stat().st_size for f in (tmp_path / "store").glob("*/*/*.npy"))


def test_clear_removes_only_the_store(tmp_path, pristine_model, samples):
    (tmp_path / "mine.txt").write_text("not the store's")
    store = FeatureStore(tmp_path / "store")
    fetch(store, pristine_model, samples)
    (tmp_path / "store" / "notes.txt").write_text("a file someone put there")
    freed = store.clear()
    assert freed > 0
    assert (tmp_path / "mine.txt").is_file() and (tmp_path / "store" / "notes.txt").is_file()
    assert not list((tmp_path / "store").glob("*/meta.json"))
    assert store.info()["entries"] == 0


def test_a_folder_that_is_not_a_store_is_refused(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("precious")
    with pytest.raises(ConfigError, match="not a visinspect feature store"):
        FeatureStore(tmp_path / "home")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        FeatureStore(tmp_path / "file")
    with pytest.raises(ConfigError, match="dtype"):
        FeatureStore(tmp_path / "new", dtype="int8")
    FeatureStore(tmp_path / "new")  # a new folder is fine
    assert (tmp_path / "home" / "thesis.tex").read_text() == "precious"


def test_predict_goes_through_the_store(tmp_path, pristine_model, samples):
    store = FeatureStore(tmp_path / "store")
    first = predict(pristine_model, samples, SIZE, precision="fp32", store=store)
    assert store.info()["entries"] == len(samples)
    again = predict(pristine_model, samples, SIZE, precision="fp32", store=store)
    assert torch.equal(first.logits, again.logits) and torch.equal(first.cams, again.cams)
    assert (tmp_path / "store" / MARKER).is_file()
