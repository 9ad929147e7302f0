"""Benchmark scripts (``python -m benchmarks.<name>``) and their recorded results; not tests."""
