"""The built-in shapes model and its codebook: resolvable, recorded, fitting each other, retrainable; the main job's spec."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoProcessor,
    LlavaOnevisionForConditionalGeneration,
)

from lmms_eval_redundancy.codebook.store import load_codebook
from lmms_eval_redundancy.core.registry import UNPRUNED
from lmms_eval_redundancy.embedded.demo import sweep_spec
from lmms_eval_redundancy.embedded.shapes_codebook import CODEBOOK
from lmms_eval_redundancy.embedded.training import TASKS, TrainSettings, train
from lmms_eval_redundancy.methods import available_methods
from lmms_eval_redundancy.runtime.loading import (
    BUILTIN,
    builtin_names,
    resolve_pretrained,
)

SHAPES = Path(str(BUILTIN / "shapes"))


def test_builtin_names_resolve_and_unknown_ones_are_refused():
    assert builtin_names() == ["shapes"]
    assert resolve_pretrained("builtin:shapes") == str(SHAPES)
    assert resolve_pretrained("some/hub-id") == "some/hub-id"
    with pytest.raises(ValueError, match="builtin:shapes"):
        resolve_pretrained("builtin:nope")


def test_committed_model_has_its_training_record():
    record = json.loads((SHAPES / "training_record.json").read_text())
    stage_one = json.loads(json.dumps(TrainSettings().__dict__))
    # stage 1: train-shapes with the defaults (recorded before task_weights and init_from existed; their
    # defaults, a plain round robin from scratch, are what it did)
    assert record["previous"]["settings"] == {k: v for k, v in stage_one.items() if k not in ("task_weights", "init_from")}
    assert record["settings"]["init_from"] and record["settings"]["task_weights"] == [1, 2, 1]
    assert all(record["held_out_accuracy"][-1]["accuracy"][task] >= 0.85 for task in TASKS)
    assert record["parameters"] < 2_000_000


def test_committed_codebook_fits_the_model_and_carries_its_thresholds():
    codebook = load_codebook(CODEBOOK)
    config = AutoConfig.from_pretrained(SHAPES)
    assert codebook.hidden_size == config.text_config.hidden_size
    thresholds = json.loads(codebook.meta["thresholds"])
    assert thresholds == sorted(thresholds) and len(thresholds) >= 2
    assert codebook.meta["model"] == "builtin:shapes"
    assert (CODEBOOK.parent / "report.json").is_file() and (CODEBOOK.parent / "report_scatter.png").is_file()


def test_main_job_sweeps_every_method_at_several_budgets(tmp_path):
    spec = sweep_spec(tmp_path / "results", tmp_path / "tasks", batch_size=8)
    methods = {m["method"]: m for m in spec["methods"]}
    assert set(methods) == set(available_methods()) - {UNPRUNED}
    assert all(0.05 in m["budgets"]["retention"] and len(m["budgets"]["retention"]) >= 3 for m in methods.values())
    assert len(methods["codebook"]["budgets"]["threshold"]) >= 2 and methods["codebook"]["codebook"] == str(CODEBOOK)
    assert methods["pooling"]["anyres"] == "base_only"  # pooling needs a token grid: the base view
    assert all(str(tmp_path) in spec[key] for key in ("output", "include_path"))


def test_a_few_training_steps_run_and_save_a_loadable_model(tmp_path):
    settings = TrainSettings(docs=16, steps=3, batch_size=4, eval_docs=8, eval_every=3)
    record = train(tmp_path, settings, progress=False)
    assert len(record["held_out_accuracy"]) == 1 and record["settings"]["steps"] == 3
    assert all(torch.isfinite(torch.tensor(step["answer_loss"])) for step in record["loss_every_50_steps"])
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path)
    assert model.config.vision_feature_select_strategy == "default"  # CLIP tower: [CLS] dropped before the LLM
    assert AutoProcessor.from_pretrained(tmp_path).num_image_tokens == 65
