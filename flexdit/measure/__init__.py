"""Measurement: FLOPs accounting, side-by-side speed and memory benchmarks."""
