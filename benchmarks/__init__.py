"""Benchmark scripts: `python -m benchmarks.blocks`, `python -m benchmarks.models` (results in docs/benchmarks.md)."""
