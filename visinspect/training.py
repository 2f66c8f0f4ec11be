"""Training the VGG16-CAM classifier with the seed's recipe, fast on a CPU.

The recipe: cross-entropy with class weights good 1 : anomaly 3, Adam lr 1e-4, batch 10, at most
10 epochs, stop early once the epoch's training accuracy reaches 98 %. The seed uses no data
augmentation, so the frozen layers (conv1_1 .. conv4_3) see the same input every epoch: their
output comes from the feature store (visinspect.backbones.store), computed once per image for every
model, split and seed, and each epoch only runs pool4, conv5 and the head.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from visinspect import distributed
from visinspect.backbones.cam import HeatmapNormalizer, upsample
from visinspect.backbones.store import FeatureStore, StoredFeatures
from visinspect.backbones.vgg16 import CONV4_3_END, FROZEN_END, VGG16CAM, build_model
from visinspect.checkpoint import load_resume_state, save_checkpoint
from visinspect.data.samples import Sample, stratified_split
from visinspect.errors import ConfigError, DataError
from visinspect.evaluate import validation_threshold
from visinspect.scoring import Predictions, predict
from visinspect.utils import autocast, model_device, resolve_device, resolve_precision, set_seed

if TYPE_CHECKING:  # annotations only: methods sit above this module
    from visinspect.methods.simclr.pretrain import PretrainConfig

# A resumable state (~140 MB: the weights and Adam's moments) is written at most this often, and
# after the last epoch: with stored features an epoch may take a second, and writing the state
# after each one would cost more than the epoch; a kill loses at most this much training.
STATE_EVERY_S = 30.0


@dataclass
class TrainConfig:
    """The seed's recipe as defaults; every field can be overridden."""

    epochs: int = 10
    batch_size: int = 10
    lr: float = 1e-4
    class_weights: tuple[float, float] = (1.0, 3.0)  # good, anomaly: defects are the minority
    target_accuracy: float = 0.98  # early stop on *training* accuracy, as the seed does
    image_size: int = 224
    seed: int = 0
    precision: str = "auto"  # "fp32", "bf16" or "auto" (bf16 only where the hardware is fast)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["class_weights"] = list(self.class_weights)
        return d


@dataclass(frozen=True)
class SourceImages:
    """What a method may learn from before it meets the new product: the labelled source images
    (split into train and val) and, for pre-training, every source image and the target's."""

    train: Sequence[Sample]
    val: Sequence[Sample]
    source: Sequence[Sample] = ()  # every source image, labels unused (SimCLR's images)
    target: Sequence[Sample] = ()  # the new product's images when known (SimCLR may add its good ones)

    @classmethod
    def split(cls, source: Sequence[Sample], val_fraction: float = 0.2, seed: int = 0) -> SourceImages:
        """The source products' images split into train and val, stratified by defect type."""
        train, val = stratified_split(source, val_fraction, seed)
        return cls(train, val, source)

    def describe(self) -> str:
        """One line on what a method trains on (what `train` prints first)."""
        products = ", ".join(sorted({s.category for s in self.source}))
        return f"training on {len(self.train)} images of {products}; {len(self.val)} validation images"


@dataclass(frozen=True)
class TrainingRun:
    """How one method's training runs: its recipe, where, and where it keeps resumable states."""

    config: TrainConfig
    pretrain: PretrainConfig | None = None  # SimCLR's settings, for the methods that pre-train
    weights: str | Path | None = "auto"  # the ImageNet backbone's ("auto", a file, "random")
    device: str | torch.device = "auto"
    progress: bool = False
    state: Path | None = None  # the classifier training's resumable state, written as it goes
    resume: Path | None = None  # continue the classifier training from this state
    pretrain_state: Path | None = None  # SimCLR's resumable state, continued whenever it exists


@dataclass
class TrainState:
    """Everything needed to continue an interrupted training exactly where it stopped."""

    epoch: int = 0
    history: dict = field(default_factory=lambda: {"loss": [], "accuracy": [], "seconds": []})
    stopped_early: bool = False


