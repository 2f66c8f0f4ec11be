"""The pre-trained encoder on disk: what `pretrain` writes and `train --pretrained` reads (the
encoder's weights, its config and history, and the ImageNet weights it started from)."""

from __future__ import annotations

from pathlib import Path

import torch

from visinspect.backbones.vgg16 import VGG16CAM, sha256_file
from visinspect.checkpoint import load_checkpoint, save_checkpoint
from visinspect.errors import CheckpointError
from visinspect.methods.simclr.model import (
    SimCLRModel,
)
from visinspect.methods.simclr.pretrain import PretrainConfig

KIND = "simclr"


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
