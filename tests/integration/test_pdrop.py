"""PyramidDrop on the tiny models: cached greedy decoding against a no-cache reference of the pruned forward,
the official counts and renumbered positions, the layer-mean budget, settings and refusals."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import (
    FAMILIES,
    STAGE_DOCS,
    cached_greedy,
    prefill_stages,
    pruned_reference_generate,
    requests_for,
    tiny_wrapper,
)

from lmms_eval_redundancy.core.registry import MethodError
from lmms_eval_redundancy.methods import pdrop
from lmms_eval_redundancy.methods.base import fitted_layers

wrapper = functools.partial(tiny_wrapper, method="pdrop")


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generation_equals_the_no_cache_reference_with_renumbered_positions(tiny_models, family):
    w = wrapper(tiny_models[family], retention=0.5)
    assert w.engine.method.layers == [1, 2, 3]  # 8, 16, 24 scaled to the tiny LLM's 4 layers
    doc = STAGE_DOCS[1] if family == "llava" else STAGE_DOCS[2]
    _, batch, records = w._build([requests_for(w, [doc])[0].args])
    stages = prefill_stages(w, batch, records)
    n = int(batch.prunable_mask.sum())
    kept = [int((s.valid & batch.prunable_mask.gather(1, s.index)).sum()) for s in stages]
    assert kept == pdrop.stage_counts(n, pdrop.ratios_for(0.5, 3))
    assert [sum(layer) for layer in zip(*(unit.layers for unit in records[0]))] == kept
    reference = pruned_reference_generate(tiny_models[family], batch, stages, [1, 2, 3], True, 6, w.engine.family.placeholder_ids)
    assert cached_greedy(w, batch, records) == reference


def test_stage_cut_ranks_by_the_layers_own_last_token_attention(tiny_models):
    """The first cut keeps the top tokens of the pure rule ``pdrop.stage`` applied to layer 1's input and weights."""
    w = wrapper(tiny_models["llava"], retention=0.5)
    _, batch, records = w._build([requests_for(w, STAGE_DOCS[:1])[0].args])
    inputs = {}
    layer = w.engine.family.decoder_layers[1]
    def capture(module, args, kwargs):
        inputs.setdefault("h", (args[0] if args else kwargs["hidden_states"]).clone())

    handle = layer.register_forward_pre_hook(capture, with_kwargs=True, prepend=True)  # before the cut
    try:
        stages = prefill_stages(w, batch, records)
    finally:
        handle.remove()
    attn, config = layer.self_attn, w.engine.family.config.text_config
    valid = batch.attention_mask.bool()
    positions = torch.arange(valid.shape[1])[None]
    n = int(batch.prunable_mask.sum())
    _, keep = pdrop.stage(inputs["h"], valid, positions, layer.input_layernorm.weight, attn.q_proj.weight, attn.k_proj.weight,
                          config.num_attention_heads, config.num_key_value_heads, config.rms_norm_eps,
                          config.rope_parameters["rope_theta"] if hasattr(config, "rope_parameters") else config.rope_theta,
                          batch.prunable_mask, [n // 2], attn.q_proj.bias, attn.k_proj.bias)
    expected = torch.nonzero(keep[0]).flatten()
    assert stages[1].index[0][stages[1].valid[0]].tolist() == expected.tolist()


def test_tokens_budget_is_the_layer_mean_and_records_every_layer(tiny_models):
    w = wrapper(tiny_models["llava_next"], tokens=6, batch_size=2)
    w.generate_until(requests_for(w, STAGE_DOCS))
    assert w.engine.settings()["lambda_at_576"] == pdrop.solve_lambda(576, 6, [1, 2, 3], 4)
    for sample in w.ledger.samples:
        n = sum(u["before"] for u in sample["units"])
        lam = pdrop.solve_lambda(n, 6, [1, 2, 3], 4)
        layers = [sum(col) for col in zip(*(u["layers"] for u in sample["units"]))]
        assert layers == [pdrop.stage_counts(n, pdrop.ratios_for(lam, 3))[j] for j in range(4)]


def test_settings_faithful_and_attention_implementation_unchanged(tiny_models):
    w = wrapper(tiny_models["llava_onevision"], retention=0.5, faithful=True)
    w.generate_until(requests_for(w, STAGE_DOCS[:1]))
    settings = w.engine.settings()
    assert settings["precision"] == "model" and settings["stage_layers"] == [1, 2, 3] and settings["lambda"] == 0.5
    assert w.engine.family.text_attention_implementation == "sdpa"


def test_layers_parameter_and_refusals(tiny_models):
    assert wrapper(tiny_models["llava"], retention=0.5, layers="2").engine.method.layers == [2]
    with pytest.raises(MethodError, match="strictly increasing"):
        wrapper(tiny_models["llava"], retention=0.5, layers="2,1")
    with pytest.raises(MethodError, match="within the LLM's 4 layers"):
        wrapper(tiny_models["llava"], retention=0.5, layers="2,4")


def test_default_layers_fit_or_scale_to_the_depth():
    assert fitted_layers("pdrop", pdrop.OFFICIAL_LAYERS, 32, 1, 31) == [8, 16, 24]
    assert fitted_layers("pdrop", pdrop.OFFICIAL_LAYERS, 28, 1, 27) == [8, 16, 24]  # Qwen2-7B: the official layers fit
    assert fitted_layers("pdrop", pdrop.OFFICIAL_LAYERS, 16, 1, 15) == [4, 8, 12]
    assert fitted_layers("pdrop", pdrop.BUDGET_LAYERS, 4, 1, 3) == [1, 2, 3]
    with pytest.raises(MethodError, match="do not fit"):
        fitted_layers("pdrop", pdrop.OFFICIAL_LAYERS, 3, 1, 2)
