"""FEATHER (LLaVA port) on the tiny models: cached greedy decoding against a layer-by-layer no-cache reference with
original positions, the stride grid of each view, the two stage counts, the layer-mean budget and settings."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import (
    FAMILIES,
    STAGE_DOCS,
    cached_greedy,
    image,
    layerwise_reference_generate,
    prefill_state,
    prefill_state_and_attention_input,
    requests_for,
    tiny_wrapper,
)

from lmms_eval_redundancy.core.registry import MethodError
from lmms_eval_redundancy.methods import feather

wrapper = functools.partial(tiny_wrapper, method="feather")


def gathering_cut(stage):
    """The reference's cut: the kept rows at their original positions."""
    return lambda rows, positions: (rows[:, stage.local[0]], stage.index[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generation_equals_the_layerwise_no_cache_reference(tiny_models, family):
    w = wrapper(tiny_models[family], retention=0.5)
    assert w.engine.method.stage_layers == [1, 2]  # 8, 16 scaled to the tiny LLM's 4 layers
    doc = STAGE_DOCS[1] if family == "llava" else STAGE_DOCS[2]
    _, batch, records = w._build([requests_for(w, [doc])[0].args])
    state = prefill_state(w, batch, records)
    stages = state["stages"]
    present = [int((s.valid & batch.prunable_mask.gather(1, s.index)).sum()) for s in stages]
    grid = state["grid"][0]
    first = torch.zeros_like(grid).scatter_(0, stages[1].index[0], stages[1].valid[0])
    assert bool((first | ~grid).all())  # the stride grid survives stage 1
    assert present[1] >= feather.keep_count(present[0], 0.5, 1) and present[2] == feather.keep_count(present[1], 0.5, 2)
    assert [sum(layer) for layer in zip(*(unit.layers for unit in records[0]))] == [present[0], present[1], present[2], present[2]]
    cuts = {layer: gathering_cut(stages[j + 1]) for j, layer in enumerate([1, 2])}
    reference = layerwise_reference_generate(tiny_models[family], batch.inputs_embeds, cuts, 6, w.engine.family.placeholder_ids)
    assert cached_greedy(w, batch, records) == reference


def test_stage_one_is_the_top_of_the_rope_free_criterion_united_with_the_grid(tiny_models):
    w = wrapper(tiny_models["llava"], retention=0.3)
    _, batch, records = w._build([requests_for(w, STAGE_DOCS[:1])[0].args])
    state, hidden = prefill_state_and_attention_input(w, batch, records)  # stage 1 (layer 1) is scored on layer 0's input
    attention, visual = w.engine.family.decoder_layers[0].self_attn, torch.nonzero(batch.prunable_mask[0]).flatten()
    heads, head_dim = w.engine.family.config.text_config.num_attention_heads, attention.head_dim
    query = attention.q_proj(hidden[0, -1]).view(heads, head_dim)
    keys = attention.k_proj(hidden[0, visual]).view(visual.numel(), -1, head_dim).transpose(0, 1)
    scores = feather.criterion(query, keys)
    grid = feather.stride_grid(4, 4, 3)
    (expected,) = feather.select([scores], [feather.keep_count(16, 0.3, 1)], [grid])
    kept = state["stages"][1].index[0][state["stages"][1].valid[0] & batch.prunable_mask[0, state["stages"][1].index[0]]]
    assert kept.tolist() == visual[expected].tolist()


def test_stride_grid_per_view_with_newlines_off_the_grid(tiny_models):
    w = wrapper(tiny_models["llava_next"], retention=0.3)
    inputs = w.processor(text=[w._prompt("q", 1, 0)], images=[[image(64, 40, 3)]], return_tensors="pt")
    (visual,) = w.engine.pipeline(inputs, [1], [0], ["doc"]).visuals[0]
    on_grid = feather.packed_stride_grid(visual, 3)
    side = 4
    assert on_grid[:side * side].tolist() == feather.stride_grid(side, side, 3).tolist()  # the base view
    crops = ~visual.newline[side * side:]
    rows = visual.newline[side * side:].sum()
    cols = int(crops.sum()) // int(rows)
    assert on_grid[side * side:][crops].tolist() == feather.stride_grid(int(rows), cols, 3).tolist()
    assert not on_grid[visual.newline].any()


def test_tokens_budget_is_the_layer_mean_and_settings_mark_the_port(tiny_models):
    w = wrapper(tiny_models["llava_onevision"], tokens=6, faithful=True)
    w.generate_until(requests_for(w, STAGE_DOCS[:1]))
    settings = w.engine.settings()
    assert settings["precision"] == "model" and settings["stage_layers"] == [1, 2] and "port" in settings["port"].lower()
    assert w.engine.family.text_attention_implementation == "sdpa"
    units = w.ledger.samples[0]["units"]
    n = sum(u["before"] for u in units)
    grid = 2 * 4  # two 4 x 4 views, stride 3: 2 x 2 each
    q = w.engine.method.keep_fraction(n, grid)
    assert abs(feather.layer_mean(n, grid, q, [1, 2], 4) - 6) <= min(abs(feather.layer_mean(n, grid, q + d, [1, 2], 4) - 6)
                                                                      for d in (-0.001, 0.001))
    assert all(u["layers"][0] == u["before"] for u in units)


def test_stage_layers_fit_or_scale_to_the_depth_and_stride_is_checked(tiny_models):
    assert feather.fitted_layers("feather", feather.STAGE_LAYERS, 32, 1, 31) == [8, 16]
    assert feather.fitted_layers("feather", feather.STAGE_LAYERS, 24, 1, 23) == [8, 16]
    assert feather.fitted_layers("feather", feather.STAGE_LAYERS, 12, 1, 11) == [3, 6]
    with pytest.raises(MethodError, match="do not fit an LLM of 2 layers"):
        feather.fitted_layers("feather", feather.STAGE_LAYERS, 2, 1, 1)
    with pytest.raises(MethodError, match="stride=0 must be at least 1"):
        wrapper(tiny_models["llava"], retention=0.3, stride=0)


def test_eager_attention_gives_the_same_pruned_output_as_sdpa(tiny_models):
    sdpa = wrapper(tiny_models["llava_onevision"], retention=0.5, batch_size=2)
    eager = wrapper(tiny_models["llava_onevision"], retention=0.5, batch_size=2, attn_implementation="eager")
    assert eager.generate_until(requests_for(eager, STAGE_DOCS)) == sdpa.generate_until(requests_for(sdpa, STAGE_DOCS))
