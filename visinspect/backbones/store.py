"""The feature store: the frozen VGG16 layers run once per image, and their output is kept on disk.

conv1_1 .. conv4_3 never train in the seed's recipe, so their output (512 maps of S/8 x S/8 at
S px: about 28 GFLOP per image at 224 px, ~88 % of a VGG16 pass) depends only on
- the image file (its bytes, hashed),
- the preprocessing (`data.PREPROCESSING`) and the image size,
- the weights of those layers (hashed, whatever file they came from),
- the numeric precision they ran in, and the dtype they are stored in.
All five form the key, so a changed file, size, preprocessing, weights or precision can never be
served stale features. Training, evaluation, calibration, the good-reference score, `compare` and
every `loo` split and seed then share one pass per image.

Layout: ROOT/<namespace>/<ab>/<digest>.npy, one file per image (ab = the digest's first two hex
digits), where a namespace is one combination of layer, image size, preprocessing, weights,
precision and dtype (its meta.json says which). Each entry is written to a temporary file and
renamed into place, so a reader never sees half an entry and two processes may fill the same
store at once (the second rename replaces identical bytes). Entries are read back one batch at a
time through memory maps: memory stays bounded whatever the dataset size. A corrupt or truncated
entry is recomputed, with a warning.

Where: $VISINSPECT_FEATURE_STORE, else $XDG_CACHE_HOME/visinspect/features, else
~/.cache/visinspect/features; "off" keeps features in memory for one call only (nothing written).
`python -m visinspect cache info` and `cache clear` show and empty it.

The same store keeps the patch features of MobileNetV2 (visinspect.backbones.mobilenet), the good-reference
score's other backbone, under their own layer name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from visinspect.backbones import mobilenet
from visinspect.backbones.vgg16 import CONV4_3_END, VGG16CAM, build_model
from visinspect.data.samples import PREPROCESSING, Sample, model_input
from visinspect.errors import ConfigError, VisinspectError
from visinspect.utils import atomic_path, autocast, model_device, resolve_precision, set_seed

Network = VGG16CAM | mobilenet.MobileNetPatches  # what the store runs: its `features[:end]`

STORE_ENV = "VISINSPECT_FEATURE_STORE"
OFF = "off"
MARKER = "visinspect-feature-store.json"  # marks a folder as a store: `clear` removes nothing else


def _vgg16(weights: str | Path | None, seed: int) -> VGG16CAM:
    set_seed(seed)  # seeded like a trained baseline: with random weights its frozen layers match
    return build_model(weights)[0]


def _mobilenet(contrast: str) -> Callable[[str | Path | None, int], mobilenet.MobileNetPatches]:
    def build(weights: str | Path | None, seed: int) -> mobilenet.MobileNetPatches:
        weights = "random" if weights in (None, "random") else "auto"
        return mobilenet.build_mobilenet(weights, contrast=contrast)[0]
    return build


def _first(end: int) -> Callable[[Network], torch.nn.Module]:
    return lambda network: network.features[:end]


@dataclass(frozen=True)
class Layer:
    """A stored layer: the output of `part(network)`, `channels` maps at 1/`stride` of the image size
    (rounded up after strided convolutions, down after max-pools); `build(weights, seed)` makes that
    network, with ImageNet weights or, given "random", seeded random ones."""

    part: Callable[[Network], torch.nn.Module]
    channels: int
    stride: int
    build: Callable[[str | Path | None, int], Network]
    round_up: bool = False

    def side(self, image_size: int) -> int:
        return -(-image_size // self.stride) if self.round_up else image_size // self.stride


LAYERS = {
    "conv4_3": Layer(_first(CONV4_3_END), 512, 8, _vgg16),  # of VGG16CAM: three 2x2 max-pools before it
    # of mobilenet.MobileNetPatches: four stride-2 convolutions; "_lcn": local contrast normalised first
    "mobilenet_v2": Layer(_first(mobilenet.CONTRASTS["image"]), mobilenet.CHANNELS, mobilenet.STRIDE,
                          _mobilenet("image"), round_up=True),
    "mobilenet_v2_lcn": Layer(_first(mobilenet.CONTRASTS["local"]), mobilenet.CHANNELS, mobilenet.STRIDE,
                              _mobilenet("local"), round_up=True),
    # its stride-8 block (three stride-2 convolutions), inside the same network
    "mobilenet_v2_s8": Layer(mobilenet.stride8_part, mobilenet.STRIDE8_CHANNELS, 8, _mobilenet("image"),
                             round_up=True),
}
# fp32 by default: rounding the classifier's training features to fp16 moved its trained rows by up
# to 0.018 image AUROC (docs/experiments.md, "fp16 feature store"), above the 0.002 a stored feature
# may move a reported metric. fp16 halves the disk and is exact enough for the good-reference score alone.
# Activations beyond fp16's range are refused, never clipped.
DTYPES = ("float16", "float32")
DEFAULT_DTYPE = "float32"
# The frozen layers always run on batches of exactly this many images (the last one padded with
# zeros): oneDNN may pick another algorithm for another batch size, and an image's features
# would then depend, in the last bits, on which images it was computed with.
FILL_BATCH = 8


def use_everywhere(root: str | Path) -> None:
    """Make `root` the store of every later `FeatureStore.default()`, in this process and in the
    processes it starts (torchrun's, a loader's workers): through the environment."""
    os.environ[STORE_ENV] = str(root)


def default_store_root() -> Path | None:
    """Where the store lives: $VISINSPECT_FEATURE_STORE, else the user's cache folder; None = off."""
    env = os.environ.get(STORE_ENV, "").strip()
    if env.lower() == OFF:
        return None
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(cache).expanduser() if cache else Path.home() / ".cache") / "visinspect" / "features"


