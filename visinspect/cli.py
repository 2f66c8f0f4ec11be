"""Command line: `python -m visinspect <command>`; `python -m visinspect <command> --help` for options.

This module parses arguments, calls the library function a notebook would call too, and prints.
Each command imports what it needs when it runs, so `--help` and argument errors answer at once.
User errors (missing folder, bad file, wrong value) print one line and exit with status 2;
a traceback means a bug in visinspect.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from visinspect.errors import VisinspectError
from visinspect.methods.simclr.levers import LEVERS as PRETRAIN_LEVERS


def _csv(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _data_roots(args) -> list[Path]:
    """The --data roots, or the embedded synthetic dataset (generated on first use)."""
    if args.data:
        return [Path(d) for d in args.data]
    from visinspect.data.samples import default_synthetic_root
    from visinspect.data.synthetic import ensure_synthetic_dataset

    return [ensure_synthetic_dataset(default_synthetic_root())]


def _categories(args, default: Sequence[str]) -> list[str] | None:
    """--categories, else (on the synthetic data) `default`, else every category."""
    if args.categories:
        return _csv(args.categories)
    return list(default) if not args.data else None


def _write_json(path: str, obj) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2) + "\n")
    print(f"wrote {path}")


def _resumable(args, state: Path) -> Path:
    """A long command's state file, named in the message a Ctrl-C prints (main catches it)."""
    args.interrupted = f"continue with --resume {state} (written as it goes)"
    return state


# ----------------------------------------------------------------------------- commands


def cmd_info(args) -> int:
    import warnings

    from visinspect.data.samples import build_sample_table, summarize, summary_markdown, unreadable

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = build_sample_table(_data_roots(args), _categories(args, ()) or None)
    if args.json:
        summary = summarize(table.samples)
        print(json.dumps({c: {k: v for k, v in s.items() if k != "splits"} for c, s in summary.items()},
                         indent=2))
    else:
        print(summary_markdown(table))
        for w in caught:
            print(f"warning: {w.message}")
    if not args.check:
        return 0
    bad = unreadable(table)
    for line in bad:
        print(f"bad: {line}", file=sys.stderr)
    print(f"checked {len(table)} images and their masks: {len(bad)} unreadable", file=sys.stderr)
    return 1 if bad else 0


def cmd_synth(args) -> int:
    from visinspect.data.synthetic import generate_synthetic_dataset

    out = generate_synthetic_dataset(args.out, seed=args.seed, image_size=args.image_size,
                                     overwrite=args.overwrite)
    print(f"wrote the synthetic dataset to {out}")
    return 0


def cmd_download(args) -> int:
    from visinspect.data.download import download_categories

    archive = Path(args.archive) if args.archive else None
    for p in download_categories(_csv(args.categories), Path(args.to), archive=archive, sha256=args.sha256):
        print(f"ready: {p}")
    return 0


def cmd_methods(args) -> int:
    from visinspect.methods.registry import methods_markdown

    print(methods_markdown())
    return 0


def cmd_train(args) -> int:
    from visinspect.data.samples import build_sample_table, unknown_context_split
    from visinspect.experiments.demo import SOURCE
    from visinspect.methods.registry import RECOMMENDED, method, save_method, train_method, training_summary
    from visinspect.training import SourceImages, TrainConfig, TrainingRun

    chosen = method(args.method or RECOMMENDED)
    source = SourceImages([], [])
    if chosen.trains is not None:
        table = build_sample_table(_data_roots(args), split="all")
        src, _ = unknown_context_split(table.samples, _categories(args, SOURCE) or table.categories, [])
        source = SourceImages.split(src, args.val_fraction, args.seed)
        print(f"training on {len(source.train)} images of {', '.join(sorted({s.category for s in src}))}; "
              f"{len(source.val)} validation images")
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         image_size=args.image_size, seed=args.seed, precision=args.precision)
    state = _resumable(args, Path(f"{args.out}.state"))
    run = TrainingRun(config, weights=args.backbone_weights, device=args.device, progress=True,
                      state=state, resume=args.resume and Path(args.resume))
    model, info = train_method(chosen.name, source, run, pretrained=args.pretrained)
    save_method(args.out, chosen.name, model, info)
    state.unlink(missing_ok=True)
    print(training_summary(chosen.name, model, info))
    print(f"saved {args.out}")
    return 0


