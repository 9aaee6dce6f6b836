"""CDPruner through the wrapper: the rule fed from an eager run of the tower and the tiny CLIP text tower,
per-sample relevance in batches, and the refusals of a missing or mismatched ``clip_text=``."""

from __future__ import annotations

import pytest
import torch
from conftest import image, requests_for, tiny_clip
from transformers import (
    AutoModelForImageTextToText,
    AutoTokenizer,
    CLIPTextModelWithProjection,
    CLIPVisionModelWithProjection,
)

from lmms_eval_redundancy.core.budget import Budget
from lmms_eval_redundancy.core.registry import MethodError, build_method
from lmms_eval_redundancy.families.tiny import build_tiny_clip
from lmms_eval_redundancy.lmms.model import LlavaRedundancy
from lmms_eval_redundancy.methods import cdpruner

QUESTION = "what color is the shape ?\nAnswer the question using a single word or phrase."


def wrapper(path, **kwargs) -> LlavaRedundancy:
    kwargs.setdefault("clip_text", str(tiny_clip()))
    return LlavaRedundancy(pretrained=str(path), device="cpu", method="cdpruner", log_keep_indices=True, **kwargs)


def expected_keep(path, clip, w: LlavaRedundancy, doc: dict, k: int) -> list[int]:
    """The rule on an eager run: projector outputs and joint-space embeddings of layer-R patch states, and the
    text tower's embeds of the question without its answer-format line."""
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager").eval()
    pixels = w.processor(text=[w._prompt("q", 1, 0)], images=[doc["visuals"]], return_tensors="pt")["pixel_values"]
    text_model, vision = CLIPTextModelWithProjection.from_pretrained(clip), CLIPVisionModelWithProjection.from_pretrained(clip)
    tokens = AutoTokenizer.from_pretrained(clip)("what color is the shape ?", return_tensors="pt")
    with torch.no_grad():
        states = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        patches = states[w.engine.family.vision_feature_layer_index + 1][0, 1:]
        features = model.model.multi_modal_projector(patches)
        embeds = vision.visual_projection(vision.vision_model.post_layernorm(patches))
        text = text_model(**dict(zip(("input_ids", "attention_mask"), cdpruner.text_segments(
            tokens["input_ids"], tokens["attention_mask"])))).text_embeds
    (relevance,) = cdpruner.relevance([embeds], text)
    return cdpruner.select(features, relevance, k).tolist()


def test_kept_indices_are_the_rule_on_eager_tower_outputs_and_the_clip_text_tower(tiny_models):
    doc = {"question": QUESTION, "visuals": [image(32, 32, 5)]}
    w = wrapper(tiny_models["llava"], tokens=5)
    w.generate_until(requests_for(w, [doc]))
    assert [u["keep"] for u in w.ledger.samples[-1]["units"]] == [expected_keep(tiny_models["llava"], tiny_clip(), w, doc, 5)]
    assert w.model.config.vision_config._attn_implementation == "sdpa"


def test_instruction_text_drops_placeholders_and_answer_format_lines():
    assert cdpruner.instruction_text("<image>\n" + QUESTION) == "what color is the shape ?"
    assert cdpruner.instruction_text("<image> Which one?\nA. x\nAnswer with the option's letter from the given "
                                     "choices directly.") == "Which one?\nA. x"


def test_relevance_is_per_sample_in_a_batch_and_follows_the_question(tiny_models):
    docs = [{"question": q, "visuals": [image(64, 40, 3)]} for q in ("what color is it ?", "how many objects ?")]
    for family in ("llava", "llava_next"):
        pair = wrapper(tiny_models[family], tokens=6, batch_size=2, anyres="per_view")
        pair.generate_until(requests_for(pair, docs))
        alone = [wrapper(tiny_models[family], tokens=6, anyres="per_view") for _ in docs]
        for w, doc in zip(alone, docs):
            w.generate_until(requests_for(w, [doc]))
        assert [s["units"] for s in sorted(pair.ledger.samples, key=lambda s: s["doc_id"])] == \
            [w.ledger.samples[0]["units"] for w in alone]


def test_faithful_normalises_features_in_the_model_dtype_and_records_it(tiny_models):
    w = wrapper(tiny_models["llava"], tokens=4, faithful=True)
    settings = w.engine.settings()
    assert settings["precision"] == "model" and settings["clip_text"] == str(tiny_clip())
    assert settings["relevance_scope"].startswith("per sample")


