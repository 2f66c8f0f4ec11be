"""Tests for visinspect.viz.plots and visinspect.viz.widgets: what each figure draws for a fake model."""

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display needed

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.container import BarContainer
from matplotlib.patches import Rectangle
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from visinspect.backbones.cam import HeatmapNormalizer
from visinspect.boxes import Box, heatmap_to_boxes
from visinspect.calibration import Calibration
from visinspect.data.samples import build_sample_table, summarize
from visinspect.data.synthetic import generate_synthetic_dataset
from visinspect.errors import ConfigError, DataError, VisinspectError
from visinspect.metrics import box_hit_rate, classification_metrics
from visinspect.scoring import Predictions, ScoredImages
from visinspect.viz import comparisons, plots, widgets


@pytest.fixture(scope="module")
def preds(tmp_path_factory) -> Predictions:
    """7 synthetic round_pill images (4 good, 3 defective with masks), random logits and CAMs."""
    root = generate_synthetic_dataset(
        tmp_path_factory.mktemp("plots") / "synthetic", image_size=64, n_train_good=2,
        n_test_good=2, n_test_per_defect=1, categories=["round_pill"],
    )
    samples = build_sample_table(root).samples
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(len(samples), 2, generator=g) * 2
    cams = torch.randn(len(samples), 4, 4, generator=g)
    return Predictions(samples, logits, cams, image_size=64)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def rectangles(ax) -> list[tuple[float, float, float, float]]:
    return [
        (p.get_x(), p.get_y(), p.get_width(), p.get_height())
        for p in ax.patches
        if isinstance(p, Rectangle)
    ]


def as_rectangles(boxes: list[Box]) -> list[tuple[float, float, float, float]]:
    return [(b.x0 - 0.5, b.y0 - 0.5, b.width, b.height) for b in boxes]


def test_apply_style_is_idempotent():
    plots.apply_style()
    first = dict(matplotlib.rcParams)
    plots.apply_style()
    assert dict(matplotlib.rcParams) == first
    assert matplotlib.rcParams["image.cmap"] == plots.HEATMAP_CMAP


def test_class_balance_stacks_the_counts(preds):
    summary = summarize(preds.samples)
    fig = plots.plot_class_balance(summary)
    (ax,) = fig.axes
    good, anomaly = ax.containers
    assert [b.get_height() for b in good] == [summary["round_pill"]["good"]]
    assert [b.get_height() for b in anomaly] == [summary["round_pill"]["anomaly"]]
    assert [b.get_y() for b in anomaly] == [summary["round_pill"]["good"]]  # stacked on good
    (ax,) = plots.plot_class_balance(summary, by_split=True).axes
    splits = summary["round_pill"]["splits"]
    good_per_split = [splits["train"]["good"], splits["test"]["good"]]
    assert [b.get_height() for b in ax.containers[0]] == good_per_split


def test_sample_grid_spreads_over_defect_types_and_draws_masks(preds):
    fig = plots.plot_sample_grid(preds.samples, n_per_category=5, image_size=64)
    assert len(fig.axes) == 5  # one category x 5
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["good", "contamination", "crack", "stain", "good"]
    assert [t.get_text() for t in fig.axes[0].texts] == ["round_pill"]  # the row's product
    has_contour = [bool(ax.collections) for ax in fig.axes]
    assert has_contour == [False, True, True, True, False]


def test_overlay_rectangles_hug_pixel_edges():
    _, ax = plt.subplots()
    image = np.zeros((20, 30, 3), np.uint8)
    boxes = [Box(2, 3, 7, 5, 0.9), Box(0, 0, 1, 1, 0.5)]
    plots.overlay(ax, image, heatmap=np.full((20, 30), 0.2), boxes=boxes, mask=np.eye(20, 30) > 0)
    assert rectangles(ax) == [(1.5, 2.5, 5, 2), (-0.5, -0.5, 1, 1)]
    assert ax.images[1].get_clim() == (0.0, 1.0)  # a normalised map keeps the fixed scale
    assert ax.get_xlim() == (-0.5, 29.5)
    with pytest.raises(DataError, match="heatmap has shape"):
        plots.overlay(ax, image, heatmap=np.zeros((10, 10)))
    with pytest.raises(DataError, match="denormalize"):
        plots.overlay(ax, np.full((4, 4, 3), 2.0))


