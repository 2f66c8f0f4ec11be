"""Command line: `python -m visinspect <command>`; `python -m visinspect <command> --help` for options.

User errors (missing folder, bad file, wrong value) print one line and exit with status 2;
a traceback means a bug in visinspect.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from visinspect.errors import VisinspectError
from visinspect.experiments.demo import SOURCE as SYNTHETIC_SOURCE
from visinspect.experiments.demo import TARGET as SYNTHETIC_TARGET
from visinspect.experiments.demo import DemoSettings
from visinspect.methods.simclr.pretrain import LEVER_SETS as PRETRAIN_LEVER_SETS
from visinspect.methods.simclr.pretrain import LEVERS as PRETRAIN_LEVERS


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _data_roots(args) -> list[Path]:
    """The --data roots, or the embedded synthetic dataset (generated on first use)."""
    if args.data:
        return [Path(d) for d in args.data]
    from visinspect.data.samples import default_synthetic_root
    from visinspect.data.synthetic import ensure_synthetic_dataset

    return [ensure_synthetic_dataset(default_synthetic_root())]


def _categories(args, default: Sequence[str]) -> list[str] | None:
    if args.categories:
        return _csv(args.categories)
    return list(default) if not args.data else None


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False))


# ----------------------------------------------------------------------------- commands


def cmd_info(args) -> int:
    from visinspect.data.samples import build_sample_table, load_mask, load_rgb, summarize

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
            print(
                f"| {cat} | {sp['train']['good']} | {sp['test']['good']} | "
                f"{sp['test']['anomaly']} | {s['masks']} | {types} |"
            )
        print(
            f"{len(table)} images; {len(table.stray_files)} stray files ignored; "
            f"{len(table.missing_masks)} defective images without mask"
        )
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
    from visinspect.data.synthetic import generate_synthetic_dataset

    out = generate_synthetic_dataset(
        args.out, seed=args.seed, image_size=args.image_size, overwrite=args.overwrite
    )
    print(f"wrote the synthetic dataset to {out}")
    return 0


def cmd_download(args) -> int:
    from visinspect.data.download import download_categories

    paths = download_categories(
        _csv(args.categories),
        Path(args.to),
        archive=Path(args.archive) if args.archive else None,
        sha256=args.sha256,
    )
    for p in paths:
        print(f"ready: {p}")
    return 0


def _train_val(args, source_default: Sequence[str]):
    from visinspect.data.samples import build_sample_table, stratified_split, unknown_context_split

    table = build_sample_table(_data_roots(args), split="all")
    names = _categories(args, source_default) or table.categories
    source, _ = unknown_context_split(table.samples, names, [])
    return stratified_split(source, args.val_fraction, args.seed)


def cmd_train(args) -> int:
    from visinspect.backbones.vgg16 import describe_backbone
    from visinspect.checkpoint import save_classifier, save_settings
    from visinspect.errors import ConfigError
    from visinspect.methods.registry import (
        METHODS,
        RECOMMENDED,
        backbone_info,
        make_detector,
        method,
        untrained,
    )
    from visinspect.training import TrainConfig, train_baseline

    chosen = method(args.method or RECOMMENDED)
    if chosen.trains is None:  # nothing to learn from the source products
        model, info = untrained(chosen.name, args.image_size, args.backbone_weights, args.seed)
        patches = make_detector(chosen.name, model, info).patch_provenance  # fails early without weights
        if model is None:  # its patch network is all it reads: record which weights, keep none
            save_settings(args.out, **backbone_info(args.image_size, patches), method=chosen.name)
            kept = "settings (no weights)"
        else:
            save_classifier(args.out, model, **info, method=chosen.name)
            kept = "settings and VGG16 backbone"
        print(f"method {chosen.name!r} trains nothing (it learns from the K good images given to "
              f"`predict`); saved its {kept} to {args.out}")
        print("patch features: " + describe_backbone(patches))
        return 0
    if chosen.trains not in ("baseline", "residual"):
        # The same detector over the baseline's training is what `--pretrained` turns into it.
        base = next((m.name for m in METHODS.values()
                     if m.detector is chosen.detector and m.trains == "baseline"), None)
        then = (f"`train --pretrained FILE --method {base}`: {base!r} on the pre-trained backbone is "
                f"{chosen.name!r}" if base else "`train --pretrained FILE`")
        raise ConfigError(
            f"method {chosen.name!r} needs SimCLR pre-training: run `pretrain` (with "
            "--include-target-good for the +target-good and simclr+LEVER variants, and a lever's flag, "
            f"e.g. --l2sp-weight 100 for simclr+l2sp), then {then}"
        )
    if args.pretrained and chosen.trains == "residual":
        raise ConfigError(
            "--pretrained starts the classifier from SimCLR; the residual method trains from ImageNet"
        )
    train, val = _train_val(args, SYNTHETIC_SOURCE)
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        image_size=args.image_size,
        seed=args.seed,
        precision=args.precision,
    )
    print(
        f"training on {len(train)} images of {', '.join(sorted({s.category for s in train}))}; "
        f"{len(val)} validation images"
    )
    state = Path(str(args.out) + ".state")
    model = provenance = None
    if args.pretrained:
        from visinspect.backbones.vgg16 import VGG16CAM
        from visinspect.methods.simclr.pretrain import load_pretrained_encoder

        model = VGG16CAM()
        provenance = load_pretrained_encoder(args.pretrained, model)
    try:
        if chosen.trains == "residual":
            from visinspect.methods.residual import train_residual

            model, info = train_residual(train, val, config, weights=args.backbone_weights,
                                         device=args.device, checkpoint_path=state, resume=args.resume)
        else:
            model, info = train_baseline(
                train,
                val,
                config,
                weights=args.backbone_weights,
                model=model,
                provenance=provenance,
                checkpoint_path=state,
                resume=args.resume,
                device=args.device,
            )
    except KeyboardInterrupt:
        # A state of at most train.STATE_EVERY_S ago is on disk (written atomically).
        print(
            f"interrupted: continue with --resume {state}" if state.is_file() else "interrupted",
            file=sys.stderr,
        )
        return 130
    # What the method learns on top of the trained model (e.g. fused-learnt's weight) goes with it.
    detector = make_detector(chosen.name, model, info, precision=args.precision, seed=args.seed)
    info |= detector.fit_sources(train, val)
    save_classifier(args.out, model, **info, method=chosen.name)
    state.unlink(missing_ok=True)
    print(f"method {chosen.name!r}: {chosen.about}")
    print(describe_backbone(info["backbone"]))
    h = info["history"]
    print(
        f"{h['epochs_run']} epochs, final train loss {h['loss'][-1]:.4f}, "
        f"accuracy {h['accuracy'][-1]:.3f}; validation threshold (logit margin) "
        f"{info['threshold']:.3f}"
    )
    if "fusion_weight" in info:
        w = info["fusion_weight"]
        print(f"fusion weight learnt on {', '.join(w['products'])}: classifier {w['classifier']:.2f}, "
              f"reference {1 - w['classifier']:.2f}")
    print(f"saved {args.out}")
    return 0


def _threshold(value: str, info: dict) -> float:
    """--threshold as a logit margin: 'val' (the checkpoint's) or a P(anomaly) such as 0.5."""
    from visinspect.errors import ConfigError
    from visinspect.evaluate import probability_to_margin

    if value == "val":
        return float(info["threshold"])
    try:
        p = float(value)
    except ValueError:
        raise ConfigError(f"--threshold must be 'val' or a probability such as 0.5; got {value!r}") from None
    return probability_to_margin(p)


def _evaluate_checkpoint(args, default_categories: Sequence[str]) -> dict:
    """The report of a checkpoint's method (or --method) on some categories. Methods that adapt to
    K good images of a product (and the baseline with --calibrate K) take K good train/ images of
    each category, which are then left out of the images evaluated; the calibration is saved next
    to the checkpoint. With --calibrate, the report keeps the uncalibrated classifier's too."""
    from visinspect.calibration import DEFAULT_K
    from visinspect.checkpoint import load_method_checkpoint
    from visinspect.data.samples import build_sample_table
    from visinspect.methods.registry import make_detector

    model, info = load_method_checkpoint(args.checkpoint)
    name = args.method or info.get("method", "baseline")
    detector = make_detector(name, model, info, precision=args.precision,
                             false_alarm_rate=args.false_alarm_rate)
    detector.progress = not args.quiet
    if not detector.uses_good:
        detector.threshold = _threshold(args.threshold, info)  # checked before the slow part
    table = build_sample_table(_data_roots(args), _categories(args, default_categories), split=args.split)
    samples, calibration, plain = table.samples, None, None
    loc = {"box_threshold": args.box_threshold, "min_area": args.min_area}
    if args.calibrate and not detector.uses_good:  # the classifier, and calibrated on K good images
        plain = detector
        detector = make_detector(f"{name} calibrated", model, info, precision=args.precision,
                                 false_alarm_rate=args.false_alarm_rate)
    if detector.uses_good:
        calibration, samples = _adapt(detector, samples, args.calibrate or DEFAULT_K, args)
    report = _report(detector, samples, args, loc)
    if calibration is not None:
        report["threshold_rule"] = (
            f"calibrated on {calibration['k']} good train/ images per category, rule "
            f"{calibration['rule']!r} (false-alarm rate {args.false_alarm_rate})"
        )
        report["calibration"] = calibration
    if plain is not None:  # on the same images
        uncalibrated = _report(plain, samples, args, loc)
        report["uncalibrated"] = {k: v for k, v in uncalibrated.items() if k != "per_defect_type"}
    report["method"] = detector.name
    report["backbone"] = info["backbone"] if model is not None else None  # the VGG16's, if any
    if detector.patch_provenance is not None:  # the network of its nearest-good-patch score
        report["patch_backbone"] = detector.patch_provenance
    report["checkpoint"] = str(args.checkpoint)
    return report


def _report(detector, samples, args, loc: dict) -> dict:
    from visinspect.evaluate import evaluate_scored
    from visinspect.methods.base import IDENTITY

    scored = detector.score(samples)
    heat_mode = args.heat_mode if detector.normalizer is not None else "image"
    report = evaluate_scored(scored, detector.threshold, score_name=detector.score_name,
                             heat_mode=heat_mode, normalizer=detector.normalizer, **loc)
    rule = detector.info.get("threshold_rule", "")
    report["threshold_rule"] = rule if args.threshold == "val" else f"P(anomaly) > {args.threshold}"
    report["heat_mode"] = "calibrated" if detector.normalizer is IDENTITY else heat_mode
    return report


def _adapt(detector, samples, k: int, args) -> tuple[dict, list]:
    """Adapt the detector to K good train/ images of each category; save the calibrations next to
    the checkpoint; return what was used and the images left to evaluate on (never the K)."""
    from visinspect.calibration import default_calibration_path, save_calibration, select_good_images

    for category in sorted({s.category for s in samples}):
        detector.adapt(select_good_images(samples, category, k, seed=0))
    by_category = detector.calibrations
    path = save_calibration(default_calibration_path(args.checkpoint, k), by_category)
    print(f"{detector.name}: adapted to {k} good images per category; calibration saved to {path}")
    _print_outliers(by_category.values())
    used = {p for c in by_category.values() for p in c.images}
    calibration = {
        "k": k,
        "false_alarm_rate": args.false_alarm_rate,
        "rule": next(iter(by_category.values())).rule,  # every category: the library's default
        "threshold": {c: cal.threshold for c, cal in by_category.items()},
        "images": {c: cal.images for c, cal in by_category.items()},
        "outliers": {c: cal.outliers for c, cal in by_category.items()},  # left out of the threshold
        "file": str(path),
    }
    return calibration, [s for s in samples if str(s.path) not in used]


def _print_outliers(calibrations) -> None:
    from visinspect.calibration import outlier_note

    for note in filter(None, map(outlier_note, calibrations)):
        print(note)


def cmd_evaluate(args) -> int:
    from visinspect.backbones.vgg16 import describe_backbone
    from visinspect.evaluate import markdown_table, round_floats

    report = _evaluate_checkpoint(args, SYNTHETIC_TARGET)
    if "uncalibrated" in report:
        print(
            markdown_table(
                report["uncalibrated"],
                title="Before calibration (threshold learnt on the training products): ",
            ),
            end="\n\n",
        )
        print(markdown_table(report, title="After calibration on good images of each product: "))
    else:
        print(markdown_table(report))
    if report["backbone"] is not None:
        print(describe_backbone(report["backbone"]))
    if (report.get("patch_backbone") or {}).get("network"):  # a patch network other than VGG16
        print("patch features: " + describe_backbone(report["patch_backbone"]))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(round_floats(report), indent=2) + "\n")
        print(f"wrote {out}")
    return 0


