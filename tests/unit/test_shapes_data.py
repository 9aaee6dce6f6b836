"""The synthetic shapes benchmark: deterministic, balanced, needs the picture."""

from __future__ import annotations

from collections import Counter

import datasets
import numpy as np
import pytest

from lmms_eval_redundancy.embedded import shapes

TASKS = ("shapes_image", "shapes_multi_image", "shapes_video")


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    first, second = tmp_path_factory.mktemp("a") / "shapes", tmp_path_factory.mktemp("b") / "shapes"
    shapes.generate(first, docs=48)
    shapes.generate(second, docs=48)
    return first, second


def rows(folder, task):
    return datasets.load_dataset("parquet", data_files={"test": str(folder / f"{task}.parquet")})["test"]


def test_generation_is_deterministic(generated):
    first, second = generated
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert len(files) == 3 + 24
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)


@pytest.mark.parametrize("task", TASKS)
def test_answers_are_balanced_within_each_question_type(generated, task):
    data = rows(generated[0], task)
    for kind in set(data["kind"]):
        counts = Counter(a for a, k in zip(data["answer"], data["kind"]) if k == kind)
        assert len(counts) >= 2 and max(counts.values()) - min(counts.values()) <= 1, (kind, counts)


@pytest.mark.parametrize("task", TASKS)
def test_a_model_without_the_picture_can_only_guess(generated, task):
    """The best answer per question text (all a blind model can know) is right at most about half the time."""
    data = rows(generated[0], task)
    by_question = {}
    for question, answer in zip(data["question"], data["answer"]):
        by_question.setdefault(question, Counter())[answer] += 1
    best = sum(max(c.values()) for c in by_question.values()) / len(data)
    assert best <= 0.6


def test_motion_clips_move_the_way_the_answer_says(generated):
    from decord import VideoReader

    data = rows(generated[0], "shapes_video")
    for doc in data:
        if doc["kind"] != "motion":
            continue
        frames = VideoReader(str(generated[0].parent / doc["video"])).get_batch([0, 7]).asnumpy().astype(int)
        assert frames.shape[0] == 2
        centres = []
        for frame in frames:
            saturated = (frame.max(axis=-1) - frame.min(axis=-1)) > 80  # the shape; the background is grey
            centres.append(np.nonzero(saturated)[1].mean())
        assert (centres[1] > centres[0]) == (doc["answer"] == "right")


def test_objects_cover_a_small_part_of_a_redundant_canvas(generated):
    """Coloured objects touch 10-20% of the 8-pixel patches on average; the rest is background and grey clutter."""
    images = [image.convert("RGB") for image in rows(generated[0], "shapes_image")["image"]]
    assert all(image.size == (shapes.CANVAS, shapes.CANVAS) for image in images)
    objects, clutter = shapes.patch_coverage(images)
    assert 0.10 <= objects <= 0.20
    assert 0 < clutter < 0.1
    assert min(shapes.patch_coverage([image])[1] for image in images) > 0  # every scene has distractors


def test_some_backgrounds_are_flat_and_others_vary():
    """Flat canvases occur beside gradients and textures (told apart by their spread of pixel values)."""
    rng = np.random.default_rng(0)
    spreads = [np.asarray(shapes.background(rng, shapes.CANVAS)).astype(int).std(axis=(0, 1)).mean() for _ in range(60)]
    assert min(spreads) < 3 and max(spreads) > 8  # flat canvases beside gradients and textures
