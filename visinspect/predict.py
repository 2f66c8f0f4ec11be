"""Scoring folders of images with a detector (a checkpoint, adapted to K good images of the
product when its method uses them), streaming: memory stays flat.

Images are read in batches and forgotten after their batch; each result is written as one JSON
line (flushed per batch), so a killed run keeps what it did and `resume=True` goes on from there.
Reader threads decode the next batch while the detector scores this one, and overlay threads draw
the previous one's (visinspect.viz.overlay): the network, the machine's limit, runs without pause.
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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from visinspect.backbones.store import FILL_BATCH
from visinspect.boxes import Box, heatmap_to_boxes
from visinspect.data.samples import IMAGE_EXTENSIONS, decoded_ahead, find_images, load_rgb, to_tensor
from visinspect.distributed import announce, barrier, gather_objects, is_main, part_name, rank, world_size
from visinspect.errors import ConfigError, DataError
from visinspect.methods.base import Detector, unlabelled_sample
from visinspect.methods.registry import load_detector
from visinspect.utils import atomic_path
from visinspect.viz.overlay import fit_image, save_overlay

RESULTS_NAME = "predictions.jsonl"
OVERLAY_DIR = "overlays"
MIN_OVERLAY_SIDE = 32  # the smallest `overlay_size`: the verdict's text needs some pixels
# A batch is about this many pixels of model input (32 images at 224 px): see auto_batch_size.
BATCH_PIXELS = 32 * 224 * 224
MAX_WORKERS = 4  # threads of each pool (decoding, overlays); see default_workers
# Decoded images larger than this are not kept for the detector (a pattern score reads such a file
# again): a batch of 8k photos held three batches deep would take GBs.
AHEAD_MAX_PIXELS = 4_000_000


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
    batch_size: int | None = None,
    box_threshold: float = 0.5,
    min_area: int = 16,
    resume: bool = False,
    progress: bool = True,
    overlay_size: int | None = None,
    workers: int | None = None,
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
    ... of the sorted list, into `distributed.part_name(rank)` (`predict_on_ranks`
    merges the parts).

    A pipeline: `workers` threads decode the next batch while the detector scores this one, and
    as many draw the overlays of the previous one (viz.overlay; at the image's own resolution,
    or `overlay_size` px on the longest side). `batch_size` None: `auto_batch_size`. A batch's
    lines are written once its overlays exist, so a killed run never lists a missing overlay.
    """
    batch_size = auto_batch_size(detector.image_size) if batch_size is None else batch_size
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1; got {batch_size}")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ConfigError(f"workers must be at least 1; got {workers}")
    if overlay_size is not None and overlay_size < MIN_OVERLAY_SIDE:
        raise ConfigError(f"overlay_size must be at least {MIN_OVERLAY_SIDE} px; got {overlay_size}")
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
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    start = time.perf_counter()
    bar = tqdm(total=len(todo), desc="predict", unit="img", disable=not progress, smoothing=0.1)
    readers = ThreadPoolExecutor(workers, thread_name_prefix="visinspect-read")
    drawers = ThreadPoolExecutor(workers, thread_name_prefix="visinspect-overlay")
    with open(results, "a" if resume else "w", encoding="utf-8") as f, bar, readers, drawers:

        def write(rows: list[dict], drawing: list[Future]) -> None:
            for job in drawing:
                job.result()  # the overlay exists (or its error is raised) before its line
            for row in rows:
                counts["n_images"] += 1
                counts["n_failed"] += "error" in row
                counts["n_anomalous"] += row.get("label") == 1
                # ASCII JSON: file names that are not valid UTF-8 still round-trip (as escapes).
                f.write(json.dumps(row) + "\n")
            f.flush()
            bar.update(len(rows))

        def read(batch: list[Path]) -> list[Future]:
            return [readers.submit(_decode, p, detector.image_size, names is not None, overlay_size)
                    for p in batch]

        reading = read(batches[0]) if batches else []
        previous: tuple[list[dict], list[Future]] | None = None
        for k, batch in enumerate(batches):
            decoded = [job.result() for job in reading]
            reading = read(batches[k + 1]) if k + 1 < len(batches) else []
            rows, heat = scorer(batch, decoded)
            drawing = []
            if names is not None:
                for row, image, h in zip(rows, decoded, heat, strict=True):
                    if h is not None:
                        row["overlay"] = names[Path(row["path"])]
                        drawing.append(_draw(drawers, out / row["overlay"], image.view, h, row))
            if previous is not None:  # its overlays were drawn while this batch was scored
                write(*previous)
            previous = rows, drawing
        if previous is not None:
            write(*previous)
    counts["seconds"] = round(time.perf_counter() - start, 2)
    return counts


