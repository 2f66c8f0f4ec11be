"""Figures that compare methods: a metric per method and target (bars), a metric against K, and
several methods' heatmaps side by side on the same images."""

from __future__ import annotations

import textwrap
from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from visinspect.backbones.cam import HeatmapNormalizer
from visinspect.boxes import heatmap_to_boxes
from visinspect.errors import DataError
from visinspect.metrics import POSITIVE_CLASS, seed_spread
from visinspect.scoring import ScoredImages
from visinspect.viz.plots import (
    CHANCE_LEVELS,
    FONT_SIZES,
    LABEL_NAMES,
    PALETTE,
    REFERENCE_GREYS,
    add_heat_colorbar,
    axes_for,
    figure_grid,
    load_image,
    overlay,
)


def plot_metric_bars(
    rows: Sequence[Mapping],
    metric: str,
    by: str = "model",
    hue: str | None = "target",
    ax: Axes | None = None,
    chance: float | None = None,
) -> Figure:
    """Bars of one metric: mean ± std over seeds (rows sharing `by` and `hue`), or the single
    value when the rows hold one seed, with the chance level as a line (`chance`, or the metric's
    in CHANCE_LEVELS).

    Rows are plain result dicts; groups keep the order in which they first appear. Missing
    values (None, e.g. AUROC of a one-class split) are left out of the mean.
    """
    values: dict[tuple, list[float]] = defaultdict(list)
    for n, row in enumerate(rows):
        missing = [k for k in (by, hue, metric) if k is not None and k not in row]
        if missing:
            raise DataError(f"result row {n} lacks {', '.join(missing)}; its keys: {sorted(row)}")
        if row[metric] is not None:
            values[(row[by], row[hue] if hue else None)].append(float(row[metric]))
    if not values:
        raise DataError(f"no values of {metric!r} to plot")
    xs = list(dict.fromkeys(k[0] for k in values))
    hues = list(dict.fromkeys(k[1] for k in values))
    size = (max(4.0, 1.5 + 0.6 * len(xs) * len(hues)), 3.5)
    fig, (ax,) = axes_for(ax, 1, 1, size, "plot_metric_bars")
    width = 0.8 / len(hues)
    spread = any(len(a) > 1 for a in values.values())  # else no error bars at all, not empty ones
    for j, h in enumerate(hues):
        pos = [i for i, x in enumerate(xs) if (x, h) in values]
        v = [values[(xs[i], h)] for i in pos]
        # Sample std over seeds; a single seed has no spread to show.
        std = [np.std(a, ddof=1) if len(a) > 1 else 0.0 for a in v] if spread else None
        offset = (j - (len(hues) - 1) / 2) * width
        ax.bar(np.array(pos) + offset, [np.mean(a) for a in v], width, yerr=std, capsize=3, label=h)
    chance = CHANCE_LEVELS.get(metric) if chance is None else chance
    if chance is not None:
        ax.axhline(chance, ls="--", lw=1.2, color=REFERENCE_GREYS[0], label=f"chance ({chance:g})")
    rotate = {"rotation": 30, "ha": "right"} if len(xs) > 4 or max(len(str(x)) for x in xs) > 12 else {}
    ax.set_xticks(range(len(xs)), [str(x) for x in xs], **rotate)
    ax.set_xlabel(by)
    ax.set_ylabel(metric)
    if all(0 <= x <= 1 for a in values.values() for x in a):
        ax.set_ylim(0, 1.05)
    ax.set_title(f"{metric} by {by} ({seed_spread([row['seed'] for row in rows if 'seed' in row])})")
    if hue or chance is not None:
        ax.legend(title=hue, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # off the bars
    return fig


def plot_model_heatmaps(
    scored: Mapping[str, ScoredImages],
    normalizers: Mapping[str, HeatmapNormalizer | None],
    paths: Sequence[str],
    *,
    rows: Sequence[Mapping] = (),
    box_threshold: float = 0.5,
    min_area: int = 16,
    fig: Figure | None = None,
) -> Figure:
    """The same test images (rows) under each model (columns): heatmap, boxes, mask contour.

    Each model's maps are scaled with its own normaliser (per image if it has none), so the
    colours mean what that model's boxes mean; the colour bar is that 0..1 scale. Models score
    on different scales (a logit margin, a patch distance), so each image shows its score minus
    the model's threshold (above 0: predicted anomaly), taken from the models' result `rows`
    (compare.run_seed; without them: threshold 0). Each column is titled with its model, each
    row labelled with its image's product and defect type on the left.
    """
    models = list(scored)
    if not models or not paths:
        raise DataError("need at least one model and one image path to compare heatmaps")
    threshold = {r["model"]: float(r["threshold"]) for r in rows if r.get("target") == "all"}
    fig, axes = figure_grid(fig, len(paths), len(models), (2.8, 2.9))
    axes = np.asarray(axes).reshape(len(paths), len(models))
    for col, name in enumerate(models):
        s = scored[name]
        where = {str(x.path): i for i, x in enumerate(s.samples)}
        missing = [p for p in paths if p not in where]
        if missing:
            raise DataError(f"model {name!r} did not score {missing[0]}")
        idx = [where[p] for p in paths]
        norm = normalizers.get(name)
        heat = s.heatmaps(idx, "dataset" if norm else "image", norm).numpy()
        masks = s.masks(idx)
        t = threshold.get(name, 0.0)
        for row, (i, h, m) in enumerate(zip(idx, heat, masks, strict=True)):
            ax = axes[row, col]
            boxes = heatmap_to_boxes(h, box_threshold, min_area)
            sample = s.samples[i]
            overlay(ax, load_image(sample.path, s.image_size), h, boxes, m)
            above = float(s.scores[i]) - t
            title = (f"true: {LABEL_NAMES[sample.label]} · predicted: {LABEL_NAMES[int(above > 0)]}\n"
                     f"score − threshold {above:+.2f}")
            if row == 0:  # the model, on at most two lines of the column's width
                title = f"{textwrap.fill(name, 24)}\n{title}"
            ax.set_title(title, fontsize=FONT_SIZES["tick"] - 1)
            if col == 0:
                ax.text(-0.04, 0.5, f"{sample.category}\n{sample.defect_type}", transform=ax.transAxes,
                        rotation=90, ha="right", va="center", fontsize=FONT_SIZES["label"])
    add_heat_colorbar(fig, axes, "each model's own", label="heat (each model's own 0…1 scale)")
    return fig


def same_series(series: Mapping[str, Mapping[int, float]]) -> dict[str, list[str]]:
    """Series (name -> {K: value}) grouped where they are equal at every K, so that a line drawn
    under another is named instead of hidden: {first name: [every name with those values]}."""
    groups: dict[tuple, list[str]] = {}
    for name, values in series.items():
        key = tuple(sorted((k, round(float(v), 12)) for k, v in values.items()))
        groups.setdefault(key, []).append(name)
    return {names[0]: names for names in groups.values()}


def plot_metric_vs_k(rows: Sequence[Mapping], metric: str = "image_auroc", target: str = "all",
                     ax: Axes | None = None, legend: bool = True,
                     groups: Mapping[str, Sequence[str]] | None = None) -> Figure:
    """A metric against K, the number of good images of the new product, for each few-good-parts
    model (rows named "... k=K"), with the uncalibrated models as horizontal reference lines.

    Models with the same values at every K share one line, named "a = b" (one would hide the
    other); the y axis spans the data (and the chance level when it lies near them). `legend`
    False leaves the legend to the caller (one legend for several panels: plot_metric_vs_k_panels);
    `groups` (see `same_series`) fixes which models share a line and each line's colour (its place).
    """
    by_model: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    flat: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        if row.get("target") != target or row.get(metric) is None:
            continue
        name, _, k = str(row["model"]).rpartition(" k=")
        if name and k.isdigit():
            by_model[name][int(k)].append(float(row[metric]))
        else:
            flat[str(row["model"])].append(float(row[metric]))
    if not by_model:
        raise DataError(f"no rows with a K ('... k=K' models) and a {metric!r} for target {target!r}")
    fig, (ax,) = axes_for(ax, 1, 1, (6.0, 3.8), "plot_metric_vs_k")
    means = {name: {k: float(np.mean(v)) for k, v in ks.items()} for name, ks in sorted(by_model.items())}
    groups = same_series(means) if groups is None else groups
    shown, drawn = [], set()
    for i, names in enumerate(groups.values()):
        name = next((n for n in names if n in means), None)
        if name is None:  # a group of another panel
            continue
        xs = sorted(means[name])
        ys = [means[name][k] for k in xs]
        # Equal here, not on another panel (`groups`): dashed over the first, so both show.
        again = (tuple(xs), tuple(round(y, 12) for y in ys)) in drawn
        drawn.add((tuple(xs), tuple(round(y, 12) for y in ys)))
        ax.plot(xs, ys, marker="x" if again else "o", linestyle="--" if again else "-",
                color=PALETTE[i % len(PALETTE)], label=" = ".join(names))
        shown += ys
    for j, (name, values) in enumerate(sorted(flat.items())):
        color = PALETTE[(j + len(groups)) % len(PALETTE)]
        ax.axhline(np.mean(values), linestyle="--", linewidth=1, color=color,
                   label=f"{name} (no good images)")
        shown.append(float(np.mean(values)))
    ks = sorted({k for per_k in by_model.values() for k in per_k})
    ax.set_xticks(ks, [str(k) for k in ks])
    low, high = min(shown), max(shown)
    chance = CHANCE_LEVELS.get(metric)
    if chance is not None and chance >= low - 0.1:  # near the data: worth its room on the axis
        ax.axhline(chance, color=REFERENCE_GREYS[1], linewidth=0.8, linestyle=":", label=f"chance ({chance})")
        low = min(low, chance)
    pad = max(0.02, 0.08 * (high - low))
    bounded = chance is not None  # metrics with a chance level live in [0, 1]
    low, high = low - pad, high + pad
    ax.set_ylim(*((max(0.0, low), min(1.01, high)) if bounded else (low, high)))
    ax.set_xlabel("K: good images of the new product")
    ax.set_ylabel(f"{metric} (positive class = {POSITIVE_CLASS})")
    ax.set_title(f"{metric} against K, target: {target}")
    if legend:
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)  # off the lines
    return fig


