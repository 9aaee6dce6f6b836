"""Wall-clock timing that waits for the device."""

from __future__ import annotations

import contextlib
import time

import torch


def sync(device: torch.device) -> None:
    """Wait for queued work on ``device`` (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Accumulates the device-synchronised duration of the blocks it times."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def reset(self) -> None:
        self.seconds = 0.0

    @contextlib.contextmanager
    def timing(self, device: torch.device):
        started = time.perf_counter()
        try:
            yield
        finally:
            sync(device)
            self.seconds += time.perf_counter() - started
