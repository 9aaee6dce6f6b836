"""HiPrune through the wrapper against its rule fed from an eager run of the same vision tower."""

from __future__ import annotations

import pytest
import torch
from conftest import image, official_next_tokens, requests_for
from transformers import AutoModelForImageTextToText

from lmms_eval_redundancy.core.registry import MethodError
from lmms_eval_redundancy.lmms.model import LlavaRedundancy
from lmms_eval_redundancy.methods import hiprune

DOC = {"question": "what is it ?", "visuals": [image(32, 32, 5)]}


def wrapper(path, **kwargs) -> LlavaRedundancy:
    return LlavaRedundancy(pretrained=str(path), device="cpu", method="hiprune", log_keep_indices=True, **kwargs)


def eager_attentions(path, w: LlavaRedundancy, doc: dict):
    """Attention probabilities of every layer of the vision tower (eager) on the first view of ``doc``'s image."""
    pixels = w.processor(text=[w._prompt("q", 1, 0)], images=[doc["visuals"]], return_tensors="pt")["pixel_values"]
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        return model.model.vision_tower(pixels.reshape(-1, *pixels.shape[-3:])[:1], output_attentions=True).attentions


@pytest.mark.parametrize(("family", "has_cls"), [("llava", True), ("llava_onevision", False)])
def test_kept_indices_are_the_rule_on_eager_attention_of_both_layers(tiny_models, family, has_cls):
    w = wrapper(tiny_models[family], tokens=6, alpha=0.9, object_layer=2, anyres="base_only")
    attentions = eager_attentions(tiny_models[family], w, DOC)
    deep = w.engine.family.vision_feature_layer_index
    object_scores = hiprune.global_attention(attentions[1], has_cls=has_cls)[0]
    deep_scores = hiprune.global_attention(attentions[deep], has_cls=has_cls)[0]
    expected = hiprune.select(object_scores, deep_scores, 6, alpha=0.9)
    w.generate_until(requests_for(w, [DOC]))
    assert [u["keep"] for u in w.ledger.samples[-1]["units"]] == [expected.tolist()]
    assert hiprune.anchor_count(6, 0.9) == 1  # one anchor and its buffers, then registers
    settings = w.engine.settings()
    assert settings["object_layer_used"] == 2 and settings["deep_vision_layer"] == deep
    assert w.model.config.vision_config._attn_implementation == "sdpa"


def test_each_anyres_view_gets_an_even_share_of_the_image_budget(tiny_models):
    w = wrapper(tiny_models["llava_next"], tokens=10)
    w.generate_until(requests_for(w, [{"question": "what is it ?", "visuals": [image(64, 40, 3)]}]))
    (unit,) = w.ledger.samples[-1]["units"]
    assert unit["after"] <= 10 < unit["before"]  # 5 views of 2 each; picks in unpadded-away patches are dropped
    per_view = wrapper(tiny_models["llava_next"], tokens=2, anyres="per_view")
    per_view.generate_until(requests_for(per_view, [{"question": "what is it ?", "visuals": [image(64, 40, 3)]}]))
    assert [u["after"] for u in per_view.ledger.samples[-1]["units"]][0] == 2


def test_default_object_layer_is_nine_on_24_layer_towers_and_scaled_on_shorter_ones():
    assert hiprune.default_object_layer(24) == 9 and hiprune.default_object_layer(27) == 9
    assert hiprune.default_object_layer(4) == 2 and hiprune.default_object_layer(2) == 1


def test_object_layer_beyond_the_tower_is_refused_naming_the_parameter(tiny_models):
    with pytest.raises(MethodError, match="object_layer="):
        wrapper(tiny_models["llava"], tokens=4, object_layer=9)


def test_anyres_views_are_each_the_rule_on_their_full_patch_grid_with_padding_picks_dropped(tiny_models):
    from lmms_eval_redundancy.core.budget import Budget
    from lmms_eval_redundancy.methods.views import view_counts

    doc = {"question": "what is it ?", "visuals": [image(64, 40, 3)]}
    w = wrapper(tiny_models["llava_next"], tokens=10, alpha=0.9)
    inputs = w.processor(text=[w._prompt("q", 1, 0)], images=[doc["visuals"]], return_tensors="pt")
    model = AutoModelForImageTextToText.from_pretrained(tiny_models["llava_next"], attn_implementation="eager").eval()
    with torch.no_grad():
        attentions = model.model.vision_tower(inputs["pixel_values"][0], output_attentions=True).attentions
    object_scores = deep_scores = hiprune.global_attention(attentions[0])  # tiny tower: object layer 1 = layer read
    (visual,) = w.engine.pipeline(inputs, [1], [0], ["doc"]).visuals[0]
    tiles, patches = visual.tiles[visual.units[0]], visual.patches[visual.units[0]]
    counts = view_counts(Budget("tokens", 10), len(object_scores), object_scores.shape[1])
    expected = torch.cat([torch.nonzero((tiles == tile) & torch.isin(patches, hiprune.select(
        object_scores[tile], deep_scores[tile], k, alpha=0.9))).flatten() for tile, k in enumerate(counts)]).sort().values
    w.generate_until(requests_for(w, [doc]))
    (unit,) = w.ledger.samples[-1]["units"]
    assert unit["keep"] == expected.tolist()
    assert unit["before"] < len(counts) * object_scores.shape[1]  # the crops have padding, chosen among too


@pytest.mark.parametrize("faithful", [False, True])
def test_the_official_next_layout_is_the_base_view_then_the_stitched_crop_grid(tiny_models, faithful):
    from lmms_eval_redundancy.core.budget import Budget
    from lmms_eval_redundancy.methods.views import view_counts

    settings = {"faithful": True} if faithful else {"layout": "official"}
    w = wrapper(tiny_models["llava_next"], tokens=30, alpha=0.5, **settings)
    assert w.engine.settings()["layout"] == "official"
    inputs = w.processor(text=[w._prompt("q", 1, 0)], images=[[image(64, 40, 3)]], return_tensors="pt")
    model = AutoModelForImageTextToText.from_pretrained(tiny_models["llava_next"], attn_implementation="eager").eval()
    with torch.no_grad():
        out = model.model.vision_tower(inputs["pixel_values"][0], output_attentions=True, output_hidden_states=True)
    scores = hiprune.global_attention(out.attentions[0])  # tiny tower: object layer 1 = layer read
    counts = view_counts(Budget("tokens", 30), len(scores), scores.shape[1])  # 6 per view: one anchor each
    picks = [hiprune.select(scores[tile], scores[tile], k, alpha=0.5) for tile, k in enumerate(counts)]
    states = out.hidden_states[w.engine.family.vision_feature_layer_index + 1][:, 1:]
    pruned = w.engine.pipeline(inputs, [1], [0], ["doc"])
    tokens = pruned.batch.inputs_embeds[0][pruned.batch.visual_mask[0]]
    torch.testing.assert_close(tokens, official_next_tokens(model, states, picks, inputs["image_sizes"][0]), atol=1e-5, rtol=1e-4)
    (record,) = pruned.records[0]
    assert record.after == 30 and record.newlines_after == 0 and record.merged  # picks in the padding are new
