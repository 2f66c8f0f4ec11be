"""Datasets in the MVTec AD layout: one validated, sorted table of samples, and a torch Dataset.

Layout (one folder per category, under one or more data roots)::

    ROOT/<category>/train/good/*.png
    ROOT/<category>/test/<good|defect_type>/*.png
    ROOT/<category>/ground_truth/<defect_type>/<name>_mask.png

Label 1 = anomaly (the positive class everywhere in visinspect), 0 = good.
Nothing under a data root is ever written.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from visinspect.errors import DataError, VisinspectError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = ("train", "test")
GOOD = "good"
# A decompression bomb guard: refuse images larger than this many pixels (about 8k x 8k).
MAX_PIXELS = 64_000_000
READ_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "GIF")

GET_DATA_HINT = (
    "make the embedded synthetic dataset with `python -m visinspect synth data/synthetic`, "
    "or get MVTec AD with `python -m visinspect download --categories bottle --to data/mvtec_ad` "
    "(manual route: https://www.mvtec.com/company/research/datasets/mvtec-ad)"
)


@dataclass(frozen=True)
class Sample:
    """One image of the table: where it is and what it shows."""

    path: Path
    category: str
    split: str  # "train" or "test" (the folder it lives in)
    label: int  # 1 = anomaly, 0 = good
    defect_type: str  # "good" or the defect folder name
    mask_path: Path | None  # None for good images and for defective images without a mask


@dataclass
class SampleTable:
    """The samples of some categories plus what was found wrong while building it."""

    samples: list[Sample]
    stray_files: list[Path] = field(default_factory=list)  # ignored, counted
    missing_masks: list[Path] = field(default_factory=list)  # defective images without mask

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def categories(self) -> list[str]:
        return sorted({s.category for s in self.samples})


# ----------------------------------------------------------------------------- finding categories


def _as_roots(roots: str | Path | Iterable[str | Path]) -> list[Path]:
    if isinstance(roots, (str, Path)):
        roots = [roots]
    return [Path(r).expanduser() for r in roots]


def find_categories(roots: str | Path | Iterable[str | Path]) -> dict[str, Path]:
    """Map each category name to its folder, over one or many data roots (names must be unique)."""
    found: dict[str, Path] = {}
    for root in _as_roots(roots):
        if not root.is_dir():
            raise DataError(f"data root {root} does not exist: {GET_DATA_HINT}")
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            if not any((folder / split).is_dir() for split in SPLITS):
                continue  # not a category (e.g. a cache folder)
            if folder.name in found:
                raise DataError(
                    f"category {folder.name!r} exists in two data roots ({found[folder.name]} and "
                    f"{folder}): category names must be unique across roots; pass only one of them"
                )
            found[folder.name] = folder
    if not found:
        names = ", ".join(str(r) for r in _as_roots(roots))
        raise DataError(
            f"no category folder (with train/ or test/ inside) found under {names}: "
            f"expected ROOT/<category>/train/good/*.png; {GET_DATA_HINT}"
        )
    return found


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _scan_category(name: str, folder: Path, table: SampleTable) -> None:
    seen_masks: set[Path] = set()
    count = 0
    for split in SPLITS:
        split_dir = folder / split
        if not split_dir.is_dir():
            continue
        for type_dir in sorted(split_dir.iterdir()):
            if not type_dir.is_dir():
                table.stray_files.append(type_dir)
                continue
            defect_type = type_dir.name
            label = 0 if defect_type == GOOD else 1
            if split == "train" and label == 1:
                # MVTec's train split is defect-free by definition; a defect folder here is a
                # layout error that would silently change the class balance.
                raise DataError(
                    f"{type_dir} is a defect folder inside train/: in the MVTec layout train/ holds "
                    f"only good/; move it to {folder / 'test' / defect_type}"
                )
            for path in sorted(type_dir.iterdir()):
                if not _is_image(path):
                    table.stray_files.append(path)
                    continue
                mask = None
                if label == 1:
                    candidate = folder / "ground_truth" / defect_type / f"{path.stem}_mask.png"
                    if candidate.is_file():
                        mask = candidate
                        seen_masks.add(candidate)
                    else:
                        table.missing_masks.append(path)
                table.samples.append(Sample(path, name, split, label, defect_type, mask))
                count += 1
    gt_dir = folder / "ground_truth"
    if gt_dir.is_dir():
        table.stray_files.extend(
            p for p in sorted(gt_dir.rglob("*")) if p.is_file() and p not in seen_masks
        )
    if count == 0:
        raise DataError(
            f"category {name!r} at {folder} has no images: expected {folder}/train/good/*.png and "
            f"{folder}/test/<good|defect_type>/*.png ({', '.join(IMAGE_EXTENSIONS)})"
        )


def build_sample_table(
    roots: str | Path | Iterable[str | Path],
    categories: Sequence[str] | None = None,
    split: str = "all",
) -> SampleTable:
    """Scan the data roots once and return the sorted, validated table of samples.

    `split` is "train", "test" or "all" (the seed's protocol uses every image of a category).
    Defective images without a mask are kept (warned once, `mask_path=None`): localisation
    metrics skip them. Files that are not images are ignored and counted in `stray_files`.
    """
    if split not in ("train", "test", "all"):
        raise DataError(f"split must be 'train', 'test' or 'all'; got {split!r}")
    available = find_categories(roots)
    wanted = sorted(available) if categories is None else list(dict.fromkeys(categories))
    unknown = [c for c in wanted if c not in available]
    if unknown:
        raise DataError(
            f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
            f"available: {', '.join(sorted(available))}"
        )
    table = SampleTable(samples=[])
    for name in sorted(wanted):
        _scan_category(name, available[name], table)
    if split != "all":
        table.samples = [s for s in table.samples if s.split == split]
    if table.missing_masks:
        warnings.warn(_missing_masks(table), stacklevel=2)
    return table


def _missing_masks(table: SampleTable) -> str:
    return (f"{len(table.missing_masks)} defective image(s) have no mask (first: {table.missing_masks[0]}); "
            "localisation metrics skip them")


# ----------------------------------------------------------------------------- splits


def stratified_split(
    samples: Sequence[Sample], val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """Deterministic train/validation split, stratified by (category, defect type).

    Each stratum sends round(n * val_fraction) images to validation (at least one and at most n - 1
    when it has two or more), so every defect type of every category is seen by both sides.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive); got {val_fraction}")
    strata: dict[tuple[str, str], list[Sample]] = defaultdict(list)
    for s in samples:
        strata[(s.category, s.defect_type)].append(s)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for key in sorted(strata):
        group = sorted(strata[key], key=lambda s: str(s.path))
        n_val = min(len(group) - 1, max(1, round(len(group) * val_fraction))) if len(group) >= 2 else 0
        order = rng.permutation(len(group))
        val.extend(group[i] for i in order[:n_val])
        train.extend(group[i] for i in order[n_val:])
    return sorted(train, key=_sort_key), sorted(val, key=_sort_key)


