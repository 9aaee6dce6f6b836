"""SparseVLM on the tiny models: cached greedy decoding against a layer-by-layer no-cache reference that merges the
recycled tokens itself, per-stage counts, per-sample seeding, settings and refusals."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import (
    FAMILIES,
    STAGE_DOCS,
    cached_greedy,
    layerwise_reference_generate,
    prefill_state,
    prefill_state_and_attention_input,
    requests_for,
    tiny_wrapper,
)

from lmms_eval_redundancy.core.registry import MethodError
from lmms_eval_redundancy.methods import sparsevlm

wrapper = functools.partial(tiny_wrapper, method="sparsevlm")


def merging_cut(stage, plan):
    """The reference's cut: the recycled rows merged by the pure rule, placed where the stage says; renumbered."""
    recycled, clusters, noise = plan

    def cut(rows, positions):
        (merged,) = sparsevlm.cluster_and_merge([rows[0, recycled]], [clusters], [noise])
        source = torch.cat([rows[0], merged.merged.to(rows.dtype)])
        new = source[stage.local[0]][None]
        return new, torch.arange(new.shape[1])

    return cut


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generation_equals_the_layerwise_no_cache_reference(tiny_models, family):
    w = wrapper(tiny_models[family], tokens=192)
    assert w.engine.method.stage_layers == [0, 1, 2]  # 2, 6, 15 scaled to the tiny LLM's 4 layers
    doc = STAGE_DOCS[1] if family == "llava" else STAGE_DOCS[2]
    _, batch, records = w._build([requests_for(w, [doc])[0].args])
    state = prefill_state(w, batch, records)
    stages = state["stages"]
    assert all(stage.inserted[0].sum() == state["plans"][j][0][1] for j, stage in enumerate(stages[1:]))
    visual = [int((s.valid & batch.prunable_mask.gather(1, s.index) | s.inserted).sum()) if s.inserted is not None
              else int(batch.prunable_mask.sum()) for s in stages]
    n = visual[0]
    budgets = sparsevlm.scaled_budgets(sparsevlm.STAGE_BUDGETS[192], n / 576)
    expected = [n]
    for budget in budgets:
        kept = sparsevlm.budget_keep_count(budget, expected[-1])
        expected.append(kept + sparsevlm.cluster_count(sparsevlm.recycled_count(expected[-1] - kept)))
    assert visual == expected
    assert [sum(layer) for layer in zip(*(unit.layers for unit in records[0]))] == expected
    cuts = {layer + 1: merging_cut(stages[j + 1], state["plans"][j][0]) for j, layer in enumerate([0, 1, 2])}
    reference = layerwise_reference_generate(tiny_models[family], batch.inputs_embeds, cuts, 6, w.engine.family.placeholder_ids)
    assert cached_greedy(w, batch, records) == reference


def test_merged_tokens_follow_the_kept_visual_tokens_and_raters_come_from_the_input_embeddings(tiny_models):
    w = wrapper(tiny_models["llava_next"], tokens=128)
    _, batch, records = w._build([requests_for(w, STAGE_DOCS[2:])[0].args])
    state = prefill_state(w, batch, records)
    visual = torch.nonzero(batch.visual_mask[0]).flatten()
    text = torch.arange(int(visual.max()) + 1, batch.visual_mask.shape[1])
    offsets = sparsevlm.rater_offsets(batch.inputs_embeds[0, visual], batch.inputs_embeds[0, text])
    assert state["raters"][0].tolist() == text[offsets].tolist()
    first = state["stages"][1]
    is_visual = batch.visual_mask.gather(1, first.index)[0] & ~first.inserted[0]
    last_visual = int(torch.nonzero(is_visual).max())
    merged = torch.nonzero(first.inserted[0]).flatten()
    assert merged.tolist() == list(range(last_visual + 1, last_visual + 1 + merged.numel()))


def test_density_noise_is_seeded_per_sample_and_stage(tiny_models):
    one = wrapper(tiny_models["llava_next"], tokens=64, batch_size=1)
    two = wrapper(tiny_models["llava_next"], tokens=64, batch_size=2)
    assert two.generate_until(requests_for(two, STAGE_DOCS)) == one.generate_until(requests_for(one, STAGE_DOCS))
    units = lambda w: sorted((s["doc_id"], u["visual"], u["after"], u.get("merged"), tuple(u["layers"]))  # noqa: E731
                             for s in w.ledger.samples for u in s["units"])
    assert units(one) == units(two)
    other_seed = wrapper(tiny_models["llava_next"], tokens=64, seed=1)
    _, batch, records = other_seed._build([requests_for(other_seed, STAGE_DOCS[2:])[0].args])
    _, batch_one, records_one = one._build([requests_for(one, STAGE_DOCS[2:])[0].args])
    noise = [prefill_state(w, b, r)["plans"][0][0][2] for w, b, r in ((one, batch_one, records_one), (other_seed, batch, records))]
    assert not torch.equal(*noise)


def test_budgets_settings_faithful_and_attention_implementation_unchanged(tiny_models):
    w = wrapper(tiny_models["llava_onevision"], tokens=100, faithful=True)
    w.generate_until(requests_for(w, STAGE_DOCS[:1]))
    settings = w.engine.settings()
    assert settings["precision"] == "model" and settings["variant"] == "v1.5" and settings["stage_layers"] == [0, 1, 2]
    assert settings["budget_scale"] != 1.0 and abs(settings["layer_mean_at_576"] - 100) < 1
    assert w.engine.family.text_attention_implementation == "sdpa"
    retention = wrapper(tiny_models["llava"], retention=1 / 3).engine.settings()
    assert retention["stage_budgets"] == [300, 200, 110] and retention["budget_scale"] == 1.0


