"""Leave-one-out: each product in turn is the unknown one, every other product is the source.

The project's question on real data, as one resumable command (`python -m visinspect loo`):

1. **Frozen pass**: every image any split needs runs through the frozen VGG16 layers once, into
   the feature store (visinspect.backbones.store); nothing later runs them again.
2. **Jobs**, seed by seed, target by target. A *train* job trains one classifier variant on a
   split's source images and saves it (its training resumes per epoch if killed); a *score* job
   scores one model family on the split's target test images and writes its rows. Each job
   writes one file, atomically, under OUT; a run that finds the file skips the job, so a killed
   run started again continues where it stopped and ends with the same rows.
3. **Results**: OUT/rows.json (every row), OUT/tables.md, OUT/budget.json and the figures.

Models (`--models`): the method names of visinspect.methods.registry, as the rows carry them without their
" k=K" suffix ("baseline", "baseline calibrated", "reference", "fused", ...). A run may add methods,
targets or seeds to an OUT that holds earlier jobs of the same settings: the tables then show them
all.
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from visinspect.backbones.store import FeatureStore, use_store
from visinspect.calibration import DEFAULT_RULE
from visinspect.checkpoint import load_checkpoint, load_classifier, save_classifier
from visinspect.data.samples import Sample, build_sample_table, single_class_categories
from visinspect.errors import ConfigError
from visinspect.experiments.compare import (
    ComparePreset,
    SeedResult,
    Split,
    add_detector_rows,
    make_split,
    pivot_table,
    summary_table,
    train_variant,
)
from visinspect.methods.base import mobilenet_for
from visinspect.methods.registry import (
    METHODS,
    make_detector,
    untrained,
    untrained_backbone,
    without_vgg16_info,
)
from visinspect.utils import atomic_path, describe_machine, resolve_device, resolve_precision

MODELS = tuple(METHODS)
DEFAULT_MODELS = ("baseline", "baseline calibrated", "reference", "fused", "fused-top5",
                  "reference-mobilenet", "reference-mobilenet+patterns", "fused-mobilenet")
# A run's folder holds jobs of one setting: these must not change when a run is resumed or extended
# (the threshold rule: runs before the "fenced" rule lack it, and their thresholds differ).
FIXED = ("preset", "image_size", "epochs", "precision", "max_source_per_category", "max_test_per_category",
         "threshold_rule")
NO_FILL = {"images": 0, "computed": 0, "from_store": 0, "seconds": 0.0, "seconds_per_image": 0.25}
FEW_KEYS = ("image_auroc", "balanced_accuracy", "precision", "recall", "pixel_auroc", "box_hit_rate")


def default_targets(samples: Sequence[Sample]) -> list[str]:
    """Every category whose test/ folder has good and defective images."""
    test = [s for s in samples if s.split == "test"]
    return sorted({s.category for s in test} - set(single_class_categories(test)))


@dataclass(frozen=True)
class Job:
    """One unit of work: train a classifier variant, or score one model family, on one split."""

    kind: str  # "train" or "score"
    target: str
    seed: int
    name: str  # the variant (train) or the model family (score)

    def path(self, out: Path) -> Path:
        folder = out / ("models" if self.kind == "train" else "rows") / self.target / f"seed{self.seed}"
        return folder / (f"{self.name}.pt" if self.kind == "train" else f"{self.name}.json")

    def __str__(self) -> str:
        return f"{self.kind} {self.target} seed {self.seed} {self.name}"


def plan_jobs(targets: Sequence[str], models: Sequence[str], seeds: Sequence[int]) -> list[Job]:
    """Seed-major order, so that a partial run has whole seeds; within a split, each classifier
    is trained before the models that need it are scored."""
    jobs = []
    for seed in seeds:
        for target in targets:
            variants = dict.fromkeys(v for m in models if (v := METHODS[m].trains) is not None)
            jobs += [Job("train", target, seed, v) for v in variants]
            jobs += [Job("score", target, seed, m) for m in models]
    return jobs


def _check_models(models: Sequence[str]) -> list[str]:
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        names = ", ".join(unknown) or "(none given)"
        raise ConfigError(f"unknown model(s) {names}; known: {', '.join(MODELS)}")
    return list(dict.fromkeys(models))


class Estimator:
    """ETA from the jobs done so far: seconds per unit of work (see LeaveOneOut.units), per kind."""

    def __init__(self, fill_seconds_per_image: float) -> None:
        # Before a job of a kind has finished, guess from the frozen pass: a training epoch of
        # block 5 costs ~8.3 GFLOP per image against ~28 for the frozen layers; a SimCLR epoch
        # on top of it about as much again; scoring one image for one K ~3.
        guess = {"train": 0.3, "train-simclr": 0.8, "score": 0.1}
        self.rates = {kind: f * fill_seconds_per_image for kind, f in guess.items()}
        self.units = dict.fromkeys(guess, 0.0)
        self.spent = dict.fromkeys(guess, 0.0)

    def update(self, kind: str, units: float, seconds: float) -> None:
        self.units[kind] += units
        self.spent[kind] += seconds
        if self.units[kind] > 0:
            self.rates[kind] = self.spent[kind] / self.units[kind]

    def seconds(self, kind: str, units: float) -> float:
        return self.rates[kind] * units


def _hms(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class LeaveOneOut:
    """One leave-one-out run over some data roots, writing everything under `out`."""

    def __init__(
        self,
        roots: Sequence[str | Path],
        out: str | Path,
        *,
        targets: Sequence[str] | None = None,
        models: Sequence[str] = DEFAULT_MODELS,
        seeds: int = 3,
        calibrate: Sequence[int] = (5, 20, 50),
        preset: ComparePreset | None = None,
        weights: str | Path | None = "auto",
        device: str | torch.device = "auto",
        store: FeatureStore | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.table = build_sample_table(roots).samples
        self.out = Path(out)
        self.categories = sorted({s.category for s in self.table})
        self.targets = list(targets) if targets else default_targets(self.table)
        known = default_targets(self.table)
        bad = [t for t in self.targets if t not in known]
        if bad:
            raise ConfigError(
                f"target(s) {', '.join(bad)} have no good and defective test/ images; targets "
                f"can be: {', '.join(known)}"
            )
        self.models = _check_models(models)
        if seeds < 1:
            raise ConfigError(f"--seeds must be at least 1; got {seeds}")
        self.seeds = list(range(seeds))
        self.calibrate = sorted(set(calibrate))
        if any(k < 1 for k in self.calibrate):
            raise ConfigError(f"K values must be at least 1; got {self.calibrate}")
        if any(METHODS[m].detector.uses_good for m in self.models) and not self.calibrate:
            raise ConfigError("the few-good-parts models need K values: pass --calibrate, e.g. 5,20")
        if any(m.startswith(("reference", "fused")) for m in self.models) and self.calibrate[0] < 2:
            raise ConfigError(
                "the reference and fused models need K >= 2 good images (each is scored against the "
                f"others to calibrate); got K = {self.calibrate[0]}"
            )
        self.preset = preset or ComparePreset.full()
        self.weights = weights
        self.device = resolve_device(device)
        self.store = store or FeatureStore.default()
        self.log = log
        self._splits: dict[tuple[str, int], Split] = {}

    # ------------------------------------------------------------------ splits

    def split(self, target: str, seed: int) -> Split:
        key = (target, seed)
        if key not in self._splits:
            sources = [c for c in self.categories if c != target]
            with warnings.catch_warnings():
                # Single-class sources (e.g. a folder of only defects) are dropped in every split;
                # `run` says so once.
                warnings.simplefilter("ignore")
                self._splits[key] = make_split(
                    self.table, sources, [target], seed, self.preset, self.calibrate, log=lambda m: None
                )
        return self._splits[key]

    def settings(self) -> dict:
        p = self.preset
        return {
            "preset": p.name,
            "image_size": p.image_size,
            "epochs": p.epochs,
            "precision": resolve_precision(p.precision),
            "threshold_rule": DEFAULT_RULE,
            "max_source_per_category": p.max_source_per_category,
            "max_test_per_category": p.max_test_per_category,
            "seeds": self.seeds,
            "calibrate": self.calibrate,
            "targets": self.targets,
            "models": self.models,
            "pretrain": p.pretrain.to_dict() if any(m.startswith("simclr") for m in self.models) else None,
            "machine": describe_machine(self.device),
        }

    # ------------------------------------------------------------------ the run

    def run(self) -> list[dict]:
        """Frozen pass, every job not done yet, then rows, tables, budget and figures; every
        frozen-layer pass of the run goes through the run's store."""
        with use_store(self.store):
            return self._run()

    def _run(self) -> list[dict]:
        start = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        self._check_settings()
        single = single_class_categories(self.table)
        if single:
            self.log(f"left out of every source (a single class): {', '.join(single)}")
        jobs = plan_jobs(self.targets, self.models, self.seeds)
        todo = [j for j in jobs if not j.path(self.out).is_file()]
        self.log(
            f"{len(jobs)} jobs ({len(jobs) - len(todo)} done before); targets {', '.join(self.targets)}; "
            f"seeds {self.seeds}; K {self.calibrate}; {self.preset.name} preset, "
            f"{self.preset.image_size} px; {describe_machine(self.device)}"
        )
        # With the store off nothing would be kept: each job computes what it needs, as before.
        fill = self.frozen_pass(todo) if self.store.enabled else NO_FILL
        estimator = Estimator(fill["seconds_per_image"])
        timings: dict[str, list[float]] = {"train": [], "score": []}
        for n, job in enumerate(todo, 1):
            began = time.perf_counter()
            self.train(job) if job.kind == "train" else self.score(job)
            seconds = time.perf_counter() - began
            timings[job.kind].append(seconds)
            estimator.update(*self.units(job), seconds)
            eta = sum(estimator.seconds(*self.units(j)) for j in todo[n:])
            self.log(
                f"[{n}/{len(todo)}] {job}: {seconds:.0f} s · elapsed {_hms(time.perf_counter() - start)}"
                f" · ETA {_hms(eta)}"
            )
        rows = self.collect()
        budget = self.budget(fill, timings, time.perf_counter() - start)
        self.write(rows, budget)
        return rows

    def units(self, job: Job) -> tuple[str, float]:
        """(kind, units of work) of a job, for the ETA: image-epochs of a training (SimCLR's kind
        also pre-trains), test images times K values of a scoring."""
        split = self.split(job.target, job.seed)
        if job.kind == "score":
            return "score", len(split.test) * max(1, len(split.ks))
        kind = "train-simclr" if job.name.startswith("simclr") else "train"
        return kind, len(split.train) * self.preset.epochs


    def frozen_pass(self, todo: Sequence[Job]) -> dict:
        """Every image the jobs need, through the frozen layers they read once (the store keeps
        them): VGG16's conv4_3 for the trainings and most methods, MobileNetV2's maps for the
        `*-mobilenet` methods (of the images they score and adapt to)."""
        needed: dict[str, dict[Path, Sample]] = {}
        for job in todo:
            split = self.split(job.target, job.seed)
            scored = [*split.test, *(g for gs in split.good.values() for g in gs)]
            layers = ("conv4_3",) if job.kind == "train" else METHODS[job.name].detector.stored_layers
            for layer in layers:
                for s in [*split.train, *split.val, *scored] if layer == "conv4_3" else scored:
                    needed.setdefault(layer, {}).setdefault(s.path, s)
        size = self.preset.image_size
        networks = {  # built only for the layers some job reads
            "conv4_3": lambda: untrained_backbone(size, self.weights, self.seeds[0])[0].to(self.device),
            "mobilenet_v2": lambda: mobilenet_for(without_vgg16_info(size, self.weights))[0],
        }
        fill = {"images": 0, "computed": 0, "from_store": 0, "seconds": 0.0, "seconds_per_image": 0.25}
        for layer in sorted(needed):
            samples = sorted(needed[layer].values(), key=lambda s: (s.category, str(s.path)))
            began = time.perf_counter()
            feats = self.store.fetch_samples(
                networks[layer](), samples, self.preset.image_size, precision=self.preset.precision,
                layer=layer, progress=True, desc=f"frozen pass ({layer})",
            )
            seconds = time.perf_counter() - began
            fill["images"] += len(samples)
            fill["computed"] += feats.computed
            fill["from_store"] += len(samples) - feats.computed
            fill["seconds"] = round(fill["seconds"] + seconds, 1)
            if layer == "conv4_3" and feats.computed:  # the ETA's guess: the cost of a VGG16 pass
                fill["seconds_per_image"] = seconds / feats.computed
            self.log(
                f"frozen pass ({layer}): {len(samples)} images, {feats.computed} computed and "
                f"{len(samples) - feats.computed} from the store ({self.store.root or 'off'}), "
                f"{seconds:.0f} s"
            )
        return fill

    def train(self, job: Job) -> None:
        split = self.split(job.target, job.seed)
        path = job.path(self.out)
        began = time.perf_counter()
        model, info = train_variant(
            job.name, split, self.preset, weights=self.weights, device=self.device, progress=True,
            state=path.with_suffix(""),
        )
        save_classifier(path, model, **info, seconds=round(time.perf_counter() - began, 1))
        for state in path.parent.glob(f"{path.stem}.*-state"):
            state.unlink()

    def score(self, job: Job) -> None:
        split = self.split(job.target, job.seed)
        began = time.perf_counter()
        trains = METHODS[job.name].trains
        if trains is None:  # the method trains nothing: a fresh backbone, or none if it reads none
            model, info = untrained(job.name, self.preset.image_size, self.weights, job.seed)
        else:
            model, info = load_classifier(Job("train", job.target, job.seed, trains).path(self.out))
        detector = make_detector(job.name, None if model is None else model.to(self.device), info,
                                 precision=self.preset.precision, seed=job.seed)
        learnt = detector.fit_sources(split.train, split.val)
        result = SeedResult()
        add_detector_rows(result, detector, split)
        # A split has one target: its "all" row repeats that target's row.
        rows = [r for r in result.rows if r["target"] != "all"]
        payload = {"job": str(job), "seconds": round(time.perf_counter() - began, 1), "rows": rows}
        if learnt:
            payload["learnt_on_sources"] = learnt
        _write_json(job.path(self.out), payload)

    # ------------------------------------------------------------------ results

    def collect(self) -> list[dict]:
        """The rows of every finished score job under OUT, this run's and earlier runs' (other
        methods, targets or seeds at the same settings), by seed, target and method."""
        order = {name: i for i, name in enumerate(MODELS)}

        def key(path: Path) -> tuple:
            return (int(path.parent.name.removeprefix("seed")), path.parent.parent.name,
                    order.get(path.stem, len(order)), path.stem)

        rows = []
        for path in sorted((self.out / "rows").glob("*/seed*/*.json"), key=key):
            rows += json.loads(path.read_text())["rows"]
        return rows

    def _check_settings(self) -> None:
        """One OUT holds jobs of one setting (preset, sizes, caps, precision, pre-training):
        other methods, targets and seeds may be added to it, nothing else."""
        fixed = {k: v for k, v in self.settings().items() if k in FIXED}
        fixed["pretrain"] = self.preset.pretrain.to_dict()
        path = self.out / "settings.json"
        if path.is_file():
            old = json.loads(path.read_text())
            # Options added to PretrainConfig later take defaults that keep the old behaviour.
            fixed["pretrain"] = {k: v for k, v in fixed["pretrain"].items() if k in old.get("pretrain", {})}
            differ = sorted(k for k in fixed if old.get(k) != fixed[k])
            if differ:
                raise ConfigError(
                    f"{self.out} holds jobs made with other settings ({', '.join(differ)}): give "
                    "another --out, or the same settings"
                )
        else:
            _write_json(path, fixed)

    def budget(self, fill: dict, timings: dict[str, list[float]], wall: float) -> dict:
        """Where the time went, this run and (from the job files) every run of this OUT."""
        jobs = plan_jobs(self.targets, self.models, self.seeds)
        recorded = {"train": [], "score": []}
        for job in jobs:
            path = job.path(self.out)
            if not path.is_file():
                continue
            if job.kind == "train":
                recorded["train"].append(float(load_checkpoint(path, kind="classifier").get("seconds", 0.0)))
            else:
                recorded["score"].append(float(json.loads(path.read_text()).get("seconds", 0.0)))
        return {
            "machine": describe_machine(self.device),
            "this_run": {
                "wall_seconds": round(wall, 1),
                "frozen_pass": fill,
                "train_seconds": round(sum(timings["train"]), 1),
                "train_jobs": len(timings["train"]),
                "score_seconds": round(sum(timings["score"]), 1),
                "score_jobs": len(timings["score"]),
            },
            "all_runs": {
                "train_seconds": round(sum(recorded["train"]), 1),
                "train_jobs": len(recorded["train"]),
                "train_seconds_per_job": round(statistics.mean(recorded["train"]), 1)
                if recorded["train"] else None,
                "score_seconds": round(sum(recorded["score"]), 1),
                "score_jobs": len(recorded["score"]),
            },
        }

    def write(self, rows: list[dict], budget: dict) -> None:
        _write_json(self.out / "rows.json", {"settings": self.settings(), "rows": rows})
        _write_json(self.out / "budget.json", budget)
        text = tables_markdown(rows, self.settings())
        with atomic_path(self.out / "tables.md") as tmp:
            tmp.write_text(text)
        self.log(text)
        self.log(budget_text(budget))
        if rows:
            draw_figures(rows, self.out)


