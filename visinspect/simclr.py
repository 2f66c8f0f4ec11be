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
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from visinspect.checkpoint import load_checkpoint, load_resume_state, save_checkpoint
from visinspect.data import IMAGENET_MEAN, IMAGENET_STD, DefectDataset, Sample, load_rgb
from visinspect.errors import CheckpointError, DataError, VisinspectError
from visinspect.models import FEATURES_END, FROZEN_END, VGG16CAM, build_model, sha256_file
from visinspect.utils import autocast, model_device, resolve_precision, set_seed

KIND = "simclr"
REPRESENTATION_DIM = 512  # channels of conv5_3, global-average-pooled into h


# ----------------------------------------------------------------------------- augmentations


class RandomRotate90:
    """Rotate a (..., H, W) tensor by 90 degrees counter-clockwise with probability p.

    With horizontal and vertical flips at p = 0.5 and this at p = 0.5, all 8 flips/rotations
    of the square are equally likely (the two flips together make the 180-degree rotation).
    """

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.rot90(x, 1, dims=(-2, -1)) if torch.rand(1).item() < self.p else x


def _check_probability(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} is a probability and must be in [0, 1]; got {p}")


class SimCLRTransform:
    """One random SimCLR view of an image: RGB uint8 array (H, W, 3), PIL image or uint8 tensor
    (3, H, W) on any device in, ImageNet-normalised float tensor (3, input_size, input_size) out
    (on the input's device: on a GPU the augmentations run there).

    Defaults are the paper's (google-research/simclr, lightly's SimCLRTransform): random resized
    crop of scale (min_scale, 1) and aspect ratio (3/4, 4/3), horizontal flip, colour jitter
    (brightness/contrast/saturation 0.8 * cj_strength, hue 0.2 * cj_strength, random order) with
    probability cj_prob, grayscale with probability random_gray_scale, and a Gaussian blur
    (sigma uniform in `sigmas`, kernel about 10 % of the side, odd) with probability gaussian_blur.
    Industrial images have no canonical orientation, hence the optional vertical flip (vf_prob)
    and 90-degree rotation (rr_prob). All randomness comes from torch's global generator, so
    `torch.manual_seed` makes the views reproducible.
    """

    def __init__(
        self,
        input_size: int = 224,
        min_scale: float = 0.08,
        hf_prob: float = 0.5,
        cj_prob: float = 0.8,
        cj_strength: float = 1.0,
        cj_bright: float = 0.8,
        cj_contrast: float = 0.8,
        cj_sat: float = 0.8,
        cj_hue: float = 0.2,
        random_gray_scale: float = 0.2,
        gaussian_blur: float = 0.5,
        sigmas: tuple[float, float] = (0.1, 2.0),
        vf_prob: float = 0.0,
        rr_prob: float = 0.0,
    ) -> None:
        if input_size < 16:
            raise ValueError(f"input_size must be at least 16 pixels; got {input_size}")
        if not 0.0 < min_scale <= 1.0:
            raise ValueError(f"min_scale is a fraction of the image area in (0, 1]; got {min_scale}")
        probabilities = {"hf_prob": hf_prob, "vf_prob": vf_prob, "rr_prob": rr_prob, "cj_prob": cj_prob,
                         "random_gray_scale": random_gray_scale, "gaussian_blur": gaussian_blur}
        for name, p in probabilities.items():
            _check_probability(name, p)
        if not 0.0 <= cj_hue * cj_strength <= 0.5:
            raise ValueError(f"cj_hue * cj_strength must be in [0, 0.5]; got {cj_hue * cj_strength}")
        if not 0.0 < sigmas[0] <= sigmas[1]:
            raise ValueError(f"sigmas must be (low, high) with 0 < low <= high; got {sigmas}")
        self.input_size = input_size
        s = cj_strength
        kernel = max(3, int(0.1 * input_size) // 2 * 2 + 1)  # odd, as a Gaussian kernel must be
        self.pipeline = T.Compose(
            [
                T.RandomResizedCrop(input_size, scale=(min_scale, 1.0), antialias=True),
                T.RandomHorizontalFlip(hf_prob),
                T.RandomVerticalFlip(vf_prob),
                RandomRotate90(rr_prob),
                T.RandomApply(
                    [T.ColorJitter(cj_bright * s, cj_contrast * s, cj_sat * s, cj_hue * s)],
                    p=cj_prob,
                ),
                T.RandomGrayscale(random_gray_scale),
                T.RandomApply([T.GaussianBlur(kernel, sigma=tuple(sigmas))], p=gaussian_blur),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    @classmethod
    def inspection(cls, input_size: int = 224, **overrides) -> SimCLRTransform:
        """Milder views for defect images: a defect covering 1 % of a part must stay visible.

        Crops keep at least half of the image (the paper's 8 % would often crop the defect
        out, making the two views disagree about it); any flip or rotation (parts have no
        up); half-strength colour jitter, since colour itself can be the defect (stains); and a
        blur of at most sigma = 1 pixel, which leaves thin scratches and cracks visible.
        """
        preset = {"min_scale": 0.5, "vf_prob": 0.5, "rr_prob": 0.5, "cj_strength": 0.5, "sigmas": (0.1, 1.0)}
        return cls(input_size=input_size, **{**preset, **overrides})

    def __call__(self, image: np.ndarray | Image.Image | torch.Tensor) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
                raise DataError(f"SimCLRTransform needs a uint8 tensor (3, H, W); got {image.dtype} "
                                f"{tuple(image.shape)}")
            return self.pipeline(image.float().div(255.0))
        if isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB"))
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
                and image.shape[2] == 3):
            raise DataError(
                f"SimCLRTransform needs an RGB uint8 array (H, W, 3) or a PIL image, got "
                f"{type(image).__name__} {getattr(image, 'dtype', '')} {getattr(image, 'shape', '')}"
                "; read images with visinspect.data.load_rgb"
            )
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div_(255.0)  # copy: may be read-only
        return self.pipeline(x)


class CachedImages(Dataset):
    """The decoded RGB uint8 image (H, W, 3) of each sample, cached in memory on first use.

    Decoding PNGs every epoch would cost more than the augmentations. `cache_side` shrinks
    larger images so their shorter side is that many pixels before caching: full-resolution
    MVTec images (1024 px) would need 3 MB each.
    """

    def __init__(self, samples: Sequence[Sample], cache_side: int | None = None) -> None:
        self.samples = list(samples)
        self.cache_side = cache_side
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, index: int) -> np.ndarray:
        """The decoded (and possibly shrunk) RGB uint8 image of sample `index`, cached."""
        if index not in self._cache:
            image = load_rgb(self.samples[index].path)
            short = min(image.shape[:2])
            if self.cache_side is not None and short > self.cache_side:
                f = self.cache_side / short
                size = (round(image.shape[1] * f), round(image.shape[0] * f))  # cv2 wants (w, h)
                image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
            self._cache[index] = image
        return self._cache[index]

    def __getitem__(self, index: int) -> np.ndarray:
        return self.image(index)


class TwoViewDataset(CachedImages):
    """(view1, view2): two independent random views of each sample's image; labels are ignored."""

    def __init__(
        self, samples: Sequence[Sample], transform: Callable, cache_side: int | None = None
    ) -> None:
        super().__init__(samples, cache_side)
        self.transform = transform

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.image(index)
        return self.transform(image), self.transform(image)


def _views_on(device: torch.device, transform: Callable, images: list[np.ndarray]):
    """Both views of a batch of cached images, augmented on `device`, image by image, drawing
    from the random generator in the same order as TwoViewDataset (view 1, view 2, next image)."""
    first, second = [], []
    for image in images:
        x = torch.tensor(image, device=device).permute(2, 0, 1)
        first.append(transform(x))
        second.append(transform(x))
    return torch.stack(first), torch.stack(second)


# ----------------------------------------------------------------------------- model and loss


class ProjectionHead(nn.Module):
    """MLP g(h) -> z on which the contrastive loss is computed (lightly's SimCLRProjectionHead).

    num_layers = 2 is SimCLR v1 (Linear-BN-ReLU-Linear), 3 is v2. Linear layers followed by
    batch norm have no bias (the norm would cancel it). The head is thrown away after
    pre-training: the paper finds h, before the head, the better representation.
    """

    def __init__(
        self,
        input_dim: int = REPRESENTATION_DIM,
        hidden_dim: int = 512,
        output_dim: int = 128,
        num_layers: int = 2,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1; got {num_layers}")
        self.config = {"input_dim": input_dim, "hidden_dim": hidden_dim, "output_dim": output_dim,
                       "num_layers": num_layers, "batch_norm": batch_norm}
        layers: list[nn.Module] = []
        dim = input_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(dim, hidden_dim, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            dim = hidden_dim
        layers.append(nn.Linear(dim, output_dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.layers(h)


class SimCLRModel(nn.Module):
    """The baseline's VGG16CAM encoder plus a projection head.

    h = global-average-pooled conv5_3 maps (512-d, exactly what the CAM head sees), z = head(h).
    `trainable_from` is the index in `encoder.features` of the first trained layer: 24 = block 5
    only (the baseline's choice, the default), 17 = blocks 4-5, 0 = all. The frozen layers run
    under torch.no_grad, which saves the memory and time of keeping their activations.
    The encoder's dense layer `fc` is not used here (it stays as it is). Freezing is done with
    `encoder.set_frozen(trainable_from)`, so the encoder passed in is changed.
    """

    def __init__(
        self, encoder: VGG16CAM, head: ProjectionHead | None = None, trainable_from: int = FROZEN_END
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head if head is not None else ProjectionHead()
        encoder.set_frozen(trainable_from)

    @property
    def trainable_from(self) -> int:
        return self.encoder.frozen_end

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimiser updates: the unfrozen conv layers and the head."""
        encoder = [p for p in self.encoder.trainable.parameters() if p.requires_grad]
        return encoder + list(self.head.parameters())

    def representation(self, x: torch.Tensor) -> torch.Tensor:
        """h (N, 512) of ImageNet-normalised images x (N, 3, S, S)."""
        with torch.no_grad():
            maps = self.encoder.frozen(x)
        return self.encoder.trainable(maps).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.representation(x))


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """NT-Xent (normalised temperature-scaled cross entropy), the SimCLR loss.

    z1[i] and z2[i] are projections of two views of image i. Each of the 2N views is an anchor
    whose positive is the other view of its image and whose negatives are the other 2N - 2
    views; the loss is the cross entropy of cosine similarity / temperature, averaged over all
    2N anchors. tau = 0.2 is Chen's advice for small batches (google-research/simclr#166); the
    paper's 0.1 is tuned for batch 4096, where many more negatives share the probability mass.
    """
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must both be (N, D) with the same shape; got "
                         f"{tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape[0] < 2:
        raise ValueError(f"NT-Xent needs N >= 2 images (the others are the negatives); got N = "
                         f"{z1.shape[0]}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number; got {temperature}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = z @ z.T / temperature
    self_pairs = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_pairs, float("-inf"))  # a view is not its own negative
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, positives)


# ----------------------------------------------------------------------------- configuration


@dataclass
class PretrainConfig:
    """Everything that decides a pre-training run; stored in its checkpoint.

    The defaults are the `full()` preset; see there for the time budget arithmetic.
    Optimiser: AdamW, not the paper's LARS: LARS exists to keep batch-4096 training stable,
    and with batches of 32 Adam-type optimisers are what the PyTorch ports use (sthalles,
    Spijkervet). The learning rate rises linearly for `warmup_epochs` (may be fractional),
    then follows a cosine down to 0, stepped every batch.
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

    def make_transform(self) -> SimCLRTransform:
        """The augmentation this config asks for, at `image_size`."""
        if self.augment == "inspection":
            return SimCLRTransform.inspection(self.image_size, **self.augment_kwargs)
        return SimCLRTransform(self.image_size, **self.augment_kwargs)

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
    return SimCLRModel(encoder, head, config.trainable_from), provenance


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


def _subset(samples: Sequence[Sample], max_images: int | None, seed: int) -> list[Sample]:
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
    """
    if model.trainable_from != config.trainable_from:
        raise VisinspectError(
            f"the model trains from layer {model.trainable_from} but config.trainable_from is "
            f"{config.trainable_from}: build the model with build_simclr_model(config)"
        )
    samples = _subset(samples, config.max_images, config.seed)
    if len(samples) < config.batch_size:
        raise DataError(
            f"only {len(samples)} images to pre-train on, fewer than one batch of "
            f"{config.batch_size} (incomplete batches are dropped): lower batch_size or add images"
        )
    set_seed(config.seed)
    device = model_device(model)
    precision = resolve_precision(config.precision)
    transform = config.make_transform()
    # On a GPU the augmentations run there too: on the CPU they would cost far more than the
    # GPU's whole training step. The loader then hands over the cached uint8 images as a list.
    augment_on_device = device.type == "cuda"
    if augment_on_device:
        dataset, collate = CachedImages(samples, cache_side=2 * config.image_size), list
    else:
        dataset, collate = TwoViewDataset(samples, transform, cache_side=2 * config.image_size), None
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        collate_fn=collate,
        shuffle=True,
        drop_last=True,  # NT-Xent and batch norm want full batches; a batch of 1 would fail
        num_workers=config.num_workers,
        persistent_workers=config.num_workers > 0,  # workers keep their image caches between epochs
        generator=torch.Generator().manual_seed(config.seed),
    )
    steps_per_epoch = len(loader)
    optimizer = torch.optim.AdamW(
        model.trainable_parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    total = config.epochs * steps_per_epoch
    warmup = round(config.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup, total))
    # channels_last is oneDNN's preferred layout for convolutions on a CPU (see inference.py).
    model.train().to(memory_format=torch.channels_last)
    history: dict[str, list] = {}
    first = 1
    if resume is not None:
        first, history = _restore_state(resume, model, optimizer, scheduler, loader.generator, config)
    bar = tqdm(total=total, initial=(first - 1) * steps_per_epoch, desc="SimCLR", unit="step",
               disable=not progress)
    for epoch in range(first, config.epochs + 1):
        start, losses = time.perf_counter(), []
        for batch in loader:
            view1, view2 = _views_on(device, transform, batch) if augment_on_device else batch
            # Both views in one forward pass: one batch-norm batch of 2N, as in the paper.
            x = torch.cat([view1, view2]).to(device, memory_format=torch.channels_last)
            with autocast(device, precision):
                z = model(x)
            loss = nt_xent_loss(*z.float().chunk(2), temperature=config.temperature)
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
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
        seconds = time.perf_counter() - start
        record = {
            "epoch": epoch,
            "loss": float(np.mean(losses)),
            "lr": lr,
            "images_per_s": steps_per_epoch * config.batch_size / seconds,
            "seconds": seconds,
        }
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)
        for key, value in record.items():
            history.setdefault(key, []).append(value)
        if checkpoint_path is not None:
            _save_state(checkpoint_path, model, optimizer, scheduler, loader.generator, config, epoch,
                        history)
    bar.close()
    return history


RESUME_KEYS = ("seed", "batch_size", "lr", "image_size", "temperature", "trainable_from", "max_images")


def _save_state(path, model, optimizer, scheduler, generator, config, epoch: int, history: dict) -> None:
    save_checkpoint(path, {
        "kind": "simclr-state",
        "config": config.to_dict(),
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "loader_rng": generator.get_state(),
        "torch_rng": torch.get_rng_state(),  # the augmentations draw from torch's global RNG
        "epoch": epoch,
        "history": history,
    })


def _restore_state(path, model, optimizer, scheduler, generator, config) -> tuple[int, dict]:
    data = load_resume_state(path, "simclr-state", config.to_dict(), RESUME_KEYS)
    model.load_state_dict(data["model"])
    optimizer.load_state_dict(data["optimizer"])
    scheduler.load_state_dict(data["scheduler"])
    generator.set_state(data["loader_rng"])
    torch.set_rng_state(data["torch_rng"])
    return int(data["epoch"]) + 1, {k: list(v) for k, v in data["history"].items()}


@torch.no_grad()
def _representations(
    model: SimCLRModel, samples: Sequence[Sample], image_size: int, batch_size: int
) -> torch.Tensor:
    device = model_device(model)
    loader = DataLoader(DefectDataset(samples, image_size), batch_size=batch_size, shuffle=False)
    return torch.cat([model.representation(b["image"].to(device)).float().cpu() for b in loader])


def knn_monitor(
    model: SimCLRModel,
    train_samples: Sequence[Sample],
    test_samples: Sequence[Sample],
    k: int = 5,
    *,
    image_size: int = 224,
    batch_size: int = 32,
) -> float:
    """Accuracy of a cosine k-nearest-neighbour classifier on h: a cheap "is h getting better?".

    Each test image takes the label with the larger summed cosine similarity among its k
    nearest train images. Use it only with held-out *source* labels, never target labels:
    those must stay unseen until the final evaluation.
    """
    if not train_samples or not test_samples:
        raise DataError("knn_monitor needs at least one train and one test image")
    if not 1 <= k <= len(train_samples):
        raise ValueError(f"k must be in [1, {len(train_samples)}] (the train images); got {k}")
    was_training = model.training
    model.eval()
    train = F.normalize(_representations(model, train_samples, image_size, batch_size), dim=1)
    test = F.normalize(_representations(model, test_samples, image_size, batch_size), dim=1)
    model.train(was_training)
    train_labels = torch.tensor([s.label for s in train_samples])
    test_labels = torch.tensor([s.label for s in test_samples])
    similarity, nearest = (test @ train.T).topk(k, dim=1)
    votes = torch.zeros(len(test_samples), 2).scatter_add_(1, train_labels[nearest], similarity)
    return (votes.argmax(dim=1) == test_labels).float().mean().item()


# ----------------------------------------------------------------------------- checkpoints


def save_pretrained(
    path: str | Path,
    model: SimCLRModel,
    config: PretrainConfig,
    history: dict,
    backbone_provenance: dict,
) -> Path:
    """Save the pre-trained encoder (`features`), the head, config, history and provenance."""
    payload = {
        "kind": KIND,
        "architecture": "vgg16-cam",
        "encoder": {k: v.detach().cpu() for k, v in model.encoder.features.state_dict().items()},
        "head": {k: v.detach().cpu() for k, v in model.head.state_dict().items()},
        "head_config": dict(model.head.config),
        "config": config.to_dict(),
        "history": history,
        "backbone": dict(backbone_provenance),
    }
    return save_checkpoint(path, payload)


def load_pretrained_encoder(path: str | Path, model: VGG16CAM) -> dict:
    """Load a SimCLR checkpoint's encoder into a classifier's `features`; return its provenance.

    The provenance (source "simclr:<path>", sha256 of the file, the ImageNet weights the
    pre-training started from, and its config) belongs in the classifier's checkpoint.
    """
    data = load_checkpoint(path, kind=KIND)
    state = data.get("encoder")
    expected = model.features.state_dict()
    if not isinstance(state, dict) or set(state) != set(expected) or any(
        not isinstance(state[k], torch.Tensor) or state[k].shape != expected[k].shape for k in expected
    ):
        raise CheckpointError(
            f"{path} does not hold VGG16 conv weights (features.0 .. features.28) of the expected "
            "shapes; was it written by visinspect's save_pretrained?"
        )
    model.features.load_state_dict(state)
    return {
        "source": f"simclr:{path}",
        "path": str(path),
        "sha256": sha256_file(path),
        "backbone": data.get("backbone"),
        "config": data.get("config"),
    }