@pytest.mark.parametrize("boxes_for", ["all", "predicted"])
def test_prediction_grid_draws_exactly_the_boxes(preds, boxes_for):
    normalizer = HeatmapNormalizer.fit(preds.cams)
    indices = list(range(len(preds.samples)))  # 7 images: 3 rows of 3, two empty panels
    fig = plots.plot_prediction_grid(
        preds, indices, threshold=0.0, normalizer=normalizer, box_threshold=0.5, min_area=4,
        boxes_for=boxes_for,
    )
    assert len(fig.axes) == 9 + 1  # panels + shared colorbar
    heat = preds.heatmaps(indices, "dataset", normalizer).numpy()
    predicted = preds.margins > 0.0
    assert 0 < predicted.sum() < len(indices)  # the fake model says both
    n_drawn = 0
    for i, ax in zip(indices, fig.axes, strict=False):
        expected = heatmap_to_boxes(heat[i], 0.5, 4) if boxes_for == "all" or predicted[i] else []
        assert rectangles(ax) == as_rectangles(expected)
        n_drawn += len(expected)
        assert f"true: {plots.LABEL_NAMES[preds.samples[i].label]} · predicted: " \
               f"{'anomaly' if predicted[i] else 'good'}" in ax.get_title()
    assert n_drawn > 0
    assert not fig.axes[7].axison and not fig.axes[8].axison


def test_prediction_grid_rejects_bad_input(preds):
    with pytest.raises(DataError, match="out of range"):
        plots.plot_prediction_grid(preds, [99], threshold=0.0)
    with pytest.raises(VisinspectError, match="boxes_for"):
        plots.plot_prediction_grid(preds, [0], threshold=0.0, boxes_for="some")


def test_confusion_matrix_annotations_are_the_counts():
    cm = {"tp": 5, "fn": 2, "fp": 1, "tn": 9}
    (ax,) = plots.plot_confusion_matrix(cm).axes
    cells = {(round(t.get_position()[1] - 0.5), round(t.get_position()[0] - 0.5)): t.get_text()
             for t in ax.texts}
    assert cells == {(0, 0): "5\n71%", (0, 1): "2\n29%", (1, 0): "1\n10%", (1, 1): "9\n90%"}
    assert [t.get_text() for t in ax.get_yticklabels()] == ["anomaly", "good"]
    assert "positive class: anomaly" in ax.get_title()
    metrics = classification_metrics([0, 1, 1], [0.1, 0.9, 0.2], 0.5)  # the whole dict works too
    (ax,) = plots.plot_confusion_matrix(metrics).axes
    assert sorted(t.get_text().split("\n")[0] for t in ax.texts) == ["0", "1", "1", "1"]
    with pytest.raises(DataError, match="tn"):
        plots.plot_confusion_matrix({"tp": 1, "fn": 0, "fp": 0})


def test_roc_pr_curves_and_legends():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(30), np.ones(20)].astype(int)
    scores = rng.normal(size=50) + labels
    roc_ax, pr_ax = plots.plot_roc_pr(labels, scores).axes
    legend = [t.get_text() for t in roc_ax.get_legend().get_texts()]
    assert f"AUROC = {roc_auc_score(labels, scores):.3f}" in legend
    fpr, tpr, _ = roc_curve(labels, scores)
    np.testing.assert_allclose(roc_ax.lines[0].get_xydata(), np.column_stack([fpr, tpr]))
    pr_legend = [t.get_text() for t in pr_ax.get_legend().get_texts()]
    assert pr_legend == [f"AP = {average_precision_score(labels, scores):.3f}", "chance = 0.400"]
    with pytest.raises(DataError, match="both good and anomalous"):
        plots.plot_roc_pr([1, 1], [0.2, 0.3])