def subsample_per_category(
    samples: Sequence[Sample], max_per_category: int | None, seed: int = 0
) -> list[Sample]:
    """About `max_per_category` images of each larger category (None: all), stratified by defect
    type and seeded, so that a comparison on big datasets stays affordable on a CPU."""
    if max_per_category is None:
        return sorted(samples, key=_sort_key)
    if max_per_category < 1:
        raise DataError(f"max_per_category must be at least 1 (or None); got {max_per_category}")
    by_category: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_category[s.category].append(s)
    kept: list[Sample] = []
    for group in by_category.values():
        if len(group) <= max_per_category:
            kept += group
        else:  # the "validation" side of a stratified split is a stratified subset of that size
            kept += stratified_split(group, max_per_category / len(group), seed)[1]
    return sorted(kept, key=_sort_key)


def _sort_key(s: Sample) -> tuple[str, str]:
    return (s.category, str(s.path))


def single_class_categories(samples: Sequence[Sample]) -> list[str]:
    """Categories that have only good or only defective images."""
    labels: dict[str, set[int]] = defaultdict(set)
    for s in samples:
        labels[s.category].add(s.label)
    return sorted(c for c, ls in labels.items() if len(ls) < 2)


def unknown_context_split(
    samples: Sequence[Sample],
    source: Sequence[str],
    target: Sequence[str],
    *,
    allow_single_class_sources: bool = False,
) -> tuple[list[Sample], list[Sample]]:
    """Split a table into source categories (training) and target categories (testing).

    Overlap is refused: the point is to test on products never seen labelled. Source categories
    with a single class are dropped by default (with a warning): a folder of only defects (e.g. a
    partial `capsule`) teaches "this product looks like a defect", not what a defect looks like.
    """
    overlap = sorted(set(source) & set(target))
    if overlap:
        raise DataError(
            f"categories {', '.join(overlap)} are both source and target: the unknown-context "
            "protocol tests only on categories never seen in training"
        )
    present = {s.category for s in samples}
    missing = [c for c in sorted(set(source) | set(target)) if c not in present]
    if missing:
        raise DataError(
            f"categories {', '.join(missing)} are not in the table; available: "
            f"{', '.join(sorted(present))}"
        )
    src = [s for s in samples if s.category in set(source)]
    tgt = [s for s in samples if s.category in set(target)]
    if not allow_single_class_sources:
        single = single_class_categories(src)
        if single:
            warnings.warn(
                f"source categories with a single class are left out of training: "
                f"{', '.join(single)} (allow_single_class_sources=True keeps them)",
                stacklevel=2,
            )
            src = [s for s in src if s.category not in single]
    if not src:
        raise DataError("no source images left to train on: name source categories with both classes")
    return src, tgt


