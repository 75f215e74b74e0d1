"""Scoring without torch: input manifests, incremental output, and the backends that run a model."""
