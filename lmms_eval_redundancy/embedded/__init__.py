"""The embedded default: the synthetic benchmarks, the built-in model's training, and the main job."""