def test_missing_clip_text_is_refused_naming_the_parameter():
    with pytest.raises(MethodError, match="clip_text="):
        build_method("cdpruner", Budget("tokens", 4))


@pytest.mark.parametrize("source", ["missing-folder", "llava-checkpoint", "narrow-clip"])
def test_a_mismatched_clip_text_is_refused_naming_the_parameter(tiny_models, tmp_path, source):
    paths = {"missing-folder": tmp_path / "nowhere", "llava-checkpoint": tiny_models["llava"],
             "narrow-clip": tmp_path / "narrow"}
    if source == "narrow-clip":
        build_tiny_clip(paths[source], vision_width=16)
    with pytest.raises(MethodError, match="clip_text=") as refused:
        wrapper(tiny_models["llava"], tokens=4, clip_text=str(paths[source]))
    assert "openai/clip-vit-large-patch14-336" in str(refused.value)


def test_the_clip_halves_load_without_a_report_and_a_half_lacking_weights_is_refused(tiny_models, tmp_path, capfd):
    import shutil

    from safetensors.torch import load_file, save_file

    wrapper(tiny_models["llava"], tokens=4)
    assert "LOAD REPORT" not in capfd.readouterr().err  # each half leaves the other's weights unused, as expected
    clip = shutil.copytree(tiny_clip(), tmp_path / "clip")
    weights = {name: t for name, t in load_file(clip / "model.safetensors").items() if not name.startswith("text_model.encoder.")}
    save_file(weights, clip / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MethodError, match=r"lacks \d+ weight\(s\) of its CLIPTextModelWithProjection .*clip_text="):
        wrapper(tiny_models["llava"], tokens=4, clip_text=str(clip))


def test_a_siglip_tower_is_refused(tiny_models):
    with pytest.raises(MethodError, match="CLIP vision tower"):
        wrapper(tiny_models["llava_onevision"], tokens=4)


def test_anyres_views_are_each_a_dpp_over_their_full_patch_grid_with_one_relevance_scale(tiny_models):
    from lmms_eval_redundancy.methods.views import view_counts

    doc = {"question": "what color is it ?", "visuals": [image(64, 40, 3)]}
    w = wrapper(tiny_models["llava_next"], tokens=10)
    inputs = w.processor(text=[w._prompt("q", 1, 0)], images=[doc["visuals"]], return_tensors="pt")
    model = AutoModelForImageTextToText.from_pretrained(tiny_models["llava_next"], attn_implementation="eager").eval()
    clip = tiny_clip()
    text_model, vision = CLIPTextModelWithProjection.from_pretrained(clip), CLIPVisionModelWithProjection.from_pretrained(clip)
    tokens = AutoTokenizer.from_pretrained(clip)("what color is it ?", return_tensors="pt")
    with torch.no_grad():
        states = model.model.vision_tower(inputs["pixel_values"][0], output_hidden_states=True).hidden_states
        patches = states[w.engine.family.vision_feature_layer_index + 1][:, 1:]  # [views, P, C]
        features = model.model.multi_modal_projector(patches)
        embeds = vision.visual_projection(vision.vision_model.post_layernorm(patches))
        text = text_model(**dict(zip(("input_ids", "attention_mask"), cdpruner.text_segments(
            tokens["input_ids"], tokens["attention_mask"])))).text_embeds
    relevance = cdpruner.relevance(list(embeds), text)  # one min-max over every view of the image
    counts = view_counts(w.engine.method.budget, len(patches), patches.shape[1])
    (visual,) = w.engine.pipeline(inputs, [1], [0], ["doc"]).visuals[0]
    tiles, patch_ids = visual.tiles[visual.units[0]], visual.patches[visual.units[0]]
    expected = torch.cat([torch.nonzero((tiles == tile) & torch.isin(patch_ids, cdpruner.select(
        features[tile], relevance[tile], k))).flatten() for tile, k in enumerate(counts)]).sort().values
    w.generate_until(requests_for(w, [doc]))
    (unit,) = w.ledger.samples[-1]["units"]
    assert unit["keep"] == expected.tolist()
    assert unit["before"] < len(counts) * patches.shape[1]  # the crops have padding, chosen among too