def cmd_predict(args) -> int:
    from visinspect.backbones.vgg16 import describe_backbone
    from visinspect.distributed import predict_images
    from visinspect.methods.registry import load_detector, make_detector

    if args.calibration:
        # A calibration file of `evaluate --calibrate K`: the product's own threshold and heatmap
        # scale replace the ones the classifier learnt on other products.
        from visinspect.checkpoint import load_classifier

        cal = _pick_calibration(args.calibration, args.category)
        model, info = load_classifier(args.checkpoint)
        detector = make_detector("baseline calibrated", model, info, precision=args.precision)
        detector.calibrations[cal.category], detector.product = cal, cal.category
        print(f"calibration for {cal.category!r}: threshold (logit margin) {cal.threshold:.3f}, "
              f"from {cal.k} good images")
        _print_outliers([cal])  # evaluate --calibrate named them when it wrote the file; again here
    else:
        detector = load_detector(args.checkpoint, method=args.method, reference=args.reference_dir,
                                 precision=args.precision)
        if detector.uses_good:
            print(f"method {detector.name!r}, adapted to {len(args.reference_dir)} reference folder(s) "
                  f"of good {detector.product!r} images")
            _print_outliers(detector.calibrations.values())
        if (detector.patch_provenance or {}).get("network"):  # a patch network other than VGG16
            print("patch features: " + describe_backbone(detector.patch_provenance))
    summary = predict_images(
        detector,
        [Path(p) for p in args.inputs],
        Path(args.out),
        overlays=not args.no_overlays,
        batch_size=args.batch_size,
        box_threshold=args.box_threshold,
        min_area=args.min_area,
        resume=args.resume,
    )
    print(
        f"{summary['n_images']} images: {summary['n_anomalous']} predicted anomalous, "
        f"{summary['n_failed']} failed; results in {args.out}"
    )
    return 1 if summary["n_failed"] else 0


