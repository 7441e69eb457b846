"""Benchmarks of modbalance; run them from the repository root as ``python -m benchmarks.NAME``."""