def _write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n")


def budget_text(budget: dict) -> str:
    """The budget as a few lines a person reads: frozen pass, training, scoring."""
    run, every = budget["this_run"], budget["all_runs"]
    fill = run["frozen_pass"]
    rate = ""
    if fill["computed"] and fill["seconds"]:
        rate = f", {fill['computed'] / fill['seconds']:.2f} images/s"
    per = every["train_seconds_per_job"]
    return "\n".join([
        f"budget on {budget['machine']}:",
        f"  frozen pass (once): {fill['images']} images, {fill['computed']} computed, "
        f"{fill['from_store']} from the store, {fill['seconds']:.0f} s{rate}",
        f"  training: {run['train_jobs']} classifiers in {run['train_seconds']:.0f} s this run "
        f"({every['train_jobs']} in {every['train_seconds']:.0f} s over all runs"
        + (f", {per:.0f} s per split and seed)" if per else ")"),
        f"  scoring: {run['score_jobs']} jobs in {run['score_seconds']:.0f} s this run "
        f"({every['score_jobs']} in {every['score_seconds']:.0f} s over all runs)",
        f"  wall time of this run: {run['wall_seconds']:.0f} s ({_hms(run['wall_seconds'])})",
    ])


def chosen_on_other_targets(rows: Sequence[dict], k: int) -> list[dict]:
    """For each target, the method (at K = k, or one that needs no good image) with the best mean
    image AUROC over the *other* targets, and what it gets on this one: the method a user would
    pick on the products they have (nested leave-one-out), against the best one picked by
    looking at this target. Only methods with rows on every target (that has K good images) compete."""
    auroc: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if r["image_auroc"] is not None and (" k=" not in r["model"] or r["model"].endswith(f" k={k}")):
            auroc.setdefault((r["target"], r["model"]), []).append(r["image_auroc"])
    mean = {key: statistics.mean(v) for key, v in auroc.items()}
    # Targets without K good images (no "k=" rows) would leave only the baseline to compare.
    targets = sorted({t for t, m in mean if " k=" in m} or {t for t, _ in mean})
    models = sorted(m for m in {m for _, m in mean} if all((t, m) in mean for t in targets))
    if len(targets) < 2 or not models:
        return []
    out = []
    for t in targets:
        others = [o for o in targets if o != t]
        chosen = max(models, key=lambda m: (statistics.mean(mean[o, m] for o in others), m))
        best = max(models, key=lambda m: (mean[t, m], m))
        out.append({"target": t, "chosen": chosen, "auroc": mean[t, chosen],
                    "best": best, "best_auroc": mean[t, best]})
    return out