def test_history_plots_train_and_validation():
    history = {"loss": [1.0, 0.5, 0.25], "val_loss": [1.1, 0.7, 0.6], "accuracy": [0.5, 0.7, 0.9]}
    loss_ax, acc_ax = plots.plot_history(history).axes
    drawn = [line.get_ydata().tolist() for line in loss_ax.lines]
    assert drawn == [history["loss"], history["val_loss"]]
    assert loss_ax.lines[0].get_xdata().tolist() == [1, 2, 3]
    assert len(acc_ax.lines) == 1
    assert len(plots.plot_history({"loss": [1.0]}).axes) == 1
    with pytest.raises(DataError, match="none of"):
        plots.plot_history({"lr": [0.1]})


def test_history_draws_reference_lines_and_a_validation_only_panel():
    history = {"loss": [1.0, 0.5], "accuracy": [0.5, 0.4], "val_accuracy": [0.6, 0.7],
               "val_recall": [1.0, 0.5]}
    references = {"accuracy": {"always 'good'": 0.64}, "loss": {"chance": 3.43}}
    loss_ax, acc_ax, recall_ax = plots.plot_history(history, references=references).axes
    assert list(loss_ax.lines[-1].get_ydata()) == [3.43, 3.43]
    assert list(acc_ax.lines[-1].get_ydata()) == [0.64, 0.64]
    (legend,) = acc_ax.figure.legends  # one legend for the figure, each label once
    labels = [t.get_text() for t in legend.get_texts()]
    assert "always 'good' (0.64)" in labels and len(labels) == len(set(labels))
    assert all(a.get_legend() is None for a in (loss_ax, acc_ax, recall_ax))
    assert [line.get_ydata().tolist() for line in recall_ax.lines] == [history["val_recall"]]
    # Validation has one colour in every panel, whether or not training is drawn next to it.
    assert recall_ax.lines[0].get_color() == acc_ax.lines[1].get_color() != acc_ax.lines[0].get_color()


