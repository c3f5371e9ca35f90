"""One training step (forward, hybrid loss, backward, AdamW), dense vs FlexDiT, same batch and dtype.

    python benchmarks/train_step.py --models DiT-S/2,DiT-XL/2 --image-size 256 --batch 4 --dtype bf16

Random weights and random latents (speed does not depend on them); the FlexDiT runs at the grid of each
timestep interval in turn, as the trainer does, and its time is the mean over the intervals. One model (with
its optimiser state) is in memory at a time: XL/2 with AdamW needs about 11 GB on its own.
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from flexdit.diffusion.gaussian import GaussianDiffusion
from flexdit.distributed import DTYPES, resolve_device
from flexdit.models.dit import DiT, model_config
from flexdit.schedule import TimestepIntervals, parse_density


def time_steps(model: DiT, grids: list, batch: int, repeats: int, device, dtype: str) -> list[float]:
    """Median seconds of one training step at each grid (one warm-up step per grid first)."""
    diffusion = GaussianDiffusion()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, model.in_channels, *model.config.input_size, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    y = torch.randint(0, model.config.num_classes, (batch,), generator=g).to(device)
    noise = torch.randn(x.shape, generator=g).to(device)
    amp = DTYPES[dtype]

    def step(grid) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        xt = diffusion.q_sample(x, t, noise)
        with torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32):
            out = model(xt, t, y, grid=grid)
        loss = diffusion.training_losses(out, x, xt, t, noise)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    times = [[] for _ in grids]
    for round_ in range(repeats + 1):  # rounds alternate over the grids; the first warms up
        for k, grid in enumerate(grids):
            elapsed = step(grid)
            if round_:
                times[k].append(elapsed)
    return [statistics.median(ts) for ts in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="DiT-S/2,DiT-XL/2")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--density", default="0.61,0.86")
    parser.add_argument("--intervals", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dtype", default="bf16", choices=tuple(DTYPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="results/train_step.json")
    args = parser.parse_args()
    device = resolve_device(args.device)
    rows = []
    for name in args.models.split(","):
        config = model_config(name, args.image_size // 8,
                              density=parse_density(args.density))
        dense = DiT(config.dense()).to(device).train()
        (dense_s,) = time_steps(dense, [None], args.batch, args.repeats, device, args.dtype)
        del dense
        flex = DiT(config).to(device).train()
        intervals = TimestepIntervals(flex.density, args.intervals)
        grids = [intervals.grid(k, flex.token_grid) for k in range(args.intervals)]
        per_interval = time_steps(flex, grids, args.batch, args.repeats, device, args.dtype)
        del flex
        flex_s = statistics.mean(per_interval)
        row = {"model": name, "batch": args.batch, "dtype": args.dtype, "dense_s": dense_s, "flexdit_s": flex_s,
               "speedup": dense_s / flex_s,
               "flexdit_per_interval_s": {"x".join(map(str, g)): s for g, s in zip(grids, per_interval)}}
        rows.append(row)
        print(f"{name} {args.image_size}px batch {args.batch} {args.dtype}: dense {dense_s:.2f} s/step, "
              f"FlexDiT {flex_s:.2f} s/step -> {row['speedup']:.2f}x", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": str(device), "threads": torch.get_num_threads(), "rows": rows},
                                         indent=2))


if __name__ == "__main__":
    main()
