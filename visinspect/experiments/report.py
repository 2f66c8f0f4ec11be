"""docs/results.md from committed rows files: `python -m visinspect report --rows ... --out ...`.

The page (and the README's results block) is written from the rows of `loo` runs alone, so that
every number it shows can be regenerated: tests/test_docs.py rewrites it from docs/rows/ and
fails if it differs from the committed page. Positive class = anomaly everywhere.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from pathlib import Path

from visinspect.experiments.tables import (
    _mean_std,
    chosen_on_all_targets,
    chosen_on_other_targets,
    draw_figures,
    headline_k,
    method_name,
    pivot_table,
    switches,
    targets_k,
)
from visinspect.methods.registry import RECOMMENDED
from visinspect.utils import atomic_path

README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"
FIGURES = ("loo_image_auroc_vs_k.png", "loo_balanced_accuracy_vs_k.png", "loo_image_auroc.png",
           "loo_balanced_accuracy.png")


def load_rows(files: Sequence[Path]) -> tuple[list[dict], list[dict]]:
    """Every row of the files, and each file's settings and provenance (None where not recorded)."""
    rows, sources = [], []
    for f in files:
        data = json.loads(Path(f).read_text())
        rows += data["rows"]
        sources.append({"file": Path(f), "settings": data.get("settings", {}),
                        "provenance": data.get("provenance"),
                        "seeds": sorted({r["seed"] for r in data["rows"]})})
    return rows, sources


def _cells(rows: Sequence[dict], target: str, model: str, metric: str = "image_auroc") -> list[float]:
    return [r[metric] for r in rows
            if r["target"] == target and r["model"] == model and r[metric] is not None]


