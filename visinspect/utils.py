"""Small shared helpers: seeding, numeric precision choice, atomic file writes."""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from visinspect.errors import ConfigError


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and PyTorch so that the same command gives the same numbers."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too
    # On a GPU: deterministic convolution algorithms, and fp32 that is really fp32 (no TF32), so
    # that a GPU run gives the CPU's numbers up to rounding. Harmless without a GPU.
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = False


def cpu_has_fast_bf16() -> bool:
    """True when this CPU has native bf16 matrix instructions (AVX-512 BF16 or AMX).

    Without them PyTorch emulates bf16 and autocast is several times *slower* than fp32
    (measured on an AVX2-only machine: 0.5 vs 3.5 VGG16 images/s), so it is not worth it.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


PRECISIONS = ("auto", "fp32", "bf16")
PRECISION_ENV = "VISINSPECT_PRECISION"


def resolve_precision(precision: str = "auto") -> str:
    """"auto" picks bf16 where it is fast (CUDA, or a CPU with native bf16), else fp32.

    The environment variable VISINSPECT_PRECISION (auto, fp32 or bf16) overrides what "auto"
    picks, so that either path can be forced on any machine (CI tests both); an explicit
    "fp32" or "bf16" argument always wins over it.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16'; got {precision!r}")
    if precision != "auto":
        return precision
    forced = os.environ.get(PRECISION_ENV, "auto").strip().lower() or "auto"
    if forced not in PRECISIONS:
        raise ConfigError(
            f"environment variable {PRECISION_ENV}={os.environ[PRECISION_ENV]!r} is not one of "
            f"auto, fp32, bf16: set one of those or unset it"
        )
    if forced != "auto":
        return forced
    return "bf16" if torch.cuda.is_available() or cpu_has_fast_bf16() else "fp32"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" is the first CUDA GPU when PyTorch sees one, else the CPU; nothing needs a GPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device} asked for, but PyTorch sees no CUDA GPU: use 'cpu' or 'auto'")
    return device


def describe_machine(device: str | torch.device = "cpu") -> str:
    """One line for every reported figure: CPU model, cores, PyTorch's CPU capability and
    threads (or the GPU), and what precision "auto" means here."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA), precision auto = {resolve_precision()}"
    name = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return (
        f"{name}, {os.cpu_count()} cores, PyTorch CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, "
        f"native bf16 {'yes' if cpu_has_fast_bf16() else 'no'}, precision auto = {resolve_precision()}"
    )


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's parameters live: inputs are moved there, results come back to the CPU."""
    return next(model.parameters()).device


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for `precision == "bf16"`, a no-op otherwise."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    So an interrupted write never leaves a half-written file under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates files readable by the owner only; give the usual umask permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def round_floats(obj, digits: int = 6):
    """Round every float in a nested structure (stable JSON across runs and machines)."""
    if isinstance(obj, float):
        return round(obj, digits) if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [round_floats(v, digits) for v in obj]
    return obj


def write_json(path: str | Path, data, indent: int = 2, digits: int | None = None) -> Path:
    """`data` as a JSON file at `path` (floats rounded to `digits` when given), written atomically,
    its folder made if missing."""
    data = data if digits is None else round_floats(data, digits)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=indent) + "\n")
    return Path(path)
