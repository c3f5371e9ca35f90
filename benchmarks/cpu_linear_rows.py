"""How fast this CPU multiplies by a linear layer's weight, by number of rows, with the weight in cache and from memory.

    python benchmarks/cpu_linear_rows.py --dtype fp32

A FlexDiT's sparse blocks multiply 36-100 token rows (batch 1, PixArt-XL/2 or DiT-XL/2 at 256 px) by the same
weights the dense blocks multiply 256 rows by, and a sampler's forward reads every weight of the model once (2.4 GB
in fp32 for PixArt-XL/2): each weight comes from memory, not from cache. With few rows the product does little
arithmetic per byte of weight, so if the kernel does not overlap loading the weight with computing, a FlexDiT gets
less than its FLOPs ratio of speed on the CPU. This prints GMAC/s per row count and weight shape for the packed
oneDNN product that `flexdit.cpu` uses (`flexdit sample` and `flexdit bench`), twice: the same weight again and
again ("cache") and a new weight each call, cycling through more weight bytes than the caches hold ("memory").
The "memory / cache" column is the share of its in-cache speed a product keeps when its weight streams from memory.
"""
import argparse
import json
import statistics
import time

import torch

from flexdit.distributed import DTYPES, describe_device

SHAPES = ((1152, 1152), (1152, 3456), (1152, 4608), (4608, 1152))  # (in, out) of PixArt-XL/2's and DiT-XL/2's layers


def packed_weights(in_features: int, out_features: int, count: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.ops.mkldnn._reorder_linear_weight(
        (torch.randn(out_features, in_features, generator=g) * 0.02).to(dtype), None) for _ in range(count)]


def gmacs(rows: int, packed: list[torch.Tensor], dtype: torch.dtype, cycle: bool, calls: int) -> float:
    """Median GMAC/s of `calls` products of (1, rows, in) by the packed weights, the first one or each in turn."""
    out_features, in_features = packed[0].shape  # a packed weight keeps its (out, in) shape
    x = torch.randn(1, rows, in_features).to(dtype)
    bias = torch.zeros(out_features, dtype=dtype)
    times = []
    warmup = len(packed) if cycle else 3  # one pass over the weights first
    with torch.inference_mode():
        for k in range(warmup + calls):
            w = packed[k % len(packed)] if cycle else packed[0]
            start = time.perf_counter()
            torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
            if k >= warmup:
                times.append(time.perf_counter() - start)
    return rows * in_features * out_features / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--rows", default="36,64,100,256")
    parser.add_argument("--memory-mb", type=int, default=2048, help="weight bytes cycled through for 'memory'")
    parser.add_argument("--calls", type=int, default=60, help="timed products per case (median)")
    parser.add_argument("--out", help="also write the table as JSON here")
    args = parser.parse_args()
    if not torch.backends.mkldnn.is_available():
        raise SystemExit("this PyTorch build has no oneDNN, which flexdit.cpu uses; nothing to measure")
    dtype = DTYPES[args.dtype]
    rows = [int(r) for r in args.rows.split(",")]
    print(f"{describe_device(torch.device('cpu'))}, {args.dtype}, GMAC/s (memory / cache)")
    print("in x out   " + "".join(f"| {r:>4} rows         " for r in rows))
    table = []
    for in_features, out_features in SHAPES:
        count = max(2, args.memory_mb * 2**20 // (in_features * out_features * dtype.itemsize))
        packed = packed_weights(in_features, out_features, count, dtype)
        cells = []
        for r in rows:
            memory = gmacs(r, packed, dtype, True, args.calls)
            cache = gmacs(r, packed, dtype, False, args.calls)
            cells.append(f"| {memory:5.0f} / {cache:5.0f} {memory / cache:4.0%} ")
            table.append({"in": in_features, "out": out_features, "rows": r, "memory_gmacs": memory,
                          "cache_gmacs": cache})
        print(f"{in_features:>4} x {out_features:<4} " + "".join(cells))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": describe_device(torch.device("cpu")), "dtype": args.dtype, "table": table}, f,
                      indent=1)


if __name__ == "__main__":
    main()