# ----------------------------------------------------------------------------- keys


_FILE_DIGESTS: dict[tuple, str] = {}


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes; remembered per (path, inode, size, mtime) within a process, so
    a file changed on disk is hashed again."""
    path = Path(path)
    st = path.stat()
    memo = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if memo not in _FILE_DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _FILE_DIGESTS[memo] = h.hexdigest()
    return _FILE_DIGESTS[memo]


def weights_digest(layers: torch.nn.Module) -> str:
    """SHA-256 of the parameters of `layers` (names, shapes and bytes): what the features depend
    on, whichever file or training they came from."""
    h = hashlib.sha256()
    for name, tensor in layers.state_dict().items():
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Namespace:
    """Everything besides the image that the stored features depend on."""

    layer: str
    image_size: int
    preprocessing: str
    weights: str  # weights_digest of the layers that produce `layer`
    precision: str  # "fp32" or "bf16": what the layers ran in
    dtype: str  # what the features are stored as

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one entry."""
        layer = LAYERS[self.layer]
        return (layer.channels, layer.side(self.image_size), layer.side(self.image_size))


def _frozen_layers(model: Network, layer: str) -> torch.nn.Module:
    if layer not in LAYERS:
        raise ConfigError(f"the feature store keeps layers {', '.join(LAYERS)}; got {layer!r}")
    return LAYERS[layer].part(model)


# ----------------------------------------------------------------------------- stored features


