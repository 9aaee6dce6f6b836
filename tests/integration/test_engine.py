"""The engine's public API without lmms-eval, as its docstring shows it."""

from __future__ import annotations

import torch
from conftest import image

from lmms_eval_redundancy.core.budget import Budget
from lmms_eval_redundancy.core.registry import build_method
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
