"""Leave-one-out comparison on real data: each category in turn is the unknown product.

For every target category with good and defective test images, `python -m visinspect compare`
runs with all other categories as the source (single-class ones such as capsule are dropped by
`unknown_context_split`, with a warning) and, where the target has enough good train/ images,
with `--calibrate` for the few-good-parts rows. Jobs (one per target and seed) run in parallel
processes, seed 0 of every target first, each writing its own JSON; a deadline stops what is
left, so that a slow machine still returns whole seeds. Then the rows are merged into one
table and the figures of docs/results.md are drawn.

    python benchmarks/loo_compare.py --data ../shared/data/mvtec_ad ../shared/data/industrial \\
        --preset full --seeds 3 --calibrate 5,20,50 --jobs 6 --out runs/loo
    python benchmarks/loo_compare.py --merge-only --out runs/loo --figures docs/
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from visinspect.compare import summary_table
from visinspect.data import build_sample_table, single_class_categories
from visinspect.plots import plot_metric_bars, plot_metric_vs_k, save_figure


def loo_jobs(roots: list[str], seeds: int, calibrate: list[int]) -> list[dict]:
    """One job per (seed, target): targets need both classes in test/; sources are the rest."""
    table = build_sample_table(roots).samples
    categories = sorted({s.category for s in table})
    test = [s for s in table if s.split == "test"]
    targets = sorted({s.category for s in test} - set(single_class_categories(test)))
    jobs = []
    for seed in range(seeds):
        for target in targets:
            good = sum(1 for s in table if s.category == target and s.split == "train" and s.label == 0)
            ks = [k for k in calibrate if k <= good]
            source = [c for c in categories if c != target]
            jobs.append({"target": target, "seed": seed, "source": source, "calibrate": ks})
    return jobs


def run_job(job: dict, args: argparse.Namespace, threads: int, deadline: float) -> str:
    out = Path(args.out)
    name = f"{job['target']}_seed{job['seed']}"
    remaining = deadline - time.monotonic()
    if remaining < args.min_job_seconds:
        return f"{name}: skipped (deadline)"
    cmd = [sys.executable, "-m", "visinspect", "compare", "--data", *args.data,
           "--source", ",".join(job["source"]), "--target", job["target"],
           "--seeds", "1", "--first-seed", str(job["seed"]), "--preset", args.preset,
           "--precision", args.precision, "--device", args.device, "--json", str(out / f"{name}.json")]
    if job["calibrate"]:
        cmd += ["--calibrate", ",".join(map(str, job["calibrate"]))]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    with open(out / f"{name}.log", "w") as log:
        try:
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=remaining)
        except subprocess.TimeoutExpired:
            return f"{name}: stopped at the deadline"
    return f"{name}: exit {done.returncode} in {time.monotonic() - start:.0f} s"


def merge(out: Path) -> list[dict]:
    """Every finished job's rows; a job's "all" row repeats its single target, so it is dropped."""
    rows = []
    for path in sorted(out.glob("*_seed*.json")):
        rows += [r for r in json.loads(path.read_text())["rows"] if r["target"] != "all"]
    return rows


def draw(rows: list[dict], folder: Path) -> None:
    import matplotlib.pyplot as plt

    plain = [r for r in rows if "k=" not in r["model"]]
    for metric in ("image_auroc", "balanced_accuracy"):
        save_figure(plot_metric_bars(plain, metric), folder / f"real_loo_{metric}.png")
    targets = sorted({r["target"] for r in rows if "k=" in r["model"]})
    # Per product, calibration shifts the scores and leaves the ranking (AUROC) as it was: the
    # AUROC panel shows the K-dependent models only; balanced accuracy shows them all.
    for metric, keep in (
        ("image_auroc", lambda m: "calibrated" not in m),
        ("balanced_accuracy", lambda m: True),
    ):
        if not targets:
            break
        fig, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets), 3.6), squeeze=False)
        for ax, target in zip(axes[0], targets, strict=True):
            chosen = [r for r in rows if r["target"] == target and keep(r["model"])]
            plot_metric_vs_k(chosen, metric, target, ax=ax)
            ax.set_title(target)
            ax.get_legend().remove()
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, frameon=False)
        save_figure(fig, folder / f"real_loo_{metric}_vs_k.png")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", nargs="+", help="data roots in MVTec layout")
    p.add_argument("--preset", default="full", choices=("demo", "medium", "full"))
    p.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16"))
    p.add_argument("--device", default="auto")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--calibrate", default="5,20,50", help="K values; fewer good images: skipped")
    p.add_argument("--jobs", type=int, default=1, help="parallel compare processes")
    p.add_argument("--deadline", type=float, default=float("inf"), help="seconds; later jobs stop")
    p.add_argument("--min-job-seconds", type=float, default=60.0, help="start no job with less time left")
    p.add_argument("--out", default="runs/loo", help="per-job JSON and logs, and the merged rows")
    p.add_argument("--figures", help="folder for the PNGs of docs/results.md")
    p.add_argument("--merge-only", action="store_true", help="only merge the JSON files of --out and draw")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.merge_only:
        calibrate = [int(k) for k in args.calibrate.split(",") if k]
        jobs = loo_jobs(args.data, args.seeds, calibrate)
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        deadline = time.monotonic() + args.deadline
        start = time.monotonic()
        print(f"{len(jobs)} jobs, {args.jobs} at a time, {threads} thread(s) each", flush=True)
        with ThreadPoolExecutor(args.jobs) as pool:
            for line in pool.map(lambda j: run_job(j, args, threads, deadline), jobs):
                print(line, flush=True)
        print(f"wall time {time.monotonic() - start:.0f} s", flush=True)
    rows = merge(out)
    (out / "rows.json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    plain = [r for r in rows if "k=" not in r["model"]]
    few = [r for r in rows if "k=" in r["model"]]
    few_keys = ("image_auroc", "balanced_accuracy", "precision", "recall", "pixel_auroc", "box_hit_rate")
    tables = "### Without good images of the new product\n\n" + summary_table(plain) + "\n"
    if few:
        tables += "\n### With K good images of the new product\n\n" + summary_table(few, few_keys) + "\n"
    (out / "tables.md").write_text(tables)
    print(tables)
    if args.figures and rows:
        draw(rows, Path(args.figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
