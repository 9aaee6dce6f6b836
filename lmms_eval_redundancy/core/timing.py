"""Time stamps that do not wait for the device, and a stopwatch built on them.

On a GPU a stamp is a CUDA event recorded on the current stream: the work queued before it is what it
dates, and reading an interval waits only for its end event (after the batch's one synchronise, not at all).
On a CPU a stamp is ``time.perf_counter``: the work there is synchronous, so wall-clock time is its duration.
Not ``time.process_time``: it sums the CPU time of every thread of the process, so a matmul spread over
eight threads would count about eight times over, and the sum changes with the thread count, not the work.
"""

from __future__ import annotations

import contextlib
import time

import torch

Stamp = float | torch.cuda.Event


def sync(device: torch.device) -> None:
    """Wait for queued work on ``device`` (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stamp(device: torch.device) -> Stamp:
    """Now, on ``device``'s clock: a recorded CUDA event on a GPU, ``time.perf_counter()`` elsewhere."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(device))
        return event
    return time.perf_counter()


@contextlib.contextmanager
def cpu_threads(count: int | None):
    """torch's CPU threads set to ``count`` for the block (unchanged when ``None``), then set back: a command
    run in-process (a test, a notebook) leaves its caller's thread count as it found it."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def elapsed(start: Stamp, end: Stamp) -> float:
    """Seconds from ``start`` to ``end`` (CUDA events: waits until ``end`` has been reached)."""
    if isinstance(start, float):
        return end - start
    end.synchronize()
    return start.elapsed_time(end) / 1000


class Stopwatch:
    """Accumulates the duration of the blocks it times, as pairs of stamps read only when asked.

    Nothing synchronises per block: on a GPU each block adds a pair of CUDA events, read after the batch's
    synchronise. ``mark()`` counts the blocks so far, so that a caller can tell apart the time before it
    (``seconds_since``).
    """

    def __init__(self) -> None:
        self.spans: list[tuple[Stamp, Stamp]] = []

    def reset(self) -> None:
        self.spans = []

    @contextlib.contextmanager
    def timing(self, device: torch.device):
        started = stamp(device)
        try:
            yield
        finally:
            self.spans.append((started, stamp(device)))

    def mark(self) -> int:
        """How many blocks have been timed so far."""
        return len(self.spans)

    def seconds_since(self, mark: int = 0) -> float:
        """Total duration of the blocks timed after ``mark`` (``mark()``'s value then)."""
        return sum(elapsed(start, end) for start, end in self.spans[mark:])

    @property
    def seconds(self) -> float:
        """Total duration of every block timed since the last ``reset``."""
        return self.seconds_since(0)