def _chosen_table(rows: Sequence[dict], k: int) -> str:
    chosen = chosen_on_other_targets(rows, k)
    if not chosen:
        return ""
    lines = [
        "image_auroc, positive class = anomaly; mean over each cell's seeds",
        "",
        "| target | chosen on the other targets | its AUROC here | best here, chosen on this target |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {c['target']} | {c['chosen']} | {c['auroc']:.3f} | {c['best']} ({c['best_auroc']:.3f}) |"
              for c in chosen]
    lines.append(
        f"| mean | | {statistics.mean(c['auroc'] for c in chosen):.3f} | "
        f"{statistics.mean(c['best_auroc'] for c in chosen):.3f} |"
    )
    return "\n".join(lines)


def paired_against(rows: Sequence[dict], base: str = "baseline") -> list[dict]:
    """Each method's image AUROC minus `base`'s on the same target and seed, for the methods without
    good images: per target (mean over the seeds both have), and per seed and overall over the
    targets that every method has paired on each of its seeds, so that the means compare across
    seeds and methods. Pairing by seed removes the split's and the seed's share of the spread."""
    auroc = {(r["target"], r["seed"], r["model"]): r["image_auroc"] for r in rows
             if r["image_auroc"] is not None and " k=" not in r["model"]}
    found = {}
    for model in dict.fromkeys(m for _, _, m in auroc):
        pairs = {(t, s): auroc[t, s, model] - auroc[t, s, base]
                 for t, s, m in auroc if m == model != base and (t, s, base) in auroc}
        if pairs:
            found[model] = pairs
    seeds = {m: sorted({s for _, s in pairs}) for m, pairs in found.items()}
    complete = {m: {t for t, _ in pairs if all((t, s) in pairs for s in seeds[m])}
                for m, pairs in found.items()}
    # Targets every method has on all its seeds; if none, each method's own.
    common = set.intersection(*complete.values()) if complete else set()
    out = []
    for model, pairs in found.items():
        over = sorted(common or complete[model])
        by_target: dict[str, list[float]] = {}
        for (t, _), d in sorted(pairs.items()):
            by_target.setdefault(t, []).append(d)
        per_target = {t: statistics.mean(v) for t, v in by_target.items()}
        out.append({
            "model": model,
            "per_target": per_target,
            "seeds_per_target": {t: len(v) for t, v in by_target.items()},
            "over": over,
            "per_seed": {s: statistics.mean(pairs[t, s] for t in over) for s in seeds[model]},
            "mean": statistics.mean(per_target[t] for t in over),
        })
    return out


