"""Figures for notebooks, CLI reports and docs, all in one visual style.

Every function returns the Figure (or the Axes it drew on) and never calls plt.show(): notebooks
display what is returned, scripts pass it to `save_figure`, and tests inspect what was drawn.
Grids take an optional `fig` to draw into, single plots an optional `ax`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from itertools import zip_longest
from pathlib import Path

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from PIL import Image
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from visinspect.backbones.cam import HeatmapNormalizer
from visinspect.boxes import Box, heatmap_to_boxes
from visinspect.data.samples import Sample, load_mask, load_rgb
from visinspect.errors import DataError, VisinspectError
from visinspect.metrics import POSITIVE_CLASS, _labels_scores
from visinspect.scoring import Predictions
from visinspect.utils import atomic_path

# ColorBrewer Dark2: colour-blind safe and readable in print. Its first two colours are reserved
# for the classes; lines that are not classes (train/validation, models) cycle through the rest.
PALETTE = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666")
COLORS = {"good": PALETTE[0], "anomaly": PALETTE[1]}
LABEL_NAMES = ("good", "anomaly")  # index = label
BOX_COLOR = "#00e5ff"  # cyan: absent from the heatmap colormap, visible on dark and bright parts
MASK_COLOR = "#39ff14"  # ground-truth contour: green, also absent from the colormap
HEATMAP_CMAP = "inferno"  # perceptually uniform and dark when cold: a good image stays dark
CONFUSION_CMAP = "Blues"  # light cells keep the black count annotations readable
FONT_SIZES = {"title": 11, "label": 10, "tick": 9, "legend": 9}
REFERENCE_GREYS = ("#333333", "#999999")  # reference lines (chance, always "good"): not data
HISTORY_KEYS = ("loss", "accuracy", "recall")
# What guessing scores, for the metrics that have a level independent of the data.
CHANCE_LEVELS = {"image_auroc": 0.5, "pixel_auroc": 0.5, "balanced_accuracy": 0.5}
DPI = 120

_STYLE = {
    "savefig.dpi": DPI,
    "savefig.bbox": "tight",
    "image.cmap": HEATMAP_CMAP,
    "font.size": FONT_SIZES["label"],
    "axes.titlesize": FONT_SIZES["title"],
    "axes.labelsize": FONT_SIZES["label"],
    "xtick.labelsize": FONT_SIZES["tick"],
    "ytick.labelsize": FONT_SIZES["tick"],
    "legend.fontsize": FONT_SIZES["legend"],
    "figure.titlesize": FONT_SIZES["title"] + 1,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": mpl.cycler(color=list(PALETTE[2:])),
}


PAGE_WIDTH = 8.4  # inches: a notebook page (about 850 px at the inline backend's 100 dpi)


def apply_style() -> None:
    """Set the project's matplotlib rcParams (idempotent; every plot function calls it)."""
    mpl.rcParams.update(_STYLE)


# ----------------------------------------------------------------------------- helpers


def figure_grid(fig: Figure | None, nrows: int, ncols: int, panel: tuple[float, float], **kw):
    """A (nrows, ncols) array of axes, in `fig` or in a new figure sized panel-by-panel."""
    apply_style()
    if fig is None:
        fig = plt.figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False, **kw)


def axes_for(
    ax: Axes | Sequence[Axes] | None,
    nrows: int,
    ncols: int,
    panel: tuple[float, float],
    what: str,
    **kw,
) -> tuple[Figure, list[Axes]]:
    """The caller's axes (checked to be nrows * ncols of them) or a new figure's, as a flat list."""
    if ax is None:
        fig, grid = figure_grid(None, nrows, ncols, panel, **kw)
        return fig, list(grid.flat)
    apply_style()
    axes = [ax] if isinstance(ax, Axes) else list(np.ravel(ax))
    if len(axes) != nrows * ncols:
        raise VisinspectError(f"{what} draws on {nrows * ncols} axes; got {len(axes)}")
    return axes[0].figure, axes


def _numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def _as_image(image) -> np.ndarray:
    """An RGB image (H, W, 3) as uint8 or float in [0, 1], from RGB or grayscale input."""
    img = _numpy(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] != 3:
        raise DataError(f"image must be H x W x 3 (RGB) or H x W; got shape {img.shape}")
    if np.issubdtype(img.dtype, np.floating):
        if img.size and (np.nanmin(img) < -1e-6 or np.nanmax(img) > 1 + 1e-6):
            raise DataError(
                "a float image must be in [0, 1]; got values in "
                f"[{np.nanmin(img):.3g}, {np.nanmax(img):.3g}] (undo the ImageNet "
                "normalisation with visinspect.data.samples.denormalize)"
            )
        return img.clip(0, 1)
    if img.dtype != np.uint8:
        raise DataError(f"an integer image must be uint8; got {img.dtype}")
    return img


