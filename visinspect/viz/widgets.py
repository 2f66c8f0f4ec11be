"""Notebook explorers: move a slider, see the boxes or the metrics change (a CAM's boxes, a
decision threshold's metrics, a nearest-good-patch map with K good parts and its threshold).

The logic lives in pure functions (tested without a notebook); the widgets only wire sliders to
them and redraw into an ipywidgets.Output.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import display
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from visinspect.backbones.cam import HeatmapNormalizer, upsample
from visinspect.boxes import Box, heatmap_to_boxes
from visinspect.data.samples import Sample
from visinspect.errors import ConfigError, DataError
from visinspect.methods.nearest_patch import ReferenceDetector
from visinspect.metrics import POSITIVE_CLASS, box_hit_rate, classification_metrics
from visinspect.scoring import Predictions, ScoredImages
from visinspect.viz.plots import (
    FONT_SIZES,
    LABEL_NAMES,
    add_heat_colorbar,
    apply_style,
    draw_prediction,
    load_image,
    overlay,
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


BOX_STEP = 0.05  # the box-threshold slider's step


def box_threshold_on_defect(
    preds: Predictions,
    index: int,
    min_area: int = 16,
    heat_mode: str = "dataset",
    normalizer: HeatmapNormalizer | None = None,
    step: float = BOX_STEP,
) -> float | None:
    """The box threshold on the slider's grid (multiples of `step` below 1) whose boxes of image
    `index` best match its defect: a box touches the defect mask, and the boxes' IoU with the
    defect regions (metrics.box_hit_rate's mean_iou) is the highest (the higher threshold on a
    tie). Where the explorer opens. None when the image has no defect mask or no box touches it."""
    mask = preds.masks([index])
    if not mask.any():
        return None
    heat = prediction_heatmaps(preds, [index], heat_mode, normalizer)[0]
    best, best_iou = None, -1.0
    for k in range(round(1 / step) - 1, -1, -1):
        found = heatmap_to_boxes(heat, round(k * step, 10), min_area)
        match = box_hit_rate(mask, [found]) if found else {"box_hit_rate": 0}
        if match["box_hit_rate"] > 0 and match["mean_iou"] > best_iou:
            best, best_iou = round(k * step, 10), match["mean_iou"]
    return best


def explorer_start(
    preds: Predictions, index: int, normalizer: HeatmapNormalizer | None = None, min_area: int = 16
) -> tuple[str, float]:
    """(heat mode, box threshold) at which the heatmap explorer opens on image `index`: a box on
    its defect, on the dataset scale if a threshold puts one there, else per image (min-max);
    ("dataset", 0.5) for an image without a defect mask, or when neither does."""
    for mode in ("dataset", "image"):
        found = box_threshold_on_defect(preds, index, min_area, mode, normalizer)
        if found is not None:
            return mode, found
    return "dataset", 0.5


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


# Descriptions at their natural width (ipywidgets cuts them at 80 px by default: "min area (…").
READABLE = {"description_width": "initial"}


def _boxes_html(boxes: Sequence[Box], box_threshold: float, min_area: int, unit: str = "heat",
                peak_scale: float = 1.0) -> str:
    """The drawn boxes as text: how many, at which settings, and where (readable without the
    figure). `unit` names what the threshold is on; box peaks are shown times `peak_scale`."""
    where = "; ".join(f"({b.x0}, {b.y0}, {b.x1}, {b.y1}) peak {b.score * peak_scale:.2f}" for b in boxes)
    return (f"<b>{len(boxes)} box(es)</b> at {unit} &gt; {box_threshold:.2f}, ≥ {min_area} px"
            + (f": {where} (x0, y0, x1, y1)" if boxes else ""))


def heatmap_explorer(
    preds: Predictions,
    normalizer: HeatmapNormalizer | None = None,
    threshold: float = 0.0,
    *,
    index: int = 0,
    heat_mode: str | None = None,
    box_threshold: float | None = None,
    min_area: int = 16,
) -> widgets.VBox:
    """Pick an image, the heatmap normalisation, the box threshold and minimum box area; see the
    overlay and boxes live. `threshold` (logit margin) only decides the verdict in the title.

    It opens on image `index`; where `heat_mode` or `box_threshold` is None, at a state that
    shows a box on the image's defect (`explorer_start`, `box_threshold_on_defect`).
    """
    if not preds.samples:
        raise DataError("no predictions to explore: predict on at least one image")
    if box_threshold is None:
        if heat_mode is None:
            heat_mode, box_threshold = explorer_start(preds, index, normalizer, min_area)
        else:
            found = box_threshold_on_defect(preds, index, min_area, heat_mode, normalizer)
            box_threshold = 0.5 if found is None else found
    heat_mode = heat_mode or "dataset"
    options = [
        (f"{s.category}/{s.defect_type}/{s.path.name} (true: {LABEL_NAMES[s.label]})", i)
        for i, s in enumerate(preds.samples)
    ]
    # Wide enough for the longest file name: a fixed-width drop-down would cut it.
    image = widgets.Dropdown(options=options, value=index, description="image", style=READABLE,
                             layout=widgets.Layout(width="max-content", max_width="100%"))
    mode = widgets.Dropdown(options=HEAT_MODES, value=heat_mode, description="normalise",
                            style=READABLE, layout=widgets.Layout(width="max-content"))
    wide = {"style": READABLE, "layout": widgets.Layout(width="30em")}  # room for label and track
    box_threshold = widgets.FloatSlider(
        value=box_threshold, min=0.0, max=1.0, step=BOX_STEP, description="box threshold: heat >",
        continuous_update=False, **wide,
    )
    min_area = widgets.IntSlider(
        value=min_area, min=1, max=max(16, preds.image_size**2 // 16), description="min box area (px)",
        continuous_update=False, **wide,
    )
    summary = widgets.HTML()
    out = widgets.Output()

    def redraw(_change=None) -> None:
        settings = (preds, image.value, box_threshold.value, min_area.value, mode.value, normalizer)
        summary.value = _boxes_html(boxes_at(*settings), box_threshold.value, min_area.value)
        _show(out, render_heatmap_view(*settings, threshold=threshold))

    for control in (image, mode, box_threshold, min_area):
        control.observe(redraw, names="value")
    redraw()
    return widgets.VBox([image, mode, widgets.HBox([box_threshold, min_area]), summary, out])


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


def threshold_positions(scores, threshold: float = 0.0, max_steps: int = 200) -> np.ndarray:
    """Where the threshold slider stops: one threshold per decision region, in increasing order.

    With the rule score > t, what is flagged changes only where t passes a score, so a slider in
    equal steps of the score range wastes its steps where no score lies and jumps past crowds
    (logit margins are skewed: half of them can sit in 2 % of the range). Here step i sits in the
    i-th gap between distinct scores (at its midpoint), so each step moves past the next score:
    every region is reachable, from "all flagged" (below the minimum) to "none" (the maximum).
    With more than `max_steps` gaps, the stops are every (n / max_steps)-th gap, so each step moves
    past about the same number of images. `threshold` (e.g. the model's) stands for its own region.
    """
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if s.size == 0 or not np.all(np.isfinite(s)) or not np.isfinite(threshold):
        raise DataError("threshold positions need at least one score, and finite scores and threshold")
    if max_steps < 1:
        raise ConfigError(f"max_steps must be at least 1; got {max_steps}")
    n = s.size
    # k = how many scores are <= t (not flagged); k changes only between distinct scores.
    ks = np.concatenate([[0], np.flatnonzero(s[1:] > s[:-1]) + 1, [n]])
    if len(ks) > max_steps + 1:
        ks = ks[np.unique(np.linspace(0, len(ks) - 1, max_steps + 1).round().astype(int))]
    below = s[0] - max(0.01 * (s[-1] - s[0]), 0.01)  # flags every image
    mids = (s[np.maximum(ks - 1, 0)] + s[np.minimum(ks, n - 1)]) / 2
    stops = np.where(ks == 0, below, np.where(ks == n, s[-1], mids))
    k_threshold = np.searchsorted(s, threshold, side="right")
    stops = stops[ks != k_threshold]  # the threshold replaces its region's midpoint
    return np.sort(np.append(stops, threshold))


def _labels(values: np.ndarray) -> list[str]:
    """Two decimals, or as many more (up to 6) as it takes for neighbouring stops to differ."""
    for decimals in range(2, 7):
        labels = [f"{v:.{decimals}f}" for v in values]
        if len(set(labels)) == len(labels):
            break
    return labels


def threshold_explorer(
    labels, scores, groups: Sequence[str] | None = None, threshold: float = 0.0
) -> widgets.VBox:
    """A slider over the scores (logit margins), one stop per decision region (see
    `threshold_positions`), starting at `threshold` (the model's), with the metrics at the chosen
    threshold and the score histograms (per group if given) with the threshold line."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    threshold_metrics(labels, s, threshold)  # validates labels and scores with a clear error
    stops = threshold_positions(s, threshold)  # and the threshold
    slider = widgets.SelectionSlider(
        options=list(zip(_labels(stops), stops.tolist(), strict=True)), value=float(threshold),
        description="anomaly if logit margin >", continuous_update=False, style=READABLE,
        layout=widgets.Layout(width="36em", max_width="100%"),
    )
    table = widgets.HTML()
    out = widgets.Output()

    def redraw(_change=None) -> None:
        table.value = _metrics_html(threshold_metrics(labels, s, slider.value))
        _show(out, plot_score_distributions(labels, s, threshold=slider.value, groups=groups))

    slider.observe(redraw, names="value")
    redraw()
    return widgets.VBox([slider, widgets.HBox([table, out])])


# ----------------------------------------------------------------------------- K good parts

HEAT_SPAN = 2.0  # the good-parts explorer's colour scale: 0 to twice the calibrated threshold


@dataclass(frozen=True)
class GoodPartsRun:
    """A nearest-good-patch method adapted to K good parts of each product: its patch distances
    on the scored images (`scored`, uncalibrated) and each product's calibrated threshold."""

    scored: ScoredImages
    thresholds: dict[str, float]


def good_parts_runs(
    make: Callable[[], ReferenceDetector],
    good: Mapping[str, Sequence[Sample]],
    samples: Sequence[Sample],
    ks: Sequence[int],
) -> dict[int, GoodPartsRun]:
    """For each K: a new detector (`make()`) adapted to the first K good parts of each product,
    its patch distances on `samples` and its calibrated thresholds."""
    runs = {}
    for k in sorted(ks):
        detector = make()
        for parts in good.values():
            detector.adapt(parts[:k])
        runs[k] = GoodPartsRun(detector.raw(samples),
                               {c: cal.threshold for c, cal in detector.calibrations.items()})
    return runs


@dataclass(frozen=True)
class GoodPartsState:
    """What the good-parts explorer shows for one image, K and threshold (in units of the
    calibrated threshold: 1 is the method's own decision)."""

    index: int
    k: int
    threshold: float
    heat: np.ndarray  # (S, S): patch distance / calibrated threshold / HEAT_SPAN, clipped to [0, 1]
    boxes: list[Box]  # where the distance is above `threshold` times the calibrated threshold
    score: float  # the image score / the calibrated threshold
    hit: bool  # a box overlaps the true defect

    @property
    def anomalous(self) -> bool:
        return self.score > self.threshold


def good_parts_state(
    runs: Mapping[int, GoodPartsRun], index: int, k: int, threshold: float = 1.0, min_area: int = 16
) -> GoodPartsState:
    """The explorer's state: image `index` scored against K good parts, boxes where its patch
    distance exceeds `threshold` times the product's calibrated threshold (0 < threshold <=
    HEAT_SPAN). With the largest patch distance as image score (`reference`), an image is
    called anomalous exactly when some patch is above the threshold."""
    if k not in runs:
        raise ConfigError(f"no run with K = {k}; the runs have K = {sorted(runs)}")
    if not 0 < threshold <= HEAT_SPAN:
        raise ConfigError(f"threshold must be in (0, {HEAT_SPAN:g}] times the calibrated one; "
                          f"got {threshold}")
    run = runs[k]
    if not 0 <= index < len(run.scored.samples):
        raise DataError(f"image {index} is out of range for {len(run.scored.samples)} scored images")
    calibrated = run.thresholds[run.scored.samples[index].category]
    distance = upsample(run.scored.maps[index : index + 1], run.scored.image_size)[0].numpy()
    heat = np.clip(distance / calibrated / HEAT_SPAN, 0.0, 1.0)
    boxes = heatmap_to_boxes(heat, threshold / HEAT_SPAN, min_area)
    mask = run.scored.masks([index])[0]
    hit = any(mask[b.y0 : b.y1, b.x0 : b.x1].any() for b in boxes)
    return GoodPartsState(index, k, threshold, heat, boxes, float(run.scored.scores[index]) / calibrated, hit)


def first_box_on_a_defect(runs: Mapping[int, GoodPartsRun], k: int, threshold: float = 1.0) -> int:
    """The first defective image with a box on its defect at these settings (else the first
    defective image, else 0): where the explorer opens."""
    samples = runs[k].scored.samples
    defective = [i for i, s in enumerate(samples) if s.label == 1]
    return next((i for i in defective if good_parts_state(runs, i, k, threshold).hit), (defective or [0])[0])


def render_good_parts_view(
    runs: Mapping[int, GoodPartsRun], state: GoodPartsState, ax: Axes | None = None
) -> Figure:
    """One image with its nearest-good-patch map, boxes and true defect (green), titled with the
    verdict at the state's K and threshold."""
    apply_style()
    own_figure = ax is None
    if own_figure:
        fig, ax = plt.subplots(figsize=(4.6, 4.4), layout="constrained")
    scored = runs[state.k].scored
    s = scored.samples[state.index]
    overlay(ax, load_image(s.path, scored.image_size), state.heat, state.boxes,
            scored.masks([state.index])[0], alpha=0.6)
    ax.set_title(f"{s.category}/{s.defect_type}/{s.path.name}, K = {state.k}\n"
                 f"true: {LABEL_NAMES[s.label]} · predicted: {LABEL_NAMES[int(state.anomalous)]}\n"
                 f"score {state.score:.2f} × the calibrated threshold", fontsize=FONT_SIZES["label"])
    if own_figure:
        add_heat_colorbar(fig, ax, "", label=f"patch distance ÷ calibrated threshold (0…{HEAT_SPAN:g})",
                          high=HEAT_SPAN)
    return ax.figure


def good_parts_explorer(
    runs: Mapping[int, GoodPartsRun], k: int | None = None, threshold: float = 1.0, min_area: int = 16
) -> widgets.VBox:
    """Pick an image, K (how many good parts the method compares with) and the threshold (times
    the calibrated one); see the nearest-good-patch map and its boxes live. Opens at `k` (default
    the middle K) on the first defective image with a box on its defect."""
    ks = sorted(runs)
    if not ks or not runs[ks[0]].scored.samples:
        raise DataError("no scored images to explore: give good_parts_runs at least one K and image")
    k = ks[len(ks) // 2] if k is None else k
    samples = runs[k].scored.samples
    options = [(f"{s.category}/{s.defect_type}/{s.path.name} (true: {LABEL_NAMES[s.label]})", i)
               for i, s in enumerate(samples)]
    image = widgets.Dropdown(options=options, value=first_box_on_a_defect(runs, k, threshold),
                             description="image", style=READABLE,
                             layout=widgets.Layout(width="max-content", max_width="100%"))
    wide = {"style": READABLE, "layout": widgets.Layout(width="30em")}
    k_slider = widgets.SelectionSlider(options=ks, value=k, description="K good parts",
                                       continuous_update=False, **wide)
    t_slider = widgets.FloatSlider(value=threshold, min=0.25, max=HEAT_SPAN, step=0.05,
                                   description="threshold (× calibrated)", continuous_update=False, **wide)
    summary = widgets.HTML()
    out = widgets.Output()

    def redraw(_change=None) -> None:
        state = good_parts_state(runs, image.value, k_slider.value, t_slider.value, min_area)
        verdict = (f"K = {state.k}: image score {state.score:.2f} × the calibrated threshold, "
                   f"predicted {LABEL_NAMES[int(state.anomalous)]}; ")
        summary.value = verdict + _boxes_html(state.boxes, state.threshold, min_area,
                                              unit="distance (× calibrated threshold)", peak_scale=HEAT_SPAN)
        _show(out, render_good_parts_view(runs, state))

    for control in (image, k_slider, t_slider):
        control.observe(redraw, names="value")
    redraw()
    return widgets.VBox([image, widgets.HBox([k_slider, t_slider]), summary, out])
