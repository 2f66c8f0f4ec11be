"""Checkpoints: plain dicts of tensors and numbers, written atomically, read with weights_only=True.

A checkpoint never holds pickled Python objects, so loading one cannot run code. It records what
is needed to use and to trust the model: state dict, config, class names, image size, decision
threshold, heatmap normalisation, backbone provenance and library versions.
"""

from __future__ import annotations

import hashlib
import pickle
import platform
import zipfile
from pathlib import Path

import numpy as np
import torch
import torchvision

from visinspect import __version__, distributed
from visinspect.errors import CheckpointError
from visinspect.utils import atomic_path

FORMAT = "visinspect-checkpoint"
FORMAT_VERSION = 1


def library_versions() -> dict[str, str]:
    """Versions that influence the numbers, stored in every checkpoint and report."""
    return {
        "visinspect": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _plain(obj):
    """Tensors, numbers, strings, lists and dicts only: what `weights_only=True` can read back."""
    if isinstance(obj, np.generic):  # before float: np.float64 is a float subclass that pickles as numpy
        return obj.item()
    if isinstance(obj, torch.Tensor) or obj is None or isinstance(obj, (bool, int, float)):
        return obj
    if isinstance(obj, str):
        return str(obj)  # str subclasses such as torch's TorchVersion are not plain data
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        # int keys stay ints: an optimiser's state dict is keyed by parameter index.
        return {k if isinstance(k, int) else str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint (only plain data)")


def save_checkpoint(path: str | Path, payload: dict) -> Path:
    """Write `payload` (plus format markers and versions) to `path` atomically.

    Under torchrun rank 0 alone writes (the ranks of a data-parallel run hold the same weights);
    the others only return the path.
    """
    if not distributed.is_main():
        return Path(path)
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, "versions": library_versions()}
    data.update(payload)
    data = _plain(data)
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(data, tmp)
    return path


def load_checkpoint(path: str | Path, *, kind: str | tuple[str, ...] | None = None) -> dict:
    """Read a visinspect checkpoint safely and check it is of the expected `kind` (or kinds).

    Every failure is a one-line CheckpointError that says what the file is and what was expected.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint "
            "(not a zip archive: truncated, or another kind of file)"
        )
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln for ln in str(e).splitlines() if "Unsupported" in ln] or [type(e).__name__]
        raise CheckpointError(
            f"{path} holds Python objects that a safe load refuses "
            f"({lines[0].strip().split('. ')[0][:160]}); "
            "visinspect checkpoints hold only tensors and numbers — was it written by visinspect?"
        ) from None
    except Exception as e:  # the safe unpickler fails on garbage with any error (IndexError, ...)
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated or another file type?): "
            f"{str(e).splitlines()[0][:160] if str(e) else type(e).__name__}"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is a PyTorch file but not a visinspect checkpoint (no '{FORMAT}' marker); "
            "train one with `python -m visinspect train`"
        )
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version}, newer than this visinspect "
            f"understands ({FORMAT_VERSION}); upgrade visinspect"
        )
    kinds = (kind,) if isinstance(kind, str) else kind
    if kinds is not None and data.get("kind") not in kinds:
        raise CheckpointError(
            f"{path} is a {data.get('kind')!r} checkpoint, but a {' or '.join(map(repr, kinds))} "
            "checkpoint is needed here"
        )
    return data


def load_resume_state(
    path: str | Path, kind: str, config: dict, keys: tuple[str, ...], defaults: dict | None = None
) -> dict:
    """Load a resumable training state and check it was written with the same settings; a key
    the state lacks (written before that setting existed) counts as its value in `defaults`."""
    data = load_checkpoint(path, kind=kind)
    saved = {**(defaults or {}), **data["config"]}
    for key in keys:
        if saved.get(key) != config.get(key):
            raise CheckpointError(
                f"{path} was written with {key}={saved.get(key)!r}, but this run has "
                f"{key}={config.get(key)!r}: resume with the same settings"
            )
    return data


# ----------------------------------------------------------------------------- classifier


def save_classifier(path: str | Path, model: torch.nn.Module, **info) -> Path:
    """Save a VGG16-CAM classifier: its weights plus `info` (config, threshold, normaliser, ...)."""
    from visinspect.backbones.vgg16 import CLASS_NAMES  # local: models imports nothing from here

    payload = {
        "kind": "classifier",
        "architecture": "vgg16-cam",
        "class_names": list(CLASS_NAMES),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    payload.update(info)
    return save_checkpoint(path, payload)


def save_settings(path: str | Path, **info) -> Path:
    """Save the settings of a method that trains nothing and reads no VGG16 (e.g. the image size
    and where its patch network's weights came from): no weights, a few kilobytes."""
    return save_checkpoint(path, {"kind": "settings", **info})


def load_method_checkpoint(path: str | Path) -> tuple[torch.nn.Module | None, dict]:
    """What `train` wrote: (classifier in eval mode, info), or (None, info) for a settings
    checkpoint, whose method needs no VGG16."""
    data = load_checkpoint(path, kind=("classifier", "settings"))
    return (None, data) if data["kind"] == "settings" else _classifier(path, data)


def load_classifier(path: str | Path, image_size: int | None = None) -> tuple[torch.nn.Module, dict]:
    """Load a classifier checkpoint into a fresh VGG16CAM; returns (model in eval mode, info)."""
    return _classifier(path, load_checkpoint(path, kind="classifier"), image_size)


def _classifier(path: str | Path, data: dict, image_size: int | None = None) -> tuple[torch.nn.Module, dict]:
    """A checkpoint's loaded dict as a VGG16CAM in eval mode and its info."""
    from visinspect.backbones.vgg16 import CLASS_NAMES, VGG16CAM

    if data.get("architecture") != "vgg16-cam" or list(data.get("class_names", [])) != list(CLASS_NAMES):
        raise CheckpointError(
            f"{path} is a {data.get('architecture')!r} model with classes {data.get('class_names')}; "
            f"expected 'vgg16-cam' with classes {list(CLASS_NAMES)}"
        )
    if image_size is not None and data.get("image_size") != image_size:
        raise CheckpointError(
            f"{path} was trained at {data.get('image_size')} px, but {image_size} px was asked for; "
            "use the checkpoint's image size (leave --image-size out)"
        )
    with torch.device("meta"):  # no random initialisation to throw away: every weight is in the file
        model = VGG16CAM(frozen_end=int(data.get("frozen_end", 24)))
    # The model takes the file's tensors (as float32) instead of copies; info keeps no state_dict
    # that training the model would then change under it.
    state = {k: v.float() for k, v in data.pop("state_dict").items()}
    expected = model.state_dict()
    bad = [k for k in expected if k not in state or state[k].shape != expected[k].shape]
    odd = bad or sorted(set(state) - set(expected))
    if odd:
        raise CheckpointError(f"{path} does not match the VGG16-CAM architecture (e.g. parameter {odd[0]!r})")
    model.load_state_dict(state, assign=True)
    return model.eval(), data


def checkpoint_digest(path: str | Path) -> str:
    """The first 12 hex digits of the SHA-256 of a checkpoint's weights (its state dict, key by
    key): two notebooks that print the same digest use the same model, whatever versions or
    settings the file also records."""
    state = load_checkpoint(path).get("state_dict") or {}
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]
