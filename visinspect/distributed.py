"""Data-parallel runs under torchrun: one process per device (or per share of a CPU's cores).

`torchrun --nproc_per_node=N -m visinspect pretrain|train|predict ...` starts N processes with
RANK, WORLD_SIZE and LOCAL_RANK in their environment; `init_from_env` joins them into PyTorch's
process group (gloo on the CPU, nccl on CUDA, one GPU per LOCAL_RANK). Without WORLD_SIZE nothing
happens: no process group, and every helper here is the identity, so a single-process run computes
exactly what it computed before this module existed.

What the commands share: the model (DistributedDataParallel averages the gradients), the batch
(each process reads its shard through DistributedSampler; SimCLR's NT-Xent draws its negatives
from the global batch, `gather`, and the projection head's batch norm uses the global batch's
statistics, `sync_batch_norm`), and one output: rank 0 alone writes checkpoints (see
`checkpoint.save_checkpoint`) and prints. `predict_images` splits the files and merges the JSON
lines as one process would have written them.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import warnings
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from visinspect.errors import ConfigError
from visinspect.utils import resolve_device

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise ConfigError(f"environment variable {name}={value!r} is not a rank or size: start the "
                          "command with torchrun (which sets RANK, WORLD_SIZE and LOCAL_RANK) or unset "
                          "WORLD_SIZE to run in one process")
    return number


def init_from_env(device: str | torch.device = "auto") -> torch.device | None:
    """Join torchrun's process group when WORLD_SIZE is set; return this process's device (None,
    and nothing done, without WORLD_SIZE).

    nccl when `device` resolves to CUDA (this process's GPU is LOCAL_RANK's, made the current one,
    so that "cuda" means it everywhere), gloo on the CPU. On a CPU torchrun gives each process one
    thread (OMP_NUM_THREADS=1) unless OMP_NUM_THREADS is set: set it to cores / processes.
    """
    if "WORLD_SIZE" not in os.environ:
        return None
    rank, world, local = (_env_int(name) for name in ENV)
    if rank >= world:
        raise ConfigError(f"RANK={rank} is not below WORLD_SIZE={world}: start the command with torchrun")
    target = resolve_device(device)
    if target.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local}, but this machine has {torch.cuda.device_count()} "
                              "CUDA GPU(s): start at most that many processes per node (--nproc_per_node)")
        torch.cuda.set_device(local)
        target = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
        atexit.register(destroy)
    return target


def init_command(device: str | torch.device = "auto") -> None:
    """What a data-parallel command does first: `init_from_env`; then rank 0 alone prints (every
    rank's errors still reach stderr)."""
    init_from_env(device)
    if not is_main():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (for the rest of the process)


def destroy() -> None:
    """Leave the process group (torchrun's processes exit cleanly); a no-op without one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """True on rank 0 (and in a single process): the process that writes and prints."""
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def describe(batch_size: int) -> str:
    """How this run is spread, e.g. "world size 2, backend gloo, global batch 64 (32 per process)"."""
    backend = dist.get_backend() if dist.is_initialized() else "none"
    return (f"world size {world_size()}, backend {backend}, global batch {batch_size * world_size()} "
            f"({batch_size} per process)")


def announce(batch_size: int) -> None:
    """Print `describe` once, on rank 0, when the run was started by torchrun."""
    if dist.is_initialized() and is_main():
        print(describe(batch_size), flush=True)


# ----------------------------------------------------------------------------- training


@contextlib.contextmanager
def _differentiable() -> Iterator[None]:
    """torch.distributed.nn.functional's collectives, without their FutureWarning: the replacement
    it names (torch.distributed._functional_collectives) computes the same gradients under gloo but
    aborts the process when the group is destroyed (torch 2.14.1, measured)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.nn")
        warnings.filterwarnings("ignore", ".*torch.distributed.nn.functional.*", FutureWarning)
        yield


def gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `tensor` (same shape on all), in rank order, with the gradient: PyTorch's
    differentiable all_gather, whose backward sums each rank's gradient for this rank's rows."""
    if world_size() == 1:
        return [tensor]
    with _differentiable():
        return list(dist_nn.all_gather(tensor))


def own_rows(n: int) -> slice:
    """This rank's rows in a gather of n rows per rank."""
    return slice(rank() * n, (rank() + 1) * n)


def mean(value: torch.Tensor) -> float:
    """The mean over ranks of a scalar (e.g. a loss for the log); the value itself in one process."""
    if world_size() == 1:
        return value.item()
    value = value.detach().clone()
    dist.all_reduce(value)
    return value.item() / world_size()


def total(value: int) -> int:
    """The sum over ranks of a count."""
    if world_size() == 1:
        return value
    t = torch.tensor(value, dtype=torch.int64, device=_collective_device())
    dist.all_reduce(t)
    return int(t.item())


def gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order (e.g. each rank's RNG state for a checkpoint)."""
    if world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def _collective_device() -> torch.device:
    """Where a collective's tensors must live: nccl reduces on the GPU, gloo on the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sampler(dataset, seed: int) -> DistributedSampler | None:
    """This rank's shard of `dataset`, reshuffled each epoch (call set_epoch) from `seed`; the tail
    that would make shards unequal is dropped. None in one process (the loader shuffles)."""
    if world_size() == 1:
        return None
    return DistributedSampler(dataset, world_size(), rank(), shuffle=True, seed=seed, drop_last=True)


def shard(items: Sequence) -> list:
    """This rank's items: every world_size-th, from its rank (all of them in one process)."""
    return list(items[rank() :: world_size()])


def data_parallel(module: nn.Module, *, find_unused_parameters: bool = False) -> nn.Module:
    """`module` in DistributedDataParallel (gradients averaged over ranks); itself in one process."""
    if world_size() == 1:
        return module
    device = next(module.parameters()).device
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused_parameters)


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the global batch, for gloo on a CPU,
    where PyTorch's SyncBatchNorm refuses CPU tensors ("expected input tensor to be on GPU").

    The sums go through PyTorch's differentiable all_reduce, so gradients flow to every rank's
    rows as with one process normalising the whole batch; eval mode and one process are plain
    BatchNorm1d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and world_size() > 1):
            return super().forward(x)
        if x.ndim != 2:
            raise ValueError(f"GlobalBatchNorm1d normalises (N, C) rows; got shape {tuple(x.shape)}")
        count = torch.tensor(float(len(x)), device=x.device)
        dist.all_reduce(count)
        with _differentiable():
            mu = dist_nn.all_reduce(x.sum(dim=0)) / count
            # Two passes (mean, then squared deviations), as numerically safe as one process's.
            var = dist_nn.all_reduce(((x - mu) ** 2).sum(dim=0)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.item()
                self.running_mean.mul_(1 - m).add_(m * mu.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * count / (count - 1))
        y = (x - mu) / torch.sqrt(var + self.eps)
        return y * self.weight + self.bias if self.affine else y


def sync_batch_norm(module: nn.Module) -> nn.Module:
    """`module` with its batch norms computing global-batch statistics across ranks: PyTorch's
    SyncBatchNorm on CUDA, GlobalBatchNorm1d on a CPU. Unchanged in one process. The layers are
    replaced in place (same parameter and buffer names: checkpoints keep their keys); call it
    before building the optimiser, which must see the new parameters."""
    if world_size() == 1:
        return module
    if next(module.parameters()).device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for parent in module.modules():
        for name, child in parent.named_children():
            if type(child) is nn.BatchNorm1d:
                replacement = GlobalBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine,
                                                child.track_running_stats).to(child.weight.device)
                replacement.load_state_dict(child.state_dict())
                setattr(parent, name, replacement.train(child.training))
    return module


# ----------------------------------------------------------------------------- predict


def part_name(rank_: int | str) -> str:
    """The JSON lines of one rank's files, merged into predict.RESULTS_NAME at the end ("*": a
    pattern for every rank's)."""
    return f"predictions.rank{rank_}.jsonl"
