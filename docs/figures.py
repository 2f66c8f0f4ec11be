"""The pictures of the method, drawn by the project from its own code and real tensors.

Every shape, number and map in these figures comes from running the model on a real image: the
shapes on the training diagram from a forward pass, the CAM pieces from conv5_3 and the dense layer
(checked to sum to `cam.anomaly_cam`), the boxes from `boxes.heatmap_to_boxes`. So the figures in
docs/ cannot disagree with what the code does. Regenerate them with
`python docs/figures.py --out docs/` (a script beside the pages it draws, not a library module).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import cv2
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import LinearSegmentedColormap, to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import ConnectionPatch, FancyBboxPatch

from visinspect import __version__
from visinspect.backbones.cam import HeatmapNormalizer, anomaly_cam, upsample
from visinspect.backbones.vgg16 import ANOMALY, CLASS_NAMES, VGG16CAM, build_model
from visinspect.boxes import heatmap_to_boxes
from visinspect.checkpoint import load_classifier
from visinspect.data.samples import Sample, build_sample_table, denormalize, load_rgb, to_tensor
from visinspect.data.synthetic import generate_synthetic_dataset
from visinspect.errors import CheckpointError, ConfigError, VisinspectError
from visinspect.evaluate import DEFAULT_BOX_THRESHOLD, DEFAULT_MIN_AREA
from visinspect.experiments.demo import TARGET, demo_model, demo_split
from visinspect.metrics import classification_metrics
from visinspect.scoring import Predictions, predict
from visinspect.training import TrainConfig
from visinspect.utils import set_seed
from visinspect.viz.plots import (
    BOX_COLOR,
    COLORS,
    DPI,
    FONT_SIZES,
    HEATMAP_CMAP,
    PALETTE,
    apply_style,
    overlay,
    plot_confusion_matrix,
    plot_prediction_grid,
    save_figure,
)

SMALL_IMAGE_SIZE = 64  # small mode: conv5_3 maps of 4 x 4, enough to draw every figure
BOX_THRESHOLDS = (0.3, 0.6)  # the two thresholds compared in heatmap_to_bbox.png
N_TILES = 4  # feature maps drawn as tiles in the head and CAM figures
FROZEN_FACE, TRAINED_FACE = "#d9d9d9", "#cfcbe8"  # grey = frozen; light PALETTE[2] = trained
LOSS_FACE = "#fbe3cf"  # light anomaly orange
CAPTION_COLOR = "#555555"
# Signed contributions: green pushes towards "good", orange towards "anomaly" (the class colours).
SIGNED_CMAP = LinearSegmentedColormap.from_list(
    "good_anomaly", [COLORS["good"], "#ffffff", COLORS["anomaly"]]
)


@dataclass
class Source:
    """What every figure is drawn from: a model, its test predictions and one example image."""

    model: VGG16CAM
    info: dict
    preds: Predictions
    threshold: float  # on the logit margin
    normalizer: HeatmapNormalizer
    example: int  # index in preds of the defective image that the diagrams follow
    x: torch.Tensor  # that image as the model sees it (1, 3, S, S)
    maps: torch.Tensor  # its conv5_3 maps (1, 512, h, w), float32
    caption: str

    @property
    def size(self) -> int:
        return self.preds.image_size

    @property
    def sample(self) -> Sample:
        return self.preds.samples[self.example]

    def image(self) -> np.ndarray:
        return denormalize(self.x[0])

    def mask(self) -> np.ndarray:
        return self.preds.masks([self.example])[0]

    def heat(self, mode: str = "dataset") -> np.ndarray:
        """The example's upsampled heatmap in [0, 1], on the dataset scale or min-max per image."""
        return self.preds.heatmaps([self.example], mode, self.normalizer)[0].numpy()


# ----------------------------------------------------------------------------- loading


def _model(checkpoint, image_size, small, weights) -> tuple[VGG16CAM, dict, str]:
    """The model, its checkpoint info and a few words on where it came from."""
    if small:
        if checkpoint is not None:
            raise ConfigError("small mode draws an untrained random-weight model: drop the "
                              "checkpoint, or leave small mode off to draw the checkpoint")
        set_seed(0)
        model, provenance = build_model("random")
        size = image_size or SMALL_IMAGE_SIZE
        info = {"image_size": size, "threshold": 0.0, "normalizer": None, "backbone": provenance}
        return model.eval(), info, "untrained (small mode)"
    if checkpoint is not None:
        model, info = load_classifier(checkpoint)
        label = f"checkpoint {Path(checkpoint).name}"
    else:
        model, info = demo_model(weights=weights)
        label = "demo checkpoint"
    if image_size is not None and image_size != info["image_size"]:
        raise CheckpointError(
            f"the {label} was trained at {info['image_size']} px, but {image_size} px was asked "
            "for; leave the image size out"
        )
    return model.eval(), info, label