def _as_map(a, shape: tuple[int, int], name: str) -> np.ndarray:
    m = _numpy(a)
    if m.shape != shape:
        raise DataError(
            f"{name} has shape {m.shape} but the image is {shape[0]} x {shape[1]}: "
            "resize them to the same size"
        )
    return m


def load_image(path: Path, size: int) -> np.ndarray:
    """An image file as RGB uint8 resized to size x size, as the model saw it."""
    return np.asarray(Image.fromarray(load_rgb(path)).resize((size, size), Image.BILINEAR))


def _both_classes(y: np.ndarray, what: str) -> None:
    if not 0 < y.sum() < y.size:
        only = LABEL_NAMES[int(y[0])]
        raise DataError(f"{what} needs both good and anomalous images; got only {only} ones")


# ----------------------------------------------------------------------------- data


def plot_class_balance(
    summary: Mapping[str, Mapping], by_split: bool = False, ax: Axes | None = None
) -> Figure:
    """Stacked bars of good/anomaly images per category (from data.summarize), or per split."""
    if not summary:
        raise DataError("empty summary: no categories to plot")
    keys = [(c, s) for c in summary for s in ("train", "test")] if by_split else list(summary)
    counts = {name: [] for name in LABEL_NAMES}
    for key in keys:
        row = summary[key[0]]["splits"][key[1]] if by_split else summary[key]
        for name in LABEL_NAMES:
            counts[name].append(row[name])
    width = min(PAGE_WIDTH, max(4.0, 0.7 * len(keys) + 1.5))  # a notebook page's width at most
    fig, (ax,) = axes_for(ax, 1, 1, (width, 3.5), "plot_class_balance")
    x = np.arange(len(keys))
    bottom = np.zeros(len(keys))
    for name in LABEL_NAMES:
        bars = ax.bar(x, counts[name], bottom=bottom, color=COLORS[name], label=name)
        ax.bar_label(bars, labels=[str(v) if v else "" for v in counts[name]], label_type="center")
        bottom += counts[name]
    rotate = {"rotation": 40, "ha": "right"} if len(keys) > 6 else {}
    ax.set_xticks(x, [f"{c} · {s}" for c, s in keys] if by_split else keys, **rotate)
    ax.set_ylabel("images")
    ax.set_title(f"Images per category (positive class: {POSITIVE_CLASS})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, never on them
    return fig


def _spread_over_types(samples: Sequence[Sample], n: int) -> list[Sample]:
    """Up to n samples, taking turns over defect types (good first) so every type shows up."""
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in sorted(samples, key=lambda s: str(s.path)):
        groups[s.defect_type].append(s)
    order = sorted(groups, key=lambda t: (t != "good", t))
    layers = zip_longest(*(groups[t] for t in order))
    return [s for layer in layers for s in layer if s is not None][:n]


def plot_sample_grid(
    samples: Sequence[Sample],
    n_per_category: int = 4,
    image_size: int = 128,
    fig: Figure | None = None,
) -> Figure:
    """One row per category, named at its left: images with their ground-truth defect contours,
    titled by defect type."""
    if not samples:
        raise DataError("no samples to show")
    categories = sorted({s.category for s in samples})
    fig, axes = figure_grid(fig, len(categories), n_per_category,
                            (min(2.1, PAGE_WIDTH / n_per_category), 2.2))
    for row, category in zip(axes, categories, strict=True):
        row[0].text(-0.06, 0.5, category, transform=row[0].transAxes, rotation=90, ha="right",
                    va="center", fontsize=FONT_SIZES["title"])  # the row's product, at its left
        chosen = _spread_over_types([s for s in samples if s.category == category], n_per_category)
        for ax, s in zip_longest(row, chosen):
            if s is None:
                ax.set_axis_off()
                continue
            size = (image_size, image_size)
            mask = None if s.mask_path is None else load_mask(s.mask_path, size)
            overlay(ax, load_image(s.path, image_size), mask=mask)
            ax.set_title(s.defect_type, color=COLORS[LABEL_NAMES[s.label]])
    return fig


# ----------------------------------------------------------------------------- heatmaps


def overlay(
    ax: Axes,
    image,
    heatmap=None,
    boxes: Sequence[Box] = (),
    mask=None,
    alpha: float = 0.45,
) -> Axes:
    """Draw an image, optionally with a heatmap on top, boxes and a ground-truth mask contour.

    `image` is H x W x 3 (or H x W), uint8 or float in [0, 1]; `heatmap` and `mask` are H x W.
    Boxes are end-exclusive pixel boxes; their rectangles hug the pixel edges.
    """
    apply_style()
    img = _as_image(image)
    shape = img.shape[:2]
    ax.imshow(img)
    if heatmap is not None:
        heat = _as_map(heatmap, shape, "heatmap").astype(np.float64)
        normalised = heat.size > 0 and np.nanmin(heat) >= 0 and np.nanmax(heat) <= 1
        # Normalised maps keep the fixed 0..1 scale, so a uniformly cool (good) image stays dark
        # instead of having its noise stretched into hot spots; raw CAMs use their own range.
        scale = {"vmin": 0.0, "vmax": 1.0} if normalised else {}
        ax.imshow(heat, cmap=HEATMAP_CMAP, alpha=alpha, **scale)
    if mask is not None:
        m = _as_map(mask, shape, "mask") > 0
        if m.any():
            ax.contour(m.astype(np.float64), levels=[0.5], colors=MASK_COLOR, linewidths=1.2)
    for b in boxes:
        # Pixel (x, y) covers [x - 0.5, x + 0.5] in imshow's coordinates.
        ax.add_patch(
            Rectangle(
                (b.x0 - 0.5, b.y0 - 0.5), b.width, b.height,
                fill=False, edgecolor=BOX_COLOR, linewidth=1.5,
            )
        )
    ax.set_xlim(-0.5, shape[1] - 0.5)
    ax.set_ylim(shape[0] - 0.5, -0.5)
    ax.set_axis_off()
    return ax


def prediction_heatmaps(
    preds: Predictions,
    indices: Sequence[int],
    heat_mode: str = "dataset",
    normalizer: HeatmapNormalizer | None = None,
) -> np.ndarray:
    """Heatmaps (n, S, S) of some predictions: "raw", or scaled per "image" or per "dataset".

    "dataset" without a normaliser fits one on all CAMs of `preds`: fine for looking, but fit it
    on validation CAMs (HeatmapNormalizer.fit) to compare images across runs and products.
    """
    if heat_mode == "dataset" and normalizer is None:
        # Fitted on the low-resolution CAMs: bilinear upsampling stays within their range.
        normalizer = HeatmapNormalizer.fit(preds.cams)
    return _numpy(preds.heatmaps(list(indices), heat_mode, normalizer))


def draw_prediction(
    ax: Axes,
    preds: Predictions,
    index: int,
    threshold: float,
    heatmap=None,
    boxes: Sequence[Box] = (),
    note: str = "",
) -> Axes:
    """One image of `preds` with heatmap, boxes and mask contour, titled with its verdict.

    The image is called anomalous iff its logit margin > `threshold`; mistakes get a bold title.
    `note` is an extra title line.
    """
    s = preds.samples[index]
    margin = float(preds.margins[index])
    predicted = int(margin > threshold)
    overlay(ax, load_image(s.path, preds.image_size), heatmap, boxes, preds.masks([index])[0])
    ax.set_title(
        f"true: {LABEL_NAMES[s.label]} · predicted: {LABEL_NAMES[predicted]}\n"
        f"P(anomaly)={preds.probabilities[index]:.2f} · margin {margin:.1f}"
        + (f"\n{note}" if note else ""),
        fontsize=FONT_SIZES["label"],
        fontweight="bold" if predicted != s.label else "normal",
    )
    return ax


def plot_prediction_grid(
    preds: Predictions,
    indices: Sequence[int],
    threshold: float,
    *,
    heat_mode: str = "dataset",
    normalizer: HeatmapNormalizer | None = None,
    box_threshold: float = 0.5,
    min_area: int = 16,
    ncols: int = 3,
    boxes_for: str = "predicted",
    fig: Figure | None = None,
) -> Figure:
    """Images with heatmap overlay, boxes and ground-truth contour, titled with the verdict.

    Boxes (heatmap_to_boxes at `box_threshold`) are drawn on images predicted anomalous
    (boxes_for="predicted") or on all of them ("all"). A shared colorbar shows the heat scale.
    """
    if boxes_for not in ("predicted", "all"):
        raise VisinspectError(f"boxes_for must be 'predicted' or 'all'; got {boxes_for!r}")
    idx = [int(i) for i in indices]
    if not idx:
        raise DataError("no images to show: pass at least one index")
    bad = [i for i in idx if not 0 <= i < len(preds.samples)]
    if bad:
        raise DataError(f"indices {bad} are out of range for {len(preds.samples)} predictions")
    heat = prediction_heatmaps(preds, idx, heat_mode, normalizer)
    predicted = preds.margins > threshold
    ncols = max(1, min(ncols, len(idx)))
    fig, axes = figure_grid(fig, math.ceil(len(idx) / ncols), ncols, (3.2, 3.5))
    for ax, i, h in zip_longest(axes.flat, idx, heat):
        if i is None:
            ax.set_axis_off()
            continue
        show = boxes_for == "all" or predicted[i]
        boxes = heatmap_to_boxes(h, box_threshold, min_area) if show else []
        draw_prediction(ax, preds, i, threshold, h, boxes)
    if heat_mode != "raw":  # raw maps have one scale per image: no shared colorbar
        add_heat_colorbar(fig, axes, heat_mode)
    return fig


def add_heat_colorbar(
    fig: Figure, axes, heat_mode: str, label: str | None = None, high: float = 1.0
) -> None:
    """The 0..1 heat scale of normalised heatmaps, beside `axes` (opaque, unlike the overlay);
    `high` labels its top (a map drawn as value / high)."""
    scale = ScalarMappable(Normalize(0.0, high), HEATMAP_CMAP)
    fig.colorbar(scale, ax=axes, shrink=0.8, label=label or f"heat ({heat_mode}-normalised)")


# ----------------------------------------------------------------------------- metrics


def plot_confusion_matrix(cm: Mapping, ax: Axes | None = None) -> Figure:
    """Counts and row percentages; rows = true (anomaly, good), columns = predicted.

    `cm` is classification_metrics' "confusion_matrix" ({tp, fn, fp, tn}) or its whole output.
    """
    counts = cm.get("confusion_matrix", cm)
    missing = [k for k in ("tp", "fn", "fp", "tn") if k not in counts]
    if missing:
        raise DataError(
            f"confusion matrix lacks {', '.join(missing)}; expected keys tp, fn, fp, tn"
        )
    grid = np.array([[counts["tp"], counts["fn"]], [counts["fp"], counts["tn"]]], dtype=np.int64)
    totals = grid.sum(axis=1, keepdims=True)
    share = np.divide(grid, totals, out=np.zeros(grid.shape), where=totals > 0)
    annot = np.array([f"{n}\n{p:.0%}" for n, p in zip(grid.flat, share.flat, strict=True)])
    annot = annot.reshape(2, 2)
    fig, (ax,) = axes_for(ax, 1, 1, (3.8, 3.4), "plot_confusion_matrix")
    names = [POSITIVE_CLASS, "good"]
    sns.heatmap(
        grid, annot=annot, fmt="", cmap=CONFUSION_CMAP, cbar=False, square=True, linewidths=1,
        linecolor="white", xticklabels=names, yticklabels=names, ax=ax,
        annot_kws={"fontsize": FONT_SIZES["title"]}, vmin=0,
    )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix (positive class: {POSITIVE_CLASS})\n% of each true class")
    return fig


def plot_roc_pr(labels, scores, ax: Sequence[Axes] | None = None) -> Figure:
    """ROC and precision-recall curves side by side, with AUROC / AP and chance lines."""
    y, s = _labels_scores(labels, scores)
    _both_classes(y, "a ROC/PR curve")
    fig, axes = axes_for(ax, 1, 2, (3.8, 3.8), "plot_roc_pr")
    roc_ax, pr_ax = axes
    fpr, tpr, _ = roc_curve(y, s)
    roc_ax.plot(fpr, tpr, color=COLORS["anomaly"], label=f"AUROC = {roc_auc_score(y, s):.3f}")
    roc_ax.plot([0, 1], [0, 1], ls="--", color="grey", label="chance = 0.500")
    roc_ax.set_xlabel("false positive rate (good flagged)")
    roc_ax.set_ylabel("true positive rate (anomalies found)")
    roc_ax.set_title(f"ROC (positive class: {POSITIVE_CLASS})")
    precision, recall, _ = precision_recall_curve(y, s)
    ap = average_precision_score(y, s)
    pr_ax.step(recall, precision, where="post", color=COLORS["anomaly"], label=f"AP = {ap:.3f}")
    pr_ax.axhline(y.mean(), ls="--", color="grey", label=f"chance = {y.mean():.3f}")
    pr_ax.set_xlabel(f"recall ({POSITIVE_CLASS})")
    pr_ax.set_ylabel(f"precision ({POSITIVE_CLASS})")
    pr_ax.set_title(f"Precision-recall (positive class: {POSITIVE_CLASS})")
    for a in axes:
        a.set_xlim(0, 1)
        a.set_ylim(0, 1.02)
        a.set_aspect("equal")
        a.legend(loc="lower right" if a is roc_ax else "lower left")
    return fig


def plot_history(
    history: Mapping[str, Sequence[float]],
    ax: Sequence[Axes] | None = None,
    references: Mapping[str, Mapping[str, float]] | None = None,
) -> Figure:
    """Curves per epoch: loss, accuracy and recall, whichever `history` has (train solid,
    "val_..." keys dashed), each with its reference lines, e.g. {"accuracy": {"always 'good'":
    0.64}}: a curve means little without the level that needs no learning at all."""
    keys = [k for k in HISTORY_KEYS if k in history or f"val_{k}" in history]
    if not keys:
        raise DataError(f"history has none of {', '.join(HISTORY_KEYS)}; its keys: {sorted(history)}")
    fig, axes = axes_for(ax, 1, len(keys), (PAGE_WIDTH / 3, 2.8), "plot_history")
    references = references or {}
    for a, key in zip(axes, keys, strict=True):
        # One colour per split in every panel, also where a panel has validation values only.
        for name, style, label, color in ((key, "-", "train", PALETTE[2]),
                                          (f"val_{key}", "--", "validation", PALETTE[3])):
            if name in history:
                values = np.asarray(history[name], dtype=np.float64)
                a.plot(np.arange(1, values.size + 1), values, style, color=color, marker="o", ms=3,
                       label=label)
        for i, (label, value) in enumerate(references.get(key, {}).items()):
            a.axhline(value, ls=":", lw=1.2, color=REFERENCE_GREYS[i % len(REFERENCE_GREYS)],
                      label=f"{label} ({value:.3g})")
        a.set_xlabel("epoch")
        a.set_ylabel(f"recall ({POSITIVE_CLASS})" if key == "recall" else key)
        a.set_title(key)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        if key != "loss":
            a.set_ylim(0, 1.02)
    figure_legend(fig, axes)
    return fig


def figure_legend(fig: Figure, axes: Sequence[Axes]) -> None:
    """One legend for the whole figure, below its panels (outside the data): each label once."""
    entries: dict[str, object] = {}
    for a in axes:
        for handle, label in zip(*a.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    fig.legend(list(entries.values()), list(entries), loc="outside lower center",
               ncols=min(len(entries), 3))


def plot_score_distributions(
    labels,
    scores,
    threshold: float | None = None,
    groups: Sequence[str] | None = None,
    bins: int = 30,
    ax: Axes | Sequence[Axes] | None = None,
) -> Figure:
    """Histograms of the ranking score for good vs anomalous images, one panel per group.

    With the threshold line on shared bins and x axis, it shows why a threshold chosen on one
    product does not transfer to another: each product's scores sit somewhere else.
    """
    y, s = _labels_scores(labels, scores)
    if groups is None:
        g, names = np.full(y.shape, "all images"), ["all images"]
    else:
        g = np.asarray(groups, dtype=str).ravel()
        if g.shape != y.shape:
            raise DataError(f"need one group per score; got {g.size} groups for {y.size} scores")
        names = sorted(set(g.tolist()))
    fig, axes = axes_for(ax, len(names), 1, (6.0, 2.0), "plot_score_distributions", sharex=True)
    edges = np.histogram_bin_edges(s, bins=bins)
    for a, name in zip(axes, names, strict=True):
        n = []
        for cls, label in enumerate(LABEL_NAMES):
            v = s[(g == name) & (y == cls)]
            a.hist(v, bins=edges, color=COLORS[label], alpha=0.6, label=label)
            n.append(f"{v.size} {label}")
        if threshold is not None:
            a.axvline(threshold, color="black", ls="--", lw=1.2, label=f"threshold {threshold:.2f}")
        a.set_title(f"{name} ({', '.join(n)})")
        a.set_ylabel("images")
        a.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].set_xlabel("ranking score (logit margin); anomaly if > threshold")
    figure_legend(fig, axes)
    return fig


# ----------------------------------------------------------------------------- files


def save_figure(fig: Figure, path: str | Path, dpi: int = DPI) -> Path:
    """Write the figure as a PNG (tight bounding box), atomically, then close it."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise VisinspectError(f"save_figure writes PNG files; give a path ending in .png: {path}")
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def highest_scoring(labels: np.ndarray, scores: np.ndarray, per_class: int) -> list[int]:
    """The highest-scoring anomalies, then the highest-scoring good images: what a person wants to
    look at first."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    anomalies = [int(i) for i in order if labels[i] == 1][:per_class]
    goods = [int(i) for i in order if labels[i] == 0][:per_class]
    return anomalies + goods
