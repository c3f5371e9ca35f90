"""The paper's speed settings in one go, for whoever has a GPU:
DiT-XL/2 vs FlexDiT-XL at 256 px (r in [0.61, 0.86]) and 512 px (r in [0.61, 0.86] and [0.90, 0.96]), and
PixArt-XL/2 vs its FlexDiT at 512 px and 1024 px (the 1024-MS form; r in [0.61, 0.86]), with a 120-token caption,
bf16, batch 1 and 16, eager and torch.compile, DDPM-250 step weighting.

    python benchmarks/gpu_paper_settings.py --out results/gpu    # writes bench.json and bench.md

The paper reports 2.75x throughput at 512 px (r in [0.90, 0.96]) for DiT and +69% for PixArt-alpha on a GPU; this
table says whether we reach them on yours. Each row times the dense model and the FlexDiT in the same process.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from flexdit.measure.bench import bench
from flexdit.models.families import build_model, named_config
from flexdit.sampling import plan
from flexdit.schedule import DensitySchedule

SETTINGS = [("FlexDiT-XL/2", 256, (0.61, 0.86)), ("FlexDiT-XL/2", 512, (0.61, 0.86)),
            ("FlexDiT-XL/2", 512, (0.90, 0.96)), ("FlexDiT-PixArt-XL/2", 512, (0.61, 0.86)),
            ("FlexDiT-PixArt-XL/2", 1024, (0.61, 0.86))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/gpu")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu_paper_settings.py: no CUDA GPU visible; run it on a GPU machine (or --device cpu)")
    torch.backends.cuda.matmul.allow_tf32 = True
    timesteps = plan("ddpm", 250).timesteps
    rows = []
    for name, image_size, (r_min, r_max) in SETTINGS:
        for batch in (int(b) for b in args.batches.split(",")):
            for compiled in (False,) if args.no_compile else (False, True):
                flex = build_model(named_config(name, image_size, density=DensitySchedule(r_min, r_max)))
                result = bench(flex, timesteps, args.device, args.dtype, batch, args.repeats, 3, compiled)
                result.update(model=name, image_size=image_size, density=[r_min, r_max])
                rows.append(result)
                print(f"{name} {image_size}px r[{r_min},{r_max}] batch {batch} {'compile' if compiled else 'eager'}: "
                      f"speedup {result['speedup']:.2f}x (FLOPs ratio {result['flops_ratio']:.2f}x), "
                      f"dense {result['dense']['images_per_s']:.2f} img/s, "
                      f"FlexDiT {result['flexdit']['images_per_s']:.2f} img/s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(rows, indent=2))
    lines = [f"Device: {rows[0]['device']}, {args.dtype}, DDPM-250 step weighting, median of {args.repeats}.", "",
             "| model | px | r | batch | compile | dense img/s | FlexDiT img/s | speedup | FLOPs ratio | "
             "peak MiB dense / FlexDiT |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['image_size']} | {r['density'][0]}-{r['density'][1]} | {r['batch']} | "
                     f"{'yes' if r['compile'] else 'no'} | {r['dense']['images_per_s']:.2f} | "
                     f"{r['flexdit']['images_per_s']:.2f} | {r['speedup']:.2f}x | {r['flops_ratio']:.2f}x | "
                     f"{r['dense']['peak_memory_bytes'] / 2**20:.0f} / "
                     f"{r['flexdit']['peak_memory_bytes'] / 2**20:.0f} |")
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
