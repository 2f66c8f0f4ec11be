"""Scoring folders of images with a detector (a checkpoint, adapted to K good images of the
product when its method uses them), streaming: memory stays flat.

Images are read in batches and forgotten after their batch; each result is written as one JSON
line (flushed per batch), so a killed run keeps what it did and `resume=True` goes on from there.
A file that cannot be read (corrupt, truncated, empty, larger than `data.MAX_PIXELS`) is reported
in its JSON line with an `error` field and the run goes on; odd but valid modes (grayscale, 16-bit,
RGBA, CMYK, palette) are converted to RGB by `data.load_rgb`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from visinspect.boxes import Box, heatmap_to_boxes
from visinspect.data.samples import IMAGE_EXTENSIONS, find_images, load_rgb
from visinspect.distributed import part_name
from visinspect.errors import ConfigError, DataError
from visinspect.methods.base import Detector, unlabelled_sample
from visinspect.methods.registry import load_detector
from visinspect.utils import atomic_path

RESULTS_NAME = "predictions.jsonl"
OVERLAY_DIR = "overlays"
# Overlays are for looking at: drawing an 8k-pixel photo at full size would cost seconds and GBs.
OVERLAY_MAX_SIDE = 512
OVERLAY_MIN_SIDE = 256  # small images are shown larger so that the title fits


def _keep_finished(results: Path) -> dict[str, str | None]:
    """Rewrite `results` with only its complete, successful lines; return the paths they cover,
    each with its overlay's name (None without one).

    A kill can cut the last line in half, and an image that failed deserves another try (it may
    have been fixed), so both are dropped. Streamed through a temporary file: memory stays flat.
    """
    done: dict[str, str | None] = {}
    if not results.is_file():
        return done
    with (
        open(results, encoding="utf-8", errors="replace") as src,
        atomic_path(results) as tmp,
        open(tmp, "w", encoding="utf-8") as dst,
    ):
        for line in src:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if not isinstance(row, dict) or not isinstance(row.get("path"), str):
                continue
            if "error" in row or row["path"] in done:
                continue
            overlay = row.get("overlay")
            done[row["path"]] = overlay if isinstance(overlay, str) else None
            dst.write(line.rstrip("\n") + "\n")
    return done


def predict_folder(
    checkpoint: str | Path,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    method: str | None = None,
    reference: Sequence[str | Path] | None = None,
    precision: str = "auto",
    **options,
) -> dict:
    """Load a checkpoint as a detector (its method, or `method`), adapt it to the good images of
    `reference` when the method uses them, and `predict_images` with it."""
    detector = load_detector(checkpoint, method=method, reference=reference, precision=precision)
    return predict_images(detector, inputs, out, **options)


def predict_images(
    detector: Detector,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    overlays: bool = True,
    batch_size: int = 16,
    box_threshold: float = 0.5,
    min_area: int = 16,
    resume: bool = False,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
) -> dict:
    """Score every image under `inputs`; write `out/predictions.jsonl` and `out/overlays/`.

    One JSON line per image, in sorted path order: path, width, height, method, score (higher =
    more anomalous, on the detector's scale), threshold (its decision threshold, calibrated on
    the K good images for the methods that use them), label (1 = anomaly: score > threshold;
    0 = good), boxes ([x0, y0, x1, y1, peak heat], end-exclusive, in the original image's pixels,
    for every image: the label says whether they matter) and overlay (the overlay PNG's path
    relative to `out`, named after the image: see `overlay_names`); or path and error. With
    `resume`, images already scored in the output are skipped (their overlays keep their names)
    and failed ones tried again. Returns counts for this run (n_images, n_anomalous, n_failed),
    n_skipped and seconds. `shard` (rank, world size): score only files rank, rank + world size,
    ... of the sorted list, into `distributed.part_name(rank)` (`distributed.predict_images`
    merges the parts).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1; got {batch_size}")
    out = Path(out)
    found = find_images(inputs, exclude=out)
    if not found:
        names = ", ".join(map(str, inputs))
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {names}")
    scorer = _Scorer(detector, box_threshold, min_area)
    out.mkdir(parents=True, exist_ok=True)
    results = out / (RESULTS_NAME if shard is None else part_name(shard[0]))
    done = _keep_finished(results) if resume else {}
    names = overlay_names(found, {Path(p): o for p, o in done.items() if o}) if overlays else None
    mine = list(found) if shard is None else list(found)[shard[0] :: shard[1]]
    todo = [p for p in mine if str(p) not in done]
    counts = {"n_images": 0, "n_anomalous": 0, "n_failed": 0, "n_skipped": len(mine) - len(todo)}
    start = time.perf_counter()
    bar = tqdm(total=len(todo), desc="predict", unit="img", disable=not progress, smoothing=0.1)
    with open(results, "a" if resume else "w", encoding="utf-8") as f, bar:
        for i in range(0, len(todo), batch_size):
            batch = todo[i : i + batch_size]
            for row in scorer(batch, out, names):
                counts["n_images"] += 1
                counts["n_failed"] += "error" in row
                counts["n_anomalous"] += row.get("label") == 1
                # ASCII JSON: file names that are not valid UTF-8 still round-trip (as escapes).
                f.write(json.dumps(row) + "\n")
            f.flush()
            bar.update(len(batch))
    counts["seconds"] = round(time.perf_counter() - start, 2)
    return counts


