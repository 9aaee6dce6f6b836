"""SparseVLM and FEATHER through the real ``python -m lmms_eval`` on every family: batch 1 equals batch 2, and
the token summary holds every decoder layer's visual tokens."""

from __future__ import annotations

import json

import pytest
from conftest import FAMILIES, run_lmms_eval, sample_outputs

TASKS = "tiny_image,tiny_multi_image"
ARGS = {"sparsevlm": "method=sparsevlm,tokens=128", "feather": "method=feather,retention=0.3"}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ARGS)
def test_batch_of_two_equals_batch_of_one_with_per_layer_counts(tiny_models, local_tasks, tmp_path, method, family):
    runs = {size: run_lmms_eval(f"pretrained={tiny_models[family]},{ARGS[method]}", tmp_path / str(size), local_tasks,
                                batch_size=size, tasks=TASKS, limit=2) for size in (1, 2)}
    (_, one, folder_one), (_, two, folder_two) = runs[1], runs[2]
    assert sample_outputs(folder_one) == sample_outputs(folder_two)
    for key in ("visual_tokens_before", "visual_tokens_after", "visual_tokens_layer_mean"):
        assert one[key] == two[key]
    assert one["settings"]["method"] == method and one["visual_tokens_layer_mean"] > one["visual_tokens_after"]
    (log,) = folder_one.glob("tokens/*/rank0.jsonl")
    units = [u for line in log.read_text().splitlines() for u in json.loads(line)["units"]]
    assert all(len(u["layers"]) == 4 and u["layers"][0] == u["before"] and u["layers"][-1] == u["after"] for u in units)
