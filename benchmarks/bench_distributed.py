"""Benchmark of data-parallel SimCLR pre-training: images/s with 1 and N processes, same global batch.

Each run starts its processes as torchrun would (RANK, WORLD_SIZE, LOCAL_RANK, a gloo or nccl
process group through `distributed.init_from_env`) and pre-trains a random-weight VGG16 (speed
does not depend on the weights) on the synthetic images: epoch 1 is warm-up (images decoded and
cached, oneDNN kernels chosen), epochs 2 and 3 are measured (the mean of pretrain's own
images_per_s: images of the global batch, each seen as two views, per second). On a CPU the cores
are split between the processes (threads = cores / N), and one process is also measured with one
thread: on a busy machine a team of OpenMP threads waits for its slowest member, so 1 x 1 thread
is the fair baseline for N single-thread processes. With CUDA GPUs: one process per GPU, nccl.

    python benchmarks/bench_distributed.py                      # CPU: 1 and 2 processes
    python benchmarks/bench_distributed.py --images 128 --global-batch 32 --image-size 128
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from visinspect.experiments.loo import package_commit
from visinspect.experiments.report import publish_benchmark
from visinspect.utils import describe_machine, resolve_precision


def _rank(rank: int, world: int, port: int, device: str, threads: int, args: argparse.Namespace,
          result: Path) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    from visinspect import distributed
    from visinspect.data.samples import build_sample_table
    from visinspect.methods.simclr.pretrain import PretrainConfig, build_simclr_model, pretrain

    target = distributed.init_from_env(device)
    try:
        config = PretrainConfig(epochs=3, batch_size=args.global_batch // world, image_size=args.image_size,
                                warmup_epochs=0, precision=args.precision)
        model, _ = build_simclr_model(config, "random")
        samples = build_sample_table(args.data).samples[: args.images]
        history = pretrain(model.to(target), samples, config, progress=False)
        if distributed.is_main():
            result.write_text(f"{sum(history['images_per_s'][1:]) / 2:.2f}")
    finally:
        distributed.destroy()


def run(world: int, device: str, threads: int, args: argparse.Namespace) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "images_per_s"
        mp.spawn(_rank, args=(world, port, device, threads, args, result), nprocs=world, join=True)
        return float(result.read_text())


PAGE_BLOCK = ("<!-- bench_distributed:start -->", "<!-- bench_distributed:end -->")
README_BLOCK = ("<!-- bench_distributed_short:start -->", "<!-- bench_distributed_short:end -->")


def markdown(result: dict) -> str:
    """The measurements as a table with the run's command, machine and load (the page's block)."""
    lines = [f"`{result['command']}` on {result['date']} at commit {result['commit']}: {result['machine']}; "
             f"load average {result['load_before']:.2f} before, {result['load_after']:.2f} after (other "
             f"processes share these cores). SimCLR pre-training of a random-weight VGG16 (block 5 trained), "
             f"{result['images']} synthetic images at {result['image_size']} px, global batch "
             f"{result['global_batch']}, epochs 2-3 measured, precision {result['precision']}:", "",
             "| device | processes × threads | batch per process | images/s |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['device']} | {r['processes']} × {r['threads']} | {r['batch']} | "
              f"{r['images_per_s']:.1f} |" for r in result["runs"]]
    return "\n".join(lines)


def summary(result: dict) -> str:
    """One sentence for the README: one process against the most processes on this machine."""
    cpu = [r for r in result["runs"] if r["device"] == "cpu"]
    one = max((r for r in cpu if r["processes"] == 1), key=lambda r: r["images_per_s"])
    most = max(cpu, key=lambda r: r["processes"])
    cpu_name, cores = (part.strip() for part in result["machine"].split(",")[:2])
    speed_up = most["images_per_s"] / one["images_per_s"]
    return (f"SimCLR pre-training on {cpu_name} ({cores}): {one['images_per_s']:.1f} images/s in one "
            f"process, {most['images_per_s']:.1f} in {most['processes']} processes sharing those cores "
            f"({speed_up:.2f}×), `benchmarks/bench_distributed.py`.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="pre-training images (synthetic)")
    parser.add_argument("--global-batch", type=int, default=16, help="images per step over all processes")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--processes", type=int, default=2, help="the largest N on the CPU")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--json", help="write the result here (docs/benchmarks/distributed.json)")
    parser.add_argument("--page", help="rewrite this page's bench_distributed block (docs/scaling.md)")
    parser.add_argument("--readme", help="rewrite this README's bench_distributed_short block")
    args = parser.parse_args()
    from visinspect.data.synthetic import generate_synthetic_dataset

    result = {"command": "python benchmarks/bench_distributed.py", "date": time.strftime("%Y-%m-%d"),
              "commit": package_commit(), "machine": describe_machine(), "torch": torch.__version__,
              "precision": resolve_precision(args.precision), "load_before": os.getloadavg()[0],
              "images": args.images, "image_size": args.image_size, "global_batch": args.global_batch,
              "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        args.data = generate_synthetic_dataset(Path(tmp) / "data", image_size=args.image_size,
                                               n_train_good=args.images // 2, n_test_good=1,
                                               n_test_per_defect=1, categories=["grain_wood", "round_pill"])
        cores = os.cpu_count() or 1
        runs = [("cpu", 1, 1)] if cores > 1 else []
        runs += [("cpu", n, max(1, cores // n)) for n in range(1, args.processes + 1)]
        runs += [("cuda", n, 1) for n in range(1, torch.cuda.device_count() + 1)]
        for device, world, threads in runs:
            if args.global_batch % world == 0:
                name = torch.cuda.get_device_name(0) if device == "cuda" else device
                result["runs"].append({"device": name,
                                       "processes": world, "threads": threads,
                                       "batch": args.global_batch // world,
                                       "images_per_s": run(world, device, threads, args)})
    result["load_after"] = os.getloadavg()[0]
    print(markdown(result))
    publish_benchmark(result, args.json, ((args.page, PAGE_BLOCK, markdown(result)),
                                          (args.readme, README_BLOCK, summary(result))))


if __name__ == "__main__":
    main()