class StoredFeatures:
    """The frozen-layer output of some images, in their order: on disk (memory-mapped, read a batch
    at a time) or, with the store off, in memory. `batch(indices)` gives float32 (n, C, h, w)."""

    def __init__(
        self, files: Sequence[Path] | None = None, tensor: torch.Tensor | None = None, computed: int = 0
    ) -> None:
        self._files = list(files) if files is not None else None
        self._tensor = tensor
        self.computed = computed  # images whose features this fetch computed (the rest were stored)

    def __len__(self) -> int:
        return len(self._files) if self._files is not None else len(self._tensor)

    @property
    def identity(self) -> tuple[str, ...] | None:
        """The store entries in order, each as <namespace>/<image digest>: the key of the features
        (layer, size, preprocessing, weights, precision, dtype) and the image's content, so equal
        identities mean equal features; None with the store off."""
        if self._files is None:
            return None
        return tuple(f"{f.parent.parent.name}/{f.stem}" for f in self._files)

    def batch(self, indices: Sequence[int] | slice) -> torch.Tensor:
        if self._tensor is not None:
            idx = indices if isinstance(indices, slice) else list(indices)
            return self._tensor[idx].float()
        files = self._files[indices] if isinstance(indices, slice) else [self._files[i] for i in indices]
        return torch.from_numpy(np.stack([np.load(f, mmap_mode="r") for f in files])).float()

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Consecutive batches, in order."""
        for i in range(0, len(self), batch_size):
            yield self.batch(slice(i, i + batch_size))


# ----------------------------------------------------------------------------- the store


class FeatureStore:
    """Frozen-layer features on disk, computed on first use (see the module docstring)."""

    def __init__(self, root: str | Path | None, dtype: str = DEFAULT_DTYPE) -> None:
        if dtype not in DTYPES:
            raise ConfigError(f"feature store dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
        self.root = Path(root).expanduser() if root is not None else None
        self.dtype = dtype
        if self.root is not None and self.root.exists():
            if not self.root.is_dir():
                raise ConfigError(f"feature store {self.root} is a file, not a folder: set {STORE_ENV} "
                                  "to a folder (or 'off')")
            # Another process creating the store has its marker's temporary file here a moment
            # before the marker itself (utils.atomic_path): that folder is a store being made.
            others = [p for p in self.root.iterdir() if not p.name.startswith(f".{MARKER}.")]
            if others and not (self.root / MARKER).is_file():
                raise ConfigError(
                    f"{self.root} is not empty and is not a visinspect feature store (no {MARKER}): "
                    f"point {STORE_ENV} or --feature-store at a new or empty folder"
                )

    @classmethod
    def default(cls) -> FeatureStore:
        """The store every call uses unless given one: the one `use_store` set, else that of
        $VISINSPECT_FEATURE_STORE or the user's cache folder ('off': none)."""
        return _CURRENT[-1] if _CURRENT else cls(default_store_root())

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def namespace(
        self, model: Network, image_size: int, precision: str, layer: str = "conv4_3"
    ) -> Namespace:
        """The key of the features `model` gives at this size and precision (all but the image)."""
        return Namespace(
            layer=layer,
            image_size=int(image_size),
            preprocessing=PREPROCESSING,
            weights=weights_digest(_frozen_layers(model, layer)),
            precision=resolve_precision(precision),
            dtype=self.dtype,
        )

    def fetch(
        self,
        model: Network,
        paths: Sequence[str | Path],
        image_size: int,
        *,
        precision: str = "auto",
        layer: str = "conv4_3",
        datasets: Sequence[str] | None = None,
        read: Callable[[int], torch.Tensor] | None = None,
        progress: bool = False,
        desc: str = "frozen layers",
    ) -> StoredFeatures:
        """The frozen-layer features of the image files `paths`: loaded where stored, else computed
        on the model's device (in batches) and stored. `read(i)` makes the model input of path i
        (default: the file read and preprocessed as data.DefectDataset does); `datasets` names
        what each path belongs to, for `cache info`. The progress bar counts stored/computed.
        Features are rounded to the store's dtype even with the store off: the same numbers."""
        ns = self.namespace(model, image_size, precision, layer)
        # channels_last is oneDNN's preferred layout for convolutions; re-laid out here, outside
        # inference mode, or the weights would become inference tensors that cannot train later.
        _frozen_layers(model, layer).to(memory_format=torch.channels_last)
        paths = [Path(p) for p in paths]
        read = read or (lambda i: model_input(paths[i], image_size))
        if self.root is None:
            tensor = self._compute(model, ns, range(len(paths)), read)
            return StoredFeatures(tensor=tensor, computed=len(paths))
        folder = self._namespace_dir(ns)
        digests = [file_digest(p) for p in paths]
        files = [folder / d[:2] / f"{d}.npy" for d in digests]
        todo = [i for i, f in enumerate(files) if not self._valid(f, ns)]
        bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, leave=False)
        with bar:
            bar.set_postfix(stored=len(paths) - len(todo), computed=0)
            bar.update(len(paths) - len(todo))
            done = 0
            for start in range(0, len(todo), FILL_BATCH):
                chunk = todo[start : start + FILL_BATCH]
                feats = self._compute(model, ns, chunk, read)
                for i, f in zip(chunk, feats, strict=True):
                    self._write(files[i], f)
                done += len(chunk)
                bar.set_postfix(stored=len(paths) - len(todo), computed=done)
                bar.update(len(chunk))
        if todo:
            names = datasets or [_dataset_of(p) for p in paths]
            self._index(folder, [(digests[i], names[i], str(paths[i])) for i in todo])
        return StoredFeatures(files=files, computed=len(todo))

    def fetch_samples(
        self, model: Network, samples: Sequence[Sample], image_size: int, **kwargs
    ) -> StoredFeatures:
        """`fetch` for samples of the table; `cache info` groups them by category."""
        return self.fetch(model, [s.path for s in samples], image_size,
                          datasets=[s.category for s in samples], **kwargs)

    def compute(
        self, model: Network, images: torch.Tensor, *, precision: str = "auto", layer: str = "conv4_3"
    ) -> StoredFeatures:
        """Features of images that are no file (normalised tensors (N, 3, S, S) made in memory,
        e.g. pseudo-defects): computed, never stored, rounded to the store's dtype like the rest."""
        ns = self.namespace(model, images.shape[-1], precision, layer)
        _frozen_layers(model, layer).to(memory_format=torch.channels_last)
        tensor = self._compute(model, ns, range(len(images)), lambda i: images[i])
        return StoredFeatures(tensor=tensor, computed=len(images))

    # --------------------------------------------------------------------- internals

    @torch.inference_mode()
    def _compute(self, model: Network, ns: Namespace, indices, read) -> torch.Tensor:
        """Run the frozen layers on images `indices`, FILL_BATCH at a time, rounded to the store's
        dtype."""
        indices = list(indices)
        device = model_device(model)
        layers = _frozen_layers(model, ns.layer)
        dtype = getattr(torch, ns.dtype)
        out = []
        for start in range(0, len(indices), FILL_BATCH):
            x = torch.stack([read(i) for i in indices[start : start + FILL_BATCH]])
            n = len(x)
            x = torch.cat([x, x.new_zeros(FILL_BATCH - n, *x.shape[1:])])
            with autocast(device, ns.precision):
                y = layers(x.to(device, memory_format=torch.channels_last))[:n]
            y = y.to(dtype).cpu().contiguous()
            if not torch.isfinite(y).all():
                raise VisinspectError(
                    f"frozen-layer activations overflow {ns.dtype} (max {float(y.float().max()):.3g}); "
                    "use a float32 feature store"
                )
            out.append(y)
        return torch.cat(out) if out else torch.zeros(0, *ns.shape(), dtype=dtype)

    def _namespace_dir(self, ns: Namespace) -> Path:
        folder = self.root / ns.digest
        if not (folder / "meta.json").is_file():
            self.root.mkdir(parents=True, exist_ok=True)
            marker = self.root / MARKER
            if not marker.is_file():
                with atomic_path(marker) as tmp:
                    tmp.write_text(json.dumps({"what": "visinspect feature store"}) + "\n")
            with atomic_path(folder / "meta.json") as tmp:
                tmp.write_text(json.dumps({**asdict(ns), "created": time.strftime("%Y-%m-%d %H:%M:%S")},
                                          indent=1) + "\n")
        return folder

    @staticmethod
    def _valid(path: Path, ns: Namespace) -> bool:
        """True for a complete entry of the namespace's shape and dtype; a damaged one is warned
        about and will be recomputed."""
        if not path.is_file():
            return False
        try:
            a = np.load(path, mmap_mode="r")
            ok = a.shape == ns.shape() and a.dtype == np.dtype(ns.dtype)
        except (OSError, ValueError, EOFError):
            ok = False
        if not ok:
            warnings.warn(f"feature store entry {path} is damaged (truncated or foreign): recomputing it",
                          stacklevel=3)
        return ok

    @staticmethod
    def _write(path: Path, features: torch.Tensor) -> None:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, features.numpy())

    @staticmethod
    def _index(folder: Path, rows: list[tuple[str, str, str]]) -> None:
        """Append `digest, dataset, path` lines in one O_APPEND write, which concurrent writers do
        not interleave; `cache info` reads it to count entries per dataset."""
        text = "".join(f"{d}\t{n}\t{p}\n".replace("\r", " ") for d, n, p in rows)
        fd = os.open(folder / "index.tsv", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, text.encode("utf-8", "surrogateescape"))
        finally:
            os.close(fd)

    # --------------------------------------------------------------------- the user's view

    def describe(self, as_json: bool = False) -> str:
        """`info` as text a person reads (the store, then a table of datasets per namespace), or as
        one JSON object."""
        if not self.enabled:
            return f"the feature store is off ({STORE_ENV}=off): nothing is kept"
        info = self.info()
        if as_json:
            return json.dumps(info, indent=2)
        lines = [f"feature store: {info['root']} (set with --feature-store or {STORE_ENV})",
                 f"{info['entries']} entries, {info['bytes'] / 2**20:.1f} MiB"]
        for ns in info["namespaces"]:
            lines += [f"\n{ns['layer']} at {ns['image_size']} px, {ns['precision']} computed, {ns['dtype']} "
                      f"stored, weights {ns['weights'][:12]}...: {ns['entries']} entries, "
                      f"{ns['bytes'] / 2**20:.1f} MiB", "| dataset | entries | MiB |", "| --- | --- | --- |"]
            lines += [f"| {name} | {d['entries']} | {d['bytes'] / 2**20:.1f} |"
                      for name, d in ns["datasets"].items()]
        return "\n".join(lines)

    def info(self) -> dict:
        """What the store holds: per namespace its key, entries and bytes, and per dataset."""
        out = {"root": str(self.root) if self.root else None, "namespaces": [], "entries": 0, "bytes": 0}
        if self.root is None or not self.root.is_dir():
            return out
        for meta in sorted(self.root.glob("*/meta.json")):
            folder = meta.parent
            sizes = {f.stem: f.stat().st_size for f in folder.glob("*/*.npy")}
            per_dataset: dict[str, set[str]] = defaultdict(set)
            index = folder / "index.tsv"
            if index.is_file():
                for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
                    parts = line.split("\t")
                    if len(parts) == 3 and parts[0] in sizes:
                        per_dataset[parts[1]].add(parts[0])
            ns = {**json.loads(meta.read_text()), "folder": folder.name, "entries": len(sizes),
                  "bytes": sum(sizes.values()),
                  "datasets": {d: {"entries": len(ds), "bytes": sum(sizes[x] for x in ds)}
                               for d, ds in sorted(per_dataset.items())}}
            out["namespaces"].append(ns)
            out["entries"] += ns["entries"]
            out["bytes"] += ns["bytes"]
        return out

    def clear(self) -> int:
        """Delete every namespace of the store (and its marker); return the bytes freed. Files that
        are not the store's are left alone."""
        if self.root is None or not self.root.is_dir():
            return 0
        freed = self.info()["bytes"]
        for meta in self.root.glob("*/meta.json"):
            shutil.rmtree(meta.parent)
        (self.root / MARKER).unlink(missing_ok=True)
        if not any(self.root.iterdir()):
            self.root.rmdir()
        return freed


_CURRENT: list[FeatureStore] = []


@contextlib.contextmanager
def use_store(store: FeatureStore) -> Iterator[FeatureStore]:
    """Within the block, every call that does not get a store explicitly uses `store` (a whole
    `loo` run, or a benchmark comparing stores, without passing it through every function)."""
    _CURRENT.append(store)
    try:
        yield store
    finally:
        _CURRENT.pop()


def _dataset_of(path: Path) -> str:
    """A readable dataset name for an image outside the sample table: its folder's name."""
    return path.parent.name or "."
