"""The SimCLR network: the VGG16 encoder, global-average-pooled into h, and the projection heads
(the paper's MLP on h; a 1x1-conv head on conv5_3's maps for the dense loss)."""

from __future__ import annotations

import torch
from torch import nn

from visinspect.backbones.vgg16 import FROZEN_END, VGG16CAM

REPRESENTATION_DIM = 512  # channels of conv5_3, global-average-pooled into h


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

    @property
    def batch_norms(self) -> list[nn.BatchNorm1d]:
        return [m for m in self.layers if isinstance(m, nn.BatchNorm1d)]

    @torch.no_grad()
    def estimate_batch_norm(self, h: torch.Tensor) -> None:
        """Set the batch-norm running statistics to the exact statistics of representations h
        (N, input_dim), e.g. of the pre-training images under the starting encoder."""
        if not self.batch_norms:
            raise ValueError("this projection head has no batch norm (batch_norm=False or num_layers=1)")
        was_training = self.training
        momenta = [m.momentum for m in self.batch_norms]
        for m in self.batch_norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch of everything gives its exact statistics
        self.train()(h)
        for m, momentum in zip(self.batch_norms, momenta, strict=True):
            m.momentum = momentum
        self.train(was_training)

    def freeze_batch_norm(self) -> None:
        """Normalise with the running statistics (eval mode) from now on, even in train mode
        (call again after every `train()`); the affine parameters still train."""
        for m in self.batch_norms:
            m.eval()


class DenseProjectionHead(nn.Module):
    """DenseCL's dense projection head: the MLP of ProjectionHead as 1x1 convolutions
    (Conv-ReLU-Conv, no batch norm, as in Wang et al. CVPR 2021), one vector per map position."""

    def __init__(
        self, input_dim: int = REPRESENTATION_DIM, hidden_dim: int = 512, output_dim: int = 128
    ) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(input_dim, hidden_dim, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden_dim, output_dim, 1)
        )

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.layers(maps)


class SimCLRModel(nn.Module):
    """The baseline's VGG16CAM encoder plus a projection head.

    h = global-average-pooled conv5_3 maps (512-d, exactly what the CAM head sees), z = head(h).
    `trainable_from` is the index in `encoder.features` of the first trained layer: 24 = block 5
    only (the baseline's choice, the default), 17 = blocks 4-5, 0 = all. The frozen layers run
    under torch.no_grad, which saves the memory and time of keeping their activations.
    The encoder's dense layer `fc` is not used here (it stays as it is). Freezing is done with
    `encoder.set_frozen(trainable_from)`, so the encoder passed in is changed. `dense_head`
    (PretrainConfig.dense_weight > 0) projects the conv5_3 maps position by position.
    """

    def __init__(
        self,
        encoder: VGG16CAM,
        head: ProjectionHead | None = None,
        trainable_from: int = FROZEN_END,
        dense_head: DenseProjectionHead | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head if head is not None else ProjectionHead()
        self.dense_head = dense_head
        encoder.set_frozen(trainable_from)

    @property
    def trainable_from(self) -> int:
        return self.encoder.frozen_end

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimiser updates: the unfrozen conv layers and the heads."""
        heads = list(self.head.parameters())
        if self.dense_head is not None:
            heads += list(self.dense_head.parameters())
        return self.encoder_parameters() + heads

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The unfrozen conv layers' parameters (those L2-SP holds near their starting values)."""
        return [p for p in self.encoder.trainable.parameters() if p.requires_grad]

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """conv5_3 + ReLU maps (N, 512, S/16, S/16) of ImageNet-normalised images x (N, 3, S, S),
        the maps the CAM reads; gradients flow through the trainable blocks only."""
        with torch.no_grad():
            maps = self.encoder.frozen(x)
        return self.encoder.trainable(maps)

    def representation(self, x: torch.Tensor) -> torch.Tensor:
        """h (N, 512) of ImageNet-normalised images x (N, 3, S, S)."""
        return self.feature_maps(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.representation(x))