def _paired_table(rows: Sequence[dict], base: str = "baseline") -> str:
    paired = paired_against(rows, base)
    if not paired:
        return ""
    targets = sorted({t for p in paired for t in p["per_target"]})
    overs = {tuple(p["over"]) for p in paired}
    over = (", ".join(overs.pop()) if len(overs) == 1
            else "each method's targets run with every one of its seeds")
    lines = [
        f"image_auroc of the method minus {base}'s on the same target and seed, positive class = anomaly; "
        f"a cell is the mean over its seeds (how many in brackets); the means are over {over}",
        "",
        "| method | " + " | ".join(targets) + " | mean | per seed |",
        "|" + " --- |" * (len(targets) + 3),
    ]
    for p in paired:
        cells = [f"{p['per_target'][t]:+.3f} ({p['seeds_per_target'][t]})" if t in p["per_target"] else "—"
                 for t in targets]
        seeds = ", ".join(f"{s}: {d:+.3f}" for s, d in p["per_seed"].items())
        lines.append(f"| {p['model']} | " + " | ".join(cells) + f" | {p['mean']:+.3f} | {seeds} |")
    return "\n".join(lines)


def tables_markdown(rows: Sequence[dict], settings: dict) -> str:
    """tables.md: the headline AUROC table, then every metric with and without good images."""
    cap = settings["max_source_per_category"]
    lines = [
        f"Leave-one-out, positive class = anomaly. {settings['preset']} preset: {settings['image_size']} px, "
        f"<= {settings['epochs']} epochs, precision {settings['precision']}; source categories "
        + (f"capped at ~{cap} images each (stratified by defect type)" if cap else "uncapped")
        + "; every target test image"
        + (f" (capped at ~{settings['max_test_per_category']})" if settings["max_test_per_category"] else "")
        + f"; seeds {sorted({r['seed'] for r in rows})}; K = {settings['calibrate']}. "
        f"Machine: {settings['machine']}.",
        "",
    ]
    plain = [r for r in rows if " k=" not in r["model"]]
    few = [r for r in rows if " k=" in r["model"]]
    if rows:
        lines += ["### Image AUROC (mean ± std over seeds)", "", pivot_table(rows, "image_auroc"), ""]
    if plain:
        lines += ["### Without good images of the new product", "", summary_table(plain), ""]
    if few:
        lines += ["### With K good images of the new product", "", summary_table(few, FEW_KEYS), ""]
    paired = _paired_table(rows)
    if paired:
        lines += ["### Against the baseline, paired by target and seed", "", paired, ""]
    k = max([k for k in settings["calibrate"] if k <= 20] or settings["calibrate"] or [0])
    chosen = _chosen_table(rows, k)
    if chosen:
        lines += [f"### The method chosen on the other targets (K = {k})", "",
                  "Which method would a user choose without this target's labels? The one best on "
                  "the other targets (nested leave-one-out); the last column is the choice made by "
                  "looking at this target, which no user can make.", "", chosen, ""]
    return "\n".join(lines)


