"""The real ``python -m lmms_eval`` and ``accelerate launch`` commands: one run per distinct path.

Each family runs every task kind (images, image pairs, video, multiple choice) with a method of another
kind (inside-LLM pruning, a vision-tower hook, seeded before-LLM selection); two processes against one.
Every method on every family goes through lmms-eval's evaluator in-process in
``integration/test_local_tasks.py``; the built-in model's accuracy in ``integration/test_builtin_model.py``;
the built-in model through the command from a wheel install in ``e2e/test_package.py``.
"""

from __future__ import annotations

import pytest
from conftest import LOCAL_DOCS, LOCAL_REQUESTS, run_lmms_eval, sample_outputs

PATHS = {  # family -> a method whose path differs from the others'
    "llava": "method=fastv,retention=0.5,fastv_k=2",
    "llava_next": "method=fastervlm,retention=0.5",
    "llava_onevision": "method=random,retention=0.5",
}


@pytest.fixture(scope="module")
def single_runs(tiny_models, local_tasks, tmp_path_factory):
    """One process per family, run once: ``family -> (results, tokens, folder)``."""
    root = tmp_path_factory.mktemp("runs")
    return {family: run_lmms_eval(f"pretrained={tiny_models[family]},{PATHS[family]}", root / family, local_tasks)
            for family in PATHS}


@pytest.mark.parametrize("family", PATHS)
def test_every_task_kind_runs_and_writes_results_and_token_summary(single_runs, family):
    results, tokens, folder = single_runs[family]
    assert set(results["results"]) >= set(LOCAL_DOCS)
    assert results["config"]["model_args"].startswith("pretrained=")
    assert tokens["samples"] == LOCAL_REQUESTS
    assert tokens["settings"]["method"] == PATHS[family].split(",")[0].removeprefix("method=")
    assert tokens["settings"]["family"] == family
    assert tokens["frames"] > 0 and tokens["images"] > 0
    assert 0.45 < tokens["achieved_retention"] < 0.55
    assert tokens["visual_tokens_after"] < tokens["visual_tokens_before"]
    if family != "llava":
        assert tokens["newline_tokens_after"] == tokens["newline_tokens_before"] > 0
    (log,) = folder.glob("tokens/*/rank0.jsonl")
    assert not log.parent.name.isdigit()  # named by the launch, not by a process id


def test_two_cpu_processes_give_the_same_outputs_as_one(single_runs, tiny_models, local_tasks, tmp_path):
    _, tokens_one, folder_one = single_runs["llava_next"]
    args = f"pretrained={tiny_models['llava_next']},{PATHS['llava_next']}"
    _, tokens_two, folder_two = run_lmms_eval(args, tmp_path / "two", local_tasks, processes=2)
    assert tokens_two["world_size"] == 2
    assert tokens_two["samples"] == tokens_one["samples"] == LOCAL_REQUESTS
    for key in ("visual_tokens_before", "visual_tokens_after", "achieved_retention"):
        assert tokens_two[key] == tokens_one[key]
    one, two = sample_outputs(folder_one), sample_outputs(folder_two)
    assert one.keys() == two.keys()
    for key in one:
        if key[1].startswith("tiny_image_choice"):  # loglikelihoods: batches differ, so the last bits may too
            assert [g for _, g in two[key]] == [g for _, g in one[key]]
            assert [float(s) for s, _ in two[key]] == pytest.approx([float(s) for s, _ in one[key]], abs=1e-4)
        else:
            assert two[key] == one[key]
