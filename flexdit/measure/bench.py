"""Side-by-side speed benchmark: the dense model and the FlexDiT of the same size, same process, same
dtype, same batch, random weights (speed does not depend on them). Warm-up first, median of repeats,
CUDA synchronised. A FlexDiT with a schedule is timed at each grid its sampler visits, and the grids are
weighted by how many steps use them, exactly as the FLOPs average is."""
import statistics
import time
from dataclasses import dataclass, field

import torch

from flexdit.cpu import tune_for_cpu_inference
from flexdit.distributed import DTYPES, describe_device, resolve_device, resolve_dtype
from flexdit.errors import FlexDiTError
from flexdit.measure.flops import FlopsReport, flops_report
from flexdit.measure.memory import peak_forward_memory
from flexdit.models.core import FlexDiTCore
from flexdit.models.families import build_model
from flexdit.sampling import sample


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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(model: FlexDiTCore, batch: int, device: torch.device, dtype: torch.dtype,
            seed: int = 0) -> tuple[tuple[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]:
    """((x, t), conditioning kwargs) for one forward of `batch` samples."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *model.sample_shape, generator=g).to(device, dtype)
    t = torch.full((batch,), 500, device=device)  # the grid is passed explicitly; t only conditions
    condition = {k: v.to(device, dtype if v.is_floating_point() else v.dtype)
                 for k, v in model.example_condition(batch, g).items()}
    return (x, t), condition


def _time_once(model: FlexDiTCore, inputs, grid, device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    model(*inputs[0], **inputs[1], grid=grid)
    _synchronize(device)
    return time.perf_counter() - start


def time_cases(cases: list[tuple[FlexDiTCore, object]], batch: int, repeats: int, warmup: int, device: torch.device,
               dtype: torch.dtype, progress=lambda msg: None) -> list[float]:
    """Median seconds of each (model, grid) case. Rounds alternate over the cases, so that drifts in machine
    speed (frequency scaling, neighbours on a shared host) hit every case alike rather than one model."""
    inputs = {id(model): _inputs(model, batch, device, dtype) for model, _ in cases}
    times: list[list[float]] = [[] for _ in cases]
    with torch.inference_mode():
        for round_ in range(warmup + repeats):
            progress(f"round {round_ + 1}/{warmup + repeats}" + (" (warm-up)" if round_ < warmup else ""))
            for k, (model, grid) in enumerate(cases):
                elapsed = _time_once(model, inputs[id(model)], grid, device)
                if round_ >= warmup:
                    times[k].append(elapsed)
    return [statistics.median(ts) for ts in times]


def time_sampling(models: dict[str, FlexDiTCore], labels: list[int], sampler: str, steps: int, cfg_scale: float = 1.0,
                  repeats: int = 3, warmup: int = 1, progress=lambda msg: None) -> dict[str, float]:
    """Median seconds to sample `labels` end to end with each model (same seed, sampler, steps and guidance);
    rounds alternate over the models, as time_cases does. A warm-up round uses 2 steps only."""
    if repeats < 1 or warmup < 0:
        raise FlexDiTError(f"repeats must be at least 1 and warm-up rounds at least 0, got {repeats} and {warmup}")
    times: dict[str, list[float]] = {name: [] for name in models}
    for round_ in range(warmup + repeats):
        progress(f"round {round_ + 1}/{warmup + repeats}" + (" (warm-up)" if round_ < warmup else ""))
        for name, model in models.items():
            device = next(model.parameters()).device
            _synchronize(device)
            start = time.perf_counter()
            sample(model, labels, sampler, steps if round_ >= warmup else 2, cfg_scale=cfg_scale)
            _synchronize(device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _peak_memory(model: FlexDiTCore, batch: int, grid, device: torch.device, dtype: torch.dtype,
                 training: bool) -> int:
    (x, t), condition = _inputs(model, batch, device, dtype)
    if training:
        model.requires_grad_(True)
    try:
        return peak_forward_memory(lambda: model(x, t, **condition, grid=grid), [x, t, *condition.values()], model,
                                   training)
    finally:
        model.requires_grad_(False)


def _grids(report: FlopsReport, model: FlexDiTCore) -> dict[str, tuple[int, int] | None]:
    if not model.layout.has_sparse_tokens:
        return {name: None for name in report.steps_per_grid}
    return {name: tuple(map(int, name.split("x"))) for name in report.steps_per_grid}


def bench(flex: FlexDiTCore, timesteps: list[int], device: str | None = "cpu", dtype: str = "auto", batch: int = 1,
          repeats: int = 5, warmup: int = 2, compile: bool = False, cpu_tuning: bool = True,
          progress=lambda msg: None) -> dict:
    """Dense vs FlexDiT of flex's size: GFLOPs, ms per forward, images/s, peak memory, speedup. dtype "auto" is
    bf16 where the device runs it natively, else fp32 (the result's "dtype" says which). cpu_tuning: on the CPU,
    eager, both models run as `flexdit sample` runs them (flexdit.cpu; the result's "cpu_tuning" says whether it
    applied)."""
    if batch < 1 or repeats < 1 or warmup < 0:
        raise FlexDiTError(f"--batch and --repeats must be at least 1 and --warmup at least 0, got {batch}, "
                           f"{repeats} and {warmup}")
    dev = resolve_device(device)
    dtype = resolve_dtype(dtype, dev)
    torch_dtype = DTYPES[dtype]
    models = {"dense": build_model(flex.config.dense()), "flexdit": flex}
    reports, cases, tuned = {}, [], False
    for name, model in models.items():
        model.to(dev, torch_dtype).eval().requires_grad_(False)
        if compile:
            model.compile_grids()
        elif cpu_tuning:
            tuned = tune_for_cpu_inference(model, dev)
        reports[name] = flops_report(model, timesteps)
        cases += [(name, gname, model, grid) for gname, grid in _grids(reports[name], model).items()]
    seconds = time_cases([(model, grid) for _, _, model, grid in cases], batch, repeats, warmup, dev, torch_dtype,
                         progress)
    results = {}
    for name, model in models.items():
        per_grid = {gname: s * 1e3 for (n, gname, _, _), s in zip(cases, seconds) if n == name}
        steps = reports[name].steps_per_grid
        ms = sum(per_grid[g] * k for g, k in steps.items()) / sum(steps.values())
        progress(f"memory of {name}")
        largest = max(_grids(reports[name], model).values(), key=lambda g: g[0] * g[1] if g else 0)
        memory = [_peak_memory(model, batch, largest, dev, torch_dtype, training) for training in (False, True)]
        results[name] = ModelTiming(name, reports[name].gflops, ms, batch / (ms / 1e3), *memory, per_grid)
    d, f = results["dense"], results["flexdit"]
    return {
        "device": describe_device(dev),
        "dtype": dtype, "batch": batch, "repeats": repeats, "compile": compile, "cpu_tuning": tuned,
        "dense": d.to_dict(), "flexdit": f.to_dict(),
        "speedup": d.ms / f.ms, "flops_ratio": d.gflops / f.gflops, "saving": 1 - f.gflops / d.gflops,
        "memory_ratio": d.peak_memory_bytes / max(1, f.peak_memory_bytes),
        "training_memory_ratio": d.training_memory_bytes / max(1, f.training_memory_bytes),
        "steps_per_grid": reports["flexdit"].steps_per_grid,
    }
