"""Measurement: FLOPs accounting, side-by-side speed and memory benchmarks, fidelity (FID Inception, evaluator)."""
