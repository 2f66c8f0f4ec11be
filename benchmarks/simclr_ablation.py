"""What was tried to make SimCLR help: one split, the pre-training settings varied.

Each variant pre-trains with SimCLR on the source images plus the target's unlabeled train/good
images, then trains the baseline's head with the seed's recipe, and is scored on the target's
test images (positive class anomaly; threshold from the source validation split). The baseline
(no pre-training) runs once per seed on the same split for reference.

    python benchmarks/simclr_ablation.py --data ../shared/data/mvtec_ad ../shared/data/industrial \\
        --target magnetic_tile --preset small --json runs/ablation_magnetic_tile.json

`--set levers` varies the anomaly-detection levers of PretrainConfig (issue 14) instead of the
plain settings; without --data it runs on the synthetic dataset's course split
(visinspect.experiments.demo.SOURCE / TARGET):

    python benchmarks/simclr_ablation.py --set levers --preset demo --seeds 2 --device cpu

`small` (defined here) keeps five pre-trainings affordable on 2 CPU cores: classifier at 96 px
for 6 epochs, ~100 images per source category and ~100 test images, SimCLR at 64 px on 200
images for 4 epochs.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from visinspect.data.samples import build_sample_table
from visinspect.data.synthetic import data_roots
from visinspect.experiments.compare import ComparePreset, run_seed
from visinspect.experiments.demo import SOURCE, TARGET
from visinspect.experiments.tables import pivot_table, summary_table
from visinspect.methods.simclr.levers import LEVER_SETS
from visinspect.methods.simclr.pretrain import PretrainConfig
from visinspect.utils import write_json

SMALL = ComparePreset("small", 96, 6, PretrainConfig(image_size=64, epochs=4, max_images=200),
                      max_source_per_category=100, max_test_per_category=100)

# name -> PretrainConfig overrides; the first is the project's default.
ABLATIONS = {
    "default (tau 0.2, inspection crops, block 5)": {},
    "tau 0.1 (the paper's)": {"temperature": 0.1},
    "tau 0.5": {"temperature": 0.5},
    "paper augmentations (crops from 8 %)": {"augment": "simclr"},
    "blocks 4-5 trained": {"trainable_from": 17},
}
# The levers against what SimCLR erases, one at a time at the settings `loo` runs as the rows
# "simclr+NAME" (visinspect.methods.simclr.pretrain.LEVER_SETS), and L2-SP also 100 times weaker.
LEVERS = {"plain SimCLR": {}, **LEVER_SETS, "l2sp 1": {"l2sp_weight": 1.0}}
SETS = {"ablation": ABLATIONS, "levers": LEVERS}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", nargs="+", help="data roots (default: the synthetic dataset)")
    p.add_argument("--target", help="comma-separated target categories (default with the synthetic "
                   "data: the course's)")
    p.add_argument("--source", help="comma-separated source categories (default: every other one)")
    p.add_argument("--set", default="ablation", choices=tuple(SETS), help="which variants to run")
    p.add_argument("--preset", default="small", choices=("small", "demo", "medium", "full"))
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--seeds", type=int, default=1, help="run seeds SEED .. SEED+N-1")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="write {'rows': [...]} here")
    args = p.parse_args()
    course = args.data is None and args.target is None  # the synthetic course split
    if args.data is not None and args.target is None:
        p.error("--target is required with --data")
    table = build_sample_table(data_roots(args.data)).samples
    target = list(TARGET) if course else args.target.split(",")
    if args.source:
        source = args.source.split(",")
    else:
        source = list(SOURCE) if course else sorted({s.category for s in table} - set(target))
    preset = SMALL if args.preset == "small" else ComparePreset.named(args.preset)
    rows = []
    runs = [("baseline", "baseline", preset)] + [
        (name, "simclr-source+target-good",
         dataclasses.replace(preset, pretrain=dataclasses.replace(preset.pretrain, **overrides)))
        for name, overrides in SETS[args.set].items()
    ]
    for seed in range(args.seed, args.seed + args.seeds):
        for name, variant, run_preset in runs:
            start = time.monotonic()
            result = run_seed(table, source, target, seed, run_preset, variants=(variant,),
                              device=args.device, log=lambda m: print(m, file=sys.stderr))
            seconds = time.monotonic() - start
            print(f"seed {seed}, {name}: {seconds:.0f} s", file=sys.stderr, flush=True)
            rows += [{**r, "model": name, "seconds": seconds} for r in result.rows]
    per_target = [r for r in rows if r["target"] != "all" or len(target) > 1]
    print(summary_table(per_target, ("image_auroc", "average_precision", "balanced_accuracy", "pixel_auroc")))
    print()
    print(pivot_table(per_target))
    if args.json:
        write_json(args.json, {"rows": rows}, indent=1, digits=6)
    return 0


if __name__ == "__main__":
    sys.exit(main())