def test_v1_variant_uses_the_rank_rule_and_its_official_budgets_only(tiny_models):
    with pytest.raises(MethodError, match="variant=v1 has official settings for tokens=192/128/64"):
        wrapper(tiny_models["llava"], tokens=100, variant="v1")
    with pytest.raises(MethodError, match="do not fit an LLM of 4 layers"):
        wrapper(tiny_models["llava"], tokens=64, variant="v1")  # four stages need five layers at least


def test_stage_layers_fit_or_scale_to_the_depth():
    assert sparsevlm.fitted_layers("sparsevlm", sparsevlm.STAGE_LAYERS["v1.5"], 32, 0, 30) == [2, 6, 15]
    assert sparsevlm.fitted_layers("sparsevlm", sparsevlm.STAGE_LAYERS["v1.5"], 28, 0, 26) == [2, 6, 15]
    assert sparsevlm.fitted_layers("sparsevlm", sparsevlm.STAGE_LAYERS["v1"], 16, 0, 14) == [1, 3, 8, 10]
    assert sparsevlm.official_layer_mean(576, (2, 6, 15), sparsevlm.STAGE_BUDGETS[192], 32) == pytest.approx(192.03, abs=0.01)
    assert sparsevlm.official_layer_mean(576, (2, 6, 15), sparsevlm.STAGE_BUDGETS[64], 32) == pytest.approx(64.8, abs=0.1)


def test_first_cut_keeps_the_top_tokens_of_the_pure_rule_on_the_stage_layer(tiny_models):
    """Stage 1 keeps the top ``budget_keep_count`` visual tokens of ``rater_attention`` computed from layer 0's own
    q/k projections and RoPE on its input (the raters' rows, head mean, then rater mean)."""
    import sys

    w = wrapper(tiny_models["llava_onevision"], tokens=128)  # Qwen2: grouped-query heads, q/k biases
    _, batch, records = w._build([requests_for(w, STAGE_DOCS[2:])[0].args])
    state, layer_input = prefill_state_and_attention_input(w, batch, records)
    attention, config = w.engine.family.decoder_layers[0].self_attn, w.engine.family.config.text_config
    hidden, length = layer_input[0], layer_input.shape[1]
    query = attention.q_proj(hidden).view(length, config.num_attention_heads, -1).transpose(0, 1)
    keys = attention.k_proj(hidden).view(length, config.num_key_value_heads, -1).transpose(0, 1)
    cos, sin = w.engine.family.rotary_embeddings(layer_input, torch.arange(length)[None])
    query, keys = sys.modules[type(attention).__module__].apply_rotary_pos_emb(query[None], keys[None], cos, sin)
    raters = state["raters"][0]
    relation = sparsevlm.rater_attention(query[0][:, raters], keys[0], raters, 0, length).mean(dim=0)
    visual = torch.nonzero(batch.prunable_mask[0]).flatten()
    n = visual.numel()
    kept_count = sparsevlm.budget_keep_count(sparsevlm.scaled_budgets(sparsevlm.STAGE_BUDGETS[128], n / 576)[0], n)
    top = torch.sort(relation[visual], descending=True, stable=True).indices[:kept_count]
    first = state["stages"][1]
    kept = first.index[0][first.valid[0] & ~first.inserted[0] & batch.prunable_mask[0, first.index[0]]]
    assert kept.tolist() == visual[top].sort().values.tolist()


def deeper_copy(path, folder, layers: int):
    """The tiny checkpoint at ``path`` rebuilt with ``layers`` decoder layers (random weights, seeded)."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    config = AutoConfig.from_pretrained(path)
    config.text_config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 3
    model.save_pretrained(folder)
    AutoProcessor.from_pretrained(path).save_pretrained(folder)
    return folder


def test_v1_rank_rule_on_a_six_layer_llm_equals_the_reference_and_batches_alike(tiny_models, tmp_path):
    path = deeper_copy(tiny_models["llava_next"], tmp_path / "six", 6)
    w = wrapper(path, tokens=64, variant="v1")
    assert w.engine.method.stage_layers == [0, 1, 3, 4]  # 2, 6, 15, 19 scaled to 6 layers
    _, batch, records = w._build([requests_for(w, STAGE_DOCS[2:])[0].args])
    state = prefill_state(w, batch, records)
    rank = int(torch.linalg.matrix_rank(state["blocks"][0].float()[None])[0])
    assert len(state["stages"]) == 5 and rank <= state["raters"][0].numel() and 0 in state["plans"]
    cuts = {layer + 1: merging_cut(state["stages"][j + 1], state["plans"][j][0])
            for j, layer in enumerate([0, 1, 3, 4]) if state["plans"].get(j)}
    reference = layerwise_reference_generate(path, batch.inputs_embeds, cuts, 6, w.engine.family.placeholder_ids)
    assert cached_greedy(w, batch, records) == reference
    one, two = wrapper(path, tokens=64, variant="v1"), wrapper(path, tokens=64, variant="v1", batch_size=2)
    assert two.generate_until(requests_for(two, STAGE_DOCS)) == one.generate_until(requests_for(one, STAGE_DOCS))


def test_eager_attention_gives_the_same_pruned_output_as_sdpa(tiny_models):
    sdpa = wrapper(tiny_models["llava_next"], tokens=128, batch_size=2)
    eager = wrapper(tiny_models["llava_next"], tokens=128, batch_size=2, attn_implementation="eager")
    assert eager.generate_until(requests_for(eager, STAGE_DOCS)) == sdpa.generate_until(requests_for(sdpa, STAGE_DOCS))