def target_test_images(target: Sequence[Sample]) -> list[Sample]:
    """The test set of the unknown-context protocol: the target products' test/ images.

    Their train/ images stay out of it: they are the unlabelled good parts a factory has of a new
    product, which SimCLR may pre-train on and calibration may fit on, so none of them is scored.
    """
    return sorted((s for s in target if s.split == "test"), key=_sort_key)


def summarize(samples: Sequence[Sample]) -> dict[str, dict]:
    """Per-category counts: good, anomaly, masks and images per defect type (both splits)."""
    out: dict[str, dict] = {}
    for category in sorted({s.category for s in samples}):
        rows = [s for s in samples if s.category == category]
        types = Counter(s.defect_type for s in rows if s.label == 1)
        out[category] = {
            "good": sum(s.label == 0 for s in rows),
            "anomaly": sum(s.label == 1 for s in rows),
            "masks": sum(s.mask_path is not None for s in rows),
            "defect_types": dict(sorted(types.items())),
            "splits": {
                split: {
                    "good": sum(s.label == 0 and s.split == split for s in rows),
                    "anomaly": sum(s.label == 1 and s.split == split for s in rows),
                }
                for split in SPLITS
            },
        }
    return out


def summary_markdown(table: SampleTable) -> str:
    """`summarize` as a Markdown table a person reads, with what the table left out."""
    lines = ["positive class = anomaly",
             "| category | train good | test good | test anomaly | masks | defect types |",
             "| --- | --- | --- | --- | --- | --- |"]
    for cat, s in summarize(table.samples).items():
        types = ", ".join(f"{t} {n}" for t, n in s["defect_types"].items()) or "-"
        sp = s["splits"]
        lines.append(f"| {cat} | {sp['train']['good']} | {sp['test']['good']} | "
                     f"{sp['test']['anomaly']} | {s['masks']} | {types} |")
    lines.append(f"{len(table)} images; {len(table.stray_files)} stray files ignored; "
                 f"{len(table.missing_masks)} defective images without mask")
    return "\n".join(lines)


