"""bench's arithmetic: speed-ups as medians of per-request ratios, FLOPs- and roofline-predicted speed-ups,
samples/s; the device's rates from timed work (run here on the CPU with small sizes)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from lmms_eval_redundancy.tools.bench import (
    DeviceRates,
    TimedRun,
    measure_rates,
    sample_bytes,
    speed_rows,
)

TEXT = SimpleNamespace(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2)
VISION = SimpleNamespace(hidden_size=4, intermediate_size=8, image_size=28, patch_size=14, model_type="clip_vision_model",
                         num_hidden_layers=1)
CONFIG = SimpleNamespace(text_config=TEXT, vision_config=VISION)


def run(method: str, device_prefill: list[float], llm_flops: float, llm_tokens: float, seconds: float) -> TimedRun:
    samples = [{"doc_id": doc, "units": [{"after": llm_tokens - 10}],
                "efficiency": {"device_prefill_seconds": s, "llm_prefill_flops": llm_flops, "vision_flops": 100.0,
                               "llm_tokens_layer_mean": llm_tokens, "vision_tiles": 1}}
               for doc, s in enumerate(device_prefill, 1)]
    return TimedRun(method, 1, samples, seconds)


def test_one_sample_moves_its_matmul_inputs_outputs_and_keys_and_values():
    # per token and layer: q/k/v 8+8+4+4, o 8+8, gate/up 2x(8+16), down 16+8, cache 2x4 = 120 values;
    # per patch and layer: q/k/v 4x4, o 2x4, fc1 4+8, fc2 8+4 = 48 values, and once the projector 4+8, 8+8 = 28,
    # over 2x2 patches and [CLS]
    assert sample_bytes(CONFIG, llm_tokens_layer_mean=10, vision_tiles=1, dtype_bytes=2) == 2 * (10 * 2 * 120 + 5 * (48 + 28))


def test_the_roofline_takes_the_slower_bound():
    rates = DeviceRates(matmul_flops=1e3, bandwidth=1e2)
    assert rates.roofline_seconds(2e3, 100) == 2 and rates.roofline_seconds(2e3, 500) == 5


def test_rows_hold_the_median_speed_up_its_predictions_and_samples_per_second():
    unpruned = run("none", [1.0, 1.0, 1.2, 0.8], llm_flops=900.0, llm_tokens=100, seconds=8.0)
    pruned = run("pooling", [0.25, 0.5, 0.3, 0.2], llm_flops=150.0, llm_tokens=20, seconds=4.0)
    rows = speed_rows([unpruned, pruned], CONFIG, weights=10_000, dtype_bytes=2, rates=DeviceRates(1e3, 4e4),
                      llava_hf_samples_per_second=0.25)
    row = rows[1]
    assert row["speed-up"].median == 4 and row["speed-up (IQR)"] == "4 (3.5-4)"  # ratios 4, 2, 4, 4
    assert row["FLOPs-predicted"] == 1000 / 250 and row["measured / FLOPs"] == 1
    # both memory-bound at these rates: weights once per batch, then each sample's activations and cache
    moved = [10_000 + sample_bytes(CONFIG, tokens, 1, 2) for tokens in (100, 20)]
    assert moved[0] / 4e4 > 1000 / 1e3 and row["roofline-predicted"] == pytest.approx(moved[0] / moved[1])
    assert row["measured / roofline"] == pytest.approx(4 / row["roofline-predicted"])
    assert (row["samples/s"], row["vs unpruned"], row["vs llava_hf"]) == (1.0, 2.0, 4.0)
    assert (row["visual tokens"], row["LLM tokens"], row["device prefill ms"]) == (10, 20, 275)
    assert rows[0]["speed-up (IQR)"] == "1 (reference)" and rows[0]["vs unpruned"] == 1
    assert "roofline-predicted" not in speed_rows([unpruned, pruned], CONFIG, 10_000, 2)[1]  # a CPU: no rates


def test_a_small_timed_matmul_and_copy_give_positive_finite_rates():
    rates = measure_rates(torch.device("cpu"), size=64, copy_bytes=2**16, dtype=torch.float32, repeats=2)
    assert all(math.isfinite(rate) and rate > 0 for rate in (rates.matmul_flops, rates.bandwidth))