def _pick_calibration(path: str, category: str | None):
    from visinspect.calibration import load_calibration
    from visinspect.errors import ConfigError

    calibrations = load_calibration(path)
    if category is None and len(calibrations) == 1:
        return next(iter(calibrations.values()))
    if category not in calibrations:
        raise ConfigError(
            f"{path} holds calibrations for {', '.join(sorted(calibrations))}: name the product "
            "of these images with --category"
        )
    return calibrations[category]


def cmd_demo(args) -> int:
    """Train on the synthetic source categories, evaluate on the held-out ones, draw a grid."""
    from visinspect.backbones.cam import HeatmapNormalizer
    from visinspect.backbones.vgg16 import describe_backbone
    from visinspect.evaluate import evaluate_predictions, markdown_table, round_floats
    from visinspect.experiments.demo import DemoSettings, demo_model, demo_split
    from visinspect.scoring import predict
    from visinspect.viz.plots import plot_prediction_grid, save_figure

    out = Path(args.out)
    settings = DemoSettings(image_size=args.image_size, epochs=args.epochs, seed=args.seed)
    model, info = demo_model(out / "baseline.pt", settings, weights=args.backbone_weights, retrain=True)
    _, _, test = demo_split(settings=settings)
    preds = predict(model, test, settings.image_size, precision=args.precision)
    normalizer = HeatmapNormalizer.from_dict(info["normalizer"])
    threshold = float(info["threshold"])
    report = evaluate_predictions(
        preds, threshold, normalizer=normalizer, box_threshold=args.box_threshold, min_area=args.min_area
    )
    report["backbone"] = info["backbone"]
    title = (
        f"Unknown context: trained on {', '.join(SYNTHETIC_SOURCE)}; tested on "
        f"{', '.join(SYNTHETIC_TARGET)} (synthetic, {settings.image_size} px). "
    )
    table = markdown_table(report, title=title) + "\n\n" + describe_backbone(info["backbone"])
    (out / "metrics.md").write_text(table + "\n")
    (out / "metrics.json").write_text(json.dumps(round_floats(report), indent=2) + "\n")
    print(table)
    picks = _grid_indices(preds.labels, preds.margins, per_class=6)
    fig = plot_prediction_grid(
        preds,
        picks,
        threshold,
        normalizer=normalizer,
        box_threshold=args.box_threshold,
        min_area=args.min_area,
        ncols=4,
    )
    save_figure(fig, out / "predictions.png")
    print(
        f"wrote {out / 'baseline.pt'}, {out / 'metrics.md'}, {out / 'metrics.json'}, "
        f"{out / 'predictions.png'}"
    )
    return 0