def describe_data(
    roots: str | Path | Iterable[str | Path], categories: Sequence[str] | None = None, as_json: bool = False
) -> tuple[SampleTable, str]:
    """The table of the `roots` and what `info` prints of it: `summary_markdown` with the warning on
    missing masks after it (not as a Python warning), or the counts per category as one JSON object
    (without the per-split counts)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # told after the table instead
        table = build_sample_table(roots, categories or None)
    if as_json:
        summary = summarize(table.samples)
        counts = {c: {k: v for k, v in s.items() if k != "splits"} for c, s in summary.items()}
        return table, json.dumps(counts, indent=2)
    warning = f"\nwarning: {_missing_masks(table)}" if table.missing_masks else ""
    return table, summary_markdown(table) + warning


def check_readable(table: SampleTable, log: Callable[[str], None] = print) -> bool:
    """Open every image and mask of the table (`info --check`): log each that cannot be read, then
    the count; True if all can."""
    bad = unreadable(table)
    for line in bad:
        log(f"bad: {line}")
    log(f"checked {len(table)} images and their masks: {len(bad)} unreadable")
    return not bad


def unreadable(table: SampleTable) -> list[str]:
    """What is wrong with each image or mask of the table that cannot be read (opens them all)."""
    bad = []
    for s in table.samples:
        for path, loader in ((s.path, load_rgb), (s.mask_path, lambda p: load_mask(p, (8, 8)))):
            if path is None:
                continue
            try:
                loader(path)
            except VisinspectError as e:
                bad.append(str(e))
    return bad


# ----------------------------------------------------------------------------- reading files


# Images decoded ahead of their use by reader threads (predict's pipeline): {path: RGB array} and
# {(path, image size): model input}, served by load_rgb and model_input instead of the file.
_AHEAD: ContextVar[tuple[Mapping, Mapping]] = ContextVar("visinspect_decoded_ahead", default=({}, {}))


@contextlib.contextmanager
def decoded_ahead(
    images: Mapping[Path, np.ndarray], inputs: Mapping[tuple[Path, int], torch.Tensor]
) -> Iterator[None]:
    """Within the block, load_rgb and model_input serve these images and model inputs (decoded
    ahead, e.g. by a thread pool while the network ran) instead of reading their files again."""
    token = _AHEAD.set((images, inputs))
    try:
        yield
    finally:
        _AHEAD.reset(token)


def load_rgb(path: str | Path) -> np.ndarray:
    """Read any image as an RGB uint8 array (H, W, 3), converting grayscale/16-bit/RGBA/CMYK/palette.

    Raises DataError naming the file when it is missing, empty, corrupt or too large.
    """
    path = Path(path)
    ahead = _AHEAD.get()[0].get(path)
    if ahead is not None:
        return ahead
    try:
        # Only raster formats: PIL would hand EPS files to Ghostscript, an external program.
        with Image.open(path, formats=READ_FORMATS) as img:
            if img.width * img.height > MAX_PIXELS:
                raise DataError(
                    f"{path} is {img.width}x{img.height} pixels, more than the limit of "
                    f"{MAX_PIXELS:,}: downsize it first (visinspect works at a few hundred px)"
                )
            img.load()
            return _to_rgb_array(img)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path} ({type(e).__name__}: {e}); is it corrupt?") from None


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float images: scale the real range to 0..255 (PIL's convert clips instead).
        a = np.asarray(img, dtype=np.float64)
        finite = np.isfinite(a)
        lo, hi = (float(a[finite].min()), float(a[finite].max())) if finite.any() else (0.0, 0.0)
        a = np.where(finite, a, lo)  # NaN/inf pixels (float TIFFs) count as the darkest value
        a = np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo) * 255.0
        return np.repeat(a.round().astype(np.uint8)[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite transparent pixels on black so they do not carry arbitrary colours.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(img.convert("RGB"))


def load_mask(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """Read a ground-truth mask as a bool array of the given (height, width), nearest resize."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img = img.convert("L")
            if img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.NEAREST)
            return np.asarray(img) > 127
    except FileNotFoundError:
        raise DataError(f"mask {path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read mask {path} ({type(e).__name__}: {e}); is it corrupt?") from None


# What to_tensor does, as a name: the feature store keys on it. Change it whenever to_tensor's
# output changes, so that features of the old preprocessing are never served again.
PREPROCESSING = "rgb-uint8/pil-bilinear-square/imagenet-mean-std/v1"


_MEAN = np.array(IMAGENET_MEAN, np.float32).reshape(3, 1, 1)
_STD = np.array(IMAGENET_STD, np.float32).reshape(3, 1, 1)


