"""Benchmark of `predict` against the machine's limit: decoding, the network, their serial limit,
and predict end to end (with and without overlays) as fractions of it, in one run on one folder.

The images: the real magnetic tile test folder (772 images, 256 px) and its first 20 good train
images as the reference when $VISINSPECT_SHARED_DATA is set (ImageNet MobileNetV2 weights from
$VISINSPECT_MOBILENET_WEIGHTS); else as many synthetic 256 px PNGs and random weights. The method
is the recommended one, its checkpoint written by `python -m visinspect train` as a user would.

1. decode + resize: load_rgb and to_tensor of every image, one thread (what a reader thread does);
2. the network: MobileNetV2 up to its stride-16 maps on those inputs, channels-last, in the
   precision "auto" resolves to, at the feature store's batch (FILL_BATCH; larger ones shown too),
   on the first NETWORK_IMAGES;
3. their serial limit: 1 / (1 / decode + 1 / network) images/s;
4. `predict_images` in fresh processes with the feature store off (every image runs the network):
   without overlays on the first --small images and on all (peak RSS should stay flat), with
   overlays at the images' own resolution on all;
5. `python -m visinspect --help`, wall time of a fresh process (best of 3).

    python benchmarks/bench_predict.py                     # the real folder if the data is there
    VISINSPECT_SHARED_DATA= python benchmarks/bench_predict.py --n 400   # synthetic images
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from visinspect.experiments.loo import package_commit
from visinspect.experiments.report import publish_benchmark
from visinspect.utils import describe_machine

SHARED_ENV = "VISINSPECT_SHARED_DATA"
PRODUCT = Path("industrial") / "magnetic_tile"
K = 20  # good reference images, as in the issue's `--reference-dir GOOD20/`
NETWORK_IMAGES = 256  # inputs the network is timed on, 3 passes per batch size


def write_images(root: Path, n: int, seed: int = 0) -> None:
    """n PNGs of 256 px, grey like the tiles: smooth noise with a few dark or bright spots."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = 256, int(rng.integers(160, 257))
        image = cv2.resize(rng.integers(80, 180, (h // 16 + 1, w // 16 + 1), np.uint8), (w, h))
        for _ in range(rng.integers(0, 3)):
            centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.circle(image, centre, int(rng.integers(3, 12)), int(rng.integers(0, 256)), -1)
        cv2.imwrite(str(root / f"img_{i:05d}.png"), image)


def inputs(tmp: Path, n: int | None) -> tuple[Path, Path, str]:
    """(test folder, reference folder, what they are): the real ones or synthetic ones."""
    shared = os.environ.get(SHARED_ENV)
    good = tmp / "good"
    good.mkdir()
    if shared:
        root = Path(shared) / PRODUCT  # as tests/test_real_data.py: the folder holding industrial/
        for f in sorted((root / "train" / "good").glob("*.png"))[:K]:
            (good / f.name).symlink_to(f)
        test = root / "test"
        if n is not None:  # the first n of the sorted test images, as links
            (tmp / "test").mkdir()
            for i, f in enumerate(sorted(test.rglob("*.png"))[:n]):
                (tmp / "test" / f"{i:05d}_{f.name}").symlink_to(f)
            test = tmp / "test"
        return test, good, f"$VISINSPECT_SHARED_DATA/{PRODUCT}/test (real)"
    write_images(good, K, seed=1)
    write_images(tmp / "test", n or 772)
    return tmp / "test", good, "synthetic 256 px PNGs, random weights"


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "visinspect", *args]


def help_seconds() -> float:
    """Wall time of `python -m visinspect --help` in a fresh process, best of 3."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run(cli("--help"), check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return min(times)


# ----------------------------------------------------------------------------- limits


def decode_rate(files: list[Path], image_size: int) -> tuple[float, list[torch.Tensor]]:
    """Images/s of load_rgb + to_tensor on one thread (torch too), and the inputs it made."""
    from visinspect.data.samples import load_rgb, to_tensor

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a reader thread's share: the network runs on the cores meanwhile
    try:
        start = time.perf_counter()
        xs = [to_tensor(load_rgb(f), image_size) for f in files]
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    return len(files) / seconds, xs


def network_rates(checkpoint: Path, xs: list[torch.Tensor]) -> tuple[str, dict[int, float]]:
    """Images/s of the recommended method's network (MobileNetV2 to its stride-16 maps, as the
    feature store runs it: channels-last, "auto" precision) by batch size, best of 3 passes."""
    from visinspect.backbones.mobilenet import mobilenet_for
    from visinspect.backbones.store import FILL_BATCH
    from visinspect.checkpoint import load_method_checkpoint
    from visinspect.utils import autocast, resolve_precision

    _, info = load_method_checkpoint(checkpoint)
    model = mobilenet_for(info)[0].eval().to(memory_format=torch.channels_last)
    precision = resolve_precision("auto")
    rates = {}
    for batch in sorted({FILL_BATCH, 16, 32}):
        n = len(xs) - len(xs) % batch
        best = float("inf")
        for _ in range(3):  # the first pass also creates oneDNN's kernels: the best of 3
            start = time.perf_counter()
            with torch.inference_mode(), autocast("cpu", precision):
                for i in range(0, n, batch):
                    model(torch.stack(xs[i : i + batch]).contiguous(memory_format=torch.channels_last))
            best = min(best, time.perf_counter() - start)
        rates[batch] = n / best
    return precision, rates


# ----------------------------------------------------------------------------- predict runs


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args) -> None:
    """One predict run in this fresh process; prints one JSON line."""
    from visinspect.methods.registry import load_detector
    from visinspect.predict import predict_images

    start = time.perf_counter()
    detector = load_detector(args.checkpoint, reference=[args.good])
    setup = time.perf_counter() - start
    summary = predict_images(detector, [Path(args.test)], Path(args.out), overlays=args.worker == "overlays",
                             progress=False)
    assert summary["n_failed"] == 0, summary
    print(json.dumps({"run": args.worker, "images": summary["n_images"], "seconds": summary["seconds"],
                      "setup_s": setup, "peak_mb": peak_rss_mb()}))


def run_worker(mode: str, checkpoint: Path, test: Path, good: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--checkpoint", str(checkpoint),
           "--good", str(good), "--test", str(test), "--out", str(out)]
    # The feature store off, as for a production folder seen once: every image runs the network.
    env = {**os.environ, "VISINSPECT_FEATURE_STORE": "off"}
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


PAGE_BLOCK = ("<!-- bench_predict:start -->", "<!-- bench_predict:end -->")
README_BLOCK = ("<!-- bench_predict_short:start -->", "<!-- bench_predict_short:end -->")


def markdown(result: dict) -> str:
    """The benchmark's table and the lines under it, from its result (printed, and the page's block)."""
    limit = result["serial_limit"]
    lines = [f"`{result['command']}` on {result['date']} at commit {result['commit']}: {result['machine']}",
             "", f"Images: {result['images']} from {result['what']}; method: `{result['method']}` (the "
             f"recommended one then) at {result['image_size']} px, K = {K}; precision "
             f"{result['precision']}.", "",
             "| stage | images/s | share of the serial limit |", "| --- | ---: | ---: |",
             f"| decode + resize (load_rgb + to_tensor, 1 thread) | {result['decode']:.1f} | |"]
    for batch, rate in result["network"].items():
        mark = " (the store's batch)" if int(batch) == result["fill_batch"] else ""
        lines.append(f"| network, {result['precision']}, channels-last, batch {batch}{mark} | {rate:.1f} | |")
    batch = result["fill_batch"]
    lines.append(f"| serial limit 1 / (1/decode + 1/network at batch {batch}) | {limit:.1f} | 100 % |")
    for r in result["runs"]:
        rate = r["images"] / r["seconds"]
        name = "predict, overlays at own resolution" if r["run"] == "overlays" else "predict, --no-overlays"
        lines.append(f"| {name}, {r['images']} images | {rate:.1f} | {100 * rate / limit:.0f} % |")
    small, plain, overlays = result["runs"]
    lines += ["", f"`python -m visinspect --help`: {result['help_seconds']:.2f} s (best of 3). Peak RSS "
              f"(whole process, model and bank included): --no-overlays {small['images']} images "
              f"{small['peak_mb']:.0f} MB, {plain['images']} images {plain['peak_mb']:.0f} MB; with overlays "
              f"{overlays['images']} images {overlays['peak_mb']:.0f} MB; setup (load + adapt) "
              f"{plain['setup_s']:.1f} s, not counted above."]
    return "\n".join(lines)


def summary(result: dict) -> str:
    """One sentence for the README: predict's rates as shares of the machine's limit."""
    limit = result["serial_limit"]
    _, plain, overlays = (r["images"] / r["seconds"] for r in result["runs"])
    return (f"On {result['machine'].split(',')[0]} ({result['precision']}), `predict` of "
            f"`{result['method']}` scored {plain:.0f} images/s without overlays and {overlays:.0f} with "
            f"overlays at the "
            f"images' own resolution: {100 * plain / limit:.0f} % and {100 * overlays / limit:.0f} % of that "
            f"machine's decode + network limit ({limit:.0f} images/s), `benchmarks/bench_predict.py`.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, help="images to score (default: the whole real folder, "
                        "else 772 synthetic ones)")
    parser.add_argument("--small", type=int, default=200, help="images of the smaller RSS run")
    parser.add_argument("--json", help="write the result here (docs/benchmarks/predict.json)")
    parser.add_argument("--page", help="rewrite this page's bench_predict block (docs/performance.md)")
    parser.add_argument("--readme", help="rewrite this README's one-sentence bench_predict_short block")
    parser.add_argument("--worker", choices=("plain", "overlays"), help=argparse.SUPPRESS)
    for name in ("--checkpoint", "--good", "--test", "--out"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from visinspect.data.samples import list_images

    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        tmp = Path(tmp)
        test, good, what = inputs(tmp, args.n)
        (tmp / "small").mkdir()
        files = list_images([test])
        for i, f in enumerate(files[: args.small]):
            (tmp / "small" / f"{i:05d}{f.suffix}").symlink_to(f.resolve())
        weights = [] if os.environ.get("VISINSPECT_MOBILENET_WEIGHTS") else ["--backbone-weights", "random"]
        subprocess.run(cli("train", "--out", str(tmp / "m.pt"), *weights), check=True, capture_output=True)
        help_s = help_seconds()
        from visinspect.checkpoint import load_method_checkpoint

        image_size = int(load_method_checkpoint(tmp / "m.pt")[1]["image_size"])
        decode, xs = decode_rate(files, image_size)
        precision, nets = network_rates(tmp / "m.pt", xs[:NETWORK_IMAGES])
        del xs
        runs = [run_worker("plain", tmp / "m.pt", tmp / "small", good, tmp / "out_small"),
                run_worker("plain", tmp / "m.pt", test, good, tmp / "out_plain"),
                run_worker("overlays", tmp / "m.pt", test, good, tmp / "out_overlays")]

    from visinspect.backbones.store import FILL_BATCH
    from visinspect.methods.registry import RECOMMENDED

    result = {
        "method": RECOMMENDED,  # what `train` set up without --method
        "command": "python benchmarks/bench_predict.py" + (f" --n {args.n}" if args.n else ""),
        "date": time.strftime("%Y-%m-%d"), "commit": package_commit(), "machine": describe_machine(),
        "torch": torch.__version__, "images": len(files), "what": what, "image_size": image_size,
        "precision": precision, "fill_batch": FILL_BATCH, "decode": decode, "network": nets,
        "serial_limit": 1 / (1 / decode + 1 / nets[FILL_BATCH]), "runs": runs, "help_seconds": help_s,
    }
    print(markdown(result))
    publish_benchmark(result, args.json, ((args.page, PAGE_BLOCK, markdown(result)),
                                          (args.readme, README_BLOCK, summary(result))))


if __name__ == "__main__":
    main()
