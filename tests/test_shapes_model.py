"""The built-in shapes model and its codebook: resolvable, accurate unpruned, sensitive to pruning, retrainable."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO
from test_lmms_eval_e2e import run_lmms_eval

from lmms_eval_redundancy.shapes_model import BUILTIN, TASKS, TrainSettings, resolve_pretrained, train

SUBSET = 24  # docs per task: a fixed subset (the first ones) of the benchmark


def test_builtin_names_resolve_and_unknown_ones_are_refused():
    assert resolve_pretrained("builtin:shapes") == str(BUILTIN["shapes"])
    assert resolve_pretrained("some/hub-id") == "some/hub-id"
    with pytest.raises(ValueError, match="builtin:shapes"):
        resolve_pretrained("builtin:nope")


def test_committed_model_has_its_training_record():
    record = json.loads((BUILTIN["shapes"] / "training_record.json").read_text())
    stage_one = json.loads(json.dumps(TrainSettings().__dict__))
    # stage 1: train-shapes with the defaults (recorded before task_weights and init_from existed; their
    # defaults, a plain round robin from scratch, are what it did)
    assert record["previous"]["settings"] == {k: v for k, v in stage_one.items() if k not in ("task_weights", "init_from")}
    assert record["settings"]["init_from"] and record["settings"]["task_weights"] == [1, 2, 1]
    assert all(record["held_out_accuracy"][-1]["accuracy"][task] >= 0.85 for task in TASKS)
    assert record["parameters"] < 2_000_000


def test_committed_model_is_accurate_unpruned_and_loses_accuracy_at_5_percent(local_data, tmp_path):
    tasks = ",".join(TASKS)
    full, tokens, _ = run_lmms_eval("pretrained=builtin:shapes", tmp_path / "full", tasks=tasks, batch_size=8,
                                    limit=SUBSET)
    scores = {task: full["results"][task]["exact_match,none"] for task in TASKS}
    assert all(score >= 0.85 for score in scores.values()), scores
    assert tokens["settings"]["pretrained"] == "builtin:shapes"
    pruned, _, _ = run_lmms_eval("pretrained=builtin:shapes,method=random,retention=0.05", tmp_path / "pruned",
                                 tasks=tasks, batch_size=8, limit=SUBSET)
    dropped = {task: pruned["results"][task]["exact_match,none"] for task in TASKS}
    assert sum(dropped.values()) / 3 < sum(scores.values()) / 3 - 0.2, (scores, dropped)


def test_committed_codebook_fits_the_model_and_carries_its_thresholds():
    from transformers import AutoConfig

    from lmms_eval_redundancy.codebook.store import load_codebook
    from lmms_eval_redundancy.demo import CODEBOOK

    codebook = load_codebook(CODEBOOK)
    config = AutoConfig.from_pretrained(BUILTIN["shapes"])
    assert codebook.hidden_size == config.text_config.hidden_size
    thresholds = json.loads(codebook.meta["thresholds"])
    assert thresholds == sorted(thresholds) and len(thresholds) >= 2
    assert codebook.meta["model"] == "builtin:shapes"
    assert (CODEBOOK.parent / "report.json").is_file() and (CODEBOOK.parent / "report_scatter.png").is_file()


def test_main_job_sweeps_every_method_at_several_budgets():
    from lmms_eval_redundancy.demo import sweep_spec
    from lmms_eval_redundancy.registry import available_methods

    spec = sweep_spec(REPO / "results", batch_size=8)
    methods = {m["method"]: m["budgets"] for m in spec["methods"]}
    assert set(methods) == set(available_methods()) - {"none"}
    assert all(0.05 in budgets["retention"] and len(budgets["retention"]) >= 3 for budgets in methods.values())
    assert len(methods["codebook"]["threshold"]) >= 2


def test_a_few_training_steps_run_and_save_a_loadable_model(tmp_path):
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    settings = TrainSettings(docs=16, steps=3, batch_size=4, eval_docs=8, eval_every=3)
    record = train(tmp_path, settings, progress=False)
    assert len(record["held_out_accuracy"]) == 1 and record["settings"]["steps"] == 3
    assert all(torch.isfinite(torch.tensor(step["answer_loss"])) for step in record["loss_every_50_steps"])
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path)
    assert model.config.vision_feature_select_strategy == "default"  # CLIP tower: [CLS] dropped before the LLM
    assert AutoProcessor.from_pretrained(tmp_path).num_image_tokens == 65
