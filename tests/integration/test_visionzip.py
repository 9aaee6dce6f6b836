"""VisionZip through the pipeline against its rule applied to tensors of an eager run of the same vision tower."""

from __future__ import annotations

import pytest
import torch
from conftest import image, requests_for
from transformers import AutoModelForImageTextToText
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
)

from lmms_eval_redundancy.lmms.model import LlavaRedundancy
from lmms_eval_redundancy.methods import visionzip


def eager_views(path, pixel_values, has_cls: bool, dominant: int, contextual: int):
    """Per view: the rule on the eager tower's layer-R hidden states, [CLS] row (or received attention) and
    per-head keys; and the model (for its projector)."""
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager").eval()
    tower = model.model.vision_tower
    encoder = tower.vision_model.encoder if hasattr(tower, "vision_model") else tower.encoder
    layer = len(encoder.layers) + model.config.vision_feature_layer if model.config.vision_feature_layer < 0 \
        else model.config.vision_feature_layer - 1
    with torch.no_grad():
        out = tower(pixel_values, output_attentions=True, output_hidden_states=True)
        attention = encoder.layers[layer].self_attn
        keys = attention.k_proj(encoder.layers[layer].layer_norm1(out.hidden_states[layer]))
    views, (count, length, _) = [], keys.shape
    keys = keys.view(count, length, attention.num_heads, -1).transpose(1, 2)  # [views, H, T, dm]
    for view in range(count):
        probs = out.attentions[layer][view]
        scores = visionzip.dominant_scores(probs[:, 0]) if has_cls else probs.mean(dim=0).mean(dim=0)
        views.append(visionzip.select(out.hidden_states[layer + 1][view], scores, visionzip.head_mean_keys(keys[view]),
                                      dominant, contextual, has_cls))
    return views, model


def image_tokens(w: LlavaRedundancy, img):
    inputs = w.processor(text=[w._prompt("q", 1, 0)], images=[[img]], return_tensors="pt")
    pruned = w.engine.pipeline(inputs, [1], [0], ["doc"])
    return inputs, pruned.batch.inputs_embeds[0][pruned.batch.visual_mask[0]], pruned


@pytest.mark.parametrize(("family", "anyres"), [("llava", "full"), ("llava_onevision", "base_only")])
def test_one_view_gives_the_rules_tokens_projected(tiny_models, family, anyres):
    w = LlavaRedundancy(pretrained=str(tiny_models[family]), device="cpu", method="visionzip", tokens=5, anyres=anyres)
    has_cls = w.engine.family.vision_has_cls
    inputs, tokens, pruned = image_tokens(w, image(32, 32, 5))
    pixels = inputs["pixel_values"].reshape(-1, *inputs["pixel_values"].shape[-3:])[:1]
    (merged,), model = eager_views(tiny_models[family], pixels, has_cls, 4, 1)  # split_budget(5) == (4, 1)
    with torch.no_grad():
        expected = model.model.multi_modal_projector(merged.tokens)
    torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=1e-4)
    (record,) = pruned.records[0]
    assert (record.after, record.merged) == (5, 1 + has_cls)
    assert w.model.config.vision_config._attn_implementation == "sdpa"


@pytest.mark.parametrize("layout", ["project", "official"])
def test_next_views_in_the_project_and_the_official_layout(tiny_models, layout):
    w = LlavaRedundancy(pretrained=str(tiny_models["llava_next"]), device="cpu", method="visionzip", tokens=40,
                        layout=layout)
    img = image(64, 40, 3)
    inputs, tokens, pruned = image_tokens(w, img)
    pixels = inputs["pixel_values"].reshape(-1, *inputs["pixel_values"].shape[-3:])
    views, model = eager_views(tiny_models["llava_next"], pixels, True, 7, 1)  # 8 tokens per view of 5
    with torch.no_grad():
        projected = [model.model.multi_modal_projector(m.tokens) for m in views]
    (visual,) = pruned.visuals[0]
    if layout == "official":
        rows, columns = get_anyres_image_grid_shape(inputs["image_sizes"][0].tolist(), model.config.image_grid_pinpoints,
                                                    model.config.vision_config.image_size)
        crops = visionzip.official_crop_layout(torch.stack(projected[1:]), torch.stack([m.dominant for m in views[1:]]),
                                               columns, rows, 4)
        expected = torch.cat([projected[0], crops])
    else:  # dominant patches at their packed positions (newlines kept), then each view's [CLS] and contextual token
        kept = [position for position in range(visual.length) if visual.newline[position] or
                int(visual.patches[position]) in views[int(visual.tiles[position])].dominant.tolist()]
        ends = torch.cat([p[[0, -1]] for p in projected])
        last = int(torch.nonzero(~visual.newline).flatten()[-1])
        expected = torch.cat([visual.features[[p for p in kept if p <= last]], ends,
                              visual.features[[p for p in kept if p > last]]])
    torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=1e-4)
    (record,) = pruned.records[0]
    assert record.newlines_after == (0 if layout == "official" else record.newlines_before)
    # 8 per view (the project drops picks in the padding); new: each view's [CLS] and contextual token, and
    # officially the dominant patches in the padding
    if layout == "official":
        assert record.after == 40 and record.merged > 10
    else:
        assert record.after - record.newlines_after < 40 and record.merged == 10


def test_faithful_records_the_official_settings_and_dominant_contextual_override_the_split(tiny_models):
    w = LlavaRedundancy(pretrained=str(tiny_models["llava"]), device="cpu", method="visionzip", tokens=6, faithful=True,
                        contextual=2)
    settings = w.engine.settings()
    assert (settings["layout"], settings["precision"], settings["contextual"]) == ("official", "model", 2)
    w.generate_until(requests_for(w, [{"question": "what is it ?", "visuals": [image(32, 32, 1)]}]))
    (unit,) = w.ledger.samples[0]["units"]
    assert (unit["after"], unit["merged"]) == (6, 3)  # [CLS] + 2 contextual tokens new, 3 dominant patches kept