def cmd_pretrain(args) -> int:
    from visinspect.data.samples import build_sample_table, unknown_context_split
    from visinspect.methods.simclr.pretrain import (
        PretrainConfig,
        build_simclr_model,
        pretrain,
        pretrain_samples,
        save_pretrained,
    )
    from visinspect.utils import resolve_device

    table = build_sample_table(_data_roots(args))
    source = (
        _csv(args.source) if args.source else list(SYNTHETIC_SOURCE if not args.data else table.categories)
    )
    target = _csv(args.target) if args.target else ([] if args.data else list(SYNTHETIC_TARGET))
    src, tgt = unknown_context_split(table.samples, source, target)
    preset = PretrainConfig.demo if args.preset == "demo" else PretrainConfig.full
    names = ("epochs", "image_size", "seed", "trainable_from", "temperature", *PRETRAIN_LEVERS)
    overrides = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    config = preset(**overrides)
    images = pretrain_samples(src, tgt, include_target_good=args.include_target_good)
    levers = ", ".join(f"{k}={getattr(config, k)}" for k in PRETRAIN_LEVERS if getattr(config, k))
    print(
        f"SimCLR pre-training on {len(images)} unlabeled images ({args.preset} preset, "
        f"{config.image_size} px, {config.epochs} epochs, temperature {config.temperature}"
        f"{', levers: ' + levers if levers else ''})"
    )
    model, provenance = build_simclr_model(config, args.backbone_weights)
    model.to(resolve_device(args.device))
    state = Path(str(args.out) + ".state")
    try:
        history = pretrain(model, images, config, checkpoint_path=state, resume=args.resume)
    except KeyboardInterrupt:
        # The state after the last finished epoch is already on disk (written atomically).
        print(f"interrupted: continue with --resume {state}" if state.is_file() else "interrupted",
              file=sys.stderr)
        return 130
    save_pretrained(args.out, model, config, history, provenance)
    state.unlink(missing_ok=True)
    print(f"loss per epoch {history['loss']}; {history['images_per_s'][-1]:.1f} images/s")
    print(f"saved {args.out}; train a classifier on it with `train --pretrained {args.out}`")
    return 0


