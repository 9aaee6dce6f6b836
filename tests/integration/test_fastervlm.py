"""FasterVLM against attention probabilities from an eager run of the same vision tower."""

from __future__ import annotations

import pytest
import torch
from conftest import image, requests_for
from transformers import AutoModelForImageTextToText

from lmms_eval_redundancy.core.visuals import VisionNeed
from lmms_eval_redundancy.lmms.model import LlavaRedundancy
from lmms_eval_redundancy.runtime.loading import load


def eager_scores(path, pixel_values, has_cls: bool) -> torch.Tensor:
    """Head-mean [CLS] row (or mean received attention) of the layer LLaVA reads, from eager attention."""
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model.model.vision_tower(pixel_values, output_attentions=True, output_hidden_states=True)
    layers = len(out.attentions)
    layer = layers + model.config.vision_feature_layer if model.config.vision_feature_layer < 0 else model.config.vision_feature_layer - 1
    probs = out.attentions[layer].mean(dim=1)  # [tiles, queries, keys]
    return probs[:, 0, 1:] if has_cls else probs.mean(dim=1)


def kept_indices(w, doc):
    w.generate_until(requests_for(w, [doc]))
    return [u["keep"] for u in w.ledger.samples[-1]["units"]]


@pytest.mark.parametrize(("family", "has_cls"), [("llava", True), ("llava_onevision", False)])
def test_kept_indices_are_top_k_of_eager_attention(tiny_models, family, has_cls):
    doc = {"question": "what is it ?", "visuals": [image(32, 32, 5)]}
    w = LlavaRedundancy(pretrained=str(tiny_models[family]), device="cpu", method="fastervlm", tokens=5,
                        anyres="base_only", log_keep_indices=True)
    pixels = w.processor(text=[w._prompt("q", 1, 0)], images=[[doc["visuals"][0]]], return_tensors="pt")["pixel_values"]
    scores = eager_scores(tiny_models[family], pixels.reshape(-1, *pixels.shape[-3:])[:1], has_cls)[0]
    expected = sorted(torch.topk(scores, 5).indices.tolist())
    assert kept_indices(w, doc) == [expected]
    assert w.engine.settings()["score"].startswith("cls_attention" if has_cls else "mean_received_attention")


def test_scores_follow_the_packed_anyres_order(tiny_models):
    """Packing the scores as an extra feature channel gives the scores the method sees."""
    w = LlavaRedundancy(pretrained=str(tiny_models["llava_next"]), device="cpu", method="fastervlm", retention=0.5)
    img = image(64, 40, 3)
    inputs = w.processor(text=[w._prompt("q", 1, 0)], images=[[img]], return_tensors="pt")
    (visual,) = w.engine.pipeline(inputs, [1], [0], ["doc"]).visuals[0]
    need = w.engine.method.need
    tiles, scores = visual.tile_vision[need], visual.vision[need]
    model = w.model.model
    with_channel = torch.cat([model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                                                       vision_feature_layer=-2, vision_feature_select_strategy="default"
                                                       ).pooler_output[0], scores[:, None]], dim=1)
    raw = torch.cat([torch.zeros(tiles.shape[0], tiles.shape[1], model.image_newline.shape[0]), tiles[..., None]], dim=-1)
    packed = model.pack_image_features([raw], inputs["image_sizes"], "default",
                                       image_newline=torch.cat([model.image_newline, torch.tensor([float("nan")])]))[0][0]
    torch.testing.assert_close(packed[:, -1], with_channel[:, -1], equal_nan=True)
    assert torch.isnan(scores[visual.newline]).all() and not torch.isnan(scores[~visual.newline]).any()


@pytest.mark.parametrize("family", ["llava", "llava_onevision"])
def test_every_vision_need_equals_the_eager_towers_outputs(tiny_models, family):
    """Hidden states, keys, [CLS] row and received attention at chosen layers, as the family serves them
    (hooks under SDPA, only the asked rows), against an eager run of the same tower."""
    loaded = load(str(tiny_models[family]), device="cpu")
    has_cls = loaded.family.vision_has_cls
    needs = [VisionNeed("hidden", 0), VisionNeed("keys", 0), VisionNeed("received_attention", 1)]
    needs += [VisionNeed("cls_attention", 0)] if has_cls else []
    inputs = loaded.processor(text=[loaded.processor.image_token], images=[[image(32, 32, 4)]], return_tensors="pt")
    with torch.no_grad():
        (visual,) = loaded.family.encode(inputs, [1], [0], needs)[0]
    eager = AutoModelForImageTextToText.from_pretrained(tiny_models[family], attn_implementation="eager").eval()
    pixels = inputs["pixel_values"].reshape(-1, *inputs["pixel_values"].shape[-3:])
    with torch.no_grad():
        out = eager.model.vision_tower(pixels, output_attentions=True, output_hidden_states=True)
        first = eager.model.vision_tower.vision_model.encoder.layers[0] if hasattr(eager.model.vision_tower, "vision_model") \
            else eager.model.vision_tower.encoder.layers[0]
        keys = first.self_attn.k_proj(first.layer_norm1(out.hidden_states[0]))
    patches = slice(1, None) if has_cls else slice(None)
    close = lambda need, expected: torch.testing.assert_close(visual.tile_vision[need], expected, atol=1e-5, rtol=1e-4)  # noqa: E731
    close(needs[0], out.hidden_states[1][:, patches])
    close(needs[1], keys[:, patches])
    close(needs[2], out.attentions[1].mean(dim=1).mean(dim=1)[:, patches])
    if has_cls:
        close(needs[3], out.attentions[0].mean(dim=1)[:, 0, 1:])
