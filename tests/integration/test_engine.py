"""The engine's public API without lmms-eval, as its docstring shows it."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, image

from lmms_eval_redundancy.core.budget import KEEP_ALL, Budget
from lmms_eval_redundancy.core.registry import UNPRUNED, build_method
from lmms_eval_redundancy.runtime.engine import PruningEngine
from lmms_eval_redundancy.runtime.loading import load
from lmms_eval_redundancy.runtime.prompts import chat_prompt, chat_template_of


def test_prune_then_generate_and_remove_the_hooks(tiny_models):
    loaded = load(str(tiny_models["llava"]), device="cpu")
    method = build_method("fastv", Budget("tokens", 4))
    engine = PruningEngine(loaded.model, loaded.processor, loaded.family, method)
    prompt = chat_prompt(loaded.processor, chat_template_of(loaded.processor), "what is it ?", 1, 0)
    inputs = engine.processor_inputs([prompt], [[image(32, 32, 0)]], [])
    batch, records = engine.prune(inputs, images_per_sample=[1], videos_per_sample=[0], keys=["doc0"])
    assert not batch.inputs_embeds.requires_grad  # no autograd graph unless grad=True
    with torch.no_grad(), engine.around_llm(batch, records):
        output = loaded.model.generate(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                                       max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert output.shape == (1, 3)
    assert [(r.before, r.after) for r in records[0]] == [(16, 4)]
    layers = loaded.family.decoder_layers
    assert layers[2]._forward_pre_hooks and layers[1].self_attn._forward_pre_hooks
    engine.close()
    assert not layers[2]._forward_pre_hooks and not layers[1].self_attn._forward_pre_hooks


# Largest difference (normalised pixel values) between transformers' torchvision-backed processors and its PIL ones
# on the images below, as measured: 0.0150 for CLIP's resize and centre crop, one 8-bit level (1 / 255 / std); 0.0900
# for the anyres processors (six levels), all of it in the views of the thin 29x101 image, whose base view is shrunk
# on one axis and stretched on the other. The bounds sit just above.
PIXEL_BOUND = {"llava": 0.016, "llava_next": 0.091, "llava_onevision": 0.091}


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_inputs_come_from_torchvision_processors_close_to_the_pil_ones(tiny_models, family):
    from transformers import AutoImageProcessor
    from transformers.image_processing_backends import TorchvisionBackend

    loaded = load(str(tiny_models[family]), device="cpu")
    processors = [getattr(loaded.processor, name) for name in ("image_processor", "video_processor")
                  if hasattr(loaded.processor, name)]
    assert processors and all(isinstance(processor, TorchvisionBackend) for processor in processors)
    engine = PruningEngine(loaded.model, loaded.processor, loaded.family, build_method(UNPRUNED, KEEP_ALL))
    images = [image(53, 37, 1), image(29, 101, 2), image(97, 33, 3), image(64, 64, 4), image(640, 480, 5)]
    inputs = engine.processor_inputs([loaded.processor.image_token] * len(images), [[picture] for picture in images], [])
    pil = AutoImageProcessor.from_pretrained(tiny_models[family], backend="pil")
    assert not isinstance(pil, TorchvisionBackend)
    reference = pil(images, return_tensors="pt")
    assert all(torch.equal(inputs[key], reference[key]) for key in reference if key != "pixel_values")  # image_sizes
    difference = (inputs["pixel_values"] - reference["pixel_values"]).abs()
    assert float(difference.max()) <= PIXEL_BOUND[family]
