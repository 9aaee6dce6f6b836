"""A batch's phases from stamps on the device's clock: host, vision, selection, LLM prefill, decode; their
per-run summary after the warm-up; the quartiles behind every speed-up."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lmms_eval_redundancy.core import timing
from lmms_eval_redundancy.lmms.ledger import summarize_efficiency
from lmms_eval_redundancy.runtime import efficiency
from lmms_eval_redundancy.runtime.efficiency import PHASES, BatchMeter, Quartiles

CPU = torch.device("cpu")


@pytest.fixture
def clock(monkeypatch):
    """A fake clock: each stamp reads the next of the times the test sets in ``clock.times``."""
    fake = SimpleNamespace(times=[])

    def read(device: torch.device) -> float:
        return fake.times.pop(0)

    monkeypatch.setattr(timing, "stamp", read)
    monkeypatch.setattr(efficiency, "stamp", read)
    return fake


def engine() -> SimpleNamespace:
    return SimpleNamespace(vision=timing.Stopwatch(), method=SimpleNamespace(selection=timing.Stopwatch()),
                           selection_in_vision=0)


def test_phases_split_the_time_to_first_token_without_counting_anything_twice(clock):
    # start 0; vision 1-3 with a vision-need hook 1.5-2 inside; selection 3.5-4; first logits at 6; end at 10
    clock.times = [0.0, 1.0, 1.5, 2.0, 3.0, 3.5, 4.0, 6.0, 10.0]
    parts = engine()
    with BatchMeter(CPU, parts) as meter:
        with parts.vision.timing(CPU), parts.method.selection.timing(CPU):
            pass
        parts.selection_in_vision = parts.method.selection.mark()
        with parts.method.selection.timing(CPU):
            pass
        meter.clock(None, "scores")
        meter.clock(None, "scores")  # later decode steps leave the first stamp alone (no stamp left to read)
    assert meter.phases() == {"host_seconds": 1.0, "vision_seconds": 2.0, "selection_seconds": 0.5,
                              "llm_prefill_seconds": 2.5, "device_prefill_seconds": 5.0, "first_token_seconds": 6.0,
                              "decode_seconds": 4.0}
    assert parts.method.selection.seconds == 1.0  # the method's own total still counts its vision-need hook


def test_without_generation_prefill_ends_with_the_block(clock):
    clock.times = [0.0, 1.0, 2.0, 5.0]
    parts = engine()
    with BatchMeter(CPU, parts) as meter, parts.vision.timing(CPU):
        pass
    phases = meter.phases()
    assert (phases["llm_prefill_seconds"], phases["first_token_seconds"], phases["decode_seconds"]) == (3.0, 5.0, 0.0)


def test_a_stopwatch_on_the_host_clock_times_real_work():
    watch = timing.Stopwatch()
    with watch.timing(CPU):
        torch.ones(256, 256) @ torch.ones(256, 256)
    mark = watch.mark()
    with watch.timing(CPU):
        pass
    assert watch.seconds > watch.seconds_since(mark) >= 0 and mark == 1
    watch.reset()
    assert watch.seconds == 0 and watch.mark() == 0


def test_cpu_threads_are_set_for_the_block_and_set_back_even_after_an_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), timing.cpu_threads(before + 1):
        assert torch.get_num_threads() == before + 1
        raise RuntimeError
    assert torch.get_num_threads() == before
    with timing.cpu_threads(None):
        assert torch.get_num_threads() == before


def test_quartiles_flag_a_speed_up_whose_spread_includes_one():
    steady, noisy = Quartiles.of([1.5, 2.0, 2.5, 3.0, 3.5]), Quartiles.of([0.5, 0.8, 1.2, 1.6, 2.0])
    assert (steady.median, steady.low, steady.high) == (2.5, 2.0, 3.0) and not steady.unreliable
    assert str(steady) == "2.5 (2-3)" and str(noisy) == "1.2 (0.8-1.6) unreliable"


def test_the_run_summary_gives_each_phase_s_median_and_quartiles_after_the_warm_up():
    def sample(batch_index: int, seconds: float) -> dict:
        return {"request": "generate_until", "efficiency": {"batch_index": batch_index, "batch_size": 1,
                                                            **{phase: seconds for phase in PHASES}}}

    summary = summarize_efficiency([sample(0, 100.0)] + [sample(i, s) for i, s in enumerate([1.0, 2.0, 3.0, 4.0, 5.0], 1)])
    phases = summary["generate_until"]["phases_after_warm_up"]
    assert phases["samples"] == 5
    assert phases["device_prefill_seconds"] == {"median": 3.0, "iqr": [2.0, 4.0]}  # the warm-up's 100 s left out
    assert set(phases) == {"samples", *PHASES}
    assert summary["generate_until"]["device_prefill_seconds_per_sample"] == pytest.approx(115 / 6)  # the mean: all
    assert "batch_index_per_sample" not in summary["generate_until"]
