"""Tables and figures from rows: the mean ± std over seeds per method and target, the method
chosen on the other targets (nested leave-one-product-out), paired differences, the time budget."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from visinspect.methods.registry import METHODS
from visinspect.metrics import seed_spread

ROW_KEYS = (
    "image_auroc",
    "average_precision",
    "f1",
    "balanced_accuracy",
    "precision",
    "recall",
    "pixel_auroc",
    "box_hit_rate",
)


def _mean_std(values: list[float | None], seeds: int = 1) -> str:
    """Mean ± std of one cell; a cell over fewer seeds than its table's others says how many (a
    run that added a method for one seed only, say), so that no number passes for more than it is."""
    vals = [v for v in values if v is not None]
    fewer = f" ({len(values)} seed{'s' * (len(values) > 1)})" if len(values) < seeds else ""
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.3f}{fewer}"
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}{fewer}"


def pivot_table(rows: Sequence[dict], metric: str = "image_auroc", by_model: bool = False) -> str:
    """Markdown: targets down, models across, mean ± std of one metric over seeds (K-dependent
    models are named with their K); `by_model`: models down and targets across (narrow when there
    are many models and few targets)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["target"], r["model"]), []).append(r)
    targets = sorted({t for t, _ in groups}, key=lambda t: (t == "all", t))
    models = list(dict.fromkeys(r["model"] for r in rows))
    seeds = max(len(g) for g in groups.values())
    n = {t: next(g[0]["n_images"] for (tt, _), g in groups.items() if tt == t) for t in targets}

    def cell(t: str, m: str) -> str:
        return _mean_std([r.get(metric) for r in groups.get((t, m), [])], seeds)

    lines = [f"{metric}, positive class = anomaly", ""]
    if by_model:
        lines += ["| method | " + " | ".join(f"{t} ({n[t]})" for t in targets) + " |",
                  "|" + " --- |" * (len(targets) + 1)]
        lines += [f"| {m} | " + " | ".join(cell(t, m) for t in targets) + " |" for m in models]
        return "\n".join(lines)
    lines += ["| target | n | " + " | ".join(models) + " |", "|" + " --- |" * (len(models) + 2)]
    lines += [f"| {t} | {n[t]} | " + " | ".join(cell(t, m) for m in models) + " |" for t in targets]
    return "\n".join(lines)


def summary_table(rows: Sequence[dict], keys: Sequence[str] = ROW_KEYS) -> str:
    """Markdown: one line per (target, model), mean ± std over seeds; positive class anomaly."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["target"], r["model"]), []).append(r)
    lines = [
        f"positive class = anomaly; {seed_spread([r['seed'] for r in rows])}; threshold from "
        "the source validation split (uncalibrated) or from K good target images (calibrated)",
        "",
        "| target | model | n | " + " | ".join(keys) + " |",
        "|" + " --- |" * (len(keys) + 3),
    ]
    order = sorted(groups, key=lambda tm: (tm[0] != "all", tm[0]))
    seeds = max((len(g) for g in groups.values()), default=1)
    for target, model in order:
        g = groups[(target, model)]
        lines.append(
            f"| {target} | {model} | {g[0]['n_images']} | "
            + " | ".join(_mean_std([r.get(k) for r in g], seeds) for k in keys)
            + " |"
        )
    return "\n".join(lines)


FEW_KEYS = ("image_auroc", "balanced_accuracy", "precision", "recall", "pixel_auroc", "box_hit_rate")


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
        f"  wall time of this run: {run['wall_seconds']:.0f} s ({hms(run['wall_seconds'])})",
    ])


def method_name(model: str) -> str:
    """A row's method without its " k=K" suffix ("reference k=20" -> "reference")."""
    return model.rsplit(" k=", 1)[0]


def _k_of(model: str) -> int | None:
    return int(model.rsplit(" k=", 1)[1]) if " k=" in model else None


def targets_k(rows: Sequence[dict], k: int) -> dict[str, int]:
    """Each target's K: the largest K up to `k` it has rows of (a product with fewer good images is
    scored with all it has); targets without rows that use good images are left out."""
    ks: dict[str, set[int]] = {}
    for r in rows:
        if (rk := _k_of(r["model"])) is not None and rk <= k:
            ks.setdefault(r["target"], set()).add(rk)
    return {t: max(v) for t, v in ks.items()}


def _values(rows: Sequence[dict], k: int) -> tuple[dict[tuple[str, str], list[float]], dict[str, int]]:
    """Image AUROCs per (target, method) at the target's K (`targets_k`; a method that uses no good
    image has one K), and each target's K."""
    own_k = targets_k(rows, k)
    values: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        rk = _k_of(r["model"])
        if r["image_auroc"] is not None and (rk is None or rk == own_k.get(r["target"])):
            values.setdefault((r["target"], method_name(r["model"])), []).append(r["image_auroc"])
    return values, own_k


