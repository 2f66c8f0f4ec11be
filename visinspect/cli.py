"""Command line: `python -m visinspect <command>`; `python -m visinspect <command> --help` for options.

This module parses arguments, calls the library function a notebook would call too, and prints.
Each command imports what it needs when it runs, so `--help` and argument errors answer at once;
it returns its exit status where it can fail (None: 0). User errors (missing folder, bad file,
wrong value) print one line and exit with status 2; a traceback means a bug in visinspect.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from visinspect.errors import VisinspectError
from visinspect.methods.simclr.levers import LEVERS as PRETRAIN_LEVERS


def _csv(value: str) -> list[str]:
    """A comma-separated option as a list (the parser's type for them)."""
    return [v.strip() for v in value.split(",") if v.strip()]


def _ints(value: str) -> list[int]:
    return [int(v) for v in _csv(value)]


def _given(settings: type, args: argparse.Namespace) -> dict:
    """The options given (not None) that are fields of the dataclass `settings`: the parser's names
    are the library's, so a new field needs only its option, and None leaves the library's default."""
    names = {f.name for f in dataclasses.fields(settings)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def _resumable(args) -> Path:
    """OUT.state, where a long command keeps its state, named in the message a Ctrl-C prints."""
    state = Path(f"{args.out}.state")
    args.interrupted = f"continue with --resume {state} (written as it goes)"
    return state


# ----------------------------------------------------------------------------- commands


def cmd_info(args) -> int:
    from visinspect.data.samples import check_readable, describe_data
    from visinspect.data.synthetic import data_roots

    table, text = describe_data(data_roots(args.data), args.categories, as_json=args.json)
    print(text)
    return int(args.check and not check_readable(table, log=lambda m: print(m, file=sys.stderr)))


def cmd_synth(args) -> None:
    from visinspect.data.synthetic import generate_synthetic_dataset

    out = generate_synthetic_dataset(args.out, seed=args.seed, image_size=args.image_size,
                                     overwrite=args.overwrite)
    print(f"wrote the synthetic dataset to {out}")


def cmd_download(args) -> None:
    from visinspect.data.download import download_categories

    for p in download_categories(args.categories, args.to, archive=args.archive, sha256=args.sha256):
        print(f"ready: {p}")


def cmd_methods(args) -> None:
    from visinspect.methods.registry import methods_markdown

    print(methods_markdown(defaults_only=args.defaults))


def cmd_train(args) -> None:
    from visinspect.experiments.demo import source_images
    from visinspect.methods.registry import RECOMMENDED, method, train_to_file
    from visinspect.training import TrainConfig, TrainingRun

    chosen = method(args.method or RECOMMENDED)
    source = (source_images(args.data, args.categories, args.val_fraction, args.seed)
              if chosen.reads_sources else None)
    run = TrainingRun(TrainConfig(**_given(TrainConfig, args)), weights=args.weights,
                      device=args.device, progress=True, state=_resumable(args), resume=args.resume)
    train_to_file(args.out, chosen.name, source, run, args.pretrained)


def cmd_evaluate(args) -> None:
    from visinspect.experiments import evaluate_checkpoint as ev
    from visinspect.experiments.demo import target_table
    from visinspect.utils import write_json

    settings = ev.EvaluationSettings(**_given(ev.EvaluationSettings, args), progress=not args.quiet)
    samples = target_table(args.data, args.categories, args.split).samples
    report = ev.evaluate_checkpoint(args.checkpoint, samples, settings)
    print(ev.report_markdown(report))
    if args.json:
        print(f"wrote {write_json(args.json, report, digits=6)}")


def cmd_predict(args) -> int:
    from visinspect.methods.registry import load_detector
    from visinspect.predict import describe_counts, predict_on_ranks

    detector = load_detector(args.checkpoint, method=args.method, reference=args.reference_dir,
                             calibration=args.calibration, category=args.category, precision=args.precision)
    print(detector.describe())
    counts = predict_on_ranks(
        detector, args.inputs, args.out, overlays=not args.no_overlays, batch_size=args.batch_size,
        box_threshold=args.box_threshold, min_area=args.min_area, resume=args.resume,
        overlay_size=args.overlay_size, workers=args.workers,
    )
    print(describe_counts(counts, args.out))
    return 1 if counts["n_failed"] else 0


def cmd_demo(args) -> None:
    from visinspect.experiments.demo import DemoSettings, run_demo

    settings = DemoSettings(**_given(DemoSettings, args))
    table, paths = run_demo(args.out, settings, weights=args.weights, precision=args.precision,
                            box_threshold=args.box_threshold, min_area=args.min_area)
    print(table)
    print(f"wrote {', '.join(map(str, paths))}")


def cmd_pretrain(args) -> None:
    from visinspect.experiments.demo import unknown_context_images
    from visinspect.methods.simclr.pretrain import PretrainConfig
    from visinspect.methods.simclr.training import pretrain_to_file

    source, target = unknown_context_images(args.data, args.source, args.target)
    config = PretrainConfig.named(args.preset, **_given(PretrainConfig, args))
    _resumable(args)
    pretrain_to_file(args.out, source, target, config, include_target_good=args.include_target_good,
                     weights=args.weights, device=args.device, resume=args.resume)
    print(f"saved {args.out}; train a classifier on it with `train --pretrained {args.out}`")


def cmd_compare(args) -> None:
    from visinspect.experiments.compare import MODELS, ComparePreset, draw_figures, run_comparison
    from visinspect.experiments.tables import summary_table
    from visinspect.utils import write_json

    rows, first = run_comparison(
        args.data, args.source, args.target, seeds=range(args.first_seed, args.first_seed + args.seeds),
        preset=ComparePreset.named(args.preset, **_given(ComparePreset, args)), calibrate=args.calibrate,
        models=args.models or MODELS, weights=args.weights, device=args.device,
        log=lambda m: print(m, file=sys.stderr),
    )
    print(summary_table(rows))
    if args.json:
        print(f"wrote {write_json(args.json, {'rows': rows}, digits=6)}")
    if args.figures:
        draw_figures(rows, first, args.calibrate, args.figures)
        print(f"wrote figures to {args.figures}")


def cmd_loo(args) -> None:
    from visinspect.experiments.compare import ComparePreset
    from visinspect.experiments.loo import LeaveOneOut

    run = LeaveOneOut(
        args.data, args.out, targets=args.targets, models=args.models, seeds=args.seeds,
        calibrate=args.calibrate, preset=ComparePreset.named(args.preset, **_given(ComparePreset, args)),
        weights=args.weights, device=args.device, log=lambda m: print(m, flush=True),
    )
    args.interrupted = f"run the same command again to continue (finished jobs are in {args.out})"
    run.run()
    print(f"wrote {Path(args.out) / 'rows.json'}, tables.md, budget.json and the figures")


def cmd_report(args) -> None:
    from visinspect.experiments.report import write_report

    write_report(args.rows, args.out, readme=args.readme, anchors=args.anchors)
    print(f"wrote {args.out} and its figures" + (f"; the results of {args.readme}" if args.readme else ""))


def cmd_cache(args) -> None:
    from visinspect.backbones.store import FeatureStore

    store = FeatureStore.default()
    if store.enabled and args.action == "clear":
        print(f"cleared the feature store {store.root}: {store.clear() / 2**20:.1f} MiB freed")
    else:
        print(store.describe(as_json=args.json))


# ----------------------------------------------------------------------------- parser

# Options that several commands take, defined once: flag -> argparse keywords.
SHARED = {
    "--data": {"nargs": "+", "metavar": "ROOT",
               "help": "data roots in MVTec layout (default: the embedded synthetic dataset)"},
    "--precision": {"default": "auto", "choices": ("auto", "fp32", "bf16")},
    "--device": {"default": "auto", "help": "'auto' (a CUDA GPU if any), 'cpu', 'cuda'"},
    "--backbone-weights": {"dest": "weights", "default": "auto", "help": "a .pth file, 'auto' (env "
                           "VISINSPECT_BACKBONE_WEIGHTS, then torchvision) or 'random'"},
    "--feature-store": {"metavar": "DIR", "help": "where frozen-layer features are kept (default: "
                        "$VISINSPECT_FEATURE_STORE or ~/.cache/visinspect/features)"},
    "--box-threshold": {"type": float, "default": 0.5, "help": "heatmap threshold in [0, 1] for boxes"},
    "--min-area": {"type": int, "default": 16, "help": "smallest box, in pixels"},
    "--seed": {"type": int, "default": 0},
    "--preset": {"default": "demo", "choices": ("demo", "medium", "full")},
    "--calibrate": {"type": _ints, "default": "",
                    "help": "comma-separated K values (good images of a target)"},
    "--checkpoint": {"required": True},
    "--categories": {"type": _csv, "help": "comma-separated categories (default: all)"},
    "--source": {"type": _csv, "help": "comma-separated source (training) categories (default: the rest)"},
    "--target": {"type": _csv, "help": "comma-separated target (unknown) categories"},
    "--models": {"type": _csv, "help": "comma-separated method names, as `python -m visinspect methods` "
                 "lists them (loo's default: those it marks `loo` default)"},
    "--json": {"action": "store_true", "help": "print one JSON object"},
    "--method": {"help": "a method (`python -m visinspect methods` lists them); default: the checkpoint's, "
                 "for train the recommended one"},
    "--resume": {"type": Path, "help": "continue from OUT.state, written as it trains"},
    # The seed's training recipe; None leaves the library's default (TrainConfig's, DemoSettings').
    "--epochs": {"type": int},
    "--image-size": {"type": int},
    "--batch-size": {"type": int},
    "--lr": {"type": float},
    "--val-fraction": {"type": float, "default": 0.2},
}
RECIPE = ("--epochs", "--image-size", "--batch-size", "--lr", "--val-fraction")
RUN = ("--backbone-weights", "--precision", "--device", "--feature-store")  # where and how models run
BOXES = ("--box-threshold", "--min-area")
SCORING = ("--checkpoint", "--method", "--precision", *BOXES, "--feature-store")  # evaluate and predict


def _command(sub, name: str, func, helptext: str, *shared: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=helptext)
    for flag in shared:
        p.add_argument(flag, **SHARED[flag])
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m visinspect", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = _command(sub, "info", cmd_info, "count images per category, split and defect type", "--data",
                 "--json", "--categories")
    p.add_argument("--check", action="store_true", help="also open every image and mask")
    p = _command(sub, "synth", cmd_synth, "write the embedded synthetic dataset (MVTec layout)", "--seed")
    p.add_argument("out")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--overwrite", action="store_true")
    p = _command(sub, "download", cmd_download, "download MVTec AD categories (CC BY-NC-SA 4.0)")
    p.add_argument("--categories", type=_csv, required=True)
    p.add_argument("--to", type=Path, default="data/mvtec_ad")
    p.add_argument("--archive", type=Path, help="use an archive you downloaded yourself")
    p.add_argument("--sha256", help="expected sha256 of the archive")
    p = _command(sub, "methods", cmd_methods, "every method: what it trains, whether it adapts to good parts")
    p.add_argument("--defaults", action="store_true", help="only the methods `loo` runs by default")

    p = _command(sub, "train", cmd_train, "set up a method for new products (default: the recommended one)",
                 "--data", "--categories", "--method", "--seed", *RUN, "--resume", *RECIPE)
    p.add_argument("--out", default="weights/baseline.pt")
    p.add_argument("--pretrained", help="start from a SimCLR checkpoint (pretrain --out)")
    p = _command(sub, "demo", cmd_demo, "train + evaluate + figure on synthetic data", "--seed",
                 "--backbone-weights", "--precision", *BOXES, "--feature-store", *RECIPE)
    p.add_argument("--out", default="runs/demo")

    p = _command(sub, "pretrain", cmd_pretrain, "SimCLR pre-training of the VGG16 backbone (labels unused)",
                 "--data", "--source", "--target", "--seed", "--backbone-weights", "--device", "--resume",
                 "--epochs", "--image-size")
    p.add_argument("--include-target-good", action="store_true",
                   help="also pre-train on the targets' unlabeled train/good images")
    p.add_argument("--out", default="weights/simclr.pt")
    p.add_argument("--preset", default="demo", choices=("demo", "full"))
    p.add_argument("--temperature", type=float)
    p.add_argument("--trainable-from", type=int, help="first trainable layer index of VGG16 features")
    for name in PRETRAIN_LEVERS:  # PretrainConfig's anomaly levers (methods/simclr/levers.py), all off
        kind = {"type": float} if name.endswith("_weight") else {"action": "store_true", "default": None}
        p.add_argument("--" + name.replace("_", "-"), help=f"PretrainConfig.{name}", **kind)

    p = _command(sub, "evaluate", cmd_evaluate, "metrics of a checkpoint on some categories", "--data",
                 "--categories", *SCORING)
    p.add_argument("--split", default="all", choices=("all", "train", "test"))
    p.add_argument("--threshold", default="val", help="'val' (the checkpoint's) or a P(anomaly) such as 0.5")
    p.add_argument("--heat-mode", default="dataset", choices=("dataset", "image"))
    p.add_argument("--json", help="write every metric to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--calibrate", type=int, metavar="K", help="fit threshold and heatmap scale per category "
                   "on K good train/ images (then left out of the images evaluated)")
    p.add_argument("--false-alarm-rate", type=float, default=0.01,
                   help="with --calibrate: share of good images allowed above the threshold")

    p = _command(sub, "predict", cmd_predict, "score images or folders; overlays and JSON lines", *SCORING)
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
    p.add_argument("--calibration", help="a calibration JSON (evaluate --calibrate K writes one)")
    p.add_argument("--category", help="with --calibration: which product these images show")

    p = _command(sub, "compare", cmd_compare, "baseline vs SimCLR vs few good parts on one split", "--data",
                 "--models", "--source", "--target", "--calibrate", "--preset", *RUN)
    p.add_argument("--seeds", type=int, default=1, help="N seeds from --first-seed; mean ± std over them")
    p.add_argument("--first-seed", type=int, default=0, help="run seeds S..S+N-1 (to split runs up)")
    p.add_argument("--json", help="write {'rows': [...]} to this file")
    p.add_argument("--figures", help="write bar charts and side-by-side heatmaps to this folder")
    p = _command(sub, "loo", cmd_loo, "leave-one-out over real products: each in turn is the unknown one",
                 "--models", "--calibrate", "--preset", *RUN)
    p.set_defaults(calibrate="5,20,50", preset="full")
    p.add_argument("--data", nargs="+", metavar="ROOT", required=True, help="data roots in MVTec layout")
    p.add_argument("--targets", type=_csv,
                   help="comma-separated (default: each category with both kinds of test image)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1; tables give mean ± std over them")
    p.add_argument("--source-cap", type=int, dest="max_source_per_category", metavar="N",
                   help="at most ~N images per source category (by defect type)")
    p.add_argument("--out", default="runs/loo", help="jobs, models, rows.json, tables.md, budget, figures")
    p = _command(sub, "report", cmd_report, "write docs/results.md (tables, figures) from committed loo rows")
    p.add_argument("--rows", nargs="+", required=True, metavar="ROWS_JSON", help="loo's rows.json files")
    p.add_argument("--out", default="docs/results.md", help="the page; its figures go beside it")
    p.add_argument("--readme", help="also rewrite this README's block between the results markers")
    p.add_argument("--anchors", help="published figures (default: anchors.json beside --out)")
    p = _command(sub, "cache", cmd_cache, "show or empty the feature store", "--feature-store", "--json")
    p.add_argument("action", choices=("info", "clear"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "feature_store", None):
        from visinspect.backbones.store import use_everywhere

        use_everywhere(args.feature_store)
    try:
        if args.func in (cmd_pretrain, cmd_train, cmd_predict):  # data-parallel under torchrun
            from visinspect.distributed import init_command

            init_command(getattr(args, "device", "auto"))
        return int(args.func(args) or 0)
    except VisinspectError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = getattr(args, "interrupted", "")
        print(f"interrupted{': ' + hint if hint else ''}", file=sys.stderr)
        return 130