def frozen_features(
    model: VGG16CAM,
    samples: Sequence[Sample],
    image_size: int,
    precision: str = "fp32",
    progress: bool = False,
    store: FeatureStore | None = None,
) -> torch.Tensor:
    """Output of the frozen layers (conv1_1 .. conv4_3 + pool4) for every sample, (N, 512, h, w)
    float32 in memory: what conv5 trains on. From the feature store, computed there if missing."""
    feats = (store or FeatureStore.default()).fetch_samples(
        model, samples, image_size, precision=precision, progress=progress
    )
    with torch.no_grad():
        return model.features[CONV4_3_END:FROZEN_END](feats.batch(slice(None)))


def adam(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam, fused into one kernel where this PyTorch has it (CPU: 2.4 and later): block 5 has
    7 M parameters, and the per-tensor update measured 0.17 s a step on 2 cores, 0.05 s fused."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr)


def train_classifier(
    model: VGG16CAM,
    samples: Sequence[Sample],
    config: TrainConfig | None = None,
    *,
    progress: bool = True,
    checkpoint_path: str | Path | None = None,
    resume: str | Path | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    store: FeatureStore | None = None,
    features: StoredFeatures | None = None,
) -> dict:
    """Fine-tune conv5 + the dense layer on labelled samples; returns the history per epoch.

    conv5 trains on the frozen layers' output from the feature store (`store`, default: the
    user's), read one batch at a time, so memory stays flat whatever the number of images; or on
    `features`, conv4_3-shaped maps of the samples made otherwise (e.g. residual.py's).
    With `checkpoint_path`, a resumable checkpoint (weights, optimiser, shuffling RNG, history) is
    written atomically after an epoch, at most every STATE_EVERY_S seconds, and after the last;
    `resume` continues from such a file and reaches the same weights as an uninterrupted run with
    the same seed.

    Under torchrun (distributed.init_from_env) a step's global batch is N * batch_size images of
    the same shuffled order; each of the N processes takes every N-th of them, weighs its share
    of the class-weighted loss by the global batch's weights, and DDP averages the gradients: the
    steps of one process with batch N * batch_size. Each rank first fills the feature store with
    its share of the images. Rank 0 alone writes the state (the ranks hold the same one).
    """
    config = config or TrainConfig()
    if model.frozen_end < CONV4_3_END:
        raise ConfigError(
            f"the model trains layers before conv4_3 (frozen_end={model.frozen_end}), but training "
            f"starts from the stored conv4_3 features: freeze at least features[:{CONV4_3_END}]"
        )
    labels = torch.tensor([s.label for s in samples])
    if len(samples) == 0 or labels.unique().numel() < 2:
        raise DataError(
            "training needs both good and anomalous images; got "
            f"{int((labels == 0).sum())} good and {int((labels == 1).sum())} anomalous"
        )
    set_seed(config.seed)
    precision = resolve_precision(config.precision)
    device = model_device(model)
    targets = labels.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adam(params, config.lr)
    class_weights = torch.tensor(config.class_weights, dtype=torch.float32, device=device)
    criterion = nn.CrossEntropyLoss(weight=class_weights)
    shuffle = torch.Generator().manual_seed(config.seed)
    state = TrainState()
    if resume is not None:
        state = _restore(resume, model, optimizer, shuffle, config)

    world = distributed.world_size()
    progress = progress and distributed.is_main()
    if features is None:
        store = store or FeatureStore.default()
        if world > 1 and store.enabled:  # each rank computes a share; then all read every entry
            store.fetch_samples(model, distributed.shard(samples), config.image_size, precision=precision)
            distributed.barrier()
        features = store.fetch_samples(model, samples, config.image_size, precision=precision,
                                       progress=progress)
    step = distributed.data_parallel(_AfterStore(model))
    model.train()
    distributed.announce(config.batch_size)
    epochs = range(state.epoch, config.epochs)
    bar = tqdm(
        epochs, desc="train", unit="epoch", disable=not progress, initial=state.epoch, total=config.epochs
    )
    saved_at = time.perf_counter()
    for epoch in bar:
        if state.stopped_early:
            break
        start = time.perf_counter()
        order = torch.randperm(len(samples), generator=shuffle)
        total_loss, correct = 0.0, 0
        for i in range(0, len(order), config.batch_size * world):
            batch = order[i : i + config.batch_size * world]
            idx = batch[distributed.rank() :: world]  # this rank's share of the global batch
            # A global batch smaller than N leaves a rank none: it still steps (DDP waits for
            # it), on an empty (0, C, h, w) slice of one row.
            x = features.batch(idx.tolist() or batch[:1].tolist())[: len(idx)]
            x = x.to(device, memory_format=torch.channels_last)
            with autocast(device, precision):
                logits = step(x)
            if world == 1:
                loss = criterion(logits.float(), targets[idx])
            else:  # its share of the global weighted mean, times N: DDP divides the sum by N
                share = F.cross_entropy(logits.float(), targets[idx], weight=class_weights, reduction="sum")
                loss = share * world / class_weights[targets[batch]].sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += distributed.mean(loss.detach()) * len(batch)
            correct += distributed.total(int((logits.argmax(1) == targets[idx]).sum()))
        accuracy = correct / len(samples)
        state.history["loss"].append(round(total_loss / len(samples), 6))
        state.history["accuracy"].append(round(accuracy, 6))
        state.history["seconds"].append(round(time.perf_counter() - start, 3))
        state.epoch = epoch + 1
        state.stopped_early = accuracy >= config.target_accuracy
        bar.set_postfix(loss=f"{state.history['loss'][-1]:.4f}", acc=f"{accuracy:.3f}")
        last = state.stopped_early or state.epoch == config.epochs
        if checkpoint_path is not None and (last or time.perf_counter() - saved_at >= STATE_EVERY_S):
            _save_resumable(checkpoint_path, model, optimizer, shuffle, config, state)
            saved_at = time.perf_counter()
        if on_epoch_end is not None:
            on_epoch_end(epoch, state.history)
    model.eval()
    return {**state.history, "epochs_run": state.epoch, "stopped_early": state.stopped_early}


class _AfterStore(nn.Module):
    """What trains on the stored features, as one module call (what DDP wraps): pool4 and any
    frozen layer after conv4_3, block 5, then the head's pooling and dense layer -> logits."""

    def __init__(self, model: VGG16CAM) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.head(self.model.maps_from_conv4_3(x))


def validation_curve(
    model: VGG16CAM, samples: Sequence[Sample], config: TrainConfig
) -> tuple[Callable[[int, dict], None], dict[str, list[float]]]:
    """A `train_classifier` hook that scores held-out `samples` after every epoch, and the dict
    it fills: val_loss (with the training loss's class weights), val_accuracy, val_recall
    (positive class anomaly) and val_flagged (the share called anomalous), at P(anomaly) > 0.5
    as the training accuracy is. It changes no weight: learning curves only."""
    labels = torch.tensor([s.label for s in samples])
    if labels.sum() == 0:
        raise DataError("a validation curve needs anomalous images among the held-out samples (recall)")
    weight = torch.tensor(config.class_weights, dtype=torch.float32)
    curves: dict[str, list[float]] = {"val_loss": [], "val_accuracy": [], "val_recall": [], "val_flagged": []}
    cache: list[torch.Tensor] = []

    @torch.no_grad()
    def hook(epoch: int, history: dict) -> None:
        was_training = model.training
        if not cache:  # the frozen layers never change: run them once, on the model's final device
            precision = resolve_precision(config.precision)
            cache.append(frozen_features(model, samples, config.image_size, precision))
        model.eval()
        logits = model.head(model.trainable(cache[0])).float().cpu()
        model.train(was_training)
        predicted = logits.argmax(1)
        curves["val_loss"].append(round(float(nn.functional.cross_entropy(logits, labels, weight=weight)), 6))
        curves["val_accuracy"].append(round(float((predicted == labels).float().mean()), 6))
        curves["val_recall"].append(round(float(predicted[labels == 1].float().mean()), 6))
        curves["val_flagged"].append(round(float(predicted.float().mean()), 6))

    return hook, curves


def training_info(
    model: VGG16CAM, config: TrainConfig, provenance: dict | None, history: dict,
    train_samples: Sequence[Sample], val: Predictions,
) -> dict:
    """What a trained classifier's checkpoint records, with the decision threshold (F1-optimal)
    and the heatmap normaliser chosen on the validation predictions `val`."""
    n_val = len(val.samples)
    normalizer = HeatmapNormalizer.fit(upsample(val.cams, config.image_size)) if n_val else None
    return {
        "config": config.to_dict(),
        "image_size": config.image_size,
        "frozen_end": model.frozen_end,
        "threshold": validation_threshold(val) if n_val else 0.0,
        "threshold_rule": "F1-optimal on the validation split" if n_val else "P(anomaly) > 0.5",
        "normalizer": normalizer.to_dict() if normalizer else None,
        "backbone": provenance or {"source": "unknown"},
        "history": history,
        "train_categories": sorted({s.category for s in train_samples}),
        "n_train": len(train_samples),
        "n_val": n_val,
    }


def _save_resumable(path, model, optimizer, shuffle, config, state: TrainState) -> None:
    save_checkpoint(
        path,
        {
            "kind": "train-state",
            "config": config.to_dict(),
            "state_dict": model.state_dict(),  # saved before the next step changes it: no copy
            "optimizer": optimizer.state_dict(),
            "rng": shuffle.get_state(),
            "epoch": state.epoch,
            "history": state.history,
            "stopped_early": state.stopped_early,
        },
    )


def _restore(path, model, optimizer, shuffle, config: TrainConfig) -> TrainState:
    keys = ("seed", "batch_size", "lr", "image_size")
    data = load_resume_state(path, "train-state", config.to_dict(), keys)
    model.load_state_dict(data["state_dict"])
    optimizer.load_state_dict(data["optimizer"])
    shuffle.set_state(data["rng"])
    return TrainState(int(data["epoch"]), data["history"], bool(data["stopped_early"]))


def train_baseline(
    train_samples: Sequence[Sample],
    val_samples: Sequence[Sample],
    config: TrainConfig | None = None,
    *,
    weights: str | Path | None = "auto",
    model: VGG16CAM | None = None,
    provenance: dict | None = None,
    progress: bool = True,
    checkpoint_path: str | Path | None = None,
    resume: str | Path | None = None,
    device: str | torch.device = "auto",
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> tuple[VGG16CAM, dict]:
    """The whole baseline: build (or take) a model, train it, then calibrate on validation images.

    On the validation split (held-out images of the *training* categories) it picks the
    F1-optimal decision threshold and fits the dataset-level heatmap normaliser. Returns the
    model and the info dict that `checkpoint.save_classifier` stores. `on_epoch_end` is
    `train_classifier`'s hook (e.g. `validation_curve`).
    """
    config = config or TrainConfig()
    if model is None:
        set_seed(config.seed)  # the dense layer (and a random backbone) start from seeded weights
        model, provenance = build_model(weights)
    model.to(resolve_device(device))  # "auto": a CUDA GPU if there is one; nothing needs one
    history = train_classifier(
        model, train_samples, config, progress=progress, checkpoint_path=checkpoint_path, resume=resume,
        on_epoch_end=on_epoch_end,
    )
    val = predict(model, val_samples, config.image_size, precision=config.precision)
    info = training_info(model, config, provenance, history, train_samples, val)
    return model, info
