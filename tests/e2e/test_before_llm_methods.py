"""``visionzip``, ``vispruner``, ``cdpruner`` and ``hiprune`` through the real ``python -m lmms_eval`` on every
family each supports, batch 1 equal to batch 2, and on the built-in shapes model as the main job runs them."""

from __future__ import annotations

import pytest
from conftest import run_lmms_eval, sample_outputs, supports, tiny_clip

from lmms_eval_redundancy.embedded.demo import TASKS as SHAPES_TASKS
from lmms_eval_redundancy.embedded.demo import shapes_clip_text
from lmms_eval_redundancy.families import FAMILIES

TASKS = "tiny_image,tiny_multi_image,tiny_video"
METHODS = ("visionzip", "vispruner", "cdpruner", "hiprune")


def method_args(method: str, clip_text) -> str:
    """model_args of ``method`` (cdpruner with the CLIP checkpoint ``clip_text()``)."""
    return f"method={method}" + (f",clip_text={clip_text()}" if method == "cdpruner" else "")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_batch_of_two_gives_the_outputs_of_batch_one(tiny_models, local_tasks, tmp_path, family, method):
    if not supports(method, family):
        pytest.skip(f"{method} needs a [CLS] token; the tiny {family} tower has none")
    args = f"pretrained={tiny_models[family]},{method_args(method, tiny_clip)},retention=0.4"
    runs = [run_lmms_eval(args, tmp_path / str(size), local_tasks, tasks=TASKS, batch_size=size, limit=4)
            for size in (1, 2)]
    (_, one, folder_one), (_, two, folder_two) = runs
    assert one["settings"]["method"] == method and one["visual_tokens_after"] < one["visual_tokens_before"]
    assert two["visual_tokens_after"] == one["visual_tokens_after"]
    assert sample_outputs(folder_two) == sample_outputs(folder_one)


@pytest.mark.parametrize("method", METHODS)
def test_the_main_jobs_cells_run_on_the_builtin_model(local_tasks, tmp_path, method):
    args = method_args(method, lambda: shapes_clip_text(tmp_path / "clip_text"))
    _, tokens, _ = run_lmms_eval(f"pretrained=builtin:shapes,{args},retention=0.1", tmp_path / "run", local_tasks,
                                 tasks=SHAPES_TASKS, batch_size=8, limit=8)
    assert tokens["images"] > 0 and tokens["frames"] > 0
    assert 0 < tokens["visual_tokens_after"] < 0.2 * tokens["visual_tokens_before"]
