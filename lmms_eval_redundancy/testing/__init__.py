"""Checkpoints and configs built locally for tests and benchmarks (no download)."""