def _backbone_words(provenance: dict) -> str:
    source = provenance.get("source", "unknown")
    if source == "random":
        return "RANDOM init"
    return f"ImageNet VGG16 ({source.split(':')[0]})"


def load_source(
    checkpoint: Path | None = None,
    *,
    image_size: int | None = None,
    small: bool = False,
    weights="auto",
    tiny_root: Path | None = None,
) -> Source:
    """Model + predictions on the synthetic test products (never seen in training) + an example.

    Small mode takes a random-weight model and writes a tiny synthetic set to `tiny_root`.
    """
    if small and tiny_root is None:
        raise ConfigError("small mode needs a new folder for its tiny dataset: pass tiny_root")
    model, info, label = _model(checkpoint, image_size, small, weights)
    size = int(info["image_size"])
    if small:
        root = generate_synthetic_dataset(
            tiny_root, image_size=SMALL_IMAGE_SIZE,
            n_train_good=1, n_test_good=2, n_test_per_defect=1, categories=TARGET,
        )
        samples, data = build_sample_table(root).samples, "tiny synthetic set seed 0"
    else:
        samples, data = demo_split()[2], "synthetic dataset seed 0"
    # fp32 so that the maps recomputed below match these CAMs to float rounding.
    preds = predict(model, samples, size, precision="fp32")
    norm = info.get("normalizer")
    normalizer = HeatmapNormalizer.from_dict(norm) if norm else HeatmapNormalizer.fit(
        upsample(preds.cams, size)
    )
    # The diagrams follow the highest-scoring defective image that has a ground-truth mask.
    masked = [i for i, s in enumerate(preds.samples) if s.label == 1 and s.mask_path is not None]
    if not masked:
        raise VisinspectError("the test products have no defective image with a mask to draw")
    example = max(masked, key=lambda i: preds.margins[i])
    x = to_tensor(load_rgb(preds.samples[example].path), size)[None]
    with torch.no_grad():
        maps = model.feature_maps(x).float()
    caption = (
        f"visinspect {__version__} · {data} · test products {', '.join(TARGET)} "
        f"({len(samples)} images) · {size} px · backbone: "
        f"{_backbone_words(info.get('backbone', {}))} · {label}"
    )
    threshold = float(info.get("threshold", 0.0))  # 0.0 on the margin is P(anomaly) > 0.5
    return Source(model, info, preds, threshold, normalizer, example, x, maps, caption)


# ----------------------------------------------------------------------------- helpers


def _new_figure(size: tuple[float, float]) -> Figure:
    apply_style()
    return plt.figure(figsize=size, layout="constrained")


def _caption(fig: Figure, src: Source, extra: str = "") -> None:
    """The provenance line under every figure (save_figure's tight box keeps it)."""
    text = src.caption + (f" · {extra}" if extra else "")
    fig.text(0.005, -0.005, text, ha="left", va="top", fontsize=FONT_SIZES["tick"] - 1,
             color=CAPTION_COLOR, wrap=True)


def _name(src: Source) -> str:
    s = src.sample
    return f"{s.category}/{s.defect_type}/{s.path.name}"


def _arrow(fig: Figure, a, b) -> None:
    """An arrow from the right edge of axes a to the left edge of axes b."""
    fig.add_artist(ConnectionPatch((1.02, 0.5), (-0.02, 0.5), "axes fraction", "axes fraction",
                                   axesA=a, axesB=b, arrowstyle="-|>", mutation_scale=14,
                                   color="black", lw=1.2))


def _signed(ax, values: np.ndarray, vmax: float):
    return ax.imshow(values, cmap=SIGNED_CMAP, vmin=-vmax, vmax=vmax, interpolation="nearest")


