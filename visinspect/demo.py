"""The default experiment on the embedded synthetic dataset, shared by the CLI demo and notebooks.

Unknown context in miniature: train on four synthetic products, test on two it never saw
(one texture, one object). Small settings by default so that it runs in about a minute on a
laptop CPU; `DemoSettings.full()` gives the seed's 224 px recipe.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from visinspect.checkpoint import load_classifier, save_classifier
from visinspect.data import (
    Sample,
    build_sample_table,
    default_synthetic_root,
    stratified_split,
    unknown_context_split,
)
from visinspect.errors import CheckpointError
from visinspect.models import VGG16CAM, pretrained_available
from visinspect.synthetic import ensure_synthetic_dataset
from visinspect.train import TrainConfig, train_baseline

SOURCE = ("grain_wood", "grain_leather", "round_pill", "bottle_top")
TARGET = ("woven_fabric", "hex_nut")


@dataclass(frozen=True)
class DemoSettings:
    """How big the demo is: image size and epochs (the rest is the seed's recipe)."""

    image_size: int = 96
    epochs: int = 6
    seed: int = 0
    val_fraction: float = 0.2

    @classmethod
    def full(cls) -> DemoSettings:
        return cls(image_size=224, epochs=10)

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, image_size=self.image_size, seed=self.seed)


def default_weights_dir() -> Path:
    """`weights/` of the source checkout (git-ignored), where notebooks keep their checkpoints."""
    return default_synthetic_root().parents[1] / "weights"


def demo_split(
    root: str | Path | None = None, settings: DemoSettings = DemoSettings()
) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """(train, validation, test): source categories split 80/20, every image of the targets."""
    root = ensure_synthetic_dataset(default_synthetic_root()) if root is None else Path(root)
    table = build_sample_table(root)
    source, target = unknown_context_split(table.samples, SOURCE, TARGET)
    train, val = stratified_split(source, settings.val_fraction, settings.seed)
    return train, val, target


def demo_model(
    checkpoint: str | Path | None = None,
    settings: DemoSettings = DemoSettings(),
    *,
    weights: str | Path | None = "auto",
    retrain: bool = False,
    progress: bool = True,
) -> tuple[VGG16CAM, dict]:
    """Load the demo baseline from `checkpoint`, or train and save it there if it is missing
    (or was trained with other settings)."""
    path = Path(checkpoint) if checkpoint else default_weights_dir() / "demo_baseline.pt"
    if path.is_file() and not retrain:
        try:
            model, info = load_classifier(path)
            # A checkpoint trained from random weights is stale once ImageNet weights are here.
            stale = info["backbone"].get("source") == "random" and pretrained_available(weights)
            if info.get("demo_settings") == asdict(settings) and not stale:
                return model, info
        except CheckpointError:
            pass  # unreadable or foreign: train a fresh one below
    train, val, _ = demo_split(settings=settings)
    model, info = train_baseline(train, val, settings.train_config(), weights=weights, progress=progress)
    info["demo_settings"] = asdict(settings)
    save_classifier(path, model, **info)
    return model, info
