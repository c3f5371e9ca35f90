"""Side-by-side speed benchmark: the dense model and the FlexDiT of the same size, same process, same
dtype, same batch, random weights (speed does not depend on them). Warm-up first, median of repeats,
CUDA synchronised. A FlexDiT with a schedule is timed at each grid its sampler visits, and the grids are
weighted by how many steps use them, exactly as the FLOPs average is."""
import statistics
import time
from dataclasses import dataclass, field

import torch

from flexdit.errors import FlexDiTError
from flexdit.measure.flops import FlopsReport, flops_report
from flexdit.measure.memory import peak_forward_memory
from flexdit.models.dit import DiT

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ModelTiming:
    name: str
    gflops: float
    ms: float  # per forward pass of the batch, step-weighted over grids
    images_per_s: float
    peak_memory_bytes: int  # inference, at the largest grid used
    training_memory_bytes: int  # forward with autograd (activations kept for backward), largest grid
    per_grid_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FlexDiTError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return torch.device(device)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(model: DiT, batch: int, grid, repeats: int, warmup: int, device: torch.device,
                 dtype: torch.dtype, seed: int = 0) -> float:
    """Median seconds of model.forward at one grid (None for dense)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, *model.config.input_size, generator=g).to(device, dtype)
    t = torch.full((batch,), 500, device=device)  # the grid is passed explicitly; t only conditions
    y = torch.zeros(batch, dtype=torch.long, device=device)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            _synchronize(device)
            start = time.perf_counter()
            model(x, t, y, grid=grid)
            _synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak_memory(model: DiT, batch: int, grid, device: torch.device, dtype: torch.dtype, training: bool) -> int:
    x = torch.randn(batch, model.in_channels, *model.config.input_size, device=device, dtype=dtype)
    t = torch.full((batch,), 500, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    if training:
        model.requires_grad_(True)
    try:
        return peak_forward_memory(lambda: model(x, t, y, grid=grid), [x, t, y], model, training)
    finally:
        model.requires_grad_(False)


def _timing(name: str, model: DiT, report: FlopsReport, batch: int, repeats: int, warmup: int,
            device: torch.device, dtype: torch.dtype, progress) -> ModelTiming:
    grids = {name_: tuple(map(int, name_.split("x"))) for name_ in report.steps_per_grid}
    per_grid = {}
    for gname, grid in grids.items():
        progress(f"timing {name} at {gname}")
        arg = grid if model.layout.has_sparse_tokens else None
        per_grid[gname] = time_forward(model, batch, arg, repeats, warmup, device, dtype) * 1e3
    total = sum(report.steps_per_grid.values())
    ms = sum(per_grid[g] * k for g, k in report.steps_per_grid.items()) / total
    progress(f"memory of {name}")
    largest = max(grids.values(), key=lambda g: g[0] * g[1]) if model.layout.has_sparse_tokens else None
    memory = [_peak_memory(model, batch, largest, device, dtype, training) for training in (False, True)]
    return ModelTiming(name, report.gflops, ms, batch / (ms / 1e3), *memory, per_grid)


def bench(flex: DiT, timesteps: list[int], device: str | None = "cpu", dtype: str = "fp32", batch: int = 1,
          repeats: int = 5, warmup: int = 2, compile: bool = False, progress=lambda msg: None) -> dict:
    """Dense vs FlexDiT of flex's size: GFLOPs, ms per forward, images/s, peak memory, speedup."""
    if dtype not in DTYPES:
        raise FlexDiTError(f"unknown dtype {dtype!r}; choose {', '.join(DTYPES)}")
    if batch < 1 or repeats < 1 or warmup < 0:
        raise FlexDiTError("batch and repeats must be at least 1 and warmup at least 0")
    dev = resolve_device(device)
    dense = DiT(flex.config.dense())
    results = {}
    for name, model in (("dense", dense), ("flexdit", flex)):
        model = model.to(dev, DTYPES[dtype]).eval().requires_grad_(False)
        if compile:
            model.compile_grids()
        report = flops_report(model, timesteps)
        results[name] = _timing(name, model, report, batch, repeats, warmup, dev, DTYPES[dtype], progress)
        model.to("cpu")
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    d, f = results["dense"], results["flexdit"]
    return {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": dtype, "batch": batch, "repeats": repeats, "compile": compile,
        "dense": d.to_dict(), "flexdit": f.to_dict(),
        "speedup": d.ms / f.ms, "flops_ratio": d.gflops / f.gflops,
        "memory_ratio": d.peak_memory_bytes / max(1, f.peak_memory_bytes),
        "training_memory_ratio": d.training_memory_bytes / max(1, f.training_memory_bytes),
        "steps_per_grid": flops_report(flex, timesteps).steps_per_grid,
    }