def _tile(ax, title: str = "", xlabel: str = "") -> None:
    """A framed map without ticks, with a title and a few words under it."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_color("#999999")
    ax.set_title(title, fontsize=FONT_SIZES["label"])
    ax.set_xlabel(xlabel, fontsize=FONT_SIZES["tick"])


def _symbol(ax, text: str) -> None:
    """An axes that only holds an operator such as +, = or an ellipsis."""
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=22, transform=ax.transAxes)


# ----------------------------------------------------------------------------- 1. training


def _segments(model: VGG16CAM) -> list[tuple[str, torch.nn.Sequential, bool]]:
    """model.features cut after every max-pool and at the frozen boundary: (name, layers, frozen).

    Names follow VGG's convention (conv<block>_<n>), counted from the layers themselves.
    """
    names, cuts, block, conv = [], {0, model.frozen_end, len(model.features)}, 1, 0
    for i, layer in enumerate(model.features):
        if isinstance(layer, torch.nn.Conv2d):
            conv += 1
            names.append(f"conv{block}_{conv}")
        elif isinstance(layer, torch.nn.MaxPool2d):
            names.append(f"pool{block}")
            cuts.add(i + 1)
            block, conv = block + 1, 0
        else:
            names.append("")
    out = []
    for start, end in pairwise(sorted(cuts)):
        layers = model.features[start:end]
        convs = [n for n in names[start:end] if n.startswith("conv")]
        pools = [n for n in names[start:end] if n.startswith("pool")]
        label = f"{convs[0]} … {convs[-1]}" if len(convs) > 2 else ", ".join(convs)
        label = "\n+ ".join(filter(None, [label, *pools]))
        params = list(layers.parameters())
        # What training will update, read from the parameters (a lone pool has none).
        frozen = not any(p.requires_grad for p in params) if params else end <= model.frozen_end
        out.append((label, layers, frozen))
    return out


def _shape(t: torch.Tensor) -> str:
    return "×".join(str(d) for d in t.shape[1:])


def _n_params(module: torch.nn.Module) -> str:
    n = sum(p.numel() for p in module.parameters())
    return f"{n / 1e6:.1f} M params" if n >= 1e5 else f"{n:,} params"


def _stages(src: Source) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """The boxes of the training diagram, (text, face colour, output shape), in two rows:
    the VGG16 conv layers, then head and loss. Shapes come from running the example image."""
    model, h = src.model, src.x
    backbone = []
    for label, layers, frozen in _segments(model):
        h = layers(h)
        mark = "❄ frozen" if frozen else "trained"
        backbone.append((f"{label}\n{_n_params(layers)}\n{mark}",
                         FROZEN_FACE if frozen else TRAINED_FACE, _shape(h)))
    pooled = h.mean(dim=(2, 3))
    logits = model.fc(pooled)
    if not torch.allclose(logits, model(src.x), atol=1e-4):
        raise VisinspectError("the pipeline drawn does not reproduce the model's output")
    weights = src.info.get("config", {}).get("class_weights", TrainConfig().class_weights)
    good, bad = (f"{w:g}" for w in weights)
    head = [
        ("global average\npooling\nno params", "white", _shape(pooled)),
        (f"dense 512→2\n{_n_params(model.fc)}\ntrained", TRAINED_FACE, _shape(logits)),
        (f"2 logits (this image)\ngood {logits[0, 0]:.2f}\nanomaly {logits[0, ANOMALY]:.2f}",
         "white", ""),
        (f"weighted\ncross-entropy\ngood {good} : anomaly {bad}", LOSS_FACE, ""),
    ]
    return backbone, head


def figure_train_pipeline(src: Source) -> Figure:
    """Image → frozen VGG16 blocks → trained conv5 (top row), then GAP → dense → 2 logits →
    weighted loss (bottom row, right to left), with the gradients' way back."""
    backbone, head = _stages(src)
    step, width, height, top_y, low_y = 2.05, 1.3, 1.25, 3.0, 0.95
    ncols = len(backbone) + 1
    fig = _new_figure((step * ncols + 0.6, 5.0))
    ax = fig.add_subplot()
    ax.set_xlim(-0.1, step * ncols + 0.5)
    ax.set_ylim(0.05, top_y + height + 0.45)
    ax.set_aspect("equal")
    ax.set_axis_off()
    small = FONT_SIZES["tick"] - 1

    def box(col: int, y: float, text: str, face: str) -> float:
        x0 = col * step + (step - width) / 2
        ax.add_patch(FancyBboxPatch((x0, y), width, height, boxstyle="round,pad=0.03",
                                    facecolor=face, edgecolor="#444444", lw=1.0))
        ax.text(x0 + width / 2, y + height / 2, text, ha="center", va="center",
                fontsize=FONT_SIZES["tick"])
        return x0

    def arrow(start, end, label: str = "") -> None:
        ax.annotate("", end, start, arrowprops={"arrowstyle": "-|>", "color": "black", "lw": 1.1})
        mid = ((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 0.07)
        ax.text(*mid, label, ha="center", va="bottom", fontsize=small, color="#333333")

    # Top row: the image and the VGG16 conv layers, left to right.
    x_img = (step - height) / 2
    ax.imshow(src.image(), extent=(x_img, x_img + height, top_y, top_y + height))
    ax.text(x_img + height / 2, top_y - 0.1, f"input image\n{_name(src)}", ha="center",
            va="top", fontsize=small)
    right, shape, mid_top = x_img + height, _shape(src.x), top_y + height / 2
    for col, (text, face, out_shape) in enumerate(backbone, start=1):
        x0 = box(col, top_y, text, face)
        arrow((right, mid_top), (x0, mid_top), shape)
        right, shape = x0 + width, out_shape
    frozen = [c for c, (_, face, _) in enumerate(backbone, start=1) if face == FROZEN_FACE]
    if frozen:
        ax.text((frozen[0] + frozen[-1] + 1) / 2 * step, top_y + height + 0.15,
                "❄ frozen ImageNet layers: not trained, run once per image and cached (train.py)",
                ha="center", fontsize=FONT_SIZES["label"], color="#444444")
    # Bottom row: the head and the loss, right to left under the last conv layer.
    last = ncols - 1
    centre = last * step + step / 2
    arrow((centre, top_y), (centre, low_y + height))
    ax.text(centre + 0.08, (top_y + low_y + height) / 2, shape, va="center", fontsize=small,
            color="#333333")
    cols = range(last, last - len(head), -1)
    left = None
    for col, (text, face, out_shape) in zip(cols, head, strict=True):
        x0 = box(col, low_y, text, face)
        if left is not None:
            arrow((left, low_y + height / 2), (x0 + width, low_y + height / 2), shape)
        left, shape = x0, out_shape
    loss_col = last - len(head) + 1
    arrow((left - (step - width) - 0.35, low_y + height / 2), (left, low_y + height / 2))
    ax.text(left - (step - width) - 0.4, low_y + height / 2, "true label\n0 good\n1 anomaly",
            ha="right", va="center", fontsize=FONT_SIZES["tick"])
    # The way back: from the loss, under the head, up the right side into the last conv layer.
    under, side = low_y - 0.3, ncols * step + 0.25
    back = {"color": COLORS["anomaly"], "lw": 1.3, "ls": "--"}
    loss_x = loss_col * step + step / 2
    ax.plot([loss_x, loss_x, side, side], [low_y, under, under, mid_top], **back)
    ax.annotate("", (last * step + (step + width) / 2, mid_top), (side, mid_top),
                arrowprops={"arrowstyle": "-|>", "color": back["color"], "lw": back["lw"],
                            "linestyle": "--"})
    dense_x = (last - 1) * step + step / 2
    ax.annotate("", (dense_x, low_y), (dense_x, under),
                arrowprops={"arrowstyle": "-|>", "color": back["color"], "lw": back["lw"],
                            "linestyle": "--"})
    ax.text((loss_x + side) / 2, under - 0.08, "backpropagation: the gradients update only the "
            "trained (coloured) parts", ha="center", va="top", fontsize=FONT_SIZES["label"],
            color=COLORS["anomaly"])
    fig.suptitle("Training the VGG16-CAM classifier (shapes: channels×height×width, "
                 "measured by running the image through the model)")
    _caption(fig, src)
    return fig


# ----------------------------------------------------------------------------- 2. inference


def _decision(src: Source) -> str:
    i = src.example
    logits = src.preds.logits[i]
    margin, p = float(src.preds.margins[i]), float(src.preds.probabilities[i])
    verdict = CLASS_NAMES[int(margin > src.threshold)]
    return (
        f"logits: good {logits[0]:.2f}, anomaly {logits[ANOMALY]:.2f}\n"
        f"margin = anomaly − good = {margin:.2f}\n"
        f"P(anomaly) = softmax = {p:.3f}\n\n"
        f"threshold on the margin: {src.threshold:.2f}\n"
        f"(P = {1 / (1 + np.exp(-src.threshold)):.3f}),\n"
        f"{src.info.get('threshold_rule', 'the default')}\n\n"
        f"predicted: {verdict}\ntrue: {CLASS_NAMES[src.sample.label]}"
    )


def _cam_values(ax, cam: np.ndarray) -> None:
    """A raw CAM with its value written in each cell when there are few (colour scale otherwise)."""
    im = ax.imshow(cam, cmap=HEATMAP_CMAP, interpolation="nearest")
    if cam.size > 64:
        ax.figure.colorbar(im, ax=ax, location="bottom", shrink=0.8)
        return
    middle = (cam.max() + cam.min()) / 2
    for (r, c), v in np.ndenumerate(cam):
        ax.text(c, r, f"{v:.0f}" if abs(v) >= 10 else f"{v:.2g}", ha="center", va="center",
                fontsize=FONT_SIZES["tick"] - 1, color="black" if v > middle else "white")


def figure_inference_pipeline(src: Source) -> Figure:
    """Image → raw CAM → upsampled normalised heatmap → boxes, with the decision written out."""
    cam = src.preds.cams[src.example].numpy()
    heat = src.heat()
    boxes = heatmap_to_boxes(heat, DEFAULT_BOX_THRESHOLD, DEFAULT_MIN_AREA)
    fig = _new_figure((15.5, 4.0))
    axes = fig.subplots(1, 5, gridspec_kw={"wspace": 0.15})
    overlay(axes[0], src.image(), mask=src.mask())
    axes[0].set_title(f"1 · input image, {src.size}×{src.size}\n{_name(src)}\n"
                      "(green: true defect outline)")
    _cam_values(axes[1], cam)
    _tile(axes[1], f"2 · anomaly CAM, {cam.shape[0]}×{cam.shape[1]}\nΣ_k w_k·A_k over 512 "
          "conv5_3 maps\n(raw values)")
    overlay(axes[2], src.image(), heat)
    axes[2].set_title(f"3 · bilinear upsampling to {src.size}×{src.size},\nscaled to [0, 1] "
                      f"(dataset scale:\nlow {src.normalizer.low:.3g}, high "
                      f"{src.normalizer.high:.3g})")
    overlay(axes[3], src.image(), boxes=boxes, mask=src.mask())
    axes[3].set_title(f"4 · boxes: regions of heat > {DEFAULT_BOX_THRESHOLD}\n"
                      f"(≥ {DEFAULT_MIN_AREA} px): {len(boxes)} box(es)\n(cyan)")
    axes[4].set_axis_off()
    axes[4].text(0.02, 0.5, _decision(src), va="center", ha="left",
                 fontsize=FONT_SIZES["label"], transform=axes[4].transAxes, linespacing=1.4)
    axes[4].set_title("5 · image-level decision")
    for a, b in pairwise(axes[:4]):
        _arrow(fig, a, b)
    fig.suptitle("Inference: one forward pass gives the class scores and the heatmap; "
                 "the heatmap gives the boxes")
    _caption(fig, src)
    return fig


# ----------------------------------------------------------------------------- 3. the head


def _bars(ax, values: np.ndarray, signed: bool, highlight=(), ylabel: str = "") -> None:
    """One bar per channel k = 0..511; signed bars coloured by the class they push towards."""
    k = np.arange(values.size)
    colors = np.where(values >= 0, COLORS["anomaly"], COLORS["good"]) if signed else PALETTE[2]
    # One LineCollection instead of 512 bar patches: the same picture, drawn far faster.
    ax.vlines(k, 0, values, colors=colors, linewidth=1.3)
    for j in highlight:
        ax.axvline(j, color="black", lw=0.6, ls=":")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlim(-1, values.size)
    ax.set_ylabel(ylabel)


def figure_classification_head(src: Source) -> Figure:
    """512 conv5_3 maps → GAP → 512 numbers → dot product with the anomaly weights = the logit."""
    maps = src.maps[0]
    pooled = maps.mean(dim=(1, 2))
    w, b = src.model.fc.weight[ANOMALY].detach(), float(src.model.fc.bias[ANOMALY])
    products = (w * pooled).numpy()
    logit = float(products.sum()) + b
    model_logit = float(src.model(src.x)[0, ANOMALY])
    if not np.isclose(logit, model_logit, rtol=1e-4, atol=1e-3):
        raise VisinspectError(f"dot product {logit} differs from the model's logit {model_logit}")
    shown = torch.argsort(pooled, descending=True)[:N_TILES].sort().values.tolist()
    n, (h, wd) = maps.shape[0], maps.shape[1:]
    fig = _new_figure((13.0, 9.0))
    top, rest = fig.subfigures(2, 1, height_ratios=[1, 2.6])
    tiles = top.subplots(1, N_TILES + 2)
    vmax = float(maps[shown].max())
    for ax, k in zip(tiles, shown, strict=False):
        ax.imshow(maps[k].numpy(), cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
        _tile(ax, f"A_{k}  ({h}×{wd})", f"mean a_{k} = {pooled[k]:.3f}")
    _symbol(tiles[N_TILES], "…")
    tiles[N_TILES + 1].set_axis_off()
    tiles[N_TILES + 1].text(
        0.0, 0.5, f"{n} conv5_3 maps A_k\nof the input image;\nshown: the {N_TILES} most "
        "active\n(after ReLU: ≥ 0,\nmany are all zero)", va="center",
        transform=tiles[N_TILES + 1].transAxes)
    top.suptitle(f"Classification head on {_name(src)}: global average pooling, then one dense "
                 "layer", fontsize=FONT_SIZES["title"] + 1)
    strips = rest.subplots(3, 1, sharex=True)
    _bars(strips[0], pooled.numpy(), False, shown, "a_k")
    strips[0].set_title(f"GAP: a_k = mean of A_k over its {h}×{wd} positions → {n} numbers "
                        "(dotted: the maps shown above)")
    _bars(strips[1], w.numpy(), True, shown, "w_k")
    strips[1].set_title("dense-layer weights of the anomaly class, w_k (orange > 0 pushes "
                        "towards anomaly, green < 0 towards good)")
    _bars(strips[2], products, True, shown, "w_k · a_k")
    strips[2].set_title(
        f"products w_k · a_k: Σ_k w_k a_k = {products.sum():.3f};  + bias b = {b:.3f}  "
        f"→  anomaly logit = {logit:.3f}  (model output {model_logit:.3f})"
    )
    strips[2].set_xlabel("channel k")
    _caption(fig, src)
    return fig


# ----------------------------------------------------------------------------- 4. the CAM


def cam_pieces(model: VGG16CAM, maps: torch.Tensor, n: int = N_TILES):
    """Split the CAM of one image (1, 512, h, w) into its n largest terms w_k·A_k and the rest.

    Largest by |w_k · mean A_k|, their share of the logit. Returns (channels, terms (n, h, w),
    rest (h, w), cam (h, w)); raises if terms + rest differ from `cam.anomaly_cam`.
    """
    w = model.fc.weight[ANOMALY].detach().float()
    terms = w[:, None, None] * maps[0]
    channels = torch.argsort((w * maps[0].mean(dim=(1, 2))).abs(), descending=True)[:n].tolist()
    others = torch.ones(len(w), dtype=torch.bool)
    others[channels] = False
    rest = terms[others].sum(0)
    cam = anomaly_cam(model, maps)[0].detach()
    if not torch.allclose(terms[channels].sum(0) + rest, cam, rtol=1e-4, atol=1e-4):
        raise VisinspectError("the CAM pieces do not add up to cam.anomaly_cam")
    return channels, terms[channels].detach(), rest.detach(), cam


def figure_heatmap_calculation(src: Source) -> Figure:
    """w_k·A_k for the top channels + the rest = CAM; then upsampling and scaling to [0, 1]."""
    channels, terms, rest, cam = cam_pieces(src.model, src.maps)
    w = src.model.fc.weight[ANOMALY].detach()
    fig = _new_figure((15.0, 7.4))
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.15, 1])
    axes = top.subplots(1, 2 * N_TILES + 3, width_ratios=[1, 0.25] * (N_TILES + 1) + [1])
    tiles = list(axes[0::2])
    # Single terms are an order of magnitude weaker than the CAM: they get their own scale.
    vmax_term = float(terms.abs().max())
    vmax = float(max(cam.abs().max(), rest.abs().max()))
    for ax, k, term in zip(tiles, channels, terms, strict=False):
        _signed(ax, term.numpy(), vmax_term)
        _tile(ax, f"w_{k} · A_{k}", f"w_{k} = {w[k]:+.4f}\nmean A_{k} = "
              f"{src.maps[0, k].mean():.3f}\n→ {term.mean():+.3f}")
    n_rest = src.maps.shape[1] - N_TILES
    _signed(tiles[N_TILES], rest.numpy(), vmax)
    _tile(tiles[N_TILES], f"the other {n_rest} terms", f"Σ w_k · A_k over\nthe other {n_rest} "
          f"maps\n→ {rest.mean():+.3f}")
    im = _signed(tiles[-1], cam.numpy(), vmax)
    bias = float(src.model.fc.bias[ANOMALY])
    _tile(tiles[-1], "anomaly CAM", f"mean {cam.mean():+.3f}\n+ bias {bias:+.3f}\n= logit "
          f"{cam.mean() + bias:+.3f}")
    for ax, op in zip(axes[1::2], ["+"] * N_TILES + ["="], strict=True):
        _symbol(ax, op)
    top.colorbar(im, ax=tiles[-1], shrink=0.8, label="← good   anomaly →")
    top.suptitle(f"CAM = Σ_k w_k · A_k over the 512 conv5_3 maps of {_name(src)}: the "
                 f"{N_TILES} largest terms (by |w_k · mean A_k|) and the rest\nColours: the "
                 f"{N_TILES} terms on a scale of ±{vmax_term:.3g}, the rest and the CAM on "
                 f"±{vmax:.3g} (bar): each term is small, the CAM is the sum of many",
                 fontsize=FONT_SIZES["title"])
    up = upsample(cam[None], src.size)
    heat = src.normalizer(up)[0].numpy()
    steps = bottom.subplots(1, 4)
    _signed(steps[0], cam.numpy(), vmax)
    _tile(steps[0], f"CAM, {cam.shape[0]}×{cam.shape[1]} (conv5_3 grid)")
    steps[1].imshow(up[0].numpy(), cmap=HEATMAP_CMAP)
    _tile(steps[1], f"bilinear upsampling\nto {src.size}×{src.size} (raw values)")
    steps[2].imshow(heat, cmap=HEATMAP_CMAP, vmin=0, vmax=1)
    low, high = src.normalizer.low, src.normalizer.high
    _tile(steps[2], f"scaled to [0, 1]: (x − low) / (high − low), clipped\n(dataset scale: "
          f"low {low:.3g}, high {high:.3g})")
    overlay(steps[3], src.image(), heat)
    steps[3].set_title("heatmap on the image")
    for a, b in pairwise(steps):
        _arrow(fig, a, b)
    _caption(fig, src, "checked in code: the pieces sum to cam.anomaly_cam (torch.allclose)")
    return fig


