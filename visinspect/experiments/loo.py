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

import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from visinspect.backbones.mobilenet import MOBILENET_ENV
from visinspect.backbones.store import LAYERS, FeatureStore, use_store
from visinspect.backbones.vgg16 import WEIGHTS_ENV
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
    train_variant,
)
from visinspect.experiments.tables import budget_text, draw_figures, hms, tables_markdown
from visinspect.methods.registry import DEFAULT_MODELS, METHODS, make_detector, training, untrained
from visinspect.utils import (
    PRECISION_ENV,
    atomic_path,
    describe_machine,
    resolve_device,
    resolve_precision,
    write_json,
)

MODELS = tuple(METHODS)
# A run's folder holds jobs of one setting: these must not change when a run is resumed or extended
# (the threshold rule: runs before the "fenced" rule lack it, and their thresholds differ).
FIXED = ("preset", "image_size", "epochs", "precision", "max_source_per_category", "max_test_per_category",
         "threshold_rule")
NO_FILL = {"images": 0, "computed": 0, "from_store": 0, "seconds": 0.0, "seconds_per_image": 0.25}


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
            variants = dict.fromkeys(t.name for m in models if (t := METHODS[m].trains) is not None)
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


class LeaveOneOut:
    """One leave-one-out run over some data roots, writing everything under `out`."""

    def __init__(
        self,
        roots: Sequence[str | Path],
        out: str | Path,
        *,
        targets: Sequence[str] | None = None,
        models: Sequence[str] | None = None,  # None: registry.DEFAULT_MODELS
        seeds: int = 3,
        calibrate: Sequence[int] = (5, 20, 50),
        preset: ComparePreset | None = None,
        weights: str | Path | None = "auto",
        device: str | torch.device = "auto",
        store: FeatureStore | None = None,
        log: Callable[[str], None] = print,
        command: str | None = None,
    ) -> None:
        self.command = command
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
        self.models = _check_models(models or DEFAULT_MODELS)
        if seeds < 1:
            raise ConfigError(f"--seeds must be at least 1; got {seeds}")
        self.seeds = list(range(seeds))
        self.calibrate = sorted(set(calibrate))
        if any(k < 1 for k in self.calibrate):
            raise ConfigError(f"K values must be at least 1; got {self.calibrate}")
        if any(METHODS[m].detector.uses_good for m in self.models) and not self.calibrate:
            raise ConfigError("the few-good-parts models need K values: pass --calibrate, e.g. 5,20")
        fewest = {m: METHODS[m].min_k for m in self.models if METHODS[m].detector.uses_good}
        too_few = sorted(m for m, k in fewest.items() if k > self.calibrate[0])
        if too_few:
            raise ConfigError(
                f"{', '.join(too_few)} need K >= {max(fewest.values())} good images (each is scored "
                f"against the others to calibrate); got K = {self.calibrate[0]}"
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
            "pretrain": p.pretrain.to_dict() if any(self._pretrains(m) for m in self.models) else None,
            "machine": describe_machine(self.device),
        }

    def provenance(self) -> dict:
        """Where the rows come from, for the pages that quote them (not a setting: a resumed run
        may differ in it): the command, the package's git commit, the date, the machine, the precision."""
        return {
            "command": self.command or command_line(),
            "commit": package_commit(),
            "date": datetime.date.today().isoformat(),
            "machine": describe_machine(self.device),
            "precision": resolve_precision(self.preset.precision),
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
        # A method that adapts to good images has nothing to score on a target without any.
        jobs = [j for j in plan_jobs(self.targets, self.models, self.seeds) if j.kind == "train"
                or not METHODS[j.name].detector.uses_good or self.split(j.target, j.seed).ks]
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
                f"[{n}/{len(todo)}] {job}: {seconds:.0f} s · elapsed {hms(time.perf_counter() - start)}"
                f" · ETA {hms(eta)}"
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
        kind = "train-simclr" if training(job.name).pretrains else "train"
        return kind, len(split.train) * self.preset.epochs

    @staticmethod
    def _pretrains(name: str) -> bool:
        return METHODS[name].trains is not None and METHODS[name].trains.pretrains


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
        fill = dict(NO_FILL)
        for layer in sorted(needed):
            samples = sorted(needed[layer].values(), key=lambda s: (s.category, str(s.path)))
            began = time.perf_counter()
            feats = self.store.fetch_samples(
                LAYERS[layer].build(self.weights, self.seeds[0]).to(self.device), samples,
                self.preset.image_size, precision=self.preset.precision,
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
            model, info = load_classifier(Job("train", job.target, job.seed, trains.name).path(self.out))
        detector = make_detector(job.name, None if model is None else model.to(self.device), info,
                                 precision=self.preset.precision, seed=job.seed)
        learnt = detector.fit_sources(split.train, split.val)
        result = SeedResult()
        add_detector_rows(result, detector, split)
        # A split has one target: its "all" row repeats that target's row.
        rows = [r for r in result.rows if r["target"] != "all"]
        payload = {"job": str(job), "seconds": round(time.perf_counter() - began, 1), "rows": rows}
        if learnt:
            payload["learnt_on_sources"] = _without_tensors(learnt)
        write_json(job.path(self.out), payload, indent=1)

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
            write_json(path, fixed, indent=1)

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
        write_json(self.out / "rows.json",
                   {"settings": self.settings(), "provenance": self.provenance(), "rows": rows}, indent=1)
        write_json(self.out / "budget.json", budget, indent=1)
        text = tables_markdown(rows, self.settings())
        with atomic_path(self.out / "tables.md") as tmp:
            tmp.write_text(text)
        self.log(text)
        self.log(budget_text(budget))
        if rows:
            draw_figures(rows, self.out)


def command_line() -> str:
    """The command that runs this process, as a user would type it, after the environment
    variables that change its numbers (the weights files, the precision) it ran with."""
    env = [f"{name}={shlex.quote(os.environ[name])}" for name in (WEIGHTS_ENV, MOBILENET_ENV, PRECISION_ENV)
           if os.environ.get(name)]
    args = [shlex.quote(a) for a in sys.argv[1:]]
    if Path(sys.argv[0]).name == "__main__.py" and Path(sys.argv[0]).parent.name == "visinspect":
        return " ".join([*env, "python -m visinspect", *args])
    return " ".join([*env, shlex.quote(sys.argv[0]), *args])


def package_commit() -> str | None:
    """`git rev-parse HEAD` of the checkout visinspect runs from, or None outside one."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def _without_tensors(obj):
    """What a rows file keeps of what a method learnt on the sources: the numbers and settings, each
    tensor (adapted weights) replaced by its shape: the weights belong in a checkpoint, not in rows."""
    if isinstance(obj, torch.Tensor):
        return f"tensor {list(obj.shape)}"
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return f"{len(obj)} tensors, {sum(v.numel() for v in obj.values())} numbers"
    if isinstance(obj, dict):
        return {k: _without_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_without_tensors(v) for v in obj]
    return obj
