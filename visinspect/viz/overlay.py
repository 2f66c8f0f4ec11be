"""Overlays an inspector reads at a glance: the image at its own resolution, the heatmap blended
where it is hot, the boxes and the verdict with the score drawn in a corner, all with OpenCV (a few
milliseconds an image, in predict's worker threads; OpenCV releases the GIL while it draws).

The notebooks' figures stay matplotlib (visinspect.viz.plots); these are the files `predict` writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from visinspect.boxes import Box
from visinspect.utils import atomic_path

MIN_SIDE = 256  # smaller images are enlarged (nearest neighbour: pixels stay pixels) so the text fits
# Own resolution up to this longest side; larger photos are shrunk: an 8k photo would cost 200 MB a
# copy and seconds to encode, and a screen shows no more (`size` chooses another side).
MAX_SIDE = 2048
ALPHA = 0.65  # the heatmap's opacity where it is hottest; cold (good) regions show the image as it is
COLORMAP = cv2.COLORMAP_INFERNO  # as viz.plots.HEATMAP_CMAP: dark when cold
BOX_BGR = (255, 229, 0)  # viz.plots.BOX_COLOR (#00e5ff, cyan: absent from the colour map), in BGR
VERDICT_BGR = {1: (40, 40, 220), 0: (60, 140, 40)}  # the verdict's background: red anomaly, green good
PNG_COMPRESSION = 1  # zlib's fastest level: a third of level 3's time, files ~10 % larger


def overlay_size(height: int, width: int, size: int | None = None) -> tuple[int, int]:
    """The overlay's (height, width): the longest side `size`, or the image's own (MIN_SIDE ..
    MAX_SIDE), aspect ratio kept."""
    longest = max(height, width)
    target = size if size is not None else min(max(longest, MIN_SIDE), MAX_SIDE)
    scale = target / longest
    return max(1, round(height * scale)), max(1, round(width * scale))


def fit_image(rgb: np.ndarray, size: int | None = None) -> np.ndarray:
    """An RGB image (H, W, 3) at its overlay's size (itself when that is its own)."""
    h, w = overlay_size(*rgb.shape[:2], size)
    if (h, w) == rgb.shape[:2]:
        return rgb
    interpolation = cv2.INTER_AREA if h < rgb.shape[0] else cv2.INTER_NEAREST
    return cv2.resize(rgb, (w, h), interpolation=interpolation)


def draw_overlay(
    rgb: np.ndarray, heat: np.ndarray, boxes: Sequence[Box], text: str, anomalous: bool
) -> np.ndarray:
    """The image (H, W, 3 RGB) with `heat` (any h x w, 0..1, stretched to H x W) blended in, the
    boxes (in its pixels, end-exclusive) drawn and `text` on the verdict's colour in the top-left
    corner; returned in OpenCV's BGR order."""
    h, w = rgb.shape[:2]
    hot = np.clip(cv2.resize(np.asarray(heat, np.float32), (w, h), interpolation=cv2.INTER_LINEAR), 0, 1)
    colour = cv2.applyColorMap((hot * 255).astype(np.uint8), COLORMAP).astype(np.float32)
    # Opacity grows with the heat: a defect glows, the rest of the part stays readable.
    alpha = (ALPHA * hot)[..., None]
    image = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR).astype(np.float32)
    out = (image * (1 - alpha) + colour * alpha).astype(np.uint8)
    line = max(2, round(max(h, w) / 200))
    for b in boxes:
        corners = (int(b.x0), int(b.y0)), (int(b.x1) - 1, int(b.y1) - 1)  # end-inclusive corners
        cv2.rectangle(out, *corners, (0, 0, 0), line + 2)  # a dark rim: visible on bright parts too
        cv2.rectangle(out, *corners, BOX_BGR, line)
    scale = max(0.45, max(h, w) / 700)
    thick = max(1, round(scale * 1.6))
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    pad = max(3, round(th / 3))
    cv2.rectangle(out, (0, 0), (tw + 2 * pad, th + base + 2 * pad), VERDICT_BGR[int(anomalous)], -1)
    cv2.putText(out, text, (pad, pad + th), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick,
                cv2.LINE_AA)
    return out


def save_overlay(dest: Path, rgb: np.ndarray, heat: np.ndarray, boxes: Sequence[Box], text: str,
                 anomalous: bool) -> None:
    """`draw_overlay`, written as the PNG `dest` (atomically: a kill leaves no half file)."""
    ok, png = cv2.imencode(".png", draw_overlay(rgb, heat, boxes, text, anomalous),
                           [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    if not ok:
        raise OSError(f"OpenCV could not encode the overlay {dest}")
    with atomic_path(dest) as tmp:
        tmp.write_bytes(png.tobytes())
