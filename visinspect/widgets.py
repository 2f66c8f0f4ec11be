"""Notebook explorers: move a slider, see the boxes or the metrics change.

The logic lives in pure functions (tested without a notebook); the widgets only wire sliders to
them and redraw into an ipywidgets.Output.
"""

from __future__ import annotations

from collections.abc import Sequence

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import display
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from visinspect.boxes import Box, heatmap_to_boxes
from visinspect.cam import HeatmapNormalizer
from visinspect.errors import DataError
from visinspect.inference import Predictions
from visinspect.metrics import POSITIVE_CLASS, classification_metrics
from visinspect.plots import (
    LABEL_NAMES,
    add_heat_colorbar,
    apply_style,
    draw_prediction,
    plot_score_distributions,
    prediction_heatmaps,
)

HEAT_MODES = (("image (per-image min-max, the seed's)", "image"), ("dataset", "dataset"))


def _heat_and_boxes(
    preds: Predictions,
    index: int,
    box_threshold: float,
    min_area: int,
    heat_mode: str,
    normalizer: HeatmapNormalizer | None,
) -> tuple[np.ndarray, list[Box]]:
    heat = prediction_heatmaps(preds, [index], heat_mode, normalizer)[0]
    return heat, heatmap_to_boxes(heat, box_threshold, min_area)


def boxes_at(
    preds: Predictions,
    index: int,
    box_threshold: float = 0.5,
    min_area: int = 16,
    heat_mode: str = "dataset",
    normalizer: HeatmapNormalizer | None = None,
) -> list[Box]:
    """The boxes of image `index` at these settings: exactly what the heatmap explorer draws."""
    return _heat_and_boxes(preds, index, box_threshold, min_area, heat_mode, normalizer)[1]


def render_heatmap_view(
    preds: Predictions,
    index: int,
    box_threshold: float = 0.5,
    min_area: int = 16,
    heat_mode: str = "dataset",
    normalizer: HeatmapNormalizer | None = None,
    ax: Axes | None = None,
    threshold: float = 0.0,
) -> Figure:
    """One image with heatmap, all its boxes and ground-truth contour; `threshold` is the
    logit-margin threshold of the verdict in the title."""
    heat, boxes = _heat_and_boxes(preds, index, box_threshold, min_area, heat_mode, normalizer)
    apply_style()
    own_figure = ax is None
    if own_figure:
        fig, ax = plt.subplots(figsize=(4.6, 4.4), layout="constrained")
    note = f"{len(boxes)} box(es): heat > {box_threshold:.2f}, ≥ {min_area} px"
    draw_prediction(ax, preds, index, threshold, heat, boxes, note=note)
    if own_figure and heat_mode != "raw":
        add_heat_colorbar(fig, ax, heat_mode)
    return ax.figure


def _show(out: widgets.Output, fig: Figure) -> None:
    """Replace what `out` shows by the figure."""
    with out:
        out.clear_output(wait=True)
        display(fig)
    plt.close(fig)  # else the inline backend shows it a second time at the end of the cell


def heatmap_explorer(
    preds: Predictions, normalizer: HeatmapNormalizer | None = None, threshold: float = 0.0
) -> widgets.VBox:
    """Pick an image, the heatmap normalisation, the box threshold and minimum box area; see the
    overlay and boxes live. `threshold` (logit margin) only decides the verdict in the title."""
    if not preds.samples:
        raise DataError("no predictions to explore: predict on at least one image")
    options = [
        (f"{s.category}/{s.defect_type}/{s.path.name} (true: {LABEL_NAMES[s.label]})", i)
        for i, s in enumerate(preds.samples)
    ]
    image = widgets.Dropdown(options=options, value=0, description="image")
    mode = widgets.Dropdown(options=HEAT_MODES, value="dataset", description="normalise")
    box_threshold = widgets.FloatSlider(
        value=0.5, min=0.0, max=1.0, step=0.05, description="heat >", continuous_update=False
    )
    min_area = widgets.IntSlider(
        value=16, min=1, max=max(16, preds.image_size**2 // 16), description="min area (px)",
        continuous_update=False,
    )
    out = widgets.Output()

    def redraw(_change=None) -> None:
        fig = render_heatmap_view(
            preds, image.value, box_threshold.value, min_area.value, mode.value, normalizer,
            threshold=threshold,
        )
        _show(out, fig)

    for control in (image, mode, box_threshold, min_area):
        control.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox([image, mode]), widgets.HBox([box_threshold, min_area]), out])


def threshold_metrics(labels, scores, threshold: float) -> dict:
    """Precision, recall, F1, accuracy and the confusion counts for the rule score > threshold."""
    m = classification_metrics(labels, scores, threshold)
    picked = {k: m[k] for k in ("threshold", "precision", "recall", "f1", "accuracy")}
    return picked | m["confusion_matrix"]


def _metrics_html(m: dict) -> str:
    rows = [
        ("precision", f"{m['precision']:.3f}"),
        ("recall", f"{m['recall']:.3f}"),
        ("F1", f"{m['f1']:.3f}"),
        ("accuracy", f"{m['accuracy']:.3f}"),
        ("TP (anomaly flagged)", m["tp"]),
        ("FN (anomaly missed)", m["fn"]),
        ("FP (good flagged)", m["fp"]),
        ("TN (good passed)", m["tn"]),
    ]
    cells = "".join(f"<tr><td>{k}</td><td style='text-align:right'>{v}</td></tr>" for k, v in rows)
    caption = f"positive class: {POSITIVE_CLASS}; anomaly if score > {m['threshold']:.2f}"
    return f"<table><caption>{caption}</caption>{cells}</table>"


def threshold_explorer(labels, scores, groups: Sequence[str] | None = None) -> widgets.VBox:
    """A slider over the score (logit margin) range with the metrics at that threshold and the
    score histograms (per group if given) with the threshold line."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    threshold_metrics(labels, s, 0.0)  # validates labels and scores with a clear error
    lo, hi = float(s.min()), float(s.max())
    span = hi - lo if hi > lo else 1.0
    slider = widgets.FloatSlider(
        value=float(np.clip(0.0, lo, lo + span)), min=lo, max=lo + span, step=span / 200,
        description="threshold", readout_format=".2f", continuous_update=False,
    )
    table = widgets.HTML()
    out = widgets.Output()

    def redraw(_change=None) -> None:
        table.value = _metrics_html(threshold_metrics(labels, s, slider.value))
        _show(out, plot_score_distributions(labels, s, threshold=slider.value, groups=groups))

    slider.observe(redraw, names="value")
    redraw()
    return widgets.VBox([slider, widgets.HBox([table, out])])