def plot_metric_vs_k_panels(rows: Sequence[Mapping], metric: str = "image_auroc",
                            targets: Sequence[str] | None = None) -> Figure:
    """plot_metric_vs_k for each target side by side (one shared y axis, each panel titled with
    its target) and one legend for all of them below the panels."""
    targets = list(targets or sorted({str(r["target"]) for r in rows if " k=" in str(r["model"])}))
    if not targets:
        raise DataError("no rows with a K ('... k=K' models) to plot against K")
    # Models share a line only where they are equal on every panel, and keep one colour throughout.
    joint: dict[str, dict[tuple[str, int], float]] = defaultdict(dict)
    for (name, target, k), values in _k_values(rows, metric).items():
        joint[name][target, k] = float(np.mean(values))
    groups = same_series(dict(sorted(joint.items())))
    fig, axes = axes_for(None, 1, len(targets), (4.2, 3.6), "plot_metric_vs_k_panels", sharey=True)
    handles: dict[str, object] = {}
    ranges = []
    for i, (ax, target) in enumerate(zip(axes, targets, strict=True)):
        plot_metric_vs_k(rows, metric, target, ax=ax, legend=False, groups=groups)
        ranges.append(ax.get_ylim())  # before the next panel sets the shared axis
        ax.set_title(target)
        if i:
            ax.set_ylabel("")
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    axes[0].set_ylim(min(r[0] for r in ranges), max(r[1] for r in ranges))  # the union of the panels' ranges
    fig.legend(list(handles.values()), list(handles), loc="outside lower center",
               ncol=min(3, len(handles)), frameon=False)
    return fig


def _k_values(rows: Sequence[Mapping], metric: str) -> dict[tuple[str, str, int], list[float]]:
    """The metric's values per (model, target, K) of the rows named "... k=K"."""
    found: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for row in rows:
        name, _, k = str(row["model"]).rpartition(" k=")
        if name and k.isdigit() and row.get(metric) is not None:
            found[name, str(row["target"]), int(k)].append(float(row[metric]))
    return found
