"""Decoding: the static KV cache (the default before the LLM) decodes the dynamic cache's greedy tokens, and
``compile=true`` gives ``compile=false``'s outputs."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import image, requests_for

from lmms_eval_redundancy.core.errors import UserError
from lmms_eval_redundancy.core.registry import MethodError, Stage
from lmms_eval_redundancy.families import FAMILIES
from lmms_eval_redundancy.lmms.model import LlavaRedundancy
from lmms_eval_redundancy.runtime.decoding import Decoding
from lmms_eval_redundancy.runtime.efficiency import cache_bytes

# two prompts of different lengths: the shorter one is left-padded
DOCS = [{"question": "what is it ?", "visuals": [image(32, 32, 0)], "target": "red"},
        {"question": "which image is blue and what color is the left one ?", "visuals": [image(48, 32, 1)],
         "target": "the blue one"}]


def greedy(wrapper, decoding: Decoding, batch, steps: int = 8) -> tuple[list, int]:
    """Greedy token ids of a batch decoded as ``decoding`` says, and the KV-cache bytes recorded for it."""
    with torch.no_grad():
        output = wrapper.model.generate(**decoding.generate_inputs(wrapper.model, batch.inputs_embeds, batch.attention_mask, steps),
                                        max_new_tokens=steps, do_sample=False, pad_token_id=wrapper.tokenizer.pad_token_id,
                                        eos_token_id=wrapper.tokenizer.eos_token_id, return_dict_in_generate=True,
                                        suppress_tokens=wrapper.engine.family.placeholder_ids)
    return output.sequences.tolist(), cache_bytes(output.past_key_values)


def scores(wrapper) -> list[tuple[float, bool]]:
    """(log-likelihood, greedy) of each document's target."""
    return [r.text for r in wrapper.loglikelihood(requests_for(wrapper, DOCS, kind="loglikelihood"))]


@pytest.mark.parametrize("family", FAMILIES)
def test_static_cache_decodes_the_dynamic_caches_greedy_tokens(tiny_models, family):
    wrapper = LlavaRedundancy(pretrained=str(tiny_models[family]), device="cpu", dtype="float32", batch_size=2)
    _, batch, _ = wrapper._build([r.args for r in requests_for(wrapper, DOCS)])
    assert not batch.attention_mask[0].all()
    tokens, used = greedy(wrapper, Decoding(static_cache=False), batch)
    assert wrapper.decoding.static_cache and greedy(wrapper, wrapper.decoding, batch) == (tokens, used)
    assert not Decoding.default(Stage.INSIDE_LLM).static_cache
    # compile=true's prompt padding and preallocated cache, uncompiled: the same tokens, and log-likelihoods
    bucketed = Decoding(transformers_compile=False, length_buckets=True)
    assert greedy(wrapper, bucketed, batch)[0] == tokens
    plain = scores(wrapper)
    wrapper.decoding = bucketed
    padded = scores(wrapper)
    assert [greedy for _, greedy in padded] == [greedy for _, greedy in plain]
    assert [logprob for logprob, _ in padded] == pytest.approx([logprob for logprob, _ in plain], rel=1e-5)


def test_compile_gives_the_uncompiled_outputs_with_vision_hooks_running(tiny_models, monkeypatch):
    """Same generated text and kept indices; fastervlm reads [CLS] attention through a hook inside a vision layer.

    Compiled through dynamo with the ``aot_eager`` backend: the graph capture, length buckets and hooks under test
    are the same, without inductor's C++ build (about a minute on 2 cores with an empty cache; inductor's own
    numerics are torch's, and ``bench-decode --compile`` runs them)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    for method in ({"method": "fastervlm", "tokens": 4}, {"method": "none"}):
        outputs = {}
        for compiled in (False, True):
            wrapper = LlavaRedundancy(pretrained=str(tiny_models["llava"]), device="cpu", dtype="float32", batch_size=2,
                                      log_keep_indices=True, compile=compiled, **method)
            outputs[compiled] = wrapper.generate_until(requests_for(wrapper, DOCS)), wrapper.ledger.samples[-2:]
        assert outputs[True][0] == outputs[False][0]
        assert [s["units"] for s in outputs[True][1]] == [s["units"] for s in outputs[False][1]]


def test_compile_refuses_other_values_and_methods_inside_the_llm(tiny_models):
    path = str(tiny_models["llava"])
    with pytest.raises(UserError, match="compile='maybe' is not a boolean"):
        LlavaRedundancy(pretrained=path, compile="maybe")
    with pytest.raises(MethodError, match="compile=true compiles the LLM, but fastv prunes inside it.*drop compile=true"):
        LlavaRedundancy(pretrained=path, method="fastv", tokens=4, compile=True)
