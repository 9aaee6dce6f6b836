"""Tools over runs: sweeps, comparison tables, kept-token pictures, speed benchmarks."""
