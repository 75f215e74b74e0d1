"""Benchmarks of every backend against the PyTorch reference, measured in one run: ``python -m benchmarks``."""
