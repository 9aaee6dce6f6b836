"""The real ``python -m lmms_eval`` and ``accelerate launch`` commands: one run per distinct path.

Each family runs every task kind (images, image pairs, video, multiple choice) with a method of another
kind (inside-LLM pruning, a vision-tower hook, seeded before-LLM selection); two processes against one;
the built-in model on the shapes group. Every method on every family (both batch sizes) goes through
lmms-eval's evaluator in-process in ``integration/test_local_tasks.py``.
"""

from __future__ import annotations

import pytest
from conftest import LOCAL_DOCS, LOCAL_REQUESTS, run_lmms_eval, sample_outputs

from lmms_eval_redundancy.embedded.training import TASKS as SHAPES_TASKS

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


SUBSET = 24  # docs per shapes task: a fixed subset (the first ones) of the benchmark


def test_builtin_model_is_accurate_unpruned_and_loses_accuracy_at_5_percent(local_tasks, tmp_path):
    """The shapes group through lmms_eval with the shipped model: it reads the pictures, and pruning hurts."""
    full, tokens, _ = run_lmms_eval("pretrained=builtin:shapes", tmp_path / "full", local_tasks, tasks="shapes",
                                    batch_size=8, limit=SUBSET)
    scores = {task: full["results"][task]["exact_match,none"] for task in SHAPES_TASKS}
    assert all(score >= 0.85 for score in scores.values()), scores
    assert tokens["settings"]["pretrained"] == "builtin:shapes"
    assert tokens["images"] > 0 and tokens["frames"] > 0
    pruned, _, _ = run_lmms_eval("pretrained=builtin:shapes,method=random,retention=0.05", tmp_path / "pruned",
                                 local_tasks, tasks=",".join(SHAPES_TASKS), batch_size=8, limit=SUBSET)
    dropped = {task: pruned["results"][task]["exact_match,none"] for task in SHAPES_TASKS}
    assert sum(dropped.values()) / 3 < sum(scores.values()) / 3 - 0.2, (scores, dropped)
