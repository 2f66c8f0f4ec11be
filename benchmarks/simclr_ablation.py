"""What was tried to make SimCLR help: one split, one seed, the pre-training settings varied.

Each variant pre-trains with SimCLR on the source images plus the target's unlabeled train/good
images, then trains the baseline's head with the seed's recipe, and is scored on the target's
test images (positive class anomaly; threshold from the source validation split). The baseline
(no pre-training) runs once on the same split for reference.

    python benchmarks/simclr_ablation.py --data ../shared/data/mvtec_ad ../shared/data/industrial \\
        --target magnetic_tile --preset small --json runs/ablation_magnetic_tile.json

`small` (defined here) keeps five pre-trainings affordable on 2 CPU cores: classifier at 96 px
for 6 epochs, ~100 images per source category and ~100 test images, SimCLR at 64 px on 200
images for 4 epochs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from visinspect.compare import ComparePreset, run_seed, summary_table
from visinspect.data import build_sample_table
from visinspect.evaluate import round_floats
from visinspect.simclr import PretrainConfig

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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--preset", default="small", choices=("small", "demo", "medium", "full"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="write {'rows': [...]} here")
    args = p.parse_args()
    table = build_sample_table(args.data).samples
    source = sorted({s.category for s in table} - {args.target})
    preset = SMALL if args.preset == "small" else ComparePreset.named(args.preset)
    rows = []
    runs = [("baseline", "baseline", preset)] + [
        (name, "simclr-source+target-good",
         dataclasses.replace(preset, pretrain=dataclasses.replace(preset.pretrain, **overrides)))
        for name, overrides in ABLATIONS.items()
    ]
    for name, variant, run_preset in runs:
        start = time.monotonic()
        result = run_seed(table, source, [args.target], args.seed, run_preset, variants=(variant,),
                          device=args.device, log=lambda m: print(m, file=sys.stderr))
        seconds = time.monotonic() - start
        print(f"{name}: {seconds:.0f} s", file=sys.stderr, flush=True)
        rows += [{**r, "model": name, "seconds": seconds} for r in result.rows if r["target"] != "all"]
    print(summary_table(rows, ("image_auroc", "average_precision", "balanced_accuracy", "pixel_auroc")))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": round_floats(rows)}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