def cmd_evaluate(args) -> int:
    from visinspect.data.samples import build_sample_table
    from visinspect.evaluate import round_floats
    from visinspect.experiments.demo import TARGET
    from visinspect.experiments.evaluate_checkpoint import (
        EvaluationSettings,
        evaluate_checkpoint,
        report_markdown,
    )

    settings = EvaluationSettings(
        method=args.method, threshold=args.threshold, calibrate=args.calibrate,
        false_alarm_rate=args.false_alarm_rate, precision=args.precision, heat_mode=args.heat_mode,
        box_threshold=args.box_threshold, min_area=args.min_area, progress=not args.quiet,
    )
    table = build_sample_table(_data_roots(args), _categories(args, TARGET), split=args.split)
    report = evaluate_checkpoint(args.checkpoint, table.samples, settings)
    print(report_markdown(report))
    if args.json:
        _write_json(args.json, round_floats(report))
    return 0


def cmd_predict(args) -> int:
    from visinspect.methods.registry import load_detector
    from visinspect.predict import predict_on_ranks

    detector = load_detector(args.checkpoint, method=args.method, reference=args.reference_dir,
                             calibration=args.calibration, category=args.category, precision=args.precision)
    print(detector.describe())
    summary = predict_on_ranks(
        detector, [Path(p) for p in args.inputs], Path(args.out), overlays=not args.no_overlays,
        batch_size=args.batch_size, box_threshold=args.box_threshold, min_area=args.min_area,
        resume=args.resume, overlay_size=args.overlay_size, workers=args.workers,
    )
    print(f"{summary['n_images']} images: {summary['n_anomalous']} predicted anomalous, "
          f"{summary['n_failed']} failed; results in {args.out}")
    return 1 if summary["n_failed"] else 0


def cmd_demo(args) -> int:
    """Train on the synthetic source categories, evaluate on the held-out ones, draw a grid."""
    from visinspect.experiments.demo import DemoSettings, run_demo

    sizes = {k: v for k, v in (("image_size", args.image_size), ("epochs", args.epochs)) if v is not None}
    table, paths = run_demo(args.out, DemoSettings(seed=args.seed, **sizes), weights=args.backbone_weights,
                            precision=args.precision, box_threshold=args.box_threshold,
                            min_area=args.min_area)
    print(table)
    print(f"wrote {', '.join(map(str, paths))}")
    return 0


def cmd_pretrain(args) -> int:
    from visinspect.data.samples import build_sample_table, unknown_context_split
    from visinspect.experiments.demo import SOURCE, TARGET
    from visinspect.methods.simclr.pretrain import PretrainConfig
    from visinspect.methods.simclr.training import pretrain_to_file

    table = build_sample_table(_data_roots(args))
    source = _csv(args.source) or list(SOURCE if not args.data else table.categories)
    target = _csv(args.target) or ([] if args.data else list(TARGET))
    src, tgt = unknown_context_split(table.samples, source, target)
    names = ("epochs", "image_size", "seed", "trainable_from", "temperature", *PRETRAIN_LEVERS)
    overrides = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    config = (PretrainConfig.demo if args.preset == "demo" else PretrainConfig.full)(**overrides)
    _resumable(args, Path(f"{args.out}.state"))
    history = pretrain_to_file(args.out, src, tgt, config, include_target_good=args.include_target_good,
                               weights=args.backbone_weights, device=args.device, resume=args.resume)
    print(f"loss per epoch {history['loss']}; {history['images_per_s'][-1]:.1f} images/s")
    print(f"saved {args.out}; train a classifier on it with `train --pretrained {args.out}`")
    return 0


