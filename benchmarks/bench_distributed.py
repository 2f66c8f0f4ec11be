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
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="pre-training images (synthetic)")
    parser.add_argument("--global-batch", type=int, default=16, help="images per step over all processes")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--processes", type=int, default=2, help="the largest N on the CPU")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    args = parser.parse_args()
    from visinspect.data.synthetic import generate_synthetic_dataset

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    print("\n".join(line for line in lscpu.splitlines() if line.split(":")[0] in ("Model name", "CPU(s)")))
    precision = resolve_precision(args.precision)
    print(f"machine: {describe_machine()}; torch {torch.__version__}; precision {precision}")
    print(f"load average before: {os.getloadavg()[0]:.2f} (other processes share these cores)")
    print(f"SimCLR pre-training, {args.images} synthetic images at {args.image_size} px, global batch "
          f"{args.global_batch}, block 5 trained; epochs 2-3 measured", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        args.data = generate_synthetic_dataset(Path(tmp) / "data", image_size=args.image_size,
                                               n_train_good=args.images // 2, n_test_good=1,
                                               n_test_per_defect=1, categories=["grain_wood", "round_pill"])
        cores = os.cpu_count() or 1
        runs = [("cpu", 1, 1)] if cores > 1 else []
        runs += [("cpu", n, max(1, cores // n)) for n in range(1, args.processes + 1)]
        runs += [("cuda", n, 1) for n in range(1, torch.cuda.device_count() + 1)]
        for device, world, threads in runs:
            if args.global_batch % world:
                continue
            speed = run(world, device, threads, args)
            what = torch.cuda.get_device_name(0) if device == "cuda" else f"{threads} thread(s) each"
            print(f"{device}: {world} process(es), batch {args.global_batch // world} each ({what}): "
                  f"{speed:.1f} images/s", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
