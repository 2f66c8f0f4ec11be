"""The VGG16-CAM model of the seed project and where its ImageNet weights come from.

VGG16's convolutional layers, cut after conv5_3 + ReLU (512 x 14 x 14 at 224 px), then global
average pooling and one dense layer to two logits (good, anomaly). Because the head is pure GAP
followed by a linear layer, the class activation map (CAM) is exact: the mean of the anomaly CAM
equals the anomaly logit minus its bias.
"""

from __future__ import annotations

import hashlib
import os
import socket
import warnings
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models import vgg

from visinspect.errors import VisinspectError

CLASS_NAMES = ("good", "anomaly")
ANOMALY = 1
# torchvision indices in vgg16().features: 23 is pool4, 24/26/28 are conv5_1/conv5_2/conv5_3.
FROZEN_END = 24  # features[:24] (conv1_1 .. conv4_3 + pool4) is frozen, as in the seed
CONV4_3_END = 23  # features[:23] ends at conv4_3 + ReLU (28 x 28 at 224 px)
FEATURES_END = 30  # features[:30] ends at conv5_3 + ReLU; VGG's last max-pool is dropped
WEIGHTS_ENV = "VISINSPECT_BACKBONE_WEIGHTS"
OFFLINE_ENV = "VISINSPECT_OFFLINE"
TORCHVISION_URL = torchvision.models.VGG16_Weights.IMAGENET1K_V1.url


class VGG16CAM(nn.Module):
    """VGG16 conv layers + global average pooling + Linear(512, 2); frozen up to conv4_3.

    `frozen_end` is the index of the first trainable layer in `features` (24 = conv5_1, the
    seed's choice); SimCLR pre-training may unfreeze more.
    """

    def __init__(self, frozen_end: int = FROZEN_END) -> None:
        super().__init__()
        # torchvision's own layer builder keeps its indices, so ImageNet state dicts
        # (`features.N.*`) load unchanged; building only the conv part skips the 102M-parameter
        # classifier that vgg16() would initialise and we would throw away.
        self.features = vgg.make_layers(vgg.cfgs["D"])[:FEATURES_END]
        for layer in self.features:
            if isinstance(layer, nn.Conv2d):  # the initialisation torchvision's VGG uses
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(layer.bias)
        self.fc = nn.Linear(512, len(CLASS_NAMES))
        self.frozen_end = frozen_end
        self.set_frozen(frozen_end)

    def set_frozen(self, frozen_end: int) -> None:
        """Freeze features[:frozen_end]; everything after it (and the dense layer) trains."""
        if not 0 <= frozen_end <= FEATURES_END:
            raise ValueError(f"frozen_end must be in [0, {FEATURES_END}]; got {frozen_end}")
        self.frozen_end = frozen_end
        for i, layer in enumerate(self.features):
            layer.requires_grad_(i >= frozen_end)

    @property
    def frozen(self) -> nn.Sequential:
        return self.features[: self.frozen_end]

    @property
    def trainable(self) -> nn.Sequential:
        return self.features[self.frozen_end :]

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """conv5_3 + ReLU maps A (N, 512, h, w) of normalised images x (N, 3, H, W)."""
        return self.features(x)

    def maps_from_conv4_3(self, c4: torch.Tensor) -> torch.Tensor:
        """conv5_3 + ReLU maps from conv4_3 + ReLU maps (pool4, then block 5): the part of the
        network that runs after the feature store (features.FeatureStore)."""
        return self.features[CONV4_3_END:](c4)

    def head(self, maps: torch.Tensor) -> torch.Tensor:
        """Logits (N, 2) from conv5_3 maps: global average pooling then the dense layer."""
        return self.fc(maps.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.feature_maps(x))


def logit_margin(logits: torch.Tensor) -> torch.Tensor:
    """Anomaly logit minus good logit: the score to rank on (P(anomaly) = sigmoid(margin)).

    In float32, P(anomaly) rounds to exactly 1.0 once the margin passes ~17, so on unfamiliar
    products many images tie at 1.0 and AUROC collapses; the margin keeps them ordered.
    """
    return (logits[..., ANOMALY] - logits[..., 1 - ANOMALY]).float()


# ----------------------------------------------------------------------------- backbone weights


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _features_state_dict(raw: dict, path: Path) -> dict[str, torch.Tensor]:
    """Accept torchvision's full VGG16 file or a features-only file; return `N.weight` keys."""
    if not isinstance(raw, dict):
        raise VisinspectError(f"{path} is not a state dict of VGG16 weights")
    out = {}
    for key, value in raw.items():
        name = key.removeprefix("features.")
        index = name.split(".")[0]
        if key.startswith("classifier.") or not index.isdigit():
            continue
        if int(index) < FEATURES_END:
            out[name] = value
    return out


