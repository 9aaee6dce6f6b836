"""The built-in shapes model and its codebook: resolvable, recorded, fitting each other, retrainable; the main job's spec."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import evaluate, method_cases
from PIL import Image
from transformers import (
    AutoConfig,
    AutoProcessor,
    LlavaOnevisionForConditionalGeneration,
)

from lmms_eval_redundancy.codebook.store import load_codebook
from lmms_eval_redundancy.core.registry import UNPRUNED, available_methods
from lmms_eval_redundancy.embedded import shapes
from lmms_eval_redundancy.embedded.demo import TASKS as SHAPES_TASKS
from lmms_eval_redundancy.embedded.demo import shapes_clip_text, sweep_spec
from lmms_eval_redundancy.embedded.shapes_codebook import CODEBOOK
from lmms_eval_redundancy.embedded.training import (
    TASKS,
    TrainSettings,
    answer_accuracy,
    answer_logits,
    encode,
    train,
)
from lmms_eval_redundancy.lmms.model import LlavaRedundancy
from lmms_eval_redundancy.runtime.loading import (
    BUILTIN,
    builtin_names,
    load,
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
    """Three recorded stages: from scratch, a longer look at image pairs, then 128-pixel scenes with token dropout."""
    record = json.loads((SHAPES / "training_record.json").read_text())
    stages = [record, record["previous"], record["previous"]["previous"]]
    assert stages[2]["settings"].get("init_from") is None and stages[2].get("previous") is None  # from scratch
    assert len(record["commands"]) == 3 and "--init-from STAGE2" in record["commands"][2]
    assert stages[1]["settings"]["init_from"] and stages[1]["settings"]["task_weights"] == [1, 2, 1]
    assert record["settings"]["init_from"] and record["settings"]["canvas"] == shapes.CANVAS
    assert record["settings"]["dropout_steps"] > 0 and record["settings"]["max_dropout"] == 0.9
    assert any(step["dropout"] > 0 for step in record["loss_every_50_steps"])
    assert all(record["held_out_accuracy"][-1]["accuracy"][task] >= 0.9 for task in TASKS)
    assert record["parameters"] < 2_000_000


def test_without_the_picture_the_model_is_near_chance():
    """The benchmark's first single-image questions: answered from the picture, near chance (0.31) on blank canvases."""
    loaded = load("builtin:shapes", device="cpu")
    docs = [{**doc, "images": [Image.open(io.BytesIO(doc["image"]["bytes"]))], "videos": []}
            for doc in shapes.image_docs(48, np.random.default_rng([0, 0]), shapes.CANVAS)]
    rng = np.random.default_rng(5)
    blank = [{**doc, "images": [shapes.background(rng, shapes.CANVAS)]} for doc in docs]
    assert answer_accuracy(loaded.model, loaded.processor, docs) >= 0.9
    assert answer_accuracy(loaded.model, loaded.processor, blank) <= 0.45


