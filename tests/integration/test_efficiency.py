"""Per-sample efficiency records: measured KV-cache bytes, times and FLOPs."""

from __future__ import annotations

import pytest
from conftest import image, requests_for

from lmms_eval_redundancy.lmms.model import LlavaRedundancy
from lmms_eval_redundancy.runtime.efficiency import PHASES, sample_flops


def assert_phases_add_up(efficiency: dict) -> None:
    """Time to first token = host + device prefill; device prefill = vision + selection + LLM prefill."""
    assert efficiency["first_token_seconds"] == pytest.approx(efficiency["host_seconds"] + efficiency["device_prefill_seconds"])
    assert efficiency["device_prefill_seconds"] == pytest.approx(
        efficiency["vision_seconds"] + efficiency["selection_seconds"] + efficiency["llm_prefill_seconds"])


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
    assert all(efficiency[phase] > 0 for phase in PHASES) and efficiency["batch_index"] == 0  # the warm-up batch
    assert_phases_add_up(efficiency)
    assert efficiency["llm_prefill_flops"] == sample_flops(plain.model.config, [prompt_tokens] * text.num_hidden_layers, 1)["llm_prefill_flops"]
    fastv = LlavaRedundancy(pretrained=str(tiny_models["llava"]), device="cpu", dtype="float32", method="fastv", tokens=4)
    fastv.generate_until(requests_for(fastv, [doc]))
    fastv_efficiency = fastv.ledger.samples[-1]["efficiency"]
    assert fastv_efficiency["selection_seconds"] > 0  # its hooks inside the LLM prefill, not counted as LLM prefill
    assert_phases_add_up(fastv_efficiency)
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


def test_vision_needs_count_as_vision_and_batches_are_numbered_per_request_type(tiny_models):
    """A method reading the vision tower (FasterVLM: [CLS] attention) has that work inside ``vision_seconds``;
    ``selection_seconds`` is its choosing after the tower, so no time counts twice."""
    w = LlavaRedundancy(pretrained=str(tiny_models["llava"]), device="cpu", dtype="float32", method="fastervlm", tokens=4)
    docs = [{"question": "what is it ?", "visuals": [image(32, 32, seed)]} for seed in range(2)]
    w.generate_until(requests_for(w, docs))
    first, second = (sample["efficiency"] for sample in w.ledger.samples)
    assert (first["batch_index"], second["batch_index"]) == (0, 1)
    selection = w.engine.method.selection
    assert w.engine.selection_in_vision > 0  # the attention hook ran inside the tower's forward
    assert second["selection_seconds"] == pytest.approx(selection.seconds_since(w.engine.selection_in_vision))
    assert 0 < second["selection_seconds"] < selection.seconds
    assert_phases_add_up(second)
