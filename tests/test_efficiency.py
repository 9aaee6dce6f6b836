"""Efficiency accounting: analytic FLOPs against a hand count, measured KV-cache bytes, per-sample records."""

from __future__ import annotations

import pytest
from conftest import image, requests_for
from transformers import LlamaConfig

from lmms_eval_redundancy.efficiency import sample_flops
from lmms_eval_redundancy.flops import llm_prefill_flops
from lmms_eval_redundancy.model import LlavaRedundancy
from lmms_eval_redundancy.tiny import real_geometry_config


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
    full = sample_flops(config, 576 + 40, 0, None, tiles=1)
    pruned = sample_flops(config, 64 + 40, 0, None, tiles=1)
    fastv = sample_flops(config, 576 + 40, 512, 2, tiles=1)
    assert full["llm_prefill_flops"] == pytest.approx(32 * hand_count(616, 4096, 4096, 11008))
    assert pruned["llm_prefill_flops"] / full["llm_prefill_flops"] == pytest.approx(
        hand_count(104, 4096, 4096, 11008) / hand_count(616, 4096, 4096, 11008))
    assert pruned["llm_prefill_flops"] < fastv["llm_prefill_flops"] < full["llm_prefill_flops"]
    assert full["vision_flops"] == pruned["vision_flops"] > 0


def test_records_carry_measured_kv_bytes_times_and_flops(tiny_models):
    plain = LlavaRedundancy(pretrained=str(tiny_models["llava"]), device="cpu", dtype="float32")
    doc = {"question": "what is it ?", "visuals": [image(32, 32, 0)]}
    plain.generate_until(requests_for(plain, [doc]))
    efficiency = plain.ledger.samples[-1]["efficiency"]
    prompt_tokens = len(plain.tokenizer(plain._prompt(doc["question"], 1, 0)).input_ids) - 1 + 16  # <image> -> 16 tokens
    text = plain.model.config.text_config
    kv_dim = text.hidden_size // text.num_attention_heads * text.num_key_value_heads
    # the cache holds the prompt and every generated token but the last (max_new_tokens=6)
    assert efficiency["kv_cache_bytes"] == 2 * text.num_hidden_layers * kv_dim * (prompt_tokens + 5) * 4
    assert efficiency["prefill_seconds"] > 0 and efficiency["decode_seconds"] > 0 and efficiency["pruning_seconds"] >= 0
    assert efficiency["llm_prefill_flops"] == sample_flops(plain.model.config, prompt_tokens, 0, None, 1)["llm_prefill_flops"]
    fastv = LlavaRedundancy(pretrained=str(tiny_models["llava"]), device="cpu", dtype="float32", method="fastv", tokens=4)
    fastv.generate_until(requests_for(fastv, [doc]))
    fastv_efficiency = fastv.ledger.samples[-1]["efficiency"]
    layers_after_k = text.num_hidden_layers - 2
    assert efficiency["kv_cache_bytes"] - fastv_efficiency["kv_cache_bytes"] == 2 * layers_after_k * kv_dim * 12 * 4
    assert fastv_efficiency["llm_prefill_flops"] < efficiency["llm_prefill_flops"]