def _competition(rows: Sequence[dict], k: int) -> tuple[dict, dict, list[str], list[str]]:
    """Per (target, method) the mean image AUROC over seeds (see `_values`); each target's K; the
    targets (those with good images, if any); the methods with rows on every target."""
    values, own_k = _values(rows, k)
    mean = {key: statistics.mean(v) for key, v in values.items()}
    targets = sorted(own_k or {t for t, _ in mean})
    models = sorted(m for m in {m for _, m in mean} if all((t, m) in mean for t in targets))
    return mean, own_k, targets, models


def _metric_at(rows: Sequence[dict], target: str, model: str, metric: str) -> float | None:
    values = [r[metric] for r in rows if r["target"] == target and r["model"] == model
              and r.get(metric) is not None]
    return statistics.mean(values) if values else None


def chosen_on_other_targets(rows: Sequence[dict], k: int) -> list[dict]:
    """For each target, the method (at K = k good images, or one that needs none) with the best mean
    image AUROC over the *other* targets, and what it gets on this one: the method a user would
    pick on the products they have (nested leave-one-out), against the best one picked by looking
    at this target. A target with fewer than k good train/ images counts at the largest K it has
    (`k` in each result). Only methods with rows on every target (that has good images) compete.
    Each result also holds the chosen method's pixel AUROC and balanced accuracy there (None when
    the target has no masks) and `tied`: every method as good as the chosen one on the other
    targets (they cannot tell them apart; the tie goes to the one listed first, `_earlier`), with
    what each gets here."""
    mean, own_k, targets, models = _competition(rows, k)
    if len(targets) < 2 or not models:
        return []
    out = []
    for t in targets:
        others = {m: statistics.mean(mean[o, m] for o in targets if o != t) for m in models}
        chosen = max(models, key=lambda m: (others[m], _earlier(m)))
        best = max(models, key=lambda m: (mean[t, m], _earlier(m)))
        tied = {m: mean[t, m] for m in models if math.isclose(others[m], others[chosen], abs_tol=1e-12)}
        row = f"{chosen} k={own_k[t]}" if _uses_good(rows, chosen) else chosen
        out.append({"target": t, "k": own_k.get(t), "chosen": chosen, "auroc": mean[t, chosen],
                    "best": best, "best_auroc": mean[t, best], "tied": tied,
                    "pixel_auroc": _metric_at(rows, t, row, "pixel_auroc"),
                    "balanced_accuracy": _metric_at(rows, t, row, "balanced_accuracy")})
    return out


def chosen_on_all_targets(rows: Sequence[dict], k: int) -> str | None:
    """The method with the best mean image AUROC over every target (each at its K, as in
    `chosen_on_other_targets`): the one to ship, chosen on all the products there are."""
    mean, _, targets, models = _competition(rows, k)
    if not models:
        return None
    return max(models, key=lambda m: (statistics.mean(mean[t, m] for t in targets), _earlier(m)))


def _earlier(method: str) -> tuple[int, list[int]]:
    """A tie's winner is the method listed first: the registry lists each method before the levers
    and rules built on it, so a tie (the products cannot tell two methods apart) goes to the one
    with fewer; names the registry does not know come after it, in alphabetical order."""
    order = list(METHODS)
    return (-order.index(method), []) if method in order else (-len(order), [-ord(c) for c in method])


def _uses_good(rows: Sequence[dict], method: str) -> bool:
    return any(method_name(r["model"]) == method and _k_of(r["model"]) is not None for r in rows)


def switches(rows: Sequence[dict], k: int) -> list[dict]:
    """Pairs of methods (at K = k, see `_values`) whose rows are the same on every target but one:
    one of them is the other plus a rule that switches on for that target alone (e.g. a score for
    binary drawings). Each: `methods` (the pair, sorted), `fires_on` (the targets where they differ)."""
    values, own_k = _values(rows, k)
    targets = sorted(own_k or {t for t, _ in values})
    models = sorted(m for m in {m for _, m in values} if all((t, m) in values for t in targets))
    found = []
    for i, a in enumerate(models):
        for b in models[i + 1:]:
            differ = [t for t in targets if sorted(values[t, a]) != sorted(values[t, b])]
            if len(differ) == 1 < len(targets):  # a rule for one product, not another method
                found.append({"methods": (a, b), "fires_on": differ})
    return found


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


def headline_k(calibrate: Sequence[int]) -> int:
    """The K the headline tables quote: the largest K up to 20 (a few good parts), else the largest."""
    return max([k for k in calibrate if k <= 20] or list(calibrate) or [0])


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
    k = headline_k(settings["calibrate"])
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
    from visinspect.viz.comparisons import plot_metric_bars, plot_metric_vs_k_panels
    from visinspect.viz.plots import save_figure

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
        kept = [r for r in rows if keep(r["model"])]
        if any(" k=" in r["model"] for r in kept):
            save_figure(plot_metric_vs_k_panels(kept, metric), folder / f"loo_{metric}_vs_k.png")


def hms(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
