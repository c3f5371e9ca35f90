"""torchrun integration: one process per device, ranks from the environment torchrun sets."""
import os
import platform
from dataclasses import dataclass

import torch
import torch.distributed as dist

from flexdit.errors import FlexDiTError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)


def _cpuinfo(field: str) -> str:
    """The first value of a /proc/cpuinfo field ("" off Linux or where it is missing)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.split(":", 1)[0].strip() == field), "")
    except OSError:
        return ""


def cpu_runs_bf16_natively() -> bool:
    """Whether the CPU executes bfloat16 matmuls in hardware (AVX512-BF16 or AMX). Elsewhere PyTorch emulates them,
    about 5x slower than float32 on an AVX2-only CPU, so bf16 is only a good default where this holds."""
    flags = _cpuinfo("flags").split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def describe_device(device: torch.device) -> str:
    """A device as figures should name it: the GPU's name, or the CPU's model, threads and whether it runs bf16
    natively (CPU timings differ several-fold between CPUs)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = _cpuinfo("model name") or platform.processor() or platform.machine()
    bf16 = "native bf16" if cpu_runs_bf16_natively() else "no native bf16"
    return f"cpu: {model}, {torch.get_num_threads()} threads, {bf16}"


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """'auto': bf16 on a CUDA GPU that supports it and on a CPU that runs it natively, fp32 otherwise."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise FlexDiTError(f"unknown --dtype {dtype}; choose {', '.join(DTYPE_CHOICES)}")
        return dtype
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_runs_bf16_natively() else "fp32"


def resolve_device(device: str | None) -> torch.device:
    """'auto' (or None): the GPU if there is one, else the CPU; 'cuda' without a GPU is a clear error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FlexDiTError(f"--device {device} was asked for but no CUDA GPU is visible; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise FlexDiTError(f"unknown --device {device!r}; use auto, cpu, cuda or cuda:N") from None


def init_from_env(device: str | None = None) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes (NCCL on GPU, gloo on CPU); a plain run is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda" and (dev.index is None or world > 1):
        dev = torch.device(f"cuda:{local}")  # one GPU per local rank (under torchrun whatever index was named)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local), dev


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