def test_score_distributions_per_group():
    labels = np.array([0, 0, 1, 0, 1, 1, 1])
    scores = np.array([-2.0, -1.0, 1.0, 3.0, 4.0, 5.0, 0.5])
    groups = ["bottle", "bottle", "bottle", "screw", "screw", "screw", "screw"]
    fig = plots.plot_score_distributions(labels, scores, threshold=0.7, groups=groups, bins=5)
    assert [ax.get_title() for ax in fig.axes] == ["bottle (2 good, 1 anomaly)", "screw (1 good, 3 anomaly)"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["good", "anomaly", "threshold 0.70"]
    for ax, name in zip(fig.axes, ["bottle", "screw"], strict=True):
        sel = np.array(groups) == name
        heights = [p.get_height() for p in ax.patches]
        assert sum(heights[:5]) == (sel & (labels == 0)).sum()  # good drawn first
        assert sum(heights[5:]) == (sel & (labels == 1)).sum()
        assert ax.lines[0].get_xdata()[0] == 0.7
    assert len(plots.plot_score_distributions(labels, scores).axes) == 1


def test_metric_bars_show_mean_and_std_over_seeds():
    rows = [
        {"model": "seed", "target": "bottle", "seed": s, "auroc": v}
        for s, v in enumerate([0.6, 0.8])
    ] + [{"model": "simclr", "target": "bottle", "seed": 0, "auroc": 0.9},
         {"model": "simclr", "target": "screw", "seed": 0, "auroc": None}]
    (ax,) = comparisons.plot_metric_bars(rows, "auroc").axes
    (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]  # "screw": no value
    assert [round(b.get_height(), 6) for b in bars] == [0.7, 0.9]
    segments = bars.errorbar.lines[2][0].get_segments()
    spans = [s[1, 1] - s[0, 1] for s in segments]
    np.testing.assert_allclose(spans, [2 * np.std([0.6, 0.8], ddof=1), 0])
    assert "mean ± std over 2 seeds" in ax.get_title()
    with pytest.raises(DataError, match="lacks target"):
        comparisons.plot_metric_bars([{"model": "a", "auroc": 1.0}], "auroc")


def test_metric_bars_of_one_seed_say_so_and_draw_the_chance_level():
    rows = [{"model": m, "target": "nut", "seed": 0, "image_auroc": v}
            for m, v in (("baseline", 0.55), ("reference", 0.6))]
    (ax,) = comparisons.plot_metric_bars(rows, "image_auroc").axes
    assert "one seed (0), no spread" in ax.get_title() and "mean ± std" not in ax.get_title()
    (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert bars.errorbar is None  # one seed: no error bars, not empty ones
    (chance,) = ax.lines
    assert list(chance.get_ydata()) == [0.5, 0.5]
    assert "chance (0.5)" in [t.get_text() for t in ax.get_legend().get_texts()]
    (ax,) = comparisons.plot_metric_bars(rows, "image_auroc", chance=0.7).axes
    assert list(ax.lines[0].get_ydata()) == [0.7, 0.7]
    (ax,) = comparisons.plot_metric_bars([{**r, "f1": 0.5} for r in rows], "f1").axes
    assert not ax.lines  # F1 has no chance level independent of the data


def test_model_heatmaps_spell_out_truth_and_prediction_relative_to_each_threshold(preds):
    normalizer = HeatmapNormalizer.fit(preds.cams)
    scored = {"baseline": preds.scored(), "reference k=5": preds.scored()}
    rows = [{"model": "baseline", "target": "all", "threshold": 1.0, "score": "logit margin"},
            {"model": "reference k=5", "target": "all", "threshold": 0.0, "score": "patch distance"}]
    paths = [str(s.path) for s in preds.samples[:2]]
    fig = comparisons.plot_model_heatmaps(scored, {"baseline": normalizer, "reference k=5": None}, paths,
                                    rows=rows)
    *panels, colorbar = fig.axes
    assert len(panels) == 4 and "each model's own" in colorbar.get_ylabel()
    for col, (name, threshold) in enumerate((("baseline", 1.0), ("reference k=5", 0.0))):
        assert panels[col].get_title().startswith(f"{name}\ntrue: ")  # the model, then the verdict
        for row in range(2):
            score = preds.margins[row] - threshold
            title = panels[2 * row + col].get_title()
            truth = plots.LABEL_NAMES[preds.samples[row].label]
            assert f"true: {truth} · predicted: {'anomaly' if score > 0 else 'good'}" in title
            assert f"score − threshold {score:+.2f}" in title
    for row in range(2):  # each row says which product and defect type it shows
        sample = preds.samples[row]
        assert [t.get_text() for t in panels[2 * row].texts] == [f"{sample.category}\n{sample.defect_type}"]


def test_save_figure_writes_png_and_closes(tmp_path):
    fig = plt.figure(figsize=(4, 3))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(np.zeros((30, 40)))
    ax.set_axis_off()
    path = plots.save_figure(fig, tmp_path / "new" / "dir" / "figure.png")
    assert path.stat().st_size > 0
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == (round(4.2 * plots.DPI), round(3.2 * plots.DPI))  # + 0.1 in tight pad
    assert not plt.fignum_exists(fig.number)
    assert [p.name for p in path.parent.iterdir()] == ["figure.png"]  # no temporary file left
    with pytest.raises(VisinspectError, match=r"\.png"):
        plots.save_figure(plt.figure(), tmp_path / "figure.pdf")


def test_threshold_metrics_equal_classification_metrics():
    labels = [0, 0, 1, 1, 1]
    scores = [-1.0, 0.5, 0.2, 2.0, 3.0]
    full = classification_metrics(labels, scores, 0.3)
    m = widgets.threshold_metrics(labels, scores, 0.3)
    assert m == {k: full[k] for k in ("threshold", "precision", "recall", "f1", "accuracy")} | full[
        "confusion_matrix"
    ]
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (2, 1, 1, 1)


def test_boxes_at_and_heatmap_view_agree(preds):
    heat = preds.heatmaps([2], "image").numpy()[0]
    boxes = widgets.boxes_at(preds, 2, box_threshold=0.4, min_area=4, heat_mode="image")
    assert boxes == heatmap_to_boxes(heat, 0.4, 4) and boxes
    fig = widgets.render_heatmap_view(preds, 2, 0.4, 4, "image", None)
    assert rectangles(fig.axes[0]) == as_rectangles(boxes)
    assert len(fig.axes) == 2  # image + colorbar


def test_heatmap_explorer_redraws_with_the_slider_values(preds, monkeypatch):
    calls = []
    render = widgets.render_heatmap_view

    def spy(*args, **kwargs):
        calls.append(args)
        return render(*args, **kwargs)

    monkeypatch.setattr(widgets, "render_heatmap_view", spy)
    box = widgets.heatmap_explorer(preds)
    image, mode, sliders, summary, _ = box.children
    box_threshold, min_area = sliders.children
    assert len(image.options) == len(preds.samples) and "(true: " in image.options[0][0]
    box_threshold.value = 0.3
    mode.value = "image"
    image.value = 3
    assert len(calls) == 4  # the first drawing, then one per change
    assert calls[-1][1:5] == (3, 0.3, min_area.value, "image")
    drawn = widgets.boxes_at(preds, 3, 0.3, min_area.value, "image")
    assert drawn and summary.value.startswith(f"<b>{len(drawn)} box(es)</b> at heat &gt; 0.30")
    assert all(f"({b.x0}, {b.y0}, {b.x1}, {b.y1}) peak {b.score:.2f}" in summary.value for b in drawn)


def test_explorer_labels_are_not_cut_to_the_default_width(preds):
    """ipywidgets cuts descriptions at 80 px ("min area (…") unless their width is 'initial'."""
    controls = [*widgets.heatmap_explorer(preds).children[:2],
                *widgets.heatmap_explorer(preds).children[2].children,
                widgets.threshold_explorer([0, 1], [0.0, 1.0]).children[0]]
    assert all(c.style.description_width == "initial" for c in controls)


def test_threshold_explorer_starts_at_the_model_threshold_and_updates_the_table():
    labels = [0, 0, 1, 1, 1]
    scores = [-1.0, 0.5, 0.2, 2.0, 3.0]
    box = widgets.threshold_explorer(labels, scores, threshold=0.3)
    slider, (table, _) = box.children[0], box.children[1].children
    assert slider.value == 0.3 and "anomaly if score > 0.30" in table.value
    assert [v for _, v in slider.options] == widgets.threshold_positions(scores, 0.3).tolist()
    slider.index += 1  # one step right: past the next score (0.5), one false alarm less
    m = widgets.threshold_metrics(labels, scores, slider.value)
    assert slider.value == 1.25 and (m["fp"], m["tp"]) == (0, 2)
    assert f"{m['recall']:.3f}" in table.value and "anomaly if score > 1.25" in table.value


def flagged_counts(scores, stops) -> list[int]:
    return [int((np.asarray(scores) > t).sum()) for t in stops]


def test_threshold_positions_reach_every_decision_once_and_start_at_the_threshold():
    # Skewed like logit margins: a crowd near 0, a long tail, a tie.
    scores = [-1.22, -0.5, -0.1, 0.0, 0.2, 0.2, 0.86, 3.0, 40.0, 90.37]
    stops = widgets.threshold_positions(scores, threshold=0.441)
    assert np.all(np.diff(stops) > 0)
    assert stops[0] < min(scores) and stops[-1] == max(scores)
    assert 0.441 in stops
    # All flagged ... none flagged, one stop per distinct outcome (9 distinct scores: 10 outcomes).
    assert flagged_counts(scores, stops) == [10, 9, 8, 7, 6, 4, 3, 2, 1, 0]
    assert stops[list(stops).index(0.441) - 1] == pytest.approx(0.1)  # midpoint of 0.0 and 0.2


def test_threshold_positions_keep_an_outside_threshold_and_handle_equal_scores():
    assert widgets.threshold_positions([1.0, 2.0], threshold=-5.0).tolist() == [-5.0, 1.5, 2.0]
    # Above every score: the threshold is the "none flagged" stop itself.
    assert widgets.threshold_positions([1.0, 2.0], threshold=9.0).tolist() == [0.99, 1.5, 9.0]
    assert widgets.threshold_positions([3.0, 3.0], threshold=0.0).tolist() == [0.0, 3.0]
    with pytest.raises(DataError, match="finite"):
        widgets.threshold_positions([1.0, float("nan")])
    with pytest.raises(DataError, match="at least one score"):
        widgets.threshold_positions([])
    with pytest.raises(ConfigError, match="max_steps"):
        widgets.threshold_positions([1.0, 2.0], max_steps=0)


def test_threshold_positions_of_many_scores_move_past_equal_shares_of_images():
    scores = np.random.default_rng(0).lognormal(0.0, 2.0, 5000) - 1.0  # skewed, one long tail
    stops = widgets.threshold_positions(scores, threshold=0.0, max_steps=100)
    assert np.all(np.diff(stops) > 0) and 101 <= len(stops) <= 102 and 0.0 in stops
    assert stops[0] < scores.min() and stops[-1] == scores.max()
    passed = -np.diff(flagged_counts(scores, stops))
    assert passed.sum() == len(scores)
    without_threshold = np.delete(passed, [i for i in (np.argmax(stops == 0.0) - 1,
                                                       np.argmax(stops == 0.0)) if 0 <= i < len(passed)])
    assert without_threshold.min() >= 49 and without_threshold.max() <= 51  # 5000 / 100 per step


def test_metric_vs_k_draws_one_line_per_few_good_parts_model():
    from visinspect.viz.comparisons import plot_metric_vs_k

    rows = [
        {"model": "baseline", "target": "all", "image_auroc": 0.7},
        {"model": "reference k=5", "target": "all", "image_auroc": 0.6},
        {"model": "reference k=10", "target": "all", "image_auroc": 0.8},
        {"model": "fused k=5", "target": "all", "image_auroc": 0.65},
        {"model": "fused k=10", "target": "all", "image_auroc": 0.9},
        {"model": "fused k=10", "target": "bottle", "image_auroc": 0.1},  # other target: ignored
    ]
    ax = plot_metric_vs_k(rows).axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert list(lines["fused"].get_xdata()) == [5, 10]
    assert list(lines["fused"].get_ydata()) == [0.65, 0.9]
    assert lines["baseline (no good images)"].get_ydata()[0] == 0.7
    assert list(lines["chance (0.5)"].get_ydata()) == [0.5, 0.5]  # near the data: drawn
    assert ax.get_ylim()[0] < 0.5 and ax.get_ylim()[1] < 1.0  # the axis spans the data, not 0..1


def test_box_threshold_on_defect_gives_the_boxes_that_best_match_the_defect(preds):
    defective = [i for i, s in enumerate(preds.samples) if s.mask_path is not None]
    good = next(i for i, s in enumerate(preds.samples) if s.label == 0)
    assert widgets.box_threshold_on_defect(preds, good, 4, "image") is None  # no mask, no defect
    grid = [round(k * widgets.BOX_STEP, 10) for k in range(round(1 / widgets.BOX_STEP))]
    for i in defective:
        mask = preds.masks([i])
        t = widgets.box_threshold_on_defect(preds, i, 4, "image")
        assert t in grid
        chosen = box_hit_rate(mask, [widgets.boxes_at(preds, i, t, 4, "image")])
        assert chosen["box_hit_rate"] > 0
        for other in grid:
            found = widgets.boxes_at(preds, i, other, 4, "image")
            match = box_hit_rate(mask, [found]) if found else {"box_hit_rate": 0, "mean_iou": 0}
            assert match["box_hit_rate"] == 0 or match["mean_iou"] <= chosen["mean_iou"]


def test_heatmap_explorer_opens_on_a_box_on_the_defect(preds):
    i = next(i for i, s in enumerate(preds.samples) if s.mask_path is not None)
    mode, t = widgets.explorer_start(preds, i, min_area=4)
    image, heat_mode, sliders, summary, _ = widgets.heatmap_explorer(preds, index=i, min_area=4).children
    assert (image.value, heat_mode.value, sliders.children[0].value) == (i, mode, t)
    drawn = widgets.boxes_at(preds, i, t, 4, mode)
    assert drawn and summary.value.startswith(f"<b>{len(drawn)} box(es)</b>")
    assert box_hit_rate(preds.masks([i]), [drawn])["box_hit_rate"] > 0
    # Given settings win; an image without a defect opens at the dataset scale and 0.5.
    given = widgets.heatmap_explorer(preds, index=i, heat_mode="image", box_threshold=0.7).children
    assert (given[1].value, given[2].children[0].value) == ("image", 0.7)
    good = next(i for i, s in enumerate(preds.samples) if s.label == 0)
    assert widgets.explorer_start(preds, good) == ("dataset", 0.5)


def test_metric_vs_k_names_methods_with_the_same_values_on_one_line():
    from visinspect.viz.comparisons import plot_metric_vs_k

    rows = [{"model": f"{m} k={k}", "target": "all", "image_auroc": v}
            for m in ("a", "a+rule") for k, v in ((5, 0.9), (10, 0.95))]
    rows += [{"model": "b k=5", "target": "all", "image_auroc": 0.92},
             {"model": "b k=10", "target": "all", "image_auroc": 0.93}]
    ax = plot_metric_vs_k(rows).axes[0]
    labels = [ln.get_label() for ln in ax.get_lines()]
    assert labels == ["a = a+rule", "b"]  # no line hidden under another; chance (0.5) too far below
    assert 0.85 < ax.get_ylim()[0] < 0.9 and ax.get_legend() is not None


def test_metric_vs_k_panels_have_one_legend_below_and_a_title_per_product():
    from visinspect.viz.comparisons import plot_metric_vs_k_panels

    rows = [{"model": f"a k={k}", "target": t, "image_auroc": v}
            for t, v in (("nut", 0.7), ("fabric", 0.9)) for k in (2, 5)]
    rows += [{"model": "baseline", "target": t, "image_auroc": 0.8} for t in ("nut", "fabric")]
    fig = plot_metric_vs_k_panels(rows)
    assert [ax.get_title() for ax in fig.axes] == ["fabric", "nut"]
    assert all(ax.get_legend() is None for ax in fig.axes) and len(fig.legends) == 1
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["a", "baseline (no good images)"]


@pytest.fixture
def good_parts(preds) -> dict[int, widgets.GoodPartsRun]:
    """Two runs (K = 2, 5) over the fixture's images: patch distance 1 everywhere, 5 under each
    defect; calibrated threshold 2 at K = 2 and 4 at K = 5 (more good parts, another threshold)."""
    masks = torch.tensor(preds.masks()).float()[:, None]
    under = torch.nn.functional.adaptive_max_pool2d(masks, (8, 8))[:, 0] > 0
    maps = torch.where(under, 5.0, 1.0)
    scored = ScoredImages(preds.samples, maps.flatten(1).amax(1).double().numpy(), maps, 64)
    return {2: widgets.GoodPartsRun(scored, {"round_pill": 2.0}),
            5: widgets.GoodPartsRun(scored, {"round_pill": 4.0})}


def test_good_parts_state_boxes_what_is_above_the_threshold(preds, good_parts):
    defective = next(i for i, s in enumerate(preds.samples) if s.label == 1 and s.mask_path)
    good = next(i for i, s in enumerate(preds.samples) if s.label == 0)
    state = widgets.good_parts_state(good_parts, defective, 2)
    assert state.hit and state.boxes and state.anomalous and state.score == 2.5  # 5 / 2
    assert state.heat.max() == 1.0  # 5 / 2 / HEAT_SPAN, clipped
    quiet = widgets.good_parts_state(good_parts, good, 2)
    assert not quiet.boxes and not quiet.anomalous and quiet.score == 0.5
    low = widgets.good_parts_state(good_parts, defective, 2, threshold=0.4)  # 0.8 < 1: every patch
    assert low.anomalous and [b.area for b in low.boxes] == [64 * 64]
    flat = widgets.good_parts_state(good_parts, good, 2, threshold=0.4)
    assert flat.anomalous and not flat.boxes  # a constant map has nothing to localise
    # More good parts, a higher calibrated threshold here: the defect now scores 5 / 4.
    assert widgets.good_parts_state(good_parts, defective, 5).score == 1.25
    assert not widgets.good_parts_state(good_parts, defective, 5, threshold=1.5).boxes
    with pytest.raises(ConfigError, match="K = 3"):
        widgets.good_parts_state(good_parts, defective, 3)
    with pytest.raises(ConfigError, match="threshold"):
        widgets.good_parts_state(good_parts, defective, 2, threshold=0.0)


def test_good_parts_runs_adapt_to_the_first_k_good_parts_of_each_product(preds):
    adapted = []

    class Fake:
        def __init__(self):
            self.calibrations = {}

        def adapt(self, parts):
            adapted.append([s.path.name for s in parts])
            self.calibrations[parts[0].category] = Calibration(
                parts[0].category, len(parts), 0.01, float(len(parts)), "quantile", HeatmapNormalizer(0, 1))

        def raw(self, samples):
            return ScoredImages(list(samples), np.zeros(len(samples)), torch.zeros(len(samples), 2, 2), 64)

    good = {"round_pill": [s for s in preds.samples if s.label == 0][:3]}
    runs = widgets.good_parts_runs(Fake, good, preds.samples[:2], [3, 1])
    assert sorted(runs) == [1, 3] and runs[3].thresholds == {"round_pill": 3.0}
    assert [len(a) for a in adapted] == [1, 3] and adapted[1][:1] == adapted[0]


def test_good_parts_explorer_opens_on_a_box_on_a_defect_and_redraws(preds, good_parts, monkeypatch):
    calls = []
    render = widgets.render_good_parts_view

    def spy(runs, state, ax=None):
        calls.append(state)
        return render(runs, state, ax)

    monkeypatch.setattr(widgets, "render_good_parts_view", spy)
    box = widgets.good_parts_explorer(good_parts, k=2)
    image, (k_slider, t_slider), summary, _ = box.children[0], box.children[1].children, *box.children[2:]
    assert calls[0].hit and image.value == widgets.first_box_on_a_defect(good_parts, 2)
    assert "predicted anomaly" in summary.value and "1 box(es)" in summary.value
    k_slider.value = 5
    assert calls[-1].k == 5 and calls[-1].score == 1.25
    t_slider.value = 1.5
    assert calls[-1].threshold == 1.5 and not calls[-1].boxes and "0 box(es)" in summary.value
    assert len(calls) == 3  # the first drawing, then one per change
    assert all(c.style.description_width == "initial" for c in (image, k_slider, t_slider))
    fig = widgets.render_good_parts_view(good_parts, calls[0])
    assert rectangles(fig.axes[0]) == as_rectangles(calls[0].boxes)


def test_metric_vs_k_panels_keep_one_colour_per_method_and_every_point_in_view():
    from visinspect.viz.comparisons import plot_metric_vs_k_panels

    # a and a+rule are equal on "nut" only: two lines there too, in the colours of "pcb".
    rows = [{"model": f"{m} k={k}", "target": t, "image_auroc": v}
            for t, m, v in (("nut", "a", 0.9), ("nut", "a+rule", 0.9), ("pcb", "a", 0.4),
                            ("pcb", "a+rule", 0.95)) for k in (2, 5)]
    fig = plot_metric_vs_k_panels(rows)
    colours = [{ln.get_label(): ln.get_color() for ln in ax.get_lines()} for ax in fig.axes]
    assert colours[0]["a"] == colours[1]["a"] != colours[0]["a+rule"] == colours[1]["a+rule"]
    low, high = fig.axes[0].get_ylim()
    assert low < 0.4 and high > 0.95  # the shared axis spans every panel's points
