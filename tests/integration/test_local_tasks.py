"""Every method on every family over every local task kind, through lmms-eval's
evaluator in-process (task loading, requests, filters and metrics as in a real run)."""

from __future__ import annotations

import pytest
from conftest import (
    LOCAL_DOCS,
    LOCAL_TASKS,
    evaluate,
    method_cases,
    supports,
    with_files,
)

from lmms_eval_redundancy.families import FAMILIES
from lmms_eval_redundancy.lmms.model import LlavaRedundancy


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", method_cases())
def test_every_method_runs_every_task_kind(tiny_models, tiny_codebook, local_tasks, family, method):
    """Two documents of each task (four requests per multiple-choice document) at batch 2; batch 2 against
    batch 1: tests/integration/test_model.py."""
    if not supports(method, family):
        pytest.skip(f"{method} needs a [CLS] token; the tiny {family} tower has none")
    args = with_files(method_cases()[method], tiny_codebook[0])
    wrapper = LlavaRedundancy(pretrained=str(tiny_models[family]), device="cpu", batch_size=2, **args)
    results, tokens = evaluate(wrapper, LOCAL_TASKS, local_tasks, limit=2)
    assert set(results["results"]) >= set(LOCAL_DOCS)
    assert tokens["samples"] == 2 + 2 + 2 + 2 * 4 and tokens["frames"] > 0 and tokens["images"] > 0
    assert 0 < tokens["visual_tokens_after"] < tokens["visual_tokens_before"]
    assert wrapper.engine.settings()["method"] == args["method"]


def test_codebook_threshold_run_keeps_fewer_tokens_and_records_the_codebook_by_content(tiny_models, tiny_codebook,
                                                                                       local_tasks):
    codebook, threshold = tiny_codebook
    wrapper = LlavaRedundancy(pretrained=str(tiny_models["llava"]), device="cpu", method="codebook",
                              codebook=str(codebook), threshold=threshold)
    results, tokens = evaluate(wrapper, "tiny_image,tiny_video", local_tasks)
    assert set(results["results"]) == {"tiny_image", "tiny_video"}
    assert 0 < tokens["visual_tokens_after"] < tokens["visual_tokens_before"]
    settings = wrapper.ledger.settings
    assert settings["variant"] == "threshold" and settings["prototypes"] == 6
    assert settings["codebook"].startswith("tiny-") and settings["paths"]["codebook"] == str(codebook)


def test_data_of_another_generator_version_is_regenerated_not_reused(tmp_path):
    from lmms_eval_redundancy.embedded.tasks import write_local_tasks

    data = write_local_tasks(tmp_path, shapes_docs=6) / "data"
    first = (data / "shapes" / "shapes_image.parquet").stat().st_mtime_ns
    write_local_tasks(tmp_path, shapes_docs=6)
    assert (data / "shapes" / "shapes_image.parquet").stat().st_mtime_ns == first  # same stamp: reused
    (data / "stamp.txt").write_text("an older generator")
    (data / "shapes" / "leftover.txt").write_text("from the older data")
    write_local_tasks(tmp_path, shapes_docs=6)
    assert not (data / "shapes" / "leftover.txt").exists() and (data / "stamp.txt").read_text() != "an older generator"