def test_training_forward_without_dropout_is_the_plain_forward():
    """Training's spliced forward equals the model's own when nothing is dropped, and differs when tokens are."""
    loaded = load("builtin:shapes", device="cpu")
    docs = [{**doc, "images": [Image.open(io.BytesIO(doc["image"]["bytes"]))], "videos": []}
            for doc in shapes.image_docs(4, np.random.default_rng(3), shapes.CANVAS)]
    inputs = encode(loaded.processor, docs, with_answer=True)
    with torch.no_grad():
        plain = loaded.model(**inputs, logits_to_keep=3).logits[:, :2]
        spliced = answer_logits(loaded.model, loaded.processor, loaded.family, docs, inputs)
        dropped = answer_logits(loaded.model, loaded.processor, loaded.family, docs, inputs, dropout=0.8)
    torch.testing.assert_close(spliced, plain, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(dropped, plain, atol=1e-3)


def test_training_gradients_reach_the_vision_tower_through_dropped_tokens():
    loaded = load("builtin:shapes", device="cpu")
    docs = [{**doc, "images": [Image.open(io.BytesIO(doc["image"]["bytes"]))], "videos": []}
            for doc in shapes.image_docs(2, np.random.default_rng(3), shapes.CANVAS)]
    answer_logits(loaded.model, loaded.processor, loaded.family, docs,
                  encode(loaded.processor, docs, with_answer=True), dropout=0.5).sum().backward()
    tower = loaded.model.model.vision_tower
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tower.parameters())


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
    assert all(m["budgets"]["retention"] == [0.1, 0.25] for m in methods.values())
    # the codebook also at the thresholds calibrated to keep those shares of the tokens
    assert methods["codebook"]["budgets"]["threshold"] == json.loads(load_codebook(CODEBOOK).meta["thresholds"])[:2]
    assert methods["codebook"]["codebook"] == str(CODEBOOK)
    assert methods["pooling"]["anyres"] == "base_only"  # pooling needs a token grid: the base view
    assert all(str(tmp_path) in spec[key] for key in ("output", "include_path"))


@pytest.mark.parametrize("method", method_cases())
def test_every_method_runs_on_the_builtin_model_as_the_main_job_runs_it(local_tasks, tmp_path, method):
    files = {"<codebook>": str(CODEBOOK), "<clip_text>": str(shapes_clip_text(tmp_path / "clip_text"))}
    args = {key: files.get(value, value) if isinstance(value, str) else value for key, value in method_cases()[method].items()}
    args["retention" if "retention" in args else "tokens"] = 0.1 if "retention" in args else 6
    wrapper = LlavaRedundancy(pretrained="builtin:shapes", batch_size=8, **args)
    _, tokens = evaluate(wrapper, SHAPES_TASKS, local_tasks, limit=4)
    assert tokens["images"] > 0 and tokens["frames"] > 0
    assert tokens["visual_tokens_after"] < tokens["visual_tokens_before"] and tokens["visual_tokens_layer_mean"] > 0


SUBSET = 24  # docs per shapes task: a fixed subset (the first ones) of the benchmark


def test_builtin_model_is_accurate_unpruned_and_loses_accuracy_at_5_percent(local_tasks):
    """The shapes group through lmms-eval's evaluator with the shipped model: it reads the pictures, and pruning hurts."""
    full, tokens = evaluate(LlavaRedundancy(pretrained="builtin:shapes", batch_size=8), "shapes", local_tasks, limit=SUBSET)
    scores = {task: full["results"][task]["exact_match,none"] for task in TASKS}
    assert all(score >= 0.85 for score in scores.values()), scores
    assert tokens["images"] > 0 and tokens["frames"] > 0
    pruned, _ = evaluate(LlavaRedundancy(pretrained="builtin:shapes", batch_size=8, method="random", retention=0.05),
                         ",".join(TASKS), local_tasks, limit=SUBSET)
    dropped = {task: pruned["results"][task]["exact_match,none"] for task in TASKS}
    assert sum(dropped.values()) / 3 < sum(scores.values()) / 3 - 0.2, (scores, dropped)


def test_a_few_training_steps_run_and_save_a_loadable_model(tmp_path):
    settings = TrainSettings(docs=16, steps=3, batch_size=4, eval_docs=8, eval_every=3, dropout_steps=1.0)
    record = train(tmp_path, settings, progress=False)
    assert len(record["held_out_accuracy"]) == 1 and record["settings"]["steps"] == 3
    assert all(0 <= step["dropout"] <= 0.9 for step in record["loss_every_50_steps"])
    assert all(torch.isfinite(torch.tensor(step["answer_loss"])) for step in record["loss_every_50_steps"])
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path)
    assert model.config.vision_feature_select_strategy == "default"  # CLIP tower: [CLS] dropped before the LLM
    assert AutoProcessor.from_pretrained(tmp_path).num_image_tokens == 65
