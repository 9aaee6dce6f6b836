"""PyramidDrop and DART through the real ``python -m lmms_eval`` on every family: batch 2 gives the outputs and
per-layer token counts of batch 1."""

from __future__ import annotations

import json

import pytest
from conftest import FAMILIES, run_lmms_eval, sample_outputs

METHODS = {"pdrop": "method=pdrop,retention=0.5", "dart": "method=dart,tokens=8,pivot_image=1,pivot_text=1"}


def per_layer(folder) -> list:
    (tokens,) = folder.glob("*_tokens.json")
    samples = json.loads(tokens.read_text())["per_sample"]
    return sorted((s["task"], s["doc_id"], u["visual"], u["unit"], u["layers"]) for s in samples for u in s["units"])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_batch_of_two_equals_batch_of_one(tiny_models, local_tasks, tmp_path, method, family):
    runs = {size: run_lmms_eval(f"pretrained={tiny_models[family]},{METHODS[method]}", tmp_path / str(size), local_tasks,
                                batch_size=size, tasks="tiny_multi_image", limit=2) for size in (1, 2)}
    (_, tokens_one, one), (_, tokens_two, two) = runs[1], runs[2]
    assert tokens_one["settings"]["method"] == method
    assert sample_outputs(one) == sample_outputs(two)
    assert per_layer(one) == per_layer(two)
    assert tokens_one["visual_tokens_after"] < tokens_one["visual_tokens_layer_mean"] < tokens_one["visual_tokens_before"]
    assert 0 < tokens_one["llm_prefill_flops_ratio"] == tokens_two["llm_prefill_flops_ratio"] < 1
