"""Benchmarks: kernels, engine speed and memory, trace replay. Each prints machine-readable JSON."""