def cmd_compare(args) -> int:
    from visinspect.evaluate import round_floats
    from visinspect.experiments.compare import MODELS, ComparePreset, draw_figures, run_comparison
    from visinspect.experiments.demo import SOURCE, TARGET
    from visinspect.experiments.tables import summary_table

    calibrate = [int(k) for k in _csv(args.calibrate)]
    rows, first = run_comparison(
        _data_roots(args), _csv(args.source) or list(SOURCE), _csv(args.target) or list(TARGET),
        seeds=range(args.first_seed, args.first_seed + args.seeds),
        preset=ComparePreset.named(args.preset, precision=args.precision),
        calibrate=calibrate, models=_csv(args.models) or MODELS, weights=args.backbone_weights,
        device=args.device, log=lambda m: print(m, file=sys.stderr),
    )
    print(summary_table(rows))
    if args.json:
        _write_json(args.json, {"rows": round_floats(rows)})
    if args.figures:
        draw_figures(rows, first, calibrate, args.figures)
        print(f"wrote figures to {args.figures}")
    return 0


def cmd_loo(args) -> int:
    from visinspect.experiments.compare import ComparePreset
    from visinspect.experiments.loo import LeaveOneOut
    from visinspect.methods.registry import DEFAULT_MODELS

    preset = ComparePreset.named(args.preset, precision=args.precision,
                                 max_source_per_category=args.source_cap)
    run = LeaveOneOut(
        args.data, args.out, targets=_csv(args.targets) or None, models=_csv(args.models) or DEFAULT_MODELS,
        seeds=args.seeds, calibrate=[int(k) for k in _csv(args.calibrate)], preset=preset,
        weights=args.backbone_weights, device=args.device, log=lambda m: print(m, flush=True),
    )
    args.interrupted = f"run the same command again to continue (finished jobs are in {args.out})"
    run.run()
    print(f"wrote {Path(args.out) / 'rows.json'}, tables.md, budget.json and the figures")
    return 0


def cmd_report(args) -> int:
    from visinspect.experiments.report import write_report

    write_report([Path(f) for f in args.rows], Path(args.out), readme=args.readme and Path(args.readme),
                 anchors=args.anchors and Path(args.anchors))
    print(f"wrote {args.out} and its figures" + (f"; the results of {args.readme}" if args.readme else ""))
    return 0


def cmd_cache(args) -> int:
    from visinspect.backbones.store import FeatureStore

    store = FeatureStore.default()
    if not store.enabled:
        print("the feature store is off (VISINSPECT_FEATURE_STORE=off): nothing is kept")
        return 0
    if args.action == "clear":
        print(f"cleared the feature store {store.root}: {store.clear() / 2**20:.1f} MiB freed")
        return 0
    print(json.dumps(store.info(), indent=2) if args.json else store.describe())
    return 0


# ----------------------------------------------------------------------------- parser

# Options that several commands share: name -> (flags, argparse keywords).
SHARED = {
    "data": (("--data",), {"nargs": "+", "metavar": "ROOT",
                           "help": "data roots in MVTec layout (default: the embedded synthetic dataset)"}),
    "precision": (("--precision",), {"default": "auto", "choices": ("auto", "fp32", "bf16")}),
    "device": (("--device",), {"default": "auto", "help": "'auto' (a CUDA GPU if any), 'cpu', 'cuda'"}),
    "weights": (("--backbone-weights",), {"default": "auto", "help": "a .pth file, 'auto' (env "
                                          "VISINSPECT_BACKBONE_WEIGHTS, then torchvision) or 'random'"}),
    "store": (("--feature-store",), {"metavar": "DIR", "help": "where frozen-layer features are kept "
                                     "(default: $VISINSPECT_FEATURE_STORE or ~/.cache/visinspect/features)"}),
    "box-threshold": (("--box-threshold",), {"type": float, "default": 0.5,
                                             "help": "heatmap threshold in [0, 1] for boxes"}),
    "min-area": (("--min-area",), {"type": int, "default": 16, "help": "smallest box, in pixels"}),
    "seed": (("--seed",), {"type": int, "default": 0}),
    "preset": (("--preset",), {"default": "demo", "choices": ("demo", "medium", "full")}),
    "calibrate": (("--calibrate",), {"help": "comma-separated K values (good images of a target)"}),
    "models": (("--models",), {"help": "comma-separated method names, as `python -m visinspect methods` "
                               "lists them"}),
    "loo-models": (("--models",), {"help": "comma-separated method names (default: those `python -m "
                                   "visinspect methods` marks `loo` default: registry.DEFAULT_MODELS)"}),
}