# ----------------------------------------------------------------------------- 5. boxes


def _components(mask: np.ndarray, min_area: int) -> tuple[np.ndarray, int, int]:
    """Connected regions (8-neighbours, as heatmap_to_boxes) as an RGB image: one colour each,
    grey for regions too small to become a box. Returns (image, n regions, n kept)."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    colours = PALETTE[2:7]
    rgb = np.ones((*mask.shape, 3))
    kept = 0
    for i in range(1, n):
        big = stats[i, cv2.CC_STAT_AREA] >= min_area
        rgb[labels == i] = to_rgb(colours[kept % len(colours)] if big else "#aaaaaa")
        kept += int(big)
    return rgb, n - 1, kept


def figure_heatmap_to_bbox(src: Source) -> Figure:
    """Normalised heatmap → mask → connected regions → boxes, at two thresholds (rows)."""
    heat, image = src.heat("image"), src.image()
    fig = _new_figure((12.0, 6.6))
    axes = fig.subplots(len(BOX_THRESHOLDS), 4)
    for row, t in zip(axes, BOX_THRESHOLDS, strict=True):
        mask = heat > t
        boxes = heatmap_to_boxes(heat, t, DEFAULT_MIN_AREA)
        row[0].imshow(heat, cmap=HEATMAP_CMAP, vmin=0, vmax=1)
        if mask.any() and not mask.all():
            row[0].contour(mask, levels=[0.5], colors=BOX_COLOR, linewidths=1.0)
        _tile(row[0], f"heatmap, min-max scaled per image\ncontour at {t}")
        row[1].imshow(mask, cmap="gray", vmin=0, vmax=1)
        _tile(row[1], f"mask: heat > {t}\n({mask.mean():.0%} of the pixels)")
        regions, n, kept = _components(mask, DEFAULT_MIN_AREA)
        row[2].imshow(regions)
        dropped = n - kept
        _tile(row[2], f"{n} connected region(s), one colour each\n" + (
            f"{dropped} grey: < {DEFAULT_MIN_AREA} px, dropped as noise" if dropped
            else f"(regions < {DEFAULT_MIN_AREA} px would be dropped)"))
        overlay(row[3], image, boxes=boxes, mask=src.mask())
        row[3].set_title(f"{len(boxes)} box(es), one per kept region\n(green: true defect)")
        row[0].set_ylabel(f"threshold {t}", fontsize=FONT_SIZES["title"])
        row[0].yaxis.label.set_visible(True)
    fig.suptitle(f"From heatmap to boxes (boxes.heatmap_to_boxes) on {_name(src)}\nThe heatmap "
                 "is min-max scaled per image, so the threshold is relative to its peak: a higher "
                 "threshold keeps fewer pixels, giving smaller or fewer boxes")
    _caption(fig, src)
    return fig


# ----------------------------------------------------------------------------- 6. results


def grid_indices(preds: Predictions) -> list[int]:
    """Per test product, its first good test image and first image of each defect type.

    First in file order, not picked by score, so the grid shows mistakes as they come.
    """
    seen, picks = set(), []
    for i, s in enumerate(preds.samples):
        key = (s.category, s.defect_type)
        if s.split == "test" and key not in seen:
            seen.add(key)
            picks.append(i)
    return sorted(picks, key=lambda i: (preds.samples[i].category,
                                        preds.samples[i].defect_type != "good",
                                        preds.samples[i].defect_type))


def figure_results_grid(src: Source) -> Figure:
    """plots.plot_prediction_grid over the test products: a good image and one per defect type."""
    picks = grid_indices(src.preds)
    ncols = max(sum(src.preds.samples[i].category == c for i in picks) for c in TARGET)
    fig = _new_figure((2.7 * ncols + 1.0, 3.4 * len(picks) / ncols))
    plot_prediction_grid(src.preds, picks, src.threshold, normalizer=src.normalizer,
                         box_threshold=DEFAULT_BOX_THRESHOLD, min_area=DEFAULT_MIN_AREA,
                         ncols=ncols, fig=fig)
    for ax, i in zip(fig.axes, picks, strict=False):  # the colorbar comes after the images
        s = src.preds.samples[i]
        ax.title.set_text(f"{s.category} · {s.defect_type}\n{ax.title.get_text()}")
    fig.suptitle("Products never seen in training: a good image and one of each defect type "
                 f"(first in file order, not picked)\nanomaly iff margin > {src.threshold:.2f}; "
                 "heat on the dataset scale; cyan: boxes, green: true defect outline")
    _caption(fig, src)
    return fig


def figure_confusion_matrix(src: Source) -> Figure:
    """plots.plot_confusion_matrix of every test image at the checkpoint's threshold."""
    metrics = classification_metrics(src.preds.labels, src.preds.margins, src.threshold)
    fig = _new_figure((6.0, 4.8))
    plot_confusion_matrix(metrics, ax=fig.add_subplot())
    fig.suptitle(f"{', '.join(TARGET)} (unseen products), margin > {src.threshold:.2f}; "
                 f"recall {metrics['recall']:.2f}, precision {metrics['precision']:.2f}",
                 fontsize=FONT_SIZES["label"])
    _caption(fig, src)
    return fig


