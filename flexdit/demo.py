"""`flexdit demo`: the dense DiT and the fine-tuned FlexDiT of the Fashion-MNIST experiment
(experiments/fashion_mnist.py), shipped with the package, sample the same classes from the same noise;
the demo writes them side by side to one PNG and prints GFLOPs, images/s and the speedup."""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flexdit.checkpoints import load
from flexdit.cpu import tune_for_cpu_inference
from flexdit.distributed import DTYPES, resolve_device, resolve_dtype
from flexdit.errors import FlexDiTError
from flexdit.io import atomic_write, check_png_output
from flexdit.measure.bench import time_sampling
from flexdit.measure.flops import flops_report
from flexdit.sampling import decode, image_grid, plan, sample

WEIGHTS = Path(__file__).parent / "weights"
DENSE_WEIGHTS = WEIGHTS / "fashion_mnist_dense.safetensors"
FLEXDIT_WEIGHTS = WEIGHTS / "fashion_mnist_flexdit.safetensors"
GAP = 8  # white pixels between the two grids


@dataclass
class DemoResult:
    png: Path
    gflops: dict[str, float]
    images_per_s: dict[str, float]

    @property
    def speedup(self) -> float:
        return self.images_per_s["flexdit"] / self.images_per_s["dense"]


def side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Two (H, W, C) uint8 images of equal height, left | gap | right."""
    gap = np.full((left.shape[0], GAP, left.shape[2]), 255, dtype=np.uint8)
    return np.concatenate([left, gap, right], axis=1)


def run_demo(out: str, dense_path: str | None = None, flexdit_path: str | None = None, per_class: int = 2,
             sampler: str = "ddim", steps: int = 25, cfg: float = 1.0, seed: int = 0, repeats: int = 1,
             device: str = "cpu", dtype: str = "auto", cpu_tuning: bool = True, log=print) -> DemoResult:
    """dtype "auto": bf16 where the device runs it natively, fp32 elsewhere (bf16 is emulated on AVX2-only CPUs).
    cpu_tuning: both models run as `flexdit sample` runs them on the CPU (flexdit.cpu)."""
    if per_class < 1 or repeats < 1:
        raise FlexDiTError(f"--per-class and --repeats must be at least 1, got {per_class} and {repeats}")
    check_png_output(out, "--out")
    dense_path, flexdit_path = Path(dense_path or DENSE_WEIGHTS), Path(flexdit_path or FLEXDIT_WEIGHTS)
    for p in (dense_path, flexdit_path):
        if not p.exists():
            raise FlexDiTError(f"demo weights not found: {p}; reinstall flexdit, or pass --dense/--flexdit "
                               "(for example the ema.safetensors of `python -m experiments.fashion_mnist`)")
    models = {"dense": load(dense_path), "flexdit": load(flexdit_path)}
    if models["dense"].layout.has_sparse_tokens or not models["flexdit"].layout.has_sparse_tokens:
        raise FlexDiTError("--dense must be a dense DiT and --flexdit a FlexDiT")
    if models["dense"].config.input_size != models["flexdit"].config.input_size:
        raise FlexDiTError("the dense model and the FlexDiT take different input sizes; pass a matching pair")
    dev = resolve_device(device)
    requested, dtype = dtype, resolve_dtype(dtype, dev)
    for model in models.values():
        model.to(dev, DTYPES[dtype]).requires_grad_(False)
        if cpu_tuning:
            tune_for_cpu_inference(model, dev)
    num_classes = min(m.config.num_classes for m in models.values())
    labels = [c for c in range(num_classes) for _ in range(per_class)]  # one row per class in the grid
    timesteps = plan(sampler, steps).timesteps
    gflops = {name: flops_report(m, timesteps).gflops for name, m in models.items()}
    density = ", ".join(f"{k} {v}" for k, v in models["flexdit"].config.density.items())
    log(f"dense   {dense_path.name}: {models['dense'].num_parameters() / 1e6:.2f} M parameters, "
        f"{models['dense'].layout}")
    log(f"FlexDiT {flexdit_path.name}: {models['flexdit'].num_parameters() / 1e6:.2f} M parameters, "
        f"{models['flexdit'].layout}, density {density}")

    log(f"sampling {len(labels)} images ({per_class} per class, {sampler} {steps} steps, cfg {cfg}, seed {seed}) "
        "with each model...")
    grids = [image_grid(decode(sample(m, labels, sampler, steps, cfg_scale=cfg, seed=seed)), columns=per_class)
             for m in models.values()]
    png = Path(out)
    picture = side_by_side(*grids)
    image = Image.fromarray(picture[..., 0] if picture.shape[2] == 1 else picture)
    atomic_write(png, lambda tmp: image.save(tmp, format="PNG"))
    log(f"wrote {png}: dense DiT (left) | FlexDiT (right), same classes and noise ({dtype} on {dev}"
        f"{', --dtype auto' if requested == 'auto' else ''})")

    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    log(f"timing: {len(labels)} images per run, median of {repeats}, models alternating ({where}, {dtype})")
    seconds = time_sampling(models, labels, sampler, steps, cfg, repeats=repeats, warmup=0)  # the grids warmed up
    result = DemoResult(png, gflops, {name: len(labels) / s for name, s in seconds.items()})
    log(f"{'':8} {'GFLOPs':>8} {'images/s':>9}")
    for name in models:
        log(f"{name:8} {gflops[name]:8.3f} {result.images_per_s[name]:9.1f}")
    log(f"FlexDiT: {1 - gflops['flexdit'] / gflops['dense']:.0%} fewer FLOPs, {result.speedup:.2f}x images/s")
    return result