def describe_counts(counts: dict, out: str | Path) -> str:
    """`predict_images`'s counts in one line a person reads."""
    return (f"{counts['n_images']} images: {counts['n_anomalous']} predicted anomalous, "
            f"{counts['n_failed']} failed; results in {out}")


def auto_batch_size(image_size: int) -> int:
    """Images per batch: about BATCH_PIXELS of model input, a multiple of the feature store's
    FILL_BATCH (the network's own batch), at least one of those."""
    return FILL_BATCH * max(1, round(BATCH_PIXELS / (FILL_BATCH * image_size**2)))


def default_workers() -> int:
    """Threads of each pool (decoding, overlays): the CPU cores, at most MAX_WORKERS (their work
    releases the GIL, and more threads than cores would only take the network's)."""
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


@dataclass(frozen=True)
class _Decoded:
    """One file as a reader thread leaves it: its (height, width), the model input, the RGB image
    for the detector (None when huge), the image at its overlay's size (None without overlays),
    or the error that reading it raised."""

    shape: tuple[int, int] = (0, 0)
    input: torch.Tensor | None = None
    rgb: np.ndarray | None = None
    view: np.ndarray | None = None
    error: DataError | None = None


def _decode(path: Path, image_size: int, overlay: bool, overlay_size: int | None) -> _Decoded:
    """Read and preprocess one file (in a reader thread); an unreadable one becomes its error."""
    try:
        rgb = load_rgb(path)
    except DataError as e:
        return _Decoded(error=e)
    rgb.flags.writeable = False  # shared by the detector and the overlay: nobody may change it
    keep = rgb.shape[0] * rgb.shape[1] <= AHEAD_MAX_PIXELS
    return _Decoded(rgb.shape[:2], to_tensor(rgb, image_size), rgb if keep else None,
                    fit_image(rgb, overlay_size) if overlay else None)


def _draw(pool: ThreadPoolExecutor, dest: Path, view: np.ndarray, heat: torch.Tensor, row: dict) -> Future:
    """Draw a row's overlay in `pool`: its heatmap on `view`, boxes on predicted anomalies only
    (as plots.plot_prediction_grid) scaled to `view`'s pixels, and the verdict with the score."""
    size = (view.shape[1], view.shape[0])
    anomalous = row["label"] == 1
    boxes = [Box(*_scale_box(b, (row["width"], row["height"]), size), b[4]) for b in row["boxes"]]
    text = f"{'ANOMALY' if anomalous else 'good'}  score {row['score']:.2f}"
    return pool.submit(save_overlay, dest, view, heat.numpy(), boxes if anomalous else [], text, anomalous)


class _Scorer:
    """Turns a batch of decoded files into result rows and heatmaps; holds nothing between batches."""

    def __init__(self, detector: Detector, box_threshold: float, min_area: int) -> None:
        self.detector = detector
        self.box_threshold, self.min_area = box_threshold, min_area

    def __call__(
        self, paths: Sequence[Path], decoded: Sequence[_Decoded]
    ) -> tuple[list[dict], list[torch.Tensor | None]]:
        """Rows for `paths` and each one's heatmap (None for a file that could not be read)."""
        rows = [{"path": str(p)} for p in paths]
        heat: list[torch.Tensor | None] = [None] * len(paths)
        read = [i for i, d in enumerate(decoded) if d.error is None]
        for i, d in enumerate(decoded):
            if d.error is not None:
                rows[i]["error"] = str(d.error)
        if not read:
            return rows, heat
        d = self.detector
        images = {paths[i]: decoded[i].rgb for i in read if decoded[i].rgb is not None}
        inputs = {(paths[i], d.image_size): decoded[i].input for i in read}
        with decoded_ahead(images, inputs):  # the detector reads no file again
            scored = d.score([unlabelled_sample(paths[i], d.product) for i in read])
        maps = scored.heatmaps(mode="dataset" if d.normalizer else "image", normalizer=d.normalizer)
        for i, h, score in zip(read, maps, scored.scores, strict=True):
            rows[i].update(self._row(decoded[i].shape, h, float(score)))
            heat[i] = h
        return rows, heat

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