def _command(sub, name: str, func, helptext: str, *shared: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=helptext)
    for option in shared:
        flags, keywords = SHARED[option]
        p.add_argument(*flags, **keywords)
    p.set_defaults(func=func)
    return p


def _recipe(p: argparse.ArgumentParser, epochs: int | None, image_size: int | None) -> None:
    """The seed's training recipe (None: the library's default)."""
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--image-size", type=int, default=image_size)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--val-fraction", type=float, default=0.2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m visinspect", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = _command(sub, "info", cmd_info, "count images per category, split and defect type", "data")
    p.add_argument("--categories", help="comma-separated categories (default: all)")
    p.add_argument("--check", action="store_true", help="also open every image and mask")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p = _command(sub, "synth", cmd_synth, "write the embedded synthetic dataset (MVTec layout)", "seed")
    p.add_argument("out")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--overwrite", action="store_true")
    p = _command(sub, "download", cmd_download, "download MVTec AD categories (CC BY-NC-SA 4.0)")
    p.add_argument("--categories", required=True)
    p.add_argument("--to", default="data/mvtec_ad")
    p.add_argument("--archive", help="use an archive you downloaded yourself")
    p.add_argument("--sha256", help="expected sha256 of the archive")
    _command(sub, "methods", cmd_methods, "every method: what it trains, whether it adapts to K good images")

    p = _command(sub, "train", cmd_train, "set up a method for new products (default: the recommended one)",
                 "data", "seed", "weights", "precision", "device", "store")
    p.add_argument("--categories", help="comma-separated training (source) categories")
    p.add_argument("--out", default="weights/baseline.pt")
    p.add_argument("--method", help="the method the checkpoint is for (default: the recommended one; "
                   "`python -m visinspect methods` lists them)")
    p.add_argument("--resume", help="continue from OUT.state, written as training goes")
    p.add_argument("--pretrained", help="start from a SimCLR checkpoint (pretrain --out)")
    _recipe(p, epochs=10, image_size=224)
    p = _command(sub, "demo", cmd_demo, "train + evaluate + figure on synthetic data", "seed", "weights",
                 "precision", "box-threshold", "min-area", "store")
    p.add_argument("--out", default="runs/demo")
    _recipe(p, epochs=None, image_size=None)

    p = _command(sub, "pretrain", cmd_pretrain, "SimCLR pre-training of the VGG16 backbone (labels unused)",
                 "data", "weights", "device")
    p.add_argument("--source", help="comma-separated source categories (default: all but --target)")
    p.add_argument("--target", help="comma-separated target categories (never their test images)")
    p.add_argument("--include-target-good", action="store_true",
                   help="also pre-train on the targets' unlabeled train/good images")
    p.add_argument("--out", default="weights/simclr.pt")
    p.add_argument("--resume", help="continue from OUT.state, written after each epoch")
    p.add_argument("--preset", default="demo", choices=("demo", "full"))
    for name in ("epochs", "image_size", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--trainable-from", type=int, help="first trainable layer index of VGG16 features")
    for name in PRETRAIN_LEVERS:  # PretrainConfig's anomaly levers (methods/simclr/levers.py), all off
        kind = {"type": float} if name.endswith("_weight") else {"action": "store_true", "default": None}
        p.add_argument("--" + name.replace("_", "-"), help=f"PretrainConfig.{name}", **kind)

    p = _command(sub, "evaluate", cmd_evaluate, "metrics of a checkpoint on some categories", "data",
                 "precision", "box-threshold", "min-area", "store")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--categories", help="comma-separated test (target) categories")
    p.add_argument("--split", default="all", choices=("all", "train", "test"))
    p.add_argument("--threshold", default="val", help="'val' (the checkpoint's) or a P(anomaly) such as 0.5")
    p.add_argument("--heat-mode", default="dataset", choices=("dataset", "image"))
    p.add_argument("--method", help="evaluate this method instead of the checkpoint's")
    p.add_argument("--json", help="write every metric to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--calibrate", type=int, metavar="K", help="fit threshold and heatmap scale per category "
                   "on K good train/ images (then left out of the images evaluated)")
    p.add_argument("--false-alarm-rate", type=float, default=0.01,
                   help="with --calibrate: share of good images allowed above the threshold")

    p = _command(sub, "predict", cmd_predict, "score images or folders; overlays and JSON lines", "precision",
                 "box-threshold", "min-area", "store")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    p.add_argument("--out", required=True)
    p.add_argument("--reference-dir", action="append", metavar="GOOD_IMAGES", help="a folder (or file) of "
                   "good images of the product, repeatable: what the methods that use K good images adapt to")
    p.add_argument("--batch-size", type=int, help="images per batch (default: by the image size)")
    p.add_argument("--no-overlays", action="store_true", help="JSON only (faster)")
    p.add_argument("--overlay-size", type=int, metavar="PX",
                   help="overlays' longest side (default: the image's own, 256..2048 px)")
    p.add_argument("--workers", type=int, help="threads decoding (as many draw); default: cores, <= 4")
    p.add_argument("--resume", action="store_true", help="skip images already in OUT/predictions.jsonl")
    p.add_argument("--method", help="score with this method instead of the checkpoint's")
    p.add_argument("--calibration", help="a calibration JSON (evaluate --calibrate K writes one)")
    p.add_argument("--category", help="with --calibration: which product these images show")

    p = _command(sub, "compare", cmd_compare, "baseline vs SimCLR vs few good parts on one split", "data",
                 "models", "calibrate", "preset", "precision", "weights", "device", "store")
    p.add_argument("--source", help="comma-separated source (training) categories")
    p.add_argument("--target", help="comma-separated target (unknown) categories")
    p.add_argument("--seeds", type=int, default=1, help="N seeds from --first-seed; mean ± std over them")
    p.add_argument("--first-seed", type=int, default=0, help="run seeds S..S+N-1 (to split runs up)")
    p.add_argument("--json", help="write {'rows': [...]} to this file")
    p.add_argument("--figures", help="write bar charts and side-by-side heatmaps to this folder")
    p = _command(sub, "loo", cmd_loo, "leave-one-out over real products: each in turn is the unknown one",
                 "loo-models", "calibrate", "preset", "precision", "weights", "device", "store")
    p.set_defaults(calibrate="5,20,50", preset="full")
    p.add_argument("--data", nargs="+", metavar="ROOT", required=True, help="data roots in MVTec layout")
    p.add_argument("--targets", help="comma-separated (default: each category with both kinds of test image)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1; tables give mean ± std over them")
    p.add_argument("--source-cap", type=int, help="at most ~N images per source category (by defect type)")
    p.add_argument("--out", default="runs/loo", help="jobs, models, rows.json, tables.md, budget, figures")
    p = _command(sub, "report", cmd_report, "write docs/results.md (tables, figures) from committed loo rows")
    p.add_argument("--rows", nargs="+", required=True, metavar="ROWS_JSON", help="loo's rows.json files")
    p.add_argument("--out", default="docs/results.md", help="the page; its figures go beside it")
    p.add_argument("--readme", help="also rewrite this README's block between the results markers")
    p.add_argument("--anchors", help="published figures (default: anchors.json beside --out)")
    p = _command(sub, "cache", cmd_cache, "show or empty the feature store", "store")
    p.add_argument("action", choices=("info", "clear"))
    p.add_argument("--json", action="store_true", help="info as one JSON object")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "feature_store", None):
        from visinspect.backbones.store import STORE_ENV

        # Through the environment: every library call (and any subprocess) then uses that store.
        os.environ[STORE_ENV] = args.feature_store
    try:
        if args.func in (cmd_pretrain, cmd_train, cmd_predict):  # data-parallel under torchrun
            from visinspect import distributed

            distributed.init_from_env(getattr(args, "device", "auto"))
            if not distributed.is_main():
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (rank 0 alone prints; errors still do)
        return int(args.func(args) or 0)
    except VisinspectError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = getattr(args, "interrupted", "")
        print(f"interrupted{': ' + hint if hint else ''}", file=sys.stderr)
        return 130