# ----------------------------------------------------------------------------- all of them


FIGURES: dict[str, Callable[[Source], Figure]] = {
    "model_train_pipeline.png": figure_train_pipeline,
    "model_inference_pipeline.png": figure_inference_pipeline,
    "classification_head_detailed.png": figure_classification_head,
    "heatmap_calculation.png": figure_heatmap_calculation,
    "heatmap_to_bbox.png": figure_heatmap_to_bbox,
    "results_grid.png": figure_results_grid,
    "confusion_matrix.png": figure_confusion_matrix,
}
FIGURE_NAMES = tuple(FIGURES)
# Eight photos of noisy synthetic textures compress poorly: a lower resolution keeps the PNG small.
FIGURE_DPI = {"results_grid.png": 90}


def _pixel_exact(fig: Figure) -> Figure:
    """Draw every image with its real pixels: matplotlib's default smoothing of 2-3x upscaled
    images blurs the 96 px pictures and doubles the PNG size."""
    for ax in fig.axes:
        for image in ax.get_images():
            image.set_interpolation("nearest")
    return fig


def make_figures(
    out: Path = Path("docs"),
    *,
    checkpoint: Path | None = None,
    image_size: int | None = None,
    small: bool = False,
    weights="auto",
) -> list[Path]:
    """Draw every figure of FIGURE_NAMES into `out` and return the paths.

    Default: the demo checkpoint (trained on first use, a few minutes) on the synthetic test
    products. small=True trains nothing: a random-weight model on a tiny synthetic set, in seconds.
    """
    out = Path(out)
    with tempfile.TemporaryDirectory() as workdir:
        src = load_source(checkpoint, image_size=image_size, small=small, weights=weights,
                          tiny_root=Path(workdir) / "synthetic")
        paths = []
        for name, draw in FIGURES.items():
            with torch.no_grad():  # predict() leaves the parameters as inference tensors
                fig = draw(src)
            paths.append(save_figure(_pixel_exact(fig), out / name, dpi=FIGURE_DPI.get(name, DPI)))
        return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `figures` command's options."""
    parser.add_argument("--out", default="docs", help="folder for the PNGs (default: docs)")
    parser.add_argument("--checkpoint", help="a classifier checkpoint (default: the demo one, "
                        "trained on first use)")
    parser.add_argument("--image-size", type=int, help="check the checkpoint's image size; in "
                        f"--small mode the size to use (default {SMALL_IMAGE_SIZE})")
    parser.add_argument("--small", action="store_true",
                        help="random weights and a tiny dataset: a quick look, nothing trained")
    parser.add_argument("--backbone-weights", default="auto",
                        help="ImageNet weights if the demo model must be trained (default: auto)")


def run(args: argparse.Namespace) -> int:
    """Draw the figures the parsed `args` ask for."""
    paths = make_figures(Path(args.out), checkpoint=args.checkpoint and Path(args.checkpoint),
                         image_size=args.image_size, small=args.small,
                         weights=args.backbone_weights)
    for p in paths:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Draw the pipeline figures of docs/ from the code itself.")
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
