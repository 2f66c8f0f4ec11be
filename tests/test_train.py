"""Tests for training: the recipe runs, is deterministic, its cache changes nothing, and resumes exactly."""

import copy

import pytest
import torch
from torch import nn

from visinspect.backbones.store import FeatureStore
from visinspect.checkpoint import load_checkpoint
from visinspect.data.samples import DefectDataset, build_sample_table
from visinspect.errors import CheckpointError, DataError
from visinspect.scoring import predict
from visinspect.training import (
    TrainConfig,
    frozen_features,
    train_baseline,
    train_classifier,
    validation_curve,
)

SIZE = 32


def config(**overrides) -> TrainConfig:
    """Tiny, exact settings: fp32, and a target accuracy that never stops training early."""
    settings = {"epochs": 2, "batch_size": 6, "image_size": SIZE, "precision": "fp32",
                "target_accuracy": 1.01, "seed": 0}
    return TrainConfig(**(settings | overrides))


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def samples(tiny_root):
    """Half of the tiny dataset (12 images, both classes, both categories): a fast epoch."""
    return build_sample_table(tiny_root).samples[::2]


@pytest.fixture(scope="module")
def two_epochs(pristine_model, samples, tmp_path_factory):
    """An uninterrupted two-epoch run that writes its resumable state: (model, history, state file)."""
    model = copy.deepcopy(pristine_model)
    state = tmp_path_factory.mktemp("train") / "run.state"
    epochs_seen = []
    history = train_classifier(model, samples, config(), progress=False, checkpoint_path=state,
                               on_epoch_end=lambda epoch, h: epochs_seen.append(epoch))
    assert epochs_seen == [0, 1]
    return model, history, state


def test_two_epochs_give_a_history_per_epoch(two_epochs, pristine_model):
    model, history, state = two_epochs
    assert history["epochs_run"] == 2 and history["stopped_early"] is False
    for key in ("loss", "accuracy", "seconds"):
        assert len(history[key]) == 2
    assert all(loss > 0 for loss in history["loss"])
    assert all(0.0 <= acc <= 1.0 for acc in history["accuracy"])
    after, before = model.state_dict(), pristine_model.state_dict()
    assert torch.equal(after["features.21.weight"], before["features.21.weight"])  # conv4_3: frozen
    assert not torch.equal(after["features.28.weight"], before["features.28.weight"])  # conv5_3 trains
    assert not torch.equal(after["fc.weight"], before["fc.weight"])
    saved = load_checkpoint(state, kind="train-state")
    assert saved["epoch"] == 2 and saved["history"]["loss"] == history["loss"]


def test_same_seed_gives_identical_weights(two_epochs, fresh_model, samples):
    train_classifier(fresh_model, samples, config(), progress=False)
    assert_same_weights(fresh_model, two_epochs[0])


def test_cached_frozen_layers_equal_the_full_forward(fresh_model, samples, tmp_path):
    dataset = DefectDataset(samples[::3], SIZE)
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    labels = torch.tensor([s.label for s in samples[::3]])
    # A float32 store: the cached path must then equal the full forward up to float rounding.
    store = FeatureStore(tmp_path / "store", dtype="float32")
    cache = frozen_features(fresh_model, samples[::3], SIZE, store=store)
    trainable = [p for p in fresh_model.parameters() if p.requires_grad]

    def logits_and_grads(logits):
        grads = torch.autograd.grad(nn.functional.cross_entropy(logits, labels), trainable)
        return logits.detach(), grads

    cached, cached_grads = logits_and_grads(fresh_model.head(fresh_model.trainable(cache)))
    full, full_grads = logits_and_grads(fresh_model(images))
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    for g_cached, g_full in zip(cached_grads, full_grads, strict=True):
        torch.testing.assert_close(g_cached, g_full, rtol=1e-4, atol=1e-6)


def test_early_stop_on_training_accuracy(fresh_model, samples):
    history = train_classifier(fresh_model, samples, config(epochs=3, target_accuracy=0.0), progress=False)
    assert history["epochs_run"] == 1 and history["stopped_early"] is True
    assert len(history["loss"]) == 1


