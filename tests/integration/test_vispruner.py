"""VisPruner through the pipeline against its rule applied to tensors of an eager run of the same vision tower."""

from __future__ import annotations

import pytest
import torch
from conftest import image, official_next_tokens, requests_for
from transformers import AutoModelForImageTextToText

from lmms_eval_redundancy.lmms.model import LlavaRedundancy
from lmms_eval_redundancy.methods import vispruner


def eager_views(path, pixel_values, has_cls: bool, tokens: int):
    """Per view: the rule's picks on the eager tower's layer-R patch states and [CLS] row (or received
    attention), the patch states, and the model (for its projector)."""
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager").eval()
    tower = model.model.vision_tower
    layers = len((tower.vision_model.encoder if hasattr(tower, "vision_model") else tower.encoder).layers)
    layer = layers + model.config.vision_feature_layer if model.config.vision_feature_layer < 0 \
        else model.config.vision_feature_layer - 1
    with torch.no_grad():
        out = tower(pixel_values, output_attentions=True, output_hidden_states=True)
    probs = out.attentions[layer]  # [views, H, T, T]
    scores = vispruner.head_mean(probs[:, :, 0, 1:]) if has_cls else vispruner.head_mean(vispruner.siglip_scores(probs))
    states = out.hidden_states[layer + 1][:, int(has_cls):]
    return [vispruner.select(s, a, tokens) for s, a in zip(states, scores)], states, model


def image_tokens(w: LlavaRedundancy, img):
    inputs = w.processor(text=[w._prompt("q", 1, 0)], images=[[img]], return_tensors="pt")
    pruned = w.engine.pipeline(inputs, [1], [0], ["doc"])
    return inputs, pruned.batch.inputs_embeds[0][pruned.batch.visual_mask[0]], pruned


@pytest.mark.parametrize(("family", "anyres"), [("llava", "full"), ("llava_onevision", "base_only")])
def test_one_view_keeps_the_rules_picks(tiny_models, family, anyres):
    w = LlavaRedundancy(pretrained=str(tiny_models[family]), device="cpu", method="vispruner", tokens=7, anyres=anyres,
                        log_keep_indices=True)
    inputs, _, pruned = image_tokens(w, image(32, 32, 5))
    pixels = inputs["pixel_values"].reshape(-1, *inputs["pixel_values"].shape[-3:])[:1]
    (picks,), _, _ = eager_views(tiny_models[family], pixels, w.engine.family.vision_has_cls, 7)
    (record,) = pruned.records[0]
    assert record.keep == picks.tolist() and record.merged is None
    assert w.model.config.vision_config._attn_implementation == "sdpa"


@pytest.mark.parametrize("layout", ["project", "official"])
def test_next_views_in_the_project_and_the_official_layout(tiny_models, layout):
    w = LlavaRedundancy(pretrained=str(tiny_models["llava_next"]), device="cpu", method="vispruner", tokens=30,
                        layout=layout)
    inputs, tokens, pruned = image_tokens(w, image(64, 40, 3))
    pixels = inputs["pixel_values"].reshape(-1, *inputs["pixel_values"].shape[-3:])
    picks, states, model = eager_views(tiny_models["llava_next"], pixels, True, 6)  # 6 tokens per view of 5
    (visual,) = pruned.visuals[0]
    if layout == "official":  # base view, then the stitched crop grid without unpadding or newlines (aefa01ad)
        expected = official_next_tokens(model, states, picks, inputs["image_sizes"][0])
    else:  # picks at their packed positions, those in the padding dropped, newlines kept
        expected = visual.features[[p for p in range(visual.length) if visual.newline[p] or
                                    int(visual.patches[p]) in picks[int(visual.tiles[p])].tolist()]]
    torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=1e-4)
    (record,) = pruned.records[0]
    if layout == "official":
        assert record.after == 30 and record.newlines_after == 0 and record.merged  # picks in the padding are new
    else:
        assert record.after - record.newlines_after < 30 and record.merged is None


def test_faithful_records_the_official_settings_and_keeps_the_official_odd_residual_count(tiny_models):
    doc = {"question": "what is it ?", "visuals": [image(32, 32, 1)]}
    kept = {}
    for odd_residual in ("official", "rule"):
        w = LlavaRedundancy(pretrained=str(tiny_models["llava"]), device="cpu", method="vispruner", tokens=6,
                            faithful=True, important_ratio=0.75, odd_residual=odd_residual)
        settings = w.engine.settings()
        assert (settings["layout"], settings["precision"], settings["score"]) == ("official", "model", "cls_attention")
        assert settings["important_ratio"] == 0.75 and settings["odd_residual"] == odd_residual
        w.generate_until(requests_for(w, [doc]))
        (unit,) = w.ledger.samples[0]["units"]
        kept[odd_residual] = unit["after"]
    # 12 residual tokens for 2 diverse ones: rounds leave 6, then 3 (odd, q = 1 = 3 // 2), which the official
    # indexing broadcasts into dropping both A members: one token short of the budget
    assert kept == {"official": 5, "rule": 6}
