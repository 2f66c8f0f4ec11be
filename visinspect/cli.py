"""Command line: `python -m visinspect <command>`; `python -m visinspect <command> --help` for options.

User errors (missing folder, bad file, wrong value) print one line and exit with status 2;
a traceback means a bug in visinspect.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from visinspect.errors import VisinspectError

from visinspect.demo import SOURCE as SYNTHETIC_SOURCE
from visinspect.demo import TARGET as SYNTHETIC_TARGET


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _data_roots(args) -> list[Path]:
    """The --data roots, or the embedded synthetic dataset (generated on first use)."""
    if args.data:
        return [Path(d) for d in args.data]
    from visinspect.data import default_synthetic_root
    from visinspect.synthetic import ensure_synthetic_dataset

    return [ensure_synthetic_dataset(default_synthetic_root())]


def _categories(args, default: Sequence[str]) -> list[str] | None:
    if args.categories:
        return _csv(args.categories)
    return list(default) if not args.data else None


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False))


# ----------------------------------------------------------------------------- commands


def cmd_info(args) -> int:
    from visinspect.data import build_sample_table, load_mask, load_rgb, summarize

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = build_sample_table(_data_roots(args), _categories(args, ()) or None)
    summary = summarize(table.samples)
    if args.json:
        _print_json({c: {k: v for k, v in s.items() if k != "splits"} for c, s in summary.items()})
    else:
        print("positive class = anomaly")
        print("| category | train good | test good | test anomaly | masks | defect types |")
        print("| --- | --- | --- | --- | --- | --- |")
        for cat, s in summary.items():
            types = ", ".join(f"{t} {n}" for t, n in s["defect_types"].items()) or "-"
            sp = s["splits"]
            print(f"| {cat} | {sp['train']['good']} | {sp['test']['good']} | "
                  f"{sp['test']['anomaly']} | {s['masks']} | {types} |")
        print(f"{len(table)} images; {len(table.stray_files)} stray files ignored; "
              f"{len(table.missing_masks)} defective images without mask")
        for w in caught:
            print(f"warning: {w.message}")
    if not args.check:
        return 0
    bad = []
    for s in table.samples:
        for path, loader in ((s.path, load_rgb), (s.mask_path, lambda p: load_mask(p, (8, 8)))):
            if path is None:
                continue
            try:
                loader(path)
            except VisinspectError as e:
                bad.append(str(e))
    for line in bad:
        print(f"bad: {line}", file=sys.stderr)
    print(f"checked {len(table)} images and their masks: {len(bad)} unreadable", file=sys.stderr)
    return 1 if bad else 0


def cmd_synth(args) -> int:
    from visinspect.synthetic import generate_synthetic_dataset

    out = generate_synthetic_dataset(args.out, seed=args.seed, image_size=args.image_size,
                                     overwrite=args.overwrite)
    print(f"wrote the synthetic dataset to {out}")
    return 0


def cmd_download(args) -> int:
    from visinspect.download import download_categories

    paths = download_categories(_csv(args.categories), Path(args.to),
                                archive=Path(args.archive) if args.archive else None,
                                sha256=args.sha256)
    for p in paths:
        print(f"ready: {p}")
    return 0


def _train_val(args, source_default: Sequence[str]):
    from visinspect.data import build_sample_table, stratified_split, unknown_context_split

    table = build_sample_table(_data_roots(args), split="all")
    names = _categories(args, source_default) or table.categories
    source, _ = unknown_context_split(table.samples, names, [])
    return stratified_split(source, args.val_fraction, args.seed)


def cmd_train(args) -> int:
    from visinspect.checkpoint import save_classifier
    from visinspect.models import describe_backbone
    from visinspect.train import TrainConfig, train_baseline

    train, val = _train_val(args, SYNTHETIC_SOURCE)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         image_size=args.image_size, seed=args.seed, precision=args.precision)
    print(f"training on {len(train)} images of {', '.join(sorted({s.category for s in train}))}; "
          f"{len(val)} validation images")
    state = Path(str(args.out) + ".state")
    try:
        model, info = train_baseline(train, val, config, weights=args.backbone_weights,
                                     checkpoint_path=state, resume=args.resume)
    except KeyboardInterrupt:
        # The state after the last finished epoch is already on disk (written atomically).
        print(f"interrupted: continue with --resume {state}" if state.is_file() else "interrupted",
              file=sys.stderr)
        return 130
    save_classifier(args.out, model, **info)
    state.unlink(missing_ok=True)
    print(describe_backbone(info["backbone"]))
    h = info["history"]
    print(f"{h['epochs_run']} epochs, final train loss {h['loss'][-1]:.4f}, "
          f"accuracy {h['accuracy'][-1]:.3f}; validation threshold (logit margin) "
          f"{info['threshold']:.3f}")
    print(f"saved {args.out}")
    return 0


def _evaluate_checkpoint(args, default_categories: Sequence[str]) -> dict:
    from visinspect.cam import HeatmapNormalizer
    from visinspect.checkpoint import load_classifier
    from visinspect.data import build_sample_table
    from visinspect.evaluate import evaluate_predictions, probability_to_margin
    from visinspect.inference import predict

    model, info = load_classifier(args.checkpoint)
    table = build_sample_table(_data_roots(args), _categories(args, default_categories), split=args.split)
    preds = predict(model, table.samples, info["image_size"], precision=args.precision,
                    progress=not args.quiet)
    if args.threshold == "val":
        threshold = float(info["threshold"])
    else:
        threshold = probability_to_margin(float(args.threshold))
    normalizer = HeatmapNormalizer.from_dict(info["normalizer"]) if info.get("normalizer") else None
    heat_mode = args.heat_mode if normalizer is not None else "image"
    report = evaluate_predictions(preds, threshold, heat_mode=heat_mode, normalizer=normalizer,
                                  box_threshold=args.box_threshold, min_area=args.min_area)
    report["backbone"] = info["backbone"]
    report["checkpoint"] = str(args.checkpoint)
    report["threshold_rule"] = info["threshold_rule"] if args.threshold == "val" else f"P(anomaly) > {args.threshold}"
    report["heat_mode"] = heat_mode
    return report, preds, threshold, normalizer, heat_mode


def cmd_evaluate(args) -> int:
    from visinspect.evaluate import markdown_table, round_floats
    from visinspect.models import describe_backbone

    report, *_ = _evaluate_checkpoint(args, SYNTHETIC_TARGET)
    print(markdown_table(report))
    print(describe_backbone(report["backbone"]))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(round_floats(report), indent=2) + "\n")
        print(f"wrote {out}")
    return 0


def cmd_predict(args) -> int:
    from visinspect.predict import predict_folder

    summary = predict_folder(args.checkpoint, [Path(p) for p in args.inputs], Path(args.out),
                             overlays=not args.no_overlays, batch_size=args.batch_size,
                             box_threshold=args.box_threshold, min_area=args.min_area,
                             resume=args.resume)
    print(f"{summary['n_images']} images: {summary['n_anomalous']} predicted anomalous, "
          f"{summary['n_failed']} failed; results in {args.out}")
    return 1 if summary["n_failed"] else 0


def cmd_demo(args) -> int:
    """Train on the synthetic source categories, evaluate on the held-out ones, draw a grid."""
    from visinspect.plots import plot_prediction_grid, save_figure

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.checkpoint = out / "baseline.pt"
    args.out = args.checkpoint
    args.categories = None
    cmd_train(args)
    args.categories, args.split, args.threshold, args.quiet = None, "all", "val", True
    report, preds, threshold, normalizer, heat_mode = _evaluate_checkpoint(args, SYNTHETIC_TARGET)
    from visinspect.evaluate import markdown_table, round_floats

    table = markdown_table(report, title="Unknown context: trained on " + ", ".join(SYNTHETIC_SOURCE)
                           + "; tested on " + ", ".join(SYNTHETIC_TARGET) + ". ")
    (out / "metrics.md").write_text(table + "\n")
    (out / "metrics.json").write_text(json.dumps(round_floats(report), indent=2) + "\n")
    print(table)
    picks = _grid_indices(preds.labels, preds.margins, per_class=6)
    fig = plot_prediction_grid(preds, picks, threshold, heat_mode=heat_mode, normalizer=normalizer,
                               box_threshold=args.box_threshold, min_area=args.min_area, ncols=4)
    save_figure(fig, out / "predictions.png")
    print(f"wrote {out / 'baseline.pt'}, {out / 'metrics.md'}, {out / 'metrics.json'}, "
          f"{out / 'predictions.png'}")
    return 0


def _grid_indices(labels, scores, per_class: int) -> list[int]:
    """The highest-scoring anomalies and good images: what a person wants to look at first."""
    import numpy as np

    order = np.argsort(-scores, kind="stable")
    anomalies = [int(i) for i in order if labels[i] == 1][:per_class]
    goods = [int(i) for i in order if labels[i] == 0][:per_class]
    return anomalies + goods


# ----------------------------------------------------------------------------- parser


def _add_data(p: argparse.ArgumentParser, categories_help: str) -> None:
    p.add_argument("--data", nargs="+", metavar="ROOT",
                   help="one or more data roots in MVTec layout (default: the embedded synthetic dataset)")
    p.add_argument("--categories", help=categories_help)


def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--box-threshold", type=float, default=0.5,
                   help="heatmap threshold in [0, 1] for boxes (higher = smaller, fewer boxes)")
    p.add_argument("--min-area", type=int, default=16, help="smallest box, in pixels")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m visinspect", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="count images per category, split and defect type")
    _add_data(p, "comma-separated categories (default: all)")
    p.add_argument("--check", action="store_true", help="also open every image and mask")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("synth", help="write the embedded synthetic dataset (MVTec layout)")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("download", help="download MVTec AD categories (CC BY-NC-SA 4.0)")
    p.add_argument("--categories", required=True)
    p.add_argument("--to", default="data/mvtec_ad")
    p.add_argument("--archive", help="use an archive you downloaded yourself")
    p.add_argument("--sha256", help="expected sha256 of the archive")
    p.set_defaults(func=cmd_download)

    for name, func, helptext in (("train", cmd_train, "train the VGG16-CAM baseline"),
                                 ("demo", cmd_demo, "train + evaluate + figure on synthetic data")):
        p = sub.add_parser(name, help=helptext)
        if name == "train":
            _add_data(p, "comma-separated training (source) categories")
            p.add_argument("--out", default="weights/baseline.pt")
            p.add_argument("--image-size", type=int, default=224)
            p.add_argument("--resume", help="continue from OUT.state written after each epoch")
        else:
            p.set_defaults(data=None)
            p.add_argument("--out", default="runs/demo")
            p.add_argument("--image-size", type=int, default=128)
            p.set_defaults(resume=None)
            _add_eval(p)
        p.add_argument("--epochs", type=int, default=10)
        p.add_argument("--batch-size", type=int, default=10)
        p.add_argument("--lr", type=float, default=1e-4)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--val-fraction", type=float, default=0.2)
        p.add_argument("--backbone-weights", default="auto",
                       help="a .pth file, 'auto' (env VISINSPECT_BACKBONE_WEIGHTS, then torchvision) or 'random'")
        if name == "train":
            p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
        p.set_defaults(func=func)

    p = sub.add_parser("evaluate", help="metrics of a checkpoint on some categories")
    p.add_argument("--checkpoint", required=True)
    _add_data(p, "comma-separated test (target) categories")
    p.add_argument("--split", default="all", choices=("all", "train", "test"))
    p.add_argument("--threshold", default="val",
                   help="'val' (the checkpoint's validation threshold) or a P(anomaly) such as 0.5")
    p.add_argument("--heat-mode", default="dataset", choices=("dataset", "image"))
    p.add_argument("--json", help="write every metric to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_eval(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="score images or folders; PNG overlays and JSON lines")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-overlays", action="store_true", help="JSON only (faster)")
    p.add_argument("--resume", action="store_true", help="skip images already in OUT/predictions.jsonl")
    _add_eval(p)
    p.set_defaults(func=cmd_predict)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except VisinspectError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
