"""End-to-end sampling wall-clock, dense vs FlexDiT, against the per-forward speedup of `flexdit bench`.

    python benchmarks/sampling_speed.py --model DiT-S/2 --image-size 256 --samplers ddpm:250,ddim:50

Both models sample the same labels with the same seed and batch (random weights: speed does not depend
on them), alternating dense and FlexDiT runs (median of --repeats). The FlexDiT changes grid as the
timestep moves; if switching grids cost anything, the end-to-end speedup would fall below the per-forward
one of `flexdit bench` weighted over the same timesteps.
"""
import argparse
import json
from pathlib import Path

from flexdit.distributed import DTYPES, resolve_device
from flexdit.measure.bench import bench, time_sampling
from flexdit.models.dit import DiT, model_config
from flexdit.sampling import plan
from flexdit.schedule import parse_density


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--repeats", type=int, default=3, help="sampling runs per model (median)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--density", default="0.61,0.86")
    parser.add_argument("--samplers", default="ddpm:250,ddim:50")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    parser.add_argument("--out", default="results/sampling_speed.json")
    args = parser.parse_args()
    device = resolve_device(args.device)
    flex = DiT(model_config(args.model, args.image_size // 8, density=parse_density(args.density))).eval()
    dense = DiT(flex.config.dense()).eval()
    for m in (flex, dense):
        m.to(device, DTYPES[args.dtype]).requires_grad_(False)
    labels = list(range(args.batch))
    rows = []
    for item in args.samplers.split(","):
        sampler, steps = item.split(":")
        steps = int(steps)
        seconds = time_sampling({"dense": dense, "flexdit": flex}, labels, sampler, steps, repeats=args.repeats)
        dense_s, flex_s = seconds["dense"], seconds["flexdit"]
        per_forward = bench(flex, plan(sampler, steps).timesteps, args.device, args.dtype, args.batch, repeats=9)
        end_to_end = dense_s / flex_s
        row = {"sampler": sampler, "steps": steps, "dense_s": dense_s, "flexdit_s": flex_s,
               "end_to_end_speedup": end_to_end, "per_forward_speedup": per_forward["speedup"],
               "relative_gap": end_to_end / per_forward["speedup"] - 1, "flops_ratio": per_forward["flops_ratio"]}
        rows.append(row)
        print(f"{sampler}-{steps}: dense {dense_s:.1f} s, FlexDiT {flex_s:.1f} s -> end-to-end {end_to_end:.2f}x; "
              f"per-forward (bench) {per_forward['speedup']:.2f}x; gap {100 * row['relative_gap']:+.1f}%", flush=True)
    result = {"model": args.model, "image_size": args.image_size, "density": args.density, "batch": args.batch,
              "device": per_forward["device"], "dtype": args.dtype, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