def square_rgb(image: np.ndarray, image_size: int) -> np.ndarray:
    """An RGB uint8 image resized to image_size x image_size, as every model input is (to_tensor)."""
    return np.asarray(Image.fromarray(image).resize((image_size, image_size), Image.BILINEAR))


def to_tensor(image: np.ndarray, image_size: int) -> torch.Tensor:
    """Resize an RGB uint8 image to a square and normalise it with ImageNet statistics.

    In NumPy, not torch: the same float32 operations, bit for bit, without torch's thread pool,
    which the network needs while reader threads decode (predict) — 30x faster there on 2 cores.
    """
    x = square_rgb(image, image_size).transpose(2, 0, 1).astype(np.float32, order="C") / np.float32(255.0)
    return torch.from_numpy((x - _MEAN) / _STD)


def model_input(path: str | Path, image_size: int) -> torch.Tensor:
    """An image file as a model's input (to_tensor of load_rgb), or the one decoded ahead."""
    ahead = _AHEAD.get()[1].get((Path(path), image_size))
    return ahead if ahead is not None else to_tensor(load_rgb(path), image_size)


def denormalize(x: torch.Tensor) -> np.ndarray:
    """Undo ImageNet normalisation: (3, H, W) tensor to an RGB float array in [0, 1] for plotting."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    return (x.float() * std + mean).clamp(0, 1).permute(1, 2, 0).cpu().numpy()


class DefectDataset(Dataset):
    """Samples as tensors: image (3, S, S, ImageNet-normalised), label, mask (1, S, S) and metadata.

    The mask is all zeros for good images and for defective images without a mask file
    (`has_mask` tells them apart).
    """

    def __init__(self, samples: Sequence[Sample], image_size: int = 224) -> None:
        if image_size < 32:
            raise DataError(f"image_size must be at least 32 pixels; got {image_size}")
        self.samples = list(samples)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        s = self.samples[index]
        image = model_input(s.path, self.image_size)
        size = (self.image_size, self.image_size)
        mask = load_mask(s.mask_path, size) if s.mask_path is not None else np.zeros(size, bool)
        return {
            "image": image,
            "label": s.label,
            "mask": torch.from_numpy(mask).unsqueeze(0).float(),
            "has_mask": s.mask_path is not None,
            "index": index,
            "category": s.category,
            "defect_type": s.defect_type,
            "path": str(s.path),
        }


def default_synthetic_root() -> Path:
    """Where the embedded synthetic dataset lives: `data/synthetic` in a source checkout."""
    repo = Path(__file__).resolve().parents[2]  # visinspect/data/samples.py -> the checkout
    if (repo / "pyproject.toml").is_file():
        return repo / "data" / "synthetic"
    return Path.home() / ".cache" / "visinspect" / "synthetic"


# ----------------------------------------------------------------------------- a user's files


def find_images(inputs: Sequence[str | Path], exclude: str | Path | None = None) -> dict[Path, Path]:
    """Image files named directly, or found recursively in folders, each mapped to where it lies
    under the input that named it (its path below that folder; a file named directly: its name).

    Sorted within each folder, in input order, without duplicates (the first input wins). In
    folders, files with an image extension (any case) count; hidden files and folders (name
    starting with ".", e.g. macOS `._x.png` copies) are skipped, and so is `exclude` (the output
    folder, so that a run never scores its own overlays). A file named directly always counts.
    """
    skip = Path(exclude).resolve() if exclude is not None else None
    found: dict[Path, Path] = {}
    for item in map(Path, inputs):
        if item.is_dir():
            files = []
            for folder, dirs, names in os.walk(item):
                dirs[:] = [d for d in dirs if not d.startswith(".")
                           and (skip is None or Path(folder, d).resolve() != skip)]
                files.extend(Path(folder, n) for n in names if _is_image_name(n))
            for path in sorted(files):
                found.setdefault(path, path.relative_to(item))
        elif item.exists():
            found.setdefault(item, Path(item.name))
        else:
            raise DataError(f"{item} does not exist: name image files or folders to predict on")
    return found


def list_images(inputs: Sequence[str | Path], exclude: str | Path | None = None) -> list[Path]:
    """The image files of `find_images`, in its order."""
    return list(find_images(inputs, exclude))


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS
