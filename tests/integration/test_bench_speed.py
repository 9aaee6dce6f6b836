"""bench's timed runs through ``llava_redundancy`` and through lmms-eval's own ``llava_hf`` (the GPU-only
comparison), on the tiny model on the CPU."""

from __future__ import annotations

import torch
from conftest import image

from lmms_eval_redundancy.core.budget import KEEP_ALL, Budget
from lmms_eval_redundancy.core.registry import build_method
from lmms_eval_redundancy.lmms.model import LlavaRedundancy
from lmms_eval_redundancy.tools.bench import (
    interleaved_runs,
    llava_hf_samples_per_second,
    never_ending,
)

DOCS = [{"question": "what is it ?", "visuals": [image(32, 32, seed)]} for seed in range(4)]


def test_methods_take_turns_on_one_model_keeping_the_batches_after_the_warm_up_and_every_token(tiny_models):
    wrapper = LlavaRedundancy(pretrained=str(tiny_models["llava"]), device="cpu", dtype="float32")
    never_ending(wrapper.model, wrapper.tokenizer.eos_token_id)
    methods = {"none": lambda: build_method("none", KEEP_ALL), "fastv": lambda: build_method("fastv", Budget("tokens", 4))}
    unpruned, fastv = interleaved_runs(wrapper, methods, DOCS, batch_size=2, samples=1, new_tokens=3)
    assert [s["efficiency"]["batch_index"] for s in fastv.samples] == [3, 3]  # turns: none, fastv, none, fastv
    assert sorted(fastv.device_prefill) == sorted(unpruned.device_prefill) == [2, 3]  # 0 and 1: the warm-up
    assert fastv.seconds > 0 and all(s["units"][0]["after"] == 4 for s in fastv.samples)
    assert all(s["units"][0]["after"] == 16 for s in unpruned.samples)
    assert not wrapper.model.model.language_model.layers[1]._forward_pre_hooks  # each turn's hooks are gone
    text = wrapper.model.config.text_config
    kv_per_token = 2 * text.num_hidden_layers * text.hidden_size // text.num_attention_heads * text.num_key_value_heads * 4
    prompt = len(wrapper.tokenizer(wrapper._prompt(DOCS[0]["question"], 1, 0)).input_ids) - 1 + 16  # 16 visual tokens
    assert unpruned.samples[0]["efficiency"]["kv_cache_bytes"] == kv_per_token * (prompt + 3 - 1)  # all 3 tokens made


def test_lmms_eval_s_llava_hf_answers_the_bench_requests_at_a_positive_rate(tiny_models):
    rate = llava_hf_samples_per_second(tiny_models["llava"], DOCS, torch.device("cpu"), torch.float32, samples=1, new_tokens=2)
    assert rate > 0