def read_weights_file(path: Path, what: str, env: str):
    """The contents of a weights file (`torch.load`, weights only), or an error naming it: `what`
    names the weights, `env` the variable that may have pointed at it."""
    if not path.is_file():
        raise VisinspectError(
            f"{what} weights file {path} does not exist: pass an existing .pth file, or unset {env}"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise VisinspectError(f"cannot load {what} weights {path}: {e}") from None


def _load_file(model: VGG16CAM, path: Path) -> None:
    state = _features_state_dict(read_weights_file(path, "backbone", WEIGHTS_ENV), path)
    expected = set(model.features.state_dict())
    if set(state) != expected:
        missing = sorted(expected - set(state))[:4]
        raise VisinspectError(
            f"{path} does not hold VGG16 conv weights in torchvision layout "
            f"(missing e.g. {missing}); expected keys like features.0.weight ... features.28.bias"
        )
    try:
        model.features.load_state_dict(state)
    except RuntimeError:
        expected_shapes = model.features.state_dict()
        shapes = [k for k, v in expected_shapes.items() if getattr(state[k], "shape", None) != v.shape]
        raise VisinspectError(
            f"{path} holds VGG16 keys with other shapes (e.g. features.{shapes[0]}): not VGG16 weights"
        ) from None


def hub_checkpoint(url: str, timeout: float) -> Path:
    """The torchvision weights file at `url`, from the torch hub cache, downloaded there if missing
    with a socket timeout (a machine without internet fails fast instead of hanging)."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if not cached.is_file():
        if os.environ.get(OFFLINE_ENV):
            raise OSError(f"{OFFLINE_ENV} is set, not downloading")
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(timeout)
        try:
            torch.hub.load_state_dict_from_url(url, progress=False, check_hash=True)
        finally:
            socket.setdefaulttimeout(old)
    return cached


def warn_random_weights(network: str, error: Exception, url: str, fix: str) -> None:
    """The warning nobody can miss when ImageNet weights could not be had."""
    warnings.warn(
        "\n" + "!" * 78 + "\n"
        f"NO PRETRAINED WEIGHTS: the {network} is RANDOMLY INITIALISED.\n"
        f"torchvision's ImageNet weights could not be had ({type(error).__name__}: {error}).\n"
        "Results will be far worse than the seed's. Fix: download\n"
        f"  {url}\n"
        f"and {fix}.\n" + "!" * 78,
        stacklevel=3,
    )


def _torchvision_weights(model: VGG16CAM, timeout: float) -> dict:
    """torchvision's VGG16_Weights.IMAGENET1K_V1, from the torch hub cache or downloaded."""
    cached = hub_checkpoint(TORCHVISION_URL, timeout)
    _load_file(model, cached)
    return {"source": "torchvision", "path": str(cached), "sha256": sha256_file(cached)}


def load_backbone_weights(
    model: VGG16CAM, weights: str | Path | None = "auto", *, timeout: float = 20.0
) -> dict:
    """Load ImageNet weights into `model.features` and return where they came from.

    Order for "auto": the environment variable VISINSPECT_BACKBONE_WEIGHTS, then torchvision's
    VGG16_Weights.IMAGENET1K_V1 (hub cache, else a download with a timeout), then random
    initialisation with a warning nobody can miss. A path loads that file; "random" skips it all.
    The returned dict (source, path, sha256) goes into every checkpoint and report.
    """
    if weights is None or weights == "random":
        return {"source": "random", "path": None, "sha256": None}
    if weights not in ("auto", "torchvision"):
        path = Path(weights).expanduser()
        _load_file(model, path)
        return {"source": "file", "path": str(path), "sha256": sha256_file(path)}
    env = os.environ.get(WEIGHTS_ENV)
    if env and weights == "auto":
        path = Path(env).expanduser()
        _load_file(model, path)
        return {"source": f"env:{WEIGHTS_ENV}", "path": str(path), "sha256": sha256_file(path)}
    try:
        return _torchvision_weights(model, timeout)
    except (OSError, RuntimeError) as e:
        warn_random_weights("VGG16 backbone", e, TORCHVISION_URL,
                            f"pass it with --backbone-weights FILE or set {WEIGHTS_ENV}=FILE")
        return {"source": "random", "path": None, "sha256": None}


def pretrained_available(weights: str | Path | None = "auto") -> bool:
    """Whether `load_backbone_weights(weights)` would find ImageNet weights without downloading."""
    if weights is None or weights == "random":
        return False
    if weights not in ("auto", "torchvision"):
        return Path(weights).expanduser().is_file()
    return imagenet_weights_here(WEIGHTS_ENV if weights == "auto" else None, TORCHVISION_URL)


def imagenet_weights_here(env: str | None, url: str) -> bool:
    """Whether ImageNet weights can be had without downloading: the file that the environment
    variable `env` names, or torchvision's file of `url` in the torch hub cache."""
    value = os.environ.get(env) if env else None
    if value and Path(value).expanduser().is_file():
        return True
    return (Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name).is_file()


def build_model(weights: str | Path | None = "auto", frozen_end: int = FROZEN_END) -> tuple[VGG16CAM, dict]:
    """A fresh VGG16-CAM with backbone weights loaded; returns (model, provenance)."""
    model = VGG16CAM(frozen_end=frozen_end)
    return model, load_backbone_weights(model, weights)


def describe_backbone(provenance: dict) -> str:
    """One line for reports: which weights the backbone started from."""
    source = str(provenance.get("source"))
    if source.startswith("simclr"):
        start = describe_backbone(provenance.get("backbone") or {}).removeprefix("backbone: ")
        return f"backbone: SimCLR-adapted ({source}), pre-training started from {start}"
    network = provenance.get("network", "VGG16")
    if source == "random":
        return f"backbone: {network}, RANDOM initialisation (no ImageNet weights found)"
    sha = (provenance.get("sha256") or "")[:12]
    return f"backbone: ImageNet {network} from {source} ({provenance.get('path')}, sha256 {sha}...)"
