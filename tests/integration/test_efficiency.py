"""Per-sample efficiency records: measured KV-cache bytes, times and FLOPs."""

from __future__ import annotations

from conftest import image, requests_for

from lmms_eval_redundancy.lmms.model import LlavaRedundancy
from lmms_eval_redundancy.runtime.efficiency import sample_flops


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
    assert efficiency["llm_prefill_flops"] == sample_flops(plain.model.config, [prompt_tokens] * text.num_hidden_layers, 1)["llm_prefill_flops"]
    fastv = LlavaRedundancy(pretrained=str(tiny_models["llava"]), device="cpu", dtype="float32", method="fastv", tokens=4)
    fastv.generate_until(requests_for(fastv, [doc]))
    fastv_efficiency = fastv.ledger.samples[-1]["efficiency"]
    layers_after_k = text.num_hidden_layers - 2
    assert efficiency["kv_cache_bytes"] - fastv_efficiency["kv_cache_bytes"] == 2 * layers_after_k * kv_dim * 12 * 4
    assert fastv_efficiency["llm_prefill_flops"] < efficiency["llm_prefill_flops"]


def test_summary_flops_ratio_counts_against_the_same_samples_unpruned(tiny_models):
    from lmms_eval_redundancy.lmms.ledger import summarize

    doc = {"question": "what is it ?", "visuals": [image(32, 32, 0)]}
    efficiency = {}
    for method, budget in (("none", {}), ("random", {"tokens": 4}), ("pdrop", {"retention": 0.5})):
        w = LlavaRedundancy(pretrained=str(tiny_models["llava"]), device="cpu", dtype="float32", method=method, **budget)
        w.generate_until(requests_for(w, [doc]))
        efficiency[method] = w.ledger.samples[-1]["efficiency"]
        summary = summarize(w.ledger.samples)
        assert summary["llm_prefill_flops_ratio"] == efficiency[method]["llm_prefill_flops"] / efficiency["none"]["llm_prefill_flops"]
    assert {e["llm_prefill_flops_unpruned"] for e in efficiency.values()} == {efficiency["none"]["llm_prefill_flops"]}
    pdrop_units = summarize(w.ledger.samples)
    assert pdrop_units["visual_tokens_after"] == 2 and pdrop_units["visual_tokens_layer_mean"] == (16 + 8 + 4 + 2) / 4
