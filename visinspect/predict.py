"""Scoring folders of images with a trained checkpoint, streaming: memory stays flat.

Images are read in batches; each result is written at once as one JSON line (flushed), so a
killed run keeps what it did and `resume=True` skips images already in the output. A file that
cannot be read is reported in its JSON line with an `error` field and the run goes on.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from visinspect.boxes import heatmap_to_boxes
from visinspect.cam import HeatmapNormalizer, anomaly_cam, normalize, upsample
from visinspect.checkpoint import load_classifier
from visinspect.data import IMAGE_EXTENSIONS, load_rgb, to_tensor
from visinspect.errors import DataError
from visinspect.models import logit_margin

RESULTS_NAME = "predictions.jsonl"


def iter_images(inputs: Sequence[Path]) -> Iterator[Path]:
    """Image files named directly or found recursively in folders, sorted, without duplicates."""
    seen: set[Path] = set()
    for item in inputs:
        if item.is_dir():
            files = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        elif item.exists():
            files = [item]
        else:
            raise DataError(f"{item} does not exist: name image files or folders to predict on")
        for f in files:
            if f not in seen:
                seen.add(f)
                yield f


def _batches(paths: Iterator[Path], size: int) -> Iterator[list[Path]]:
    batch: list[Path] = []
    for p in paths:
        batch.append(p)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _done(results: Path) -> set[str]:
    if not results.is_file():
        return set()
    done = set()
    for line in results.read_text().splitlines():
        try:
            done.add(json.loads(line)["path"])
        except (json.JSONDecodeError, KeyError):
            continue  # a line cut by a kill: that image is simply done again
    return done


def predict_folder(
    checkpoint: str | Path,
    inputs: Sequence[Path],
    out: Path,
    *,
    overlays: bool = True,
    batch_size: int = 16,
    box_threshold: float = 0.5,
    min_area: int = 16,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """Predict every image under `inputs`; write `out/predictions.jsonl` (+ PNG overlays)."""
    model, info = load_classifier(checkpoint)
    size = int(info["image_size"])
    threshold = float(info["threshold"])
    normalizer = HeatmapNormalizer.from_dict(info["normalizer"]) if info.get("normalizer") else None
    out.mkdir(parents=True, exist_ok=True)
    results = out / RESULTS_NAME
    done = _done(results) if resume else set()
    todo = (p for p in iter_images(inputs) if str(p) not in done)
    counts = {"n_images": 0, "n_anomalous": 0, "n_failed": 0, "n_skipped": len(done)}
    start = time.perf_counter()
    bar = tqdm(desc="predict", unit="img", disable=not progress)
    with open(results, "a" if resume else "w") as f, torch.inference_mode():
        for batch in _batches(todo, batch_size):
            images, tensors, rows = [], [], []
            for path in batch:
                try:
                    image = load_rgb(path)
                except DataError as e:
                    rows.append({"path": str(path), "error": str(e)})
                    continue
                images.append((path, image))
                tensors.append(to_tensor(image, size))
            if tensors:
                x = torch.stack(tensors).to(memory_format=torch.channels_last)
                maps = model.feature_maps(x)
                logits = model.head(maps)
                raw = upsample(anomaly_cam(model, maps), size)
                heat = normalize(raw, "dataset" if normalizer else "image", normalizer)
                for (path, image), lg, h in zip(images, logits, heat, strict=True):
                    rows.append(_result(path, image, lg, h, threshold, box_threshold, min_area))
                    if overlays:
                        _save_overlay(out, path, image, h.numpy(), rows[-1])
            for row in rows:
                counts["n_images"] += 1
                counts["n_failed"] += "error" in row
                counts["n_anomalous"] += row.get("label") == "anomaly"
                f.write(json.dumps(row) + "\n")
            f.flush()
            bar.update(len(batch))
            bar.set_postfix(img_s=f"{counts['n_images'] / (time.perf_counter() - start):.1f}")
    bar.close()
    counts["seconds"] = round(time.perf_counter() - start, 2)
    return counts


def _result(path, image, logits, heat, threshold, box_threshold, min_area) -> dict:
    margin = float(logit_margin(logits))
    h, w = image.shape[:2]
    sx, sy = w / heat.shape[1], h / heat.shape[0]
    boxes = [
        [round(b.x0 * sx), round(b.y0 * sy), round(b.x1 * sx), round(b.y1 * sy), round(b.score, 4)]
        for b in heatmap_to_boxes(heat.numpy(), box_threshold, min_area)
    ]
    return {
        "path": str(path),
        "probability": round(float(torch.softmax(logits.float(), 0)[1]), 6),
        "margin": round(margin, 4),
        "label": "anomaly" if margin > threshold else "good",
        "threshold_margin": round(threshold, 4),
        "boxes": boxes,  # x0, y0, x1, y1 (end exclusive) in the original image's pixels, peak heat
    }


def _save_overlay(out: Path, path: Path, image: np.ndarray, heat: np.ndarray, row: dict) -> None:
    from visinspect.plots import overlay_figure, save_figure

    # A short digest of the folder keeps same-named files from different folders apart.
    name = f"{hashlib.sha1(str(path.parent).encode()).hexdigest()[:8]}_{path.stem}.png"
    save_figure(overlay_figure(image, heat, row), out / "overlays" / name)
