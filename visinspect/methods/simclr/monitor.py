"""How good the representations are while SimCLR trains: a k-nearest-neighbour probe (kNN
monitor) of labelled images on the encoder's pooled conv5_3 features, no training involved."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from visinspect.data.samples import DefectDataset, Sample
from visinspect.errors import DataError
from visinspect.methods.simclr.model import (
    SimCLRModel,
)
from visinspect.utils import model_device


@torch.no_grad()
def representations(
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
    train = F.normalize(representations(model, train_samples, image_size, batch_size), dim=1)
    test = F.normalize(representations(model, test_samples, image_size, batch_size), dim=1)
    model.train(was_training)
    train_labels = torch.tensor([s.label for s in train_samples])
    test_labels = torch.tensor([s.label for s in test_samples])
    similarity, nearest = (test @ train.T).topk(k, dim=1)
    votes = torch.zeros(len(test_samples), 2).scatter_add_(1, train_labels[nearest], similarity)
    return (votes.argmax(dim=1) == test_labels).float().mean().item()