def cmd_compare(args) -> int:
    from visinspect.evaluate import round_floats
    from visinspect.experiments.compare import ComparePreset, run_comparison, summary_table
    from visinspect.viz.plots import plot_metric_bars, plot_metric_vs_k, plot_model_heatmaps, save_figure

    source = _csv(args.source) if args.source else list(SYNTHETIC_SOURCE)
    target = _csv(args.target) if args.target else list(SYNTHETIC_TARGET)
    calibrate = [int(k) for k in _csv(args.calibrate)] if args.calibrate else []
    rows, first = run_comparison(
        _data_roots(args),
        source,
        target,
        seeds=range(args.first_seed, args.first_seed + args.seeds),
        preset=dataclasses.replace(ComparePreset.named(args.preset), precision=args.precision),
        calibrate=calibrate,
        weights=args.backbone_weights,
        device=args.device,
        log=lambda m: print(m, file=sys.stderr),
    )
    print(summary_table(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": round_floats(rows)}, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.figures:
        out = Path(args.figures)
        if len(calibrate) > 1:
            for metric in ("image_auroc", "balanced_accuracy"):
                save_figure(plot_metric_vs_k(rows, metric), out / f"compare_{metric}_vs_k.png")
        for metric in ("image_auroc", "f1"):
            save_figure(
                plot_metric_bars([r for r in rows if r["target"] != "all"], metric),
                out / f"compare_{metric}.png",
            )
        base = first.scored["baseline"] if "baseline" in first.scored else next(iter(first.scored.values()))
        picks = [str(base.samples[i].path) for i in _grid_indices(base.labels, base.scores, 2)]
        shown = {m: s for m, s in first.scored.items() if "k=" not in m or m.endswith(f"k={max(calibrate)}")}
        figure = plot_model_heatmaps(shown, first.normalizers, picks, rows=first.rows)
        save_figure(figure, out / "compare_heatmaps.png")
        print(f"wrote figures to {out}")
    return 0


def cmd_loo(args) -> int:
    from visinspect.experiments.compare import ComparePreset
    from visinspect.experiments.loo import DEFAULT_MODELS, LeaveOneOut

    preset = dataclasses.replace(ComparePreset.named(args.preset), precision=args.precision)
    if args.source_cap is not None:
        preset = dataclasses.replace(preset, max_source_per_category=args.source_cap)
    run = LeaveOneOut(
        args.data,
        args.out,
        targets=_csv(args.targets) if args.targets else None,
        models=_csv(args.models) if args.models else DEFAULT_MODELS,
        seeds=args.seeds,
        calibrate=[int(k) for k in _csv(args.calibrate)] if args.calibrate else [],
        preset=preset,
        weights=args.backbone_weights,
        device=args.device,
        log=lambda m: print(m, flush=True),
    )
    try:
        run.run()
    except KeyboardInterrupt:
        print(f"interrupted: run the same command again to continue (finished jobs are in {args.out})",
              file=sys.stderr)
        return 130
    print(f"wrote {Path(args.out) / 'rows.json'}, tables.md, budget.json and the figures")
    return 0


def cmd_cache(args) -> int:
    from visinspect.backbones.store import FeatureStore

    store = FeatureStore.default()
    if not store.enabled:
        print("the feature store is off (VISINSPECT_FEATURE_STORE=off): nothing is kept")
        return 0
    if args.action == "clear":
        freed = store.clear()
        print(f"cleared the feature store {store.root}: {freed / 2**20:.1f} MiB freed")
        return 0
    info = store.info()
    if args.json:
        _print_json(info)
        return 0
    print(f"feature store: {info['root']} (set with --feature-store or VISINSPECT_FEATURE_STORE)")
    print(f"{info['entries']} entries, {info['bytes'] / 2**20:.1f} MiB")
    for ns in info["namespaces"]:
        print(
            f"\n{ns['layer']} at {ns['image_size']} px, {ns['precision']} computed, {ns['dtype']} stored, "
            f"weights {ns['weights'][:12]}...: {ns['entries']} entries, {ns['bytes'] / 2**20:.1f} MiB"
        )
        print("| dataset | entries | MiB |\n| --- | --- | --- |")
        for name, d in ns["datasets"].items():
            print(f"| {name} | {d['entries']} | {d['bytes'] / 2**20:.1f} |")
    return 0


def _grid_indices(labels, scores, per_class: int) -> list[int]:
    """The highest-scoring anomalies and good images: what a person wants to look at first."""
    import numpy as np

    order = np.argsort(-scores, kind="stable")
    anomalies = [int(i) for i in order if labels[i] == 1][:per_class]
    goods = [int(i) for i in order if labels[i] == 0][:per_class]
    return anomalies + goods


# ----------------------------------------------------------------------------- parser


def _add_store(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--feature-store",
        metavar="DIR",
        help="where frozen-layer features are kept (default: $VISINSPECT_FEATURE_STORE, else "
        "~/.cache/visinspect/features); 'off' keeps nothing",
    )


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="'auto' (a CUDA GPU if any, else the CPU), 'cpu', 'cuda'")


def _add_data(p: argparse.ArgumentParser, categories_help: str) -> None:
    p.add_argument(
        "--data",
        nargs="+",
        metavar="ROOT",
        help="one or more data roots in MVTec layout (default: the embedded synthetic dataset)",
    )
    p.add_argument("--categories", help=categories_help)


def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument(
        "--box-threshold",
        type=float,
        default=0.5,
        help="heatmap threshold in [0, 1] for boxes (higher = smaller, fewer boxes)",
    )
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

    for name, func, helptext in (
        ("train", cmd_train, "train the VGG16-CAM baseline"),
        ("demo", cmd_demo, "train + evaluate + figure on synthetic data"),
    ):
        p = sub.add_parser(name, help=helptext)
        if name == "train":
            _add_data(p, "comma-separated training (source) categories")
            p.add_argument("--out", default="weights/baseline.pt")
            p.add_argument("--image-size", type=int, default=224)
            p.add_argument("--resume", help="continue from OUT.state written after each epoch")
            p.add_argument("--pretrained", help="start from a SimCLR checkpoint (pretrain --out)")
            p.add_argument(
                "--method",
                help="the method the checkpoint is for (default: the recommended one, see README); "
                "predict and evaluate score with it",
            )
        else:
            p.set_defaults(data=None)
            p.add_argument("--out", default="runs/demo")
            p.add_argument("--image-size", type=int, default=DemoSettings.image_size)
            p.set_defaults(resume=None, pretrained=None)
            _add_eval(p)
        p.add_argument("--epochs", type=int, default=10 if name == "train" else DemoSettings.epochs)
        p.add_argument("--batch-size", type=int, default=10)
        p.add_argument("--lr", type=float, default=1e-4)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--val-fraction", type=float, default=0.2)
        p.add_argument(
            "--backbone-weights",
            default="auto",
            help="a .pth file, 'auto' (env VISINSPECT_BACKBONE_WEIGHTS, then torchvision) or 'random'",
        )
        if name == "train":
            p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
            _add_device(p)
        _add_store(p)
        p.set_defaults(func=func)

    p = sub.add_parser("pretrain", help="SimCLR pre-training of the VGG16 backbone (labels unused)")
    p.add_argument("--data", nargs="+", metavar="ROOT", help="data roots (default: synthetic)")
    p.add_argument("--source", help="comma-separated source categories (default: all but --target)")
    p.add_argument("--target", help="comma-separated target categories (never their test images)")
    p.add_argument(
        "--include-target-good",
        action="store_true",
        help="also pre-train on the targets' unlabeled train/good images",
    )
    p.add_argument("--out", default="weights/simclr.pt")
    p.add_argument("--resume", help="continue from OUT.state, written after each epoch")
    p.add_argument("--preset", default="demo", choices=("demo", "full"))
    p.add_argument("--epochs", type=int)
    p.add_argument("--image-size", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--trainable-from", type=int, help="first trainable layer index of VGG16 features")
    p.add_argument("--seed", type=int)
    p.add_argument("--backbone-weights", default="auto")
    # The anomaly-detection levers of visinspect.methods.simclr.pretrain.PretrainConfig (all off by default).
    for name in PRETRAIN_LEVERS:
        flag = "--" + name.replace("_", "-")
        if name.endswith("_weight"):
            p.add_argument(flag, type=float, help=f"PretrainConfig.{name} (0 = off)")
        else:
            p.add_argument(flag, action="store_true", default=None, help=f"PretrainConfig.{name}")
    _add_device(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("compare", help="baseline vs SimCLR vs few good parts on one split")
    p.add_argument("--data", nargs="+", metavar="ROOT", help="data roots (default: synthetic)")
    p.add_argument("--source", help="comma-separated source (training) categories")
    p.add_argument("--target", help="comma-separated target (unknown) categories")
    p.add_argument("--seeds", type=int, default=1, help="N seeds from --first-seed; mean ± std over them")
    p.add_argument("--first-seed", type=int, default=0, help="run seeds S..S+N-1 (to split runs up)")
    p.add_argument("--preset", default="demo", choices=("demo", "medium", "full"))
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    _add_device(p)
    p.add_argument("--calibrate", help="comma-separated K values, e.g. 5,20,50: few-good-parts rows")
    p.add_argument("--json", help="write {'rows': [...]} to this file")
    p.add_argument("--figures", help="write bar charts and side-by-side heatmaps to this folder")
    p.add_argument("--backbone-weights", default="auto")
    _add_store(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("loo", help="leave-one-out over real products: each in turn is the unknown one")
    p.add_argument("--data", nargs="+", metavar="ROOT", required=True, help="data roots in MVTec layout")
    p.add_argument(
        "--targets", help="comma-separated (default: every category with good and defective test images)"
    )
    p.add_argument(
        "--models",
        help="comma-separated row names without ' k=K' (default: baseline,baseline calibrated,"
        "reference,fused,fused-top5,reference-mobilenet,reference-mobilenet+patterns,fused-mobilenet; "
        "also simclr-source[ calibrated], "
        "simclr-source+target-good[ calibrated], "
        f"simclr+LEVER[ calibrated] with LEVER one of {', '.join(PRETRAIN_LEVER_SETS)}, and the "
        "other methods of the README's table)",
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1; tables give mean ± std over them")
    p.add_argument("--calibrate", default="5,20,50", help="K values (good images of the target)")
    p.add_argument("--preset", default="full", choices=("demo", "medium", "full"))
    p.add_argument(
        "--source-cap", type=int, help="at most ~N images per source category (stratified by defect type)"
    )
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument(
        "--out", default="runs/loo", help="jobs, models, rows.json, tables.md, budget.json, figures"
    )
    p.add_argument("--backbone-weights", default="auto")
    _add_device(p)
    _add_store(p)
    p.set_defaults(func=cmd_loo)

    p = sub.add_parser("cache", help="show or empty the feature store")
    p.add_argument("action", choices=("info", "clear"))
    p.add_argument("--json", action="store_true", help="info as one JSON object")
    _add_store(p)
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("evaluate", help="metrics of a checkpoint on some categories")
    p.add_argument("--checkpoint", required=True)
    _add_data(p, "comma-separated test (target) categories")
    p.add_argument("--split", default="all", choices=("all", "train", "test"))
    p.add_argument(
        "--threshold",
        default="val",
        help="'val' (the checkpoint's validation threshold) or a P(anomaly) such as 0.5",
    )
    p.add_argument("--heat-mode", default="dataset", choices=("dataset", "image"))
    p.add_argument("--method", help="evaluate this method instead of the checkpoint's")
    p.add_argument("--json", help="write every metric to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--calibrate",
        type=int,
        metavar="K",
        help="fit threshold and heatmap scale per category on K good train/ images "
        "(they are then left out of the test images)",
    )
    p.add_argument(
        "--false-alarm-rate",
        type=float,
        default=0.01,
        help="with --calibrate: share of good images allowed above the threshold",
    )
    _add_eval(p)
    _add_store(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="score images or folders; PNG overlays and JSON lines")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-overlays", action="store_true", help="JSON only (faster)")
    p.add_argument("--resume", action="store_true", help="skip images already in OUT/predictions.jsonl")
    p.add_argument(
        "--reference-dir",
        action="append",
        metavar="GOOD_IMAGES",
        help="a folder (or file) of good images of the product, repeatable: the methods that adapt "
        "to K good images fit their threshold, heatmap scale (and memory bank) on them",
    )
    p.add_argument("--method", help="score with this method instead of the checkpoint's")
    p.add_argument("--calibration", help="a calibration JSON (evaluate --calibrate K writes one)")
    p.add_argument("--category", help="with --calibration: which product these images show")
    _add_eval(p)
    _add_store(p)
    p.set_defaults(func=cmd_predict)
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
        print("interrupted", file=sys.stderr)
        return 130