def _mean(values: Sequence[float]) -> float | None:
    return statistics.mean(values) if values else None


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def headline_table(rows: Sequence[dict], k: int) -> str:
    """Per target, the nested figures: the method chosen on the *other* targets at K = k (a target
    with fewer good images at the K it has) and its image AUROC, pixel AUROC and calibrated
    balanced accuracy there; beside them the best method's AUROC picked by looking at the target
    itself (the figure that flatters) and the baseline's without good images."""
    chosen = chosen_on_other_targets(rows, k)
    seeds = len({r["seed"] for r in rows})
    lines = [
        "| unknown product | test images | K | chosen on the other products | **image AUROC** | "
        "pixel AUROC | balanced accuracy | best, chosen on this product (flatters) | "
        "baseline, no good image |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    columns: dict[str, list[float]] = {}
    for c in chosen:
        t = c["target"]
        n = next(r["n_images"] for r in rows if r["target"] == t)
        base = _cells(rows, t, "baseline")
        values = {"auroc": c["auroc"], "pixel": c["pixel_auroc"], "balanced": c["balanced_accuracy"],
                  "best": c["best_auroc"], "base": _mean(base)}
        for key, v in values.items():
            if v is not None:
                columns.setdefault(key, []).append(v)
        lines.append(
            f"| {t} | {n} | {c['k']} | `{c['chosen']}` | **{c['auroc']:.3f}** | {_fmt(c['pixel_auroc'])} | "
            f"{_fmt(c['balanced_accuracy'])} | {c['best_auroc']:.3f} | "
            f"{_mean_std(base, seeds) if base else '–'} |"
        )
    mean = {key: _fmt(statistics.mean(v)) for key, v in columns.items()}
    lines.append(f"| mean | | | | **{mean.get('auroc', '–')}** | {mean.get('pixel', '–')} | "
                 f"{mean.get('balanced', '–')} | {mean.get('best', '–')} | {mean.get('base', '–')} |")
    return "\n".join(lines)


def switch_notes(rows: Sequence[dict], k: int) -> list[str]:
    """One line per rule that acts on one product alone (`tables.switches`, the rows of a pair of
    methods differ there only) and that the headline's method there carries: the other products
    cannot choose it, so its credit in the headline rests on that product's own rows. Each line
    gives both figures there and the headline mean with the lower one, the figure of a protocol
    that cannot flatter itself."""
    chosen = chosen_on_other_targets(rows, k)
    figures, ks = {c["target"]: c["auroc"] for c in chosen}, {c["target"]: c["k"] for c in chosen}
    picked = {c["target"]: c["chosen"] for c in chosen}
    lines = []
    for s in switches(rows, k):
        if len(s["fires_on"]) != 1 or s["fires_on"][0] not in figures:
            continue
        t, (a, b) = s["fires_on"][0], sorted(s["methods"], key=len)
        # A rule is what b adds to a; noted where the headline's method there carries it.
        if not extends(b, a) or not (picked[t] == b or extends(picked[t], b)):
            continue
        va, vb = (_mean(_cells(rows, t, f"{m} k={ks[t]}") or _cells(rows, t, m)) for m in (a, b))
        if round(va, 3) == round(vb, 3):  # a difference the tables do not show
            continue
        alt = statistics.mean([min(va, vb) if o == t else v for o, v in figures.items()])
        lines.append(f"- `{a}` and `{b}` differ on {t} alone ({va:.3f} and {vb:.3f} there): a rule the "
                     f"other products cannot choose; with the lower figure on {t} the mean above is "
                     f"{alt:.3f}.")
    return lines


def _by_seed(rows: Sequence[dict], target: str, method: str, k: int | None) -> dict[int, float]:
    """Image AUROC by seed of `method` on `target` (at K = k when it uses good images)."""
    return {r["seed"]: r["image_auroc"] for r in rows if r["target"] == target
            and r["model"] in (method, f"{method} k={k}") and r["image_auroc"] is not None}


def simclr_table(rows: Sequence[dict], k: int, plain: str, twin: str) -> str:
    """`twin` (features adapted by SimCLR) against `plain` per product at its K: mean ± std over
    seeds and the paired difference."""
    lines = ["| product | K | ImageNet features | adapted by SimCLR | difference (same seed) |",
             "| --- | --- | --- | --- | --- |"]
    for t, kt in sorted(targets_k(rows, k).items()):
        a, b = (_by_seed(rows, t, m, kt) for m in (plain, twin))
        both = sorted(set(a) & set(b))
        if both:
            lines.append(f"| {t} | {kt} | {_mean_std([a[s] for s in both], len(both))} | "
                         f"{_mean_std([b[s] for s in both], len(both))} | "
                         f"{statistics.mean(b[s] - a[s] for s in both):+.3f} |")
    return "\n".join(lines)


def extends(variant: str, method: str) -> bool:
    """Whether method `variant` is `method` plus a lever, by name ("+poses", "@256", ...)."""
    return variant.startswith(method) and len(variant) > len(method) and variant[len(method)] in "+@"


def lever_pairs(rows: Sequence[dict]) -> list[tuple[str, str]]:
    """(method, its lever variant) for each method of the rows named as another one plus a lever
    ("+poses", "@256", "+simclr", ...): the variant against the longest method name it extends."""
    names = {method_name(r["model"]) for r in rows}
    pairs = []
    for m in sorted(names):
        bases = [b for b in names if extends(m, b)]
        if bases:
            pairs.append((max(bases, key=len), m))
    return pairs


def levers_table(rows: Sequence[dict], k: int) -> str:
    """Each lever (a method's variant) against the method it extends: image AUROC difference per
    target at K = k (or the target's K), paired by seed, and whether the nested protocol picks it."""
    chosen = chosen_on_other_targets(rows, k)
    shipped = chosen_on_all_targets(rows, k)
    targets = [(c["target"], c["k"]) for c in chosen]
    lines = ["| lever (method) | against | " + " | ".join(t for t, _ in targets) + " | mean | chosen |",
             "|" + " --- |" * (len(targets) + 4)]
    for base, variant in lever_pairs(rows):
        diffs = []
        for t, kt in targets:
            a, b = (_by_seed(rows, t, m, kt) for m in (base, variant))
            both = sorted(set(a) & set(b))
            diffs.append(statistics.mean(b[s] - a[s] for s in both) if both else None)
        if all(d is None for d in diffs):
            continue
        picked = sum(c["chosen"] == variant for c in chosen)
        where = ", ".join([*(["shipped"] if variant == shipped else []),
                           *([f"nested: {picked} of {len(chosen)}"] if picked else [])]) or "no"
        known = [d for d in diffs if d is not None]
        cells = " | ".join("–" if d is None else f"{d:+.3f}" for d in diffs)
        lines.append(f"| `{variant}` | `{base}` | {cells} | {statistics.mean(known):+.3f} | {where} |")
    return "\n".join(lines)


def _k_targets(rows: Sequence[dict]) -> list[str]:
    """The targets that have rows with K good images (the others have too few good images)."""
    return sorted({r["target"] for r in rows if " k=" in r["model"]})


def k_against_auroc(rows: Sequence[dict], ks: Sequence[int]) -> str:
    """Each method with good images: mean image AUROC over the targets (of its seeds' means) at each
    K; a target with fewer good images counts at the largest K up to it that it has."""
    methods = dict.fromkeys(r["model"].rsplit(" k=", 1)[0] for r in rows if " k=" in r["model"]
                            and "calibrated" not in r["model"])
    targets = _k_targets(rows)
    lines = ["| method | " + " | ".join(f"K = {k}" for k in ks) + " |", "|" + " --- |" * (len(ks) + 1)]
    for m in methods:
        cells = []
        for k in ks:
            own_k = targets_k(rows, k)
            means = [_mean(_cells(rows, t, f"{m} k={own_k[t]}")) if t in own_k else None for t in targets]
            cells.append(f"{statistics.mean(means):.3f}" if all(v is not None for v in means) else "–")
        lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def anchors_table(anchors: dict, rows: Sequence[dict], ks: Sequence[int], settings: dict) -> str:
    """The published figures (anchors.json) beside this run's nested and recommended means, in %."""
    lines = ["| method | source | backbone | resolution | K good images | products | image AUROC (%) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for a in anchors["anchors"]:
        lines.append(f"| {a['method']} | {a['source']} | {a['backbone']} | {a['resolution'] or '–'} | "
                     f"{' / '.join(map(str, a['k']))} | MVTec AD (15) | "
                     f"{' / '.join(f'{v:.1f}' for v in a['image_auroc'])} |")
    # The K values every product can be nested at (each at its largest K up to it).
    ks = [k for k in ks if chosen_on_other_targets(rows, k)]
    nested = [chosen_on_other_targets(rows, k) for k in ks]
    targets = sorted({c["target"] for n in nested for c in n})
    rec = [[_mean(_cells(rows, c["target"], f"{RECOMMENDED} k={c['k']}")) for c in n] for n in nested]
    ours = {
        "visinspect, chosen without the product's labels": [
            statistics.mean(c["auroc"] for c in n) * 100 if n else None for n in nested],
        f"visinspect `{RECOMMENDED}`, chosen on these same products (flatters)": [
            statistics.mean(v) * 100 if all(x is not None for x in v) else None for v in rec],
    }
    for name, values in ours.items():
        lines.append(f"| {name} | this page's rows | see `python -m visinspect methods` | "
                     f"{settings.get('image_size', '–')} px | {' / '.join(map(str, ks))} | "
                     f"{', '.join(targets)} | "
                     + " / ".join("–" if v is None else f"{v:.1f}" for v in values) + " |")
    return "\n".join(lines)


def _provenance(source: dict, page_dir: Path) -> list[str]:
    s, p = source["settings"], source["provenance"] or {}
    cap, link = s.get("max_source_per_category"), os.path.relpath(source["file"], page_dir)
    return [
        f"- rows: [`{link}`]({link})"
        f" (seeds {source['seeds']}: every row of the run)",
        f"- command: `{p.get('command', 'not recorded')}`",
        f"- commit: `{p.get('commit') or 'not recorded'}`; date: {p.get('date', 'not recorded')}",
        f"- machine: {p.get('machine') or s.get('machine', 'not recorded')}",
        f"- precision: {p.get('precision') or s.get('precision')}; {s.get('preset')} preset, "
        f"{s.get('image_size')} px, ≤ {s.get('epochs')} epochs; source categories "
        + (f"capped at ~{cap} images each" if cap else "uncapped") + "; "
        f"K = {s.get('calibrate')}; threshold rule `{s.get('threshold_rule')}`",
    ]


def _bullets(rows: Sequence[dict], k: int) -> list[str]:
    """"What this shows", from the numbers of the tables above: every figure of a method is the
    nested one (each product's method chosen on the other products), never one chosen on it."""
    chosen = chosen_on_other_targets(rows, k)
    if not chosen:
        return []
    base = {c["target"]: _mean(_cells(rows, c["target"], "baseline")) for c in chosen}
    nested = {c["target"]: c["auroc"] for c in chosen}
    picks = sorted({c["chosen"] for c in chosen})
    high = ", ".join(t for t, v in nested.items() if v >= 0.95) or "no product"
    low = ", ".join(t for t, v in nested.items() if v < 0.85) or "no product"
    out = [f"- Chosen on the other products (what a user without this product's labels can do), "
           f"the method is {', '.join(f'`{p}`' for p in picks)}: mean image AUROC "
           f"{statistics.mean(nested.values()):.3f} at K = {k}, against "
           f"{statistics.mean(c['best_auroc'] for c in chosen):.3f} for the best choice made by "
           "looking at each product (no user can make it).",
           f"- Nested, at K = {k}: ≥ 0.95 on {high}; below 0.85 on {low}."]
    if all(v is not None for v in base.values()):
        out.append(f"- Without any good image of the product the baseline averages "
                   f"{statistics.mean(base.values()):.3f}; K = {k} good images lift the nested mean to "
                   f"{statistics.mean(nested.values()):.3f}.")
    bal = [c["balanced_accuracy"] for c in chosen]
    bal0 = [_mean(_cells(rows, t, "baseline", "balanced_accuracy")) for t in nested]
    if all(v is not None for v in [*bal, *bal0]):
        out.append(f"- The threshold: learnt on the other products, the baseline's balanced accuracy "
                   f"averages {statistics.mean(bal0):.3f}; calibrated on K = {k} good images, the nested "
                   f"choice's {statistics.mean(bal):.3f}.")
    return out


def report_markdown(files: Sequence[Path], page_dir: Path, anchors: Path | None = None) -> str:
    """The whole results page, from the rows files (links relative to page_dir)."""
    rows, sources = load_rows(files)
    settings = sources[0]["settings"]
    ks = sorted({int(r["model"].rsplit(" k=", 1)[1]) for r in rows if " k=" in r["model"]})
    k = headline_k(ks)
    plain = [r for r in rows if " k=" not in r["model"]]
    simclr = [r for r in rows if "simclr" in r["model"] and " k=" not in r["model"]]
    lines = [
        "# Results",
        "",
        "Written by `python -m visinspect report` from the rows files below (do not edit: "
        "`tests/test_docs.py` regenerates this page and fails if it differs). Leave-one-out: each "
        "product in turn is the unknown one, every other product the source. **Positive class = "
        "anomaly**; image AUROC ranks the logit margin or the method's anomaly score; mean ± std "
        "over seeds. Earlier screens, not kept: [experiments.md](experiments.md).",
        "",
        "## Where the numbers come from",
        "",
    ]
    for source in sources:
        lines += _provenance(source, page_dir)
    lines += [
        "",
        f"## Headline: image AUROC with K = {k} good images of the new product",
        "",
        "The bold figure is the one to quote: the method chosen on the *other* products (nested "
        "leave-one-out), as a user without this product's labels would choose it.",
        "",
        headline_table(rows, k),
        "",
        *switch_notes(rows, k),
        "",
    ]
    if anchors and anchors.is_file():
        lines += ["Published few-shot figures beside ours (what differs: backbone, resolution, K, products; "
                  "theirs are means over MVTec AD's 15 categories):", "",
                  anchors_table(json.loads(anchors.read_text()), rows, ks, settings), ""]
    lines += ["## No good image of the product", "", pivot_table(plain, "image_auroc"), "",
              "![image AUROC per method and product](loo_image_auroc.png)", ""]
    lines += ["## K good images of the product", ""]
    for kk in ks:
        at_k = [r for r in rows if r["model"].endswith(f" k={kk}") and "calibrated" not in r["model"]]
        lines += [f"K = {kk}: " + pivot_table(at_k, "image_auroc"), ""]
    lines += ["## Levers", "",
              f"Each lever against the method it extends: image AUROC difference at K = {k} (a product "
              "with fewer good images at its K), paired by seed; \"chosen\": whether the nested "
              "protocol picks it (for how many products), \"shipped\": chosen on all products, what "
              "`train` sets up.", "", levers_table(rows, k), ""]
    lines += ["## SimCLR", ""]
    for base_method, twin in (p for p in lever_pairs(rows) if p[1].endswith("+simclr")):
        lines += [f"On the patch network: `{twin}` against `{base_method}` (the same score on ImageNet "
                  "features), image AUROC:", "", simclr_table(rows, k, base_method, twin), ""]
    lines += ([pivot_table(simclr, "image_auroc"), ""] if simclr else [
        "No classifier pre-trained by SimCLR is in these rows; the earlier screens are history in "
        "[experiments.md](experiments.md).", ""])
    lines += ["## K against AUROC", "", f"Mean image AUROC over {', '.join(_k_targets(rows))}:", "",
              k_against_auroc(rows, ks), "", "![image AUROC against K](loo_image_auroc_vs_k.png)", ""]
    calibrated = [r for r in rows if r["model"].endswith(f" k={k}") or r["model"] == "baseline"]
    lines += ["## Calibrated balanced accuracy", "",
              f"The threshold from K = {k} good images of the product (`baseline`: from the other "
              "products' validation images).", "", pivot_table(calibrated, "balanced_accuracy"), "",
              "![balanced accuracy against K](loo_balanced_accuracy_vs_k.png)",
              "![balanced accuracy without good images](loo_balanced_accuracy.png)", ""]
    lines += ["## What this shows", "", *_bullets(rows, k), ""]
    return "\n".join(lines)


def readme_block(files: Sequence[Path]) -> str:
    """The README's results in short: the headline table between its markers."""
    rows, _ = load_rows(files)
    k = headline_k(sorted({int(r["model"].rsplit(" k=", 1)[1]) for r in rows if " k=" in r["model"]}))
    notes = switch_notes(rows, k)  # computed once: each call runs the nested choice again
    block = "\n".join([headline_table(rows, k), *(["", *notes] if notes else [])])
    return f"{README_START}\n{block}\n{README_END}"


def replace_block(text: str, block: str) -> str:
    """`text` with the part between the results markers (markers included) replaced by `block`."""
    start, end = text.index(README_START), text.index(README_END) + len(README_END)
    return text[:start] + block + text[end:]


def publish_benchmark(result: dict, json_path: str | None,
                      blocks: Sequence[tuple[str | None, tuple[str, str], str]]) -> None:
    """A benchmark's `result` as JSON at `json_path`, and each (page, markers, body) block written
    into its page; None paths are skipped (the benchmark was run only to look)."""
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1) + "\n")
    for page, markers, body in blocks:
        if page:
            Path(page).write_text(replace_between(Path(page).read_text(), markers, body))


def replace_between(text: str, markers: tuple[str, str], body: str) -> str:
    """`text` with what lies between two marker lines replaced by `body`: how a benchmark writes
    its result into a page (benchmarks/bench_predict.py, bench_distributed.py)."""
    start, end = text.index(markers[0]) + len(markers[0]), text.index(markers[1])
    return text[:start] + "\n" + body + "\n" + text[end:]


def write_report(files: Sequence[str | Path], out: str | Path, *, readme: str | Path | None = None,
                 anchors: str | Path | None = None, figures: bool = True) -> str:
    """Write the page (and its figures beside it, and the README's block); return the page."""
    out = Path(out)
    anchors = Path(anchors) if anchors else out.parent / "anchors.json"
    text = report_markdown(files, out.parent, anchors)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    if figures:
        draw_figures(load_rows(files)[0], out.parent)
    if readme:
        Path(readme).write_text(replace_block(Path(readme).read_text(), readme_block(files)))
    return text