def test_single_class_training_set_is_refused(fresh_model, samples):
    good = [s for s in samples if s.label == 0]
    with pytest.raises(DataError, match=f"{len(good)} good and 0 anomalous"):
        train_classifier(fresh_model, good, config(), progress=False)
    with pytest.raises(DataError, match="both good and anomalous"):
        train_classifier(fresh_model, [], config(), progress=False)


def test_resume_reaches_the_uninterrupted_weights(two_epochs, pristine_model, samples, tmp_path):
    model, history, _ = two_epochs
    state = tmp_path / "interrupted.state"
    first = copy.deepcopy(pristine_model)
    train_classifier(first, samples, config(epochs=1), progress=False, checkpoint_path=state)
    resumed = copy.deepcopy(pristine_model)  # a new process: the weights come from the state file
    again = train_classifier(resumed, samples, config(), progress=False, resume=state)
    assert_same_weights(resumed, model)
    assert again["loss"] == history["loss"] and again["accuracy"] == history["accuracy"]
    assert again["epochs_run"] == 2


def test_resume_with_other_settings_is_refused(two_epochs, fresh_model, samples):
    state = two_epochs[2]
    with pytest.raises(CheckpointError, match="seed=0, but this run has seed=1") as err:
        train_classifier(fresh_model, samples, config(seed=1), progress=False, resume=state)
    assert str(state) in str(err.value)
    with pytest.raises(CheckpointError, match="batch_size"):
        train_classifier(fresh_model, samples, config(batch_size=4), progress=False, resume=state)


@pytest.mark.slow
def test_train_baseline_is_seeded_and_calibrates_on_validation(samples):
    train, val = samples[1::2], samples[::2]
    runs = []
    for noise in (1, 2):
        torch.manual_seed(noise)  # whatever happened before, the same seed gives the same model
        runs.append(train_baseline(train, val, config(epochs=1), weights="random", progress=False))
    (model, info), (model_again, _) = runs
    assert_same_weights(model, model_again)
    assert info["backbone"]["source"] == "random"
    assert info["image_size"] == SIZE and info["n_train"] == len(train) and info["n_val"] == len(val)
    assert isinstance(info["threshold"], float) and info["threshold_rule"].startswith("F1-optimal")
    assert set(info["normalizer"]) == {"low", "high", "method"}
    assert info["normalizer"]["high"] > info["normalizer"]["low"]
    assert info["train_categories"] == sorted({s.category for s in train})


def test_validation_curve_scores_held_out_images_and_changes_no_weight(fresh_model, samples, two_epochs,
                                                                       tiny_root):
    held_out = build_sample_table(tiny_root).samples[1::2]
    hook, curves = validation_curve(fresh_model, held_out, config())
    train_classifier(fresh_model, samples, config(), progress=False, on_epoch_end=hook)
    assert_same_weights(fresh_model, two_epochs[0])  # the same run as without the hook
    assert all(len(values) == 2 for values in curves.values())
    # After the last epoch: what the trained model says about the held-out images, at P > 0.5.
    preds = predict(fresh_model, held_out, SIZE, precision="fp32")
    called = preds.margins > 0
    labels = preds.labels
    assert curves["val_accuracy"][-1] == pytest.approx((called == labels).mean(), abs=1e-6)
    assert curves["val_recall"][-1] == pytest.approx(called[labels == 1].mean(), abs=1e-6)
    assert curves["val_flagged"][-1] == pytest.approx(called.mean(), abs=1e-6)
    weighted = nn.CrossEntropyLoss(weight=torch.tensor(config().class_weights))
    expected = weighted(preds.logits, torch.tensor(labels)).item()
    assert curves["val_loss"][-1] == pytest.approx(expected, rel=1e-4)
    with pytest.raises(DataError, match="anomalous"):
        validation_curve(fresh_model, [s for s in held_out if s.label == 0], config())
