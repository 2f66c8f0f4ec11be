"""SimCLR contrastive pre-training of the VGG16 backbone on unlabeled industrial images.

SimCLR (Chen et al. 2020, arXiv 2002.05709) shows the network two random augmentations
("views") of each image and trains it to tell, among all views of a batch, which one comes from
the same image (the NT-Xent loss). No labels are needed, so the backbone can be adapted to
industrial images, including good parts of a new product, before the GAP + dense CAM head is
trained on the source categories' labels.

Deliberate deviations from the paper, which trains a ResNet-50 from scratch with batch 4096:
we start from ImageNet VGG16 and train only its last block(s); batches are small (32), so AdamW
replaces LARS and tau = 0.2 replaces 0.1 (see `nt_xent_loss`); `SimCLRTransform.inspection()`
uses milder augmentations than the paper so that small defects survive cropping and blurring.

Plain SimCLR learns to ignore exactly what a defect is (a local change of colour, texture or
shape is what its augmentations teach it to disregard), and telling near-identical good parts
apart drifts away from the ImageNet features. `PretrainConfig` therefore names a few levers from
the anomaly-detection literature, all off by default: defect and rotation views as extra
negatives (CutPaste, CSI), a dense loss on the conv5_3 maps the CAM reads (DenseCL), the
mean-shifted loss (Reiss & Hoshen) and staying close to ImageNet (L2-SP, frozen batch norm).
Each is still SimCLR: two views, NT-Xent, a projection head; what a lever changes is named there.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from visinspect import distributed
from visinspect.backbones.vgg16 import FEATURES_END, FROZEN_END, build_model
from visinspect.checkpoint import load_resume_state, save_checkpoint
from visinspect.data.samples import Sample
from visinspect.errors import CheckpointError, ConfigError, DataError, VisinspectError
from visinspect.methods.simclr.augment import CachedImages, SimCLRTransform, TwoViewDataset, views_on
from visinspect.methods.simclr.levers import LEVERS
from visinspect.methods.simclr.loss import (
    defect_views,
    dense_nt_xent_loss,
    l2sp_penalty,
    mean_shift,
    nt_xent_loss,
    rotated_views,
)
from visinspect.methods.simclr.model import (
    REPRESENTATION_DIM,
    DenseProjectionHead,
    ProjectionHead,
    SimCLRModel,
)
from visinspect.methods.simclr.monitor import representations
from visinspect.utils import autocast, model_device, resolve_precision, set_seed

# ----------------------------------------------------------------------------- configuration


@dataclass
class PretrainConfig:
    """Everything that decides a pre-training run; stored in its checkpoint.

    The defaults are the `full()` preset; see there for the time budget arithmetic.
    Optimiser: AdamW, not the paper's LARS: LARS exists to keep batch-4096 training stable,
    and with batches of 32 Adam-type optimisers are what the PyTorch ports use (sthalles,
    Spijkervet). The learning rate rises linearly for `warmup_epochs` (may be fractional),
    then follows a cosine down to 0, stepped every batch.

    Levers for anomaly detection (issue 14), each off by default, so the default is plain SimCLR:

    - `defect_negatives` (False). CutPaste (Li et al. CVPR 2021) meets CSI (Tack et al. NeurIPS
      2020): view 1 of each image, with one synthetic local defect drawn on it (`defect_views`),
      joins the batch as an extra *negative*, in every anchor's NT-Xent denominator: the views of
      image i must be closer to each other than to image i with a defect, so the encoder may no
      longer be invariant to local defects. N more views per step (1.5x the work).
    - `rotation_negatives` (False). CSI's shifting transformation: view 1 rotated by 90, 180 or
      270 degrees (`rotated_views`) as another extra negative, for products with an up (not for
      rotation-symmetric parts: a hex nut turned by 180 degrees is itself). Rotations
      then leave the augmentations (the preset's vf_prob and rr_prob become 0; vertical and
      horizontal flips together make the 180-degree rotation): a change cannot be both a positive
      and a negative. N more views per step.
    - `dense_weight` (0.0 = off; DenseCL uses 0.5). Loss = (1 - w) NT-Xent + w dense NT-Xent
      (`dense_nt_xent_loss`) on a dense projection head over the conv5_3 maps the CAM reads:
      defects are local, so positions, not only whole images, are contrasted.
    - `mean_shifted` (False). Reiss & Hoshen's mean-shifted contrastive loss (AAAI 2023): NT-Xent
      on `mean_shift(h, c)` of the encoder's h, where c is the mean normalised h of each category's
      pre-training images under the starting (ImageNet) encoder, computed once; the target's
      unlabeled good images get the target's own center. As in the paper the projection head is
      bypassed: the loss acts on h, what the CAM head will read. The paper pairs it with a low lr
      (1e-5, SGD) and tau = 0.25.
    - `l2sp_weight` (0.0 = off; try 0.01 to 1). L2-SP (Li et al. ICML 2018): adds
      l2sp_weight / 2 * sum ||w - w0||^2 over the trained conv layers (w0: the starting ImageNet
      weights) to the loss; weight decay then applies to the projection heads only.
    - `freeze_head_bn` (False). The projection head's batch norm uses fixed statistics, those of
      the pre-training images under the starting encoder, instead of each batch's: small batches
      of near-identical parts make batch statistics noisy. Not with `mean_shifted` (no head).
    - Short schedules and a low lr are the existing `epochs`, `lr` and `trainable_from` (24: block
      5 only).
    """

    epochs: int = 7
    batch_size: int = 32
    lr: float = 3e-4  # sthalles/SimCLR's Adam rate; the head starts from scratch
    weight_decay: float = 1e-4  # sthalles/SimCLR; over a few hundred steps it barely matters
    warmup_epochs: float = 1.0
    temperature: float = 0.2
    image_size: int = 128
    trainable_from: int = FROZEN_END
    proj_hidden_dim: int = 512
    proj_output_dim: int = 128
    proj_layers: int = 2
    augment: str = "inspection"  # "inspection" (SimCLRTransform.inspection) or "simclr" (paper)
    augment_kwargs: dict = field(default_factory=dict)  # overrides of the preset's arguments
    max_images: int | None = None  # pre-train on a seeded random subset of this many images
    seed: int = 0
    precision: str = "auto"  # see utils.resolve_precision
    num_workers: int = 0  # DataLoader workers; 0 keeps the image cache in one process
    defect_negatives: bool = False  # each image's view with a pseudo-defect as an extra negative
    rotation_negatives: bool = False  # each image's view rotated by 90/180/270 as an extra negative
    dense_weight: float = 0.0  # weight of the dense conv5_3 loss, in [0, 1]; DenseCL: 0.5
    mean_shifted: bool = False  # NT-Xent on h around each category's mean (Reiss & Hoshen)
    l2sp_weight: float = 0.0  # L2-SP: pull towards the starting weights; 0 = off
    freeze_head_bn: bool = False  # head batch norm with the starting encoder's statistics

    def __post_init__(self) -> None:
        positive = ("epochs", "lr", "temperature", "proj_hidden_dim", "proj_output_dim", "proj_layers")
        for name in positive:
            if not getattr(self, name) > 0:
                raise VisinspectError(f"PretrainConfig.{name} must be positive; got {getattr(self, name)}")
        if self.batch_size < 2:
            raise VisinspectError(
                f"PretrainConfig.batch_size must be at least 2 (the other images of a batch are the "
                f"negatives); got {self.batch_size}"
            )
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise VisinspectError(f"PretrainConfig.warmup_epochs must be in [0, epochs={self.epochs}]; "
                                  f"got {self.warmup_epochs}")
        if self.weight_decay < 0 or self.num_workers < 0:
            raise VisinspectError("PretrainConfig.weight_decay and num_workers must not be negative")
        if self.image_size < 32:
            raise VisinspectError(f"PretrainConfig.image_size must be at least 32; got {self.image_size}")
        if not 0 <= self.trainable_from <= FEATURES_END:
            raise VisinspectError(f"PretrainConfig.trainable_from must be in [0, {FEATURES_END}] "
                                  f"(24 = block 5, 17 = blocks 4-5, 0 = all); got {self.trainable_from}")
        if self.augment not in ("inspection", "simclr"):
            raise VisinspectError(f"PretrainConfig.augment must be 'inspection' or 'simclr'; got "
                                  f"{self.augment!r}")
        if self.max_images is not None and self.max_images < self.batch_size:
            raise VisinspectError(f"PretrainConfig.max_images ({self.max_images}) must be at least "
                                  f"batch_size ({self.batch_size})")
        self._check_levers()

    def __repr__(self) -> str:
        """The dataclass's repr, levers only when on: a plain SimCLR config reads as it did
        before the levers existed."""
        shown = [f.name for f in fields(self) if f.name not in LEVERS or getattr(self, f.name) != f.default]
        return f"PretrainConfig({', '.join(f'{name}={getattr(self, name)!r}' for name in shown)})"

    def _check_levers(self) -> None:
        for name in ("defect_negatives", "rotation_negatives", "mean_shifted", "freeze_head_bn"):
            if not isinstance(getattr(self, name), bool):
                raise VisinspectError(f"PretrainConfig.{name} must be True or False; got "
                                      f"{getattr(self, name)!r}")
        if not 0.0 <= self.dense_weight <= 1.0:
            raise VisinspectError(f"PretrainConfig.dense_weight is the dense loss's share, in [0, 1] "
                                  f"(0 = off, DenseCL: 0.5); got {self.dense_weight}")
        if not (math.isfinite(self.l2sp_weight) and self.l2sp_weight >= 0):
            raise VisinspectError(f"PretrainConfig.l2sp_weight must be 0 (off) or positive; got "
                                  f"{self.l2sp_weight}")
        rotations = {k: self.augment_kwargs[k] for k in ("vf_prob", "rr_prob") if self.augment_kwargs.get(k)}
        if self.rotation_negatives and rotations:
            raise VisinspectError(f"PretrainConfig.rotation_negatives makes rotations negatives, but "
                                  f"augment_kwargs makes them positives too ({rotations}): drop those keys")
        if self.freeze_head_bn and self.mean_shifted:
            raise VisinspectError("PretrainConfig.freeze_head_bn has no effect with mean_shifted (the "
                                  "mean-shifted loss bypasses the projection head): set one of them")
        if self.freeze_head_bn and self.proj_layers < 2:
            raise VisinspectError("PretrainConfig.freeze_head_bn needs a head with batch norm "
                                  "(proj_layers >= 2)")

    @classmethod
    def demo(cls, **overrides) -> PretrainConfig:
        """Under a minute on 2 idle CPU cores: 64 images at 64 px, 4 epochs of 4 steps."""
        preset = {"epochs": 4, "batch_size": 16, "warmup_epochs": 1.0, "image_size": 64, "max_images": 64}
        return cls(**{**preset, **overrides})

    @classmethod
    def full(cls, **overrides) -> PretrainConfig:
        """About 1,000 images in at most 30 minutes on 2 AVX2 CPU cores (fp32): 128 px, 7 epochs.

        Arithmetic: a VGG16 forward at 224 px runs at ~3.5 images/s on 2 idle cores. Measured on
        the same (busy) cores, one SimCLR step on 16 image pairs at 128 px, block 5 trained,
        ran ~1.3x as many images/s as that forward, so ~4.5 images/s idle (two views each, but
        a view costs (128/224)^2 = 0.33 of a 224-px forward, and the frozen blocks skip the
        backward pass). 1,000 images / 4.5 per s = 220 s per epoch; 7 epochs = 26 minutes,
        plus about a minute to decode and cache the images during the first epoch.
        """
        return cls(**overrides)

    @classmethod
    def named(cls, preset: str, **overrides) -> PretrainConfig:
        """The preset `demo` or `full` with some fields replaced (what `pretrain --preset` picks)."""
        if preset not in ("demo", "full"):
            raise VisinspectError(f"PretrainConfig preset must be 'demo' or 'full'; got {preset!r}")
        return cls.demo(**overrides) if preset == "demo" else cls.full(**overrides)

    def make_transform(self) -> SimCLRTransform:
        """The augmentation this config asks for, at `image_size` (without rotations and vertical
        flips when they are negatives)."""
        kwargs = {"vf_prob": 0.0, "rr_prob": 0.0} if self.rotation_negatives else {}
        kwargs.update(self.augment_kwargs)
        if self.augment == "inspection":
            return SimCLRTransform.inspection(self.image_size, **kwargs)
        return SimCLRTransform(self.image_size, **kwargs)

    def to_dict(self) -> dict:
        return asdict(self)


def build_simclr_model(
    config: PretrainConfig, weights: str | Path | None = "auto"
) -> tuple[SimCLRModel, dict]:
    """A SimCLR model on an ImageNet VGG16 (models.build_model); returns (model, provenance).

    Seeds with config.seed first, so the projection head starts from the same weights each run.
    """
    set_seed(config.seed)
    encoder, provenance = build_model(weights, frozen_end=config.trainable_from)
    head = ProjectionHead(REPRESENTATION_DIM, config.proj_hidden_dim, config.proj_output_dim,
                          config.proj_layers)
    dense = None
    if config.dense_weight > 0:  # built after the head, which so starts as in plain SimCLR
        dense = DenseProjectionHead(REPRESENTATION_DIM, config.proj_hidden_dim, config.proj_output_dim)
    return SimCLRModel(encoder, head, config.trainable_from, dense), provenance


# ----------------------------------------------------------------------------- data selection


def pretrain_samples(
    source_samples: Sequence[Sample], target_samples: Sequence[Sample], include_target_good: bool
) -> list[Sample]:
    """The pre-training images: every source image (labels ignored), optionally plus the good
    images of the target categories' *train* split.

    The second part is the realistic unknown-context setting: a factory has good parts of a new
    product long before it has labelled defects. Target test images (and so every target
    defect) are never included, and no label is ever used. Note that source images used here
    for validation elsewhere have then been seen, unlabelled, by the encoder.
    """
    overlap = sorted({s.category for s in source_samples} & {s.category for s in target_samples})
    if overlap:
        raise DataError(f"categories {', '.join(overlap)} are both source and target")
    chosen = list(source_samples)
    if include_target_good:
        good = [s for s in target_samples if s.split == "train" and s.label == 0]
        if not good:
            warnings.warn("include_target_good=True, but the target categories have no train/good "
                          "images: pre-training on source images only", stacklevel=2)
        chosen += good
    return sorted(dict.fromkeys(chosen), key=lambda s: (s.category, str(s.path)))


def subset(samples: Sequence[Sample], max_images: int | None, seed: int) -> list[Sample]:
    """At most `max_images` of the samples, drawn with `seed`, in their order."""
    if max_images is None or len(samples) <= max_images:
        return list(samples)
    keep = np.random.default_rng(seed).permutation(len(samples))[:max_images]
    return [samples[i] for i in sorted(keep)]


# ----------------------------------------------------------------------------- training


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear warm-up from 1/warmup_steps to 1, then cosine decay towards 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def pretrain(
    model: SimCLRModel,
    samples: Sequence[Sample],
    config: PretrainConfig,
    *,
    progress: bool = True,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    checkpoint_path: str | Path | None = None,
    resume: str | Path | None = None,
) -> dict[str, list]:
    """Train `model` with SimCLR on the images of `samples` (labels ignored); returns history.

    With `checkpoint_path`, a resumable state (weights, optimiser, schedule, random states,
    history) is written atomically after every epoch; `resume` continues from such a file and
    reaches the same weights as an uninterrupted run with the same config.

    History: per-epoch lists "epoch", "loss" (mean over steps), "lr" (of the epoch's last step),
    "images_per_s" (images, each seen as two views, per second) and "seconds".
    `on_epoch_end(epoch, record)` may add keys to `record` (e.g. a knn_monitor accuracy on
    held-out *source* labels); they are added to the history too. The model is trained where
    it lives (move it to a GPU first to use one).

    Under torchrun (distributed.init_from_env) each of the N processes reads its shard of every
    epoch, `config.batch_size` images per step (the global batch is N times that), its NT-Xent
    takes the negatives of the global batch and the projection head's batch norm its statistics,
    and DDP averages the gradients: N processes train as one with batch N * batch_size. "loss" is
    then the global batch's, and rank 0 alone writes the state, holding every rank's random state.
    """
    if model.trainable_from != config.trainable_from:
        raise VisinspectError(
            f"the model trains from layer {model.trainable_from} but config.trainable_from is "
            f"{config.trainable_from}: build the model with build_simclr_model(config)"
        )
    world = distributed.world_size()
    if world > 1 and config.dense_weight > 0:
        raise ConfigError(
            f"dense_weight={config.dense_weight} with {world} processes: the dense loss's negatives "
            "are positions of one process's batch, not yet of the global batch; run it in one process"
        )
    samples = subset(samples, config.max_images, config.seed)
    if len(samples) < config.batch_size * world:
        raise DataError(
            f"only {len(samples)} images to pre-train on, fewer than one batch of "
            f"{config.batch_size * world} ({config.batch_size} per process x {world}; incomplete "
            f"batches are dropped): lower batch_size or add images"
        )
    # Measured on the starting model, before set_seed, so that their loader's random draws do
    # not shift the run's; a resumed run reads them from its state instead.
    anchors = _anchors(model, samples, config) if resume is None else {}
    set_seed(config.seed + distributed.rank())  # the ranks draw different augmentations
    device = model_device(model)
    precision = resolve_precision(config.precision)
    transform = config.make_transform()
    # On a GPU the augmentations run there too: on the CPU they would cost far more than the
    # GPU's whole training step. The loader then hands over the cached uint8 images as a list.
    augment_on_device = device.type == "cuda"
    if augment_on_device:
        dataset, collate = CachedImages(samples, cache_side=2 * config.image_size), _collate_images
    else:
        dataset, collate = TwoViewDataset(samples, transform, cache_side=2 * config.image_size), None
    shard = distributed.sampler(dataset, config.seed)  # None in one process: the loader shuffles
    loader = DataLoader(
        _Indexed(dataset),
        batch_size=config.batch_size,
        collate_fn=collate,
        shuffle=shard is None,
        sampler=shard,
        drop_last=True,  # NT-Xent and batch norm want full batches; a batch of 1 would fail
        num_workers=config.num_workers,
        persistent_workers=config.num_workers > 0,  # workers keep their image caches between epochs
        generator=torch.Generator().manual_seed(config.seed),
    )
    steps_per_epoch = len(loader)
    if not config.freeze_head_bn:  # a frozen batch norm normalises with fixed statistics: no sync
        distributed.sync_batch_norm(model.head)
    optimizer = torch.optim.AdamW(_parameter_groups(model, config), lr=config.lr,
                                  weight_decay=config.weight_decay)
    total = config.epochs * steps_per_epoch
    warmup = round(config.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup, total))
    # channels_last is oneDNN's preferred layout for convolutions on a CPU (see inference.py).
    model.train().to(memory_format=torch.channels_last)
    if config.freeze_head_bn:
        model.head.freeze_batch_norm()
    # DDP must not wait for gradients that never come: the encoder's dense layer `fc` is not used
    # here, nor the head by the mean-shifted loss.
    forward = distributed.data_parallel(_Forward(model, config), find_unused_parameters=True)
    history: dict[str, list] = {}
    first = 1
    if resume is not None:
        first, history, anchors = _restore_state(resume, model, optimizer, scheduler, loader.generator,
                                                 config)
    categories = _category_indices(samples)
    distributed.announce(config.batch_size)
    bar = tqdm(total=total, initial=(first - 1) * steps_per_epoch, desc="SimCLR", unit="step",
               disable=not (progress and distributed.is_main()))
    for epoch in range(first, config.epochs + 1):
        if shard is not None:
            shard.set_epoch(epoch)
        start, losses = time.perf_counter(), []
        for index, batch in loader:
            view1, view2 = views_on(device, transform, batch) if augment_on_device else batch
            loss = _batch_loss(forward, model, view1, view2, categories[index], anchors, config, precision)
            if not torch.isfinite(loss):
                raise VisinspectError(
                    f"SimCLR loss became {loss.item()} at epoch {epoch}: lower lr "
                    f"(now {config.lr}) or use precision='fp32'"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            losses.append(distributed.mean(loss))  # the global batch's loss
            bar.update()
            bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.3f}")
        seconds = time.perf_counter() - start
        record = {
            "epoch": epoch,
            "loss": float(np.mean(losses)),
            "lr": lr,
            "images_per_s": steps_per_epoch * config.batch_size * world / seconds,
            "seconds": seconds,
        }
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)
        for key, value in record.items():
            history.setdefault(key, []).append(value)
        if checkpoint_path is not None:
            _save_state(checkpoint_path, model, optimizer, scheduler, loader.generator, config, epoch,
                        history, anchors)
    bar.close()
    return history


class _Indexed(Dataset):
    """(index, item) of another dataset: the loss needs to know which image a view shows."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, object]:
        return index, self.dataset[index]


def _collate_images(batch: list[tuple[int, np.ndarray]]) -> tuple[torch.Tensor, list[np.ndarray]]:
    """The indices as a tensor and the cached images as a list (they may differ in size)."""
    return torch.tensor([i for i, _ in batch]), [image for _, image in batch]


def _category_indices(samples: Sequence[Sample]) -> torch.Tensor:
    """Each sample's category as an index into the sorted category names."""
    names = sorted({s.category for s in samples})
    return torch.tensor([names.index(s.category) for s in samples])


def _anchors(model: SimCLRModel, samples: Sequence[Sample], config: PretrainConfig) -> dict:
    """What the levers measure once on the starting model: the mean-shifted loss's per-category
    centers (mean normalised h), the head's frozen batch-norm statistics (set in the head) and
    L2-SP's starting weights."""
    anchors: dict = {}
    if config.mean_shifted or config.freeze_head_bn:
        h = representations(model, samples, config.image_size, config.batch_size)
        if config.mean_shifted:
            unit, categories = F.normalize(h, dim=1), _category_indices(samples)
            anchors["centers"] = torch.stack([unit[categories == k].mean(dim=0)
                                              for k in range(int(categories.max()) + 1)])
        if config.freeze_head_bn:
            model.head.estimate_batch_norm(h.to(model_device(model)))
    if config.l2sp_weight > 0:
        anchors["start"] = [p.detach().clone() for p in model.encoder_parameters()]
    return anchors


def _parameter_groups(model: SimCLRModel, config: PretrainConfig) -> list:
    """The optimiser's parameters; with L2-SP, the conv layers without weight decay: L2-SP pulls
    them towards their starting values, weight decay would pull them towards zero."""
    if config.l2sp_weight == 0:
        return model.trainable_parameters()
    encoder = model.encoder_parameters()
    ids = {id(p) for p in encoder}
    heads = [p for p in model.trainable_parameters() if id(p) not in ids]
    return [{"params": encoder, "weight_decay": 0.0}, {"params": heads}]


class _Forward(nn.Module):
    """One step's forward pass as one module call, what DistributedDataParallel wraps: the conv5_3
    maps of x, their pooled h, the projection z (None with the mean-shifted loss) and the dense
    projections of the first 2n views (None without the dense loss)."""

    def __init__(self, model: SimCLRModel, config: PretrainConfig) -> None:
        super().__init__()
        self.model, self.config = model, config

    def forward(self, x: torch.Tensor, n: int) -> tuple:
        maps = self.model.feature_maps(x)
        h = maps.mean(dim=(2, 3))
        z = None if self.config.mean_shifted else self.model.head(h)
        dense = self.model.dense_head(maps[: 2 * n]) if self.config.dense_weight > 0 else None
        return maps, h, z, dense


def _batch_loss(
    forward: nn.Module,
    model: SimCLRModel,
    view1: torch.Tensor,
    view2: torch.Tensor,
    categories: torch.Tensor,
    anchors: dict,
    config: PretrainConfig,
    precision: str,
) -> torch.Tensor:
    """The loss of one batch: NT-Xent of the two views, with the levers `config` turns on.
    `forward` is the model's _Forward, in DDP under torchrun (the NT-Xent then spans the global
    batch)."""
    device = model_device(model)
    n = len(view1)
    extra = []
    if config.defect_negatives:
        # A fresh generator per batch, seeded from torch's (saved in resumable states).
        rng = np.random.default_rng(int(torch.randint(2**62, (1,)).item()))
        extra.append(defect_views(view1, rng))
    if config.rotation_negatives:
        extra.append(rotated_views(view1))
    # Every view in one forward pass: one batch-norm batch, as in the paper.
    x = torch.cat([view1, view2, *extra]).to(device, memory_format=torch.channels_last)
    with autocast(device, precision):
        maps, h, z, dense = forward(x, n)
    if config.mean_shifted:
        centers = anchors["centers"].to(device)[categories.repeat(2 + len(extra)).to(device)]
        z = mean_shift(h, centers)
    # Every rank's views (with their gradient), in rank order: views 1, views 2, extra negatives.
    every = distributed.gather(z.float())
    z1, z2 = (torch.cat([g[k * n : (k + 1) * n] for g in every]) for k in (0, 1))
    negatives = torch.cat([g[2 * n :] for g in every]) if extra else None
    rows = distributed.own_rows(n) if len(every) > 1 else None
    loss = nt_xent_loss(z1, z2, config.temperature, negatives=negatives, rows=rows)
    if dense is not None:
        dense_loss = dense_nt_xent_loss(dense[:n], dense[n:], maps[:n], maps[n : 2 * n], config.temperature)
        loss = (1.0 - config.dense_weight) * loss + config.dense_weight * dense_loss
    if config.l2sp_weight > 0:
        loss = loss + 0.5 * config.l2sp_weight * l2sp_penalty(model.encoder_parameters(), anchors["start"])
    return loss


RESUME_KEYS = ("seed", "batch_size", "lr", "image_size", "temperature", "trainable_from", "max_images",
               "defect_negatives", "rotation_negatives", "dense_weight", "mean_shifted", "l2sp_weight",
               "freeze_head_bn")


def _save_state(
    path, model, optimizer, scheduler, generator, config, epoch: int, history: dict, anchors: dict
) -> None:
    """Rank 0 writes the state (every rank holds the same weights), with each rank's random state,
    the augmentations' draws; the barrier: no rank starts the next epoch before it is on disk."""
    rng = distributed.gather_objects(torch.get_rng_state())
    save_checkpoint(path, {
        "kind": "simclr-state",
        "config": config.to_dict(),
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "loader_rng": generator.get_state(),
        "torch_rng": rng[0],  # the augmentations draw from torch's global RNG
        **({"torch_rng_ranks": rng} if len(rng) > 1 else {}),
        "epoch": epoch,
        "history": history,
        "anchors": anchors,  # measured on the starting model, which a resumed run no longer has
    })
    distributed.barrier()


def _restore_state(path, model, optimizer, scheduler, generator, config) -> tuple[int, dict, dict]:
    # States written before the levers existed were written with them off (their defaults).
    data = load_resume_state(path, "simclr-state", config.to_dict(), RESUME_KEYS,
                             defaults=PretrainConfig().to_dict())
    model.load_state_dict(data["model"])
    optimizer.load_state_dict(data["optimizer"])
    scheduler.load_state_dict(data["scheduler"])
    generator.set_state(data["loader_rng"])
    ranks = data.get("torch_rng_ranks", [data["torch_rng"]])
    if len(ranks) != distributed.world_size():
        raise CheckpointError(f"{path} was written by {len(ranks)} process(es), this run has "
                              f"{distributed.world_size()}: resume with the same number of processes")
    torch.set_rng_state(ranks[distributed.rank()])
    history = {k: list(v) for k, v in data["history"].items()}
    return int(data["epoch"]) + 1, history, data.get("anchors", {})





