"""DART on the tiny models: cached greedy decoding against a no-cache reference of the pruned forward, the
pure rule ``dart.select`` on what layer K-1 produced, the official counts, settings and refusals."""

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
from lmms_eval_redundancy.methods import dart

wrapper = functools.partial(tiny_wrapper, method="dart")


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generation_equals_the_no_cache_reference_with_original_positions(tiny_models, family):
    w = wrapper(tiny_models[family], tokens=8, pivot_image=1, pivot_text=1)
    doc = STAGE_DOCS[1] if family == "llava" else STAGE_DOCS[2]
    _, batch, records = w._build([requests_for(w, [doc])[0].args])
    stages = prefill_stages(w, batch, records)
    kept = int((stages[1].valid & batch.prunable_mask.gather(1, stages[1].index)).sum())
    assert kept == min(int(batch.prunable_mask.sum()), 1 + 2 * 4)  # P_img + (P_img + P_txt) * (8 // 2)
    reference = pruned_reference_generate(tiny_models[family], batch, stages, [2], False, 6, w.engine.family.placeholder_ids)
    assert cached_greedy(w, batch, records) == reference


@pytest.mark.parametrize("pivot_order", dart.PIVOT_ORDERS)
def test_the_cut_is_the_pure_rule_on_layer_k_minus_1_keys_and_final_norm_output(tiny_models, pivot_order):
    w = wrapper(tiny_models["llava_onevision"], tokens=8, pivot_image=2, pivot_text=2, pivot_order=pivot_order)
    _, batch, records = w._build([requests_for(w, STAGE_DOCS[:1])[0].args])
    family = w.engine.family
    captured = {}
    previous = family.decoder_layers[1]

    def keys_hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] == batch.inputs_embeds.shape[1]:
            cos, sin = kwargs["position_embeddings"]
            key = module.k_proj(hidden).view(1, hidden.shape[1], -1, module.head_dim).transpose(1, 2)
            captured["keys"] = key * cos[:, None] + torch.cat([-key[..., key.shape[-1] // 2:], key[..., : key.shape[-1] // 2]], -1) * sin[:, None]

    handles = [previous.self_attn.register_forward_pre_hook(keys_hook, with_kwargs=True),
               previous.register_forward_hook(lambda m, a, out: captured.update(out=out[0] if isinstance(out, tuple) else out))]
    try:
        stages = prefill_stages(w, batch, records)
    finally:
        for handle in handles:
            handle.remove()
    features = w.model.model.language_model.norm(captured["out"])
    n = int(batch.prunable_mask.sum())
    chosen = dart.select(features, captured["keys"], batch.attention_mask.bool(), batch.prunable_mask,
                         [dart.picks_per_pivot(n, 8, pivot_image=2, pivot_text=2)], 2, 2, pivot_order,
                         block_mask=batch.visual_mask)
    assert stages[1].index[0][stages[1].valid[0]].tolist() == torch.nonzero(chosen.keep[0]).flatten().tolist()


def test_official_count_rule_keeps_four_plus_eight_t(tiny_models):
    method = wrapper(tiny_models["llava"], tokens=128).engine.method
    assert method.per_pivot(576) == 16 and 4 + 8 * method.per_pivot(576) == 132
    assert wrapper(tiny_models["llava"], retention=0.222).engine.method.per_pivot(576) == 15
    assert wrapper(tiny_models["llava"], retention=0.222, count="qwen").engine.method.per_pivot(576) == 15
    assert wrapper(tiny_models["llava"], retention=0.5, count="llava_next").engine.method.per_pivot(2000) == 40


def test_settings_faithful_and_attention_implementation_unchanged(tiny_models):
    w = wrapper(tiny_models["llava_next"], tokens=8, faithful=True, batch_size=2)
    w.generate_until(requests_for(w, STAGE_DOCS))
    settings = w.engine.settings()
    assert settings["pivot_order"] == "set" and settings["precision"] == "model" and settings["count"] == "llava"
    assert w.engine.family.text_attention_implementation == "sdpa"
    for sample in w.ledger.samples:
        for unit in sample["units"]:
            assert unit["layers"][:2] == [unit["before"]] * 2 and unit["layers"][2:] == [unit["after"]] * 2


def test_refusals(tiny_models):
    with pytest.raises(MethodError, match="layer=4 must be below"):
        wrapper(tiny_models["llava"], tokens=8, layer=4)
    with pytest.raises(MethodError, match="layer=0 is out of range"):
        wrapper(tiny_models["llava"], tokens=8, layer=0)
    with pytest.raises(MethodError, match="count=qwen"):
        wrapper(tiny_models["llava"], tokens=8, count="qwen")
