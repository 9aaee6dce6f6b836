"""Analytic FLOPs against a hand count."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from lmms_eval_redundancy.families.tiny import real_geometry_config
from lmms_eval_redundancy.runtime.efficiency import sample_flops
from lmms_eval_redundancy.runtime.flops import llm_prefill_flops, vision_flops


def hand_count(tokens: int, hidden: int, kv: int, inter: int) -> float:
    """Multiply-adds of one causal decoder layer, written out matrix by matrix (2 FLOPs each)."""
    q, k, v, o = tokens * hidden * hidden, tokens * hidden * kv, tokens * hidden * kv, tokens * hidden * hidden
    gate, up, down = tokens * hidden * inter, tokens * hidden * inter, tokens * inter * hidden
    scores = sum(i + 1 for i in range(tokens)) * hidden  # query i against its i + 1 keys, all heads together
    weighted = scores
    return 2 * (q + k + v + o + gate + up + down + scores + weighted)


def test_llm_flops_equal_a_hand_count_with_grouped_kv_heads():
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=3)
    assert llm_prefill_flops(config, [10, 10, 4]) == pytest.approx(2 * hand_count(10, 64, 16, 96) + hand_count(4, 64, 16, 96))


def test_llava15_prefill_flops_at_576_and_64_visual_tokens():
    config = real_geometry_config("llava-1.5-7b", text_layers=32, intermediate_size=11008)
    full = sample_flops(config, [576 + 40] * 32, tiles=1)
    pruned = sample_flops(config, [64 + 40] * 32, tiles=1)
    fastv = sample_flops(config, [576 + 40] * 2 + [64 + 40] * 30, tiles=1)
    assert full["llm_prefill_flops"] == pytest.approx(32 * hand_count(616, 4096, 4096, 11008))
    assert pruned["llm_prefill_flops"] / full["llm_prefill_flops"] == pytest.approx(
        hand_count(104, 4096, 4096, 11008) / hand_count(616, 4096, 4096, 11008))
    assert pruned["llm_prefill_flops"] < fastv["llm_prefill_flops"] < full["llm_prefill_flops"]
    assert full["vision_flops"] == pruned["vision_flops"] > 0
    # the projector (1024 -> 4096 -> 4096) over the 576 patch features, beside the tower
    tower = vision_flops(config.vision_config, 1, config.vision_config.num_hidden_layers)
    assert full["vision_flops"] - tower == pytest.approx(2 * 576 * (1024 * 4096 + 4096 * 4096))