def draw_figures(rows: Sequence[dict], folder: Path) -> None:
    """The figures docs/results.md shows: AUROC and balanced accuracy per model and target, and
    both against K for the few-good-parts models."""
    import matplotlib.pyplot as plt

    from visinspect.viz.plots import plot_metric_bars, plot_metric_vs_k, save_figure

    plain = [r for r in rows if " k=" not in r["model"]]
    if plain:
        for metric in ("image_auroc", "balanced_accuracy"):
            save_figure(plot_metric_bars(plain, metric), folder / f"loo_{metric}.png")
    # Per product, calibration shifts the scores and leaves the ranking (AUROC) as it was: the
    # AUROC panel shows the K-dependent models only; balanced accuracy shows them all.
    for metric, keep in (
        ("image_auroc", lambda m: "calibrated" not in m),
        ("balanced_accuracy", lambda m: True),
    ):
        targets = sorted({r["target"] for r in rows if " k=" in r["model"] and keep(r["model"])})
        if not targets:
            continue
        fig, axes = plt.subplots(1, len(targets), figsize=(3.6 * len(targets), 3.6), squeeze=False,
                                 sharey=True)
        for i, (ax, target) in enumerate(zip(axes[0], targets, strict=True)):
            plot_metric_vs_k([r for r in rows if r["target"] == target and keep(r["model"])], metric,
                             target, ax=ax)
            ax.set_title(target)
            ax.get_legend().remove()
            if i:
                ax.set_ylabel("")
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, frameon=False)
        save_figure(fig, folder / f"loo_{metric}_vs_k.png")