class _Scorer:
    """Turns a batch of paths into result rows (and overlays); holds nothing between batches."""

    def __init__(self, detector: Detector, box_threshold: float, min_area: int) -> None:
        self.detector = detector
        self.box_threshold, self.min_area = box_threshold, min_area

    def __call__(self, paths: Sequence[Path], out: Path, overlays: dict[Path, str] | None) -> list[dict]:
        """Rows for `paths`; with `overlays` ({path: name under `out`}), their overlays too."""
        rows = [{"path": str(p)} for p in paths]
        read = {}
        for i, path in enumerate(paths):
            try:
                read[i] = self._read(path, overlays is not None)
            except DataError as e:
                rows[i]["error"] = str(e)
        if not read:
            return rows
        d = self.detector
        scored = d.score([unlabelled_sample(paths[i], d.product) for i in read])
        heat = scored.heatmaps(mode="dataset" if d.normalizer else "image", normalizer=d.normalizer)
        for (i, (shape, thumb)), h, score in zip(read.items(), heat, scored.scores, strict=True):
            rows[i].update(self._row(shape, h, float(score)))
            if overlays is not None:
                rows[i]["overlay"] = overlays[paths[i]]
                _save_overlay(out / overlays[paths[i]], paths[i], thumb, h, rows[i])
        return rows

    @staticmethod
    def _read(path: Path, thumb: bool) -> tuple[tuple[int, int], Image.Image | None]:
        """The original (height, width) and a small copy for overlays (or None); an unreadable
        file raises DataError here, before the detector sees the batch. The full-size array is
        dropped here, so a batch of huge photos costs little memory."""
        image = load_rgb(path)
        small = None
        if thumb:
            small = Image.fromarray(image)
            small.thumbnail((OVERLAY_MAX_SIDE, OVERLAY_MAX_SIDE))
        return image.shape[:2], small

    def _row(self, shape: tuple[int, int], heat: torch.Tensor, score: float) -> dict:
        h, w = shape
        size = self.detector.image_size
        threshold = self.detector.threshold
        boxes = heatmap_to_boxes(heat.numpy(), self.box_threshold, self.min_area)
        return {
            "width": w,
            "height": h,
            "method": self.detector.name,
            "score": round(score, 4),
            "threshold": round(threshold, 4),
            "label": int(score > threshold),
            "boxes": [[*_scale_box(b, (size, size), (w, h)), round(b.score, 4)] for b in boxes],
        }


def _scale_box(box: Sequence[float], src: tuple[int, int], dst: tuple[int, int]) -> list[int]:
    """An end-exclusive box (x0, y0, x1, y1) on a src (width, height) grid, in dst's pixels.

    Outward rounding: the scaled box covers every pixel of the region and is never empty.
    """
    sx, sy = dst[0] / src[0], dst[1] / src[1]
    x0, y0, x1, y1 = box[:4]
    return [
        min(math.floor(x0 * sx), dst[0] - 1),
        min(math.floor(y0 * sy), dst[1] - 1),
        max(min(math.ceil(x1 * sx), dst[0]), 1),
        max(min(math.ceil(y1 * sy), dst[1]), 1),
    ]


# The longest file name most file systems take, in bytes.
MAX_NAME_BYTES = 255


def overlay_names(found: dict[Path, Path], taken: dict[Path, str] | None = None) -> dict[Path, str]:
    """The overlay of each image of `find_images`, relative to the output folder: its path under
    its input folder with the extension .png, in `overlays/` (`in/a/b.jpg` -> `overlays/a/b.png`).

    Names that would clash (`b.png` and `b.jpg`, the same name under two inputs; compared without
    case, as macOS and Windows do) get `_2`, `_3`, ... in `found`'s order, so the same inputs give
    the same names. `taken` ({path: name}) keeps names given before (by a run being resumed).
    """
    taken = taken or {}
    used = {name.casefold() for name in taken.values()}
    names = {}
    for path, rel in found.items():
        if path in taken:
            names[path] = taken[path]
            continue
        stem, n = rel.stem, 1
        while True:
            suffix = f"_{n}.png" if n > 1 else ".png"
            while len(os.fsencode(stem + suffix)) > MAX_NAME_BYTES:  # room for the suffix
                stem = stem[:-1]
            name = (Path(OVERLAY_DIR) / rel.parent / (stem + suffix)).as_posix()
            if name.casefold() not in used:
                break
            n += 1
        used.add(name.casefold())
        names[path] = name
    return names


def _save_overlay(dest: Path, path: Path, thumb: Image.Image, heat: torch.Tensor, row: dict) -> None:
    """Draw the heatmap and (for anomalies) boxes on the image; save it as `dest`."""
    from matplotlib.figure import Figure  # not pyplot: figures nobody has to close

    from visinspect.viz.plots import DPI, overlay, save_figure

    w, h = thumb.size
    small = F.interpolate(heat[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    # Boxes on predicted anomalies only, as in plots.plot_prediction_grid.
    boxes = [Box(*_scale_box(b, (row["width"], row["height"]), (w, h)), b[4]) for b in row["boxes"]]
    scale = max(1.0, OVERLAY_MIN_SIDE / max(w, h))
    fig = Figure(figsize=(w * scale / DPI, h * scale / DPI), dpi=DPI)
    ax = fig.add_subplot()
    overlay(ax, np.asarray(thumb), small.numpy(), boxes if row["label"] == 1 else ())
    verdict = f"predicted {'anomaly' if row['label'] == 1 else 'good'} · score {row['score']:.2f}"
    ax.set_title(f"{path.name[:40]}\n{verdict}", fontsize=8)
    save_figure(fig, dest)