# ----------------------------------------------------------------------------- under torchrun


def predict_on_ranks(
    detector: Detector, inputs: Sequence[str | Path], out: str | Path, **options
) -> dict:
    """`predict_images` over all ranks (under torchrun): rank r scores files r, r + N, r + 2N, ... of the
    sorted list into its part file (resumable as the single-process results are), then rank 0
    merges the parts in the list's order, atomically, into OUT/predictions.jsonl: the file a
    single process writes. Overlay names are given over the whole list, so they are a single
    process's too. Returns the counts summed over ranks. In one process it is `predict_images`.
    """
    if world_size() == 1:
        return predict_images(detector, inputs, out, **options)
    out = Path(out)
    announce(options.get("batch_size") or auto_batch_size(detector.image_size))
    parts = [out / part_name(r) for r in range(world_size())]
    if is_main():
        # Parts of a killed run (of any world size): dealt to the ranks that own their files now
        # when resuming, else dropped.
        _deal(out / RESULTS_NAME, sorted(out.glob(part_name("*"))), parts,
              find_images(inputs, exclude=out), resume=bool(options.get("resume")))
    barrier()
    options["progress"] = options.get("progress", True) and is_main()
    counts = predict_images(detector, inputs, out, shard=(rank(), world_size()), **options)
    every = gather_objects(counts)
    if is_main():
        order = {str(p): i for i, p in enumerate(find_images(inputs, exclude=out))}
        lines = [line for p in parts for line in _lines(p)]
        lines.sort(key=lambda line: order.get(_path_of(line), len(order)))  # stable: unknown paths last
        with atomic_path(out / RESULTS_NAME) as tmp:
            tmp.write_text("".join(lines), encoding="utf-8", errors="surrogateescape")
        for p in parts:
            p.unlink()
    barrier()  # no rank returns (and its process exits) before the merged file is there
    summed = {k: sum(c[k] for c in every) for k in ("n_images", "n_anomalous", "n_failed", "n_skipped")}
    return {**summed, "seconds": max(c["seconds"] for c in every)}


def _lines(path: Path) -> list[str]:
    """A results file's whole lines (a kill may have cut the last one); none if it is missing."""
    if not path.is_file():
        return []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return [line for line in f if line.endswith("\n")]


def _path_of(line: str) -> str | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row.get("path") if isinstance(row, dict) and isinstance(row.get("path"), str) else None


def _deal(results: Path, old: list[Path], parts: list[Path], found: dict, *, resume: bool) -> None:
    """Before the ranks start: with `resume`, the lines of the results file and of the old parts
    go to the part of the rank that owns their file now (lines of files no longer found stay
    with rank 0), so that each rank resumes from its own part; without, old parts are removed."""
    if resume:
        owner = {str(p): i % len(parts) for i, p in enumerate(found)}
        dealt: list[list[str]] = [[] for _ in parts]
        for line in [line for p in [results, *old] for line in _lines(p)]:
            dealt[owner.get(_path_of(line), 0)].append(line)
        for part, lines in zip(parts, dealt, strict=True):
            with atomic_path(part) as tmp:
                tmp.write_text("".join(lines), encoding="utf-8", errors="surrogateescape")
        results.unlink(missing_ok=True)
    for p in old:
        if p not in parts or not resume:
            p.unlink()
