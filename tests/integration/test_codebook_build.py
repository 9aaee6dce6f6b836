"""Whole codebook builds in-process on a tiny model: loadable, repeatable, clear refusals."""

from __future__ import annotations

import json

import pytest
from conftest import build_settings as settings
from conftest import same_codebook

from lmms_eval_redundancy.codebook.builder import (
    BuildError,
    build_codebook,
)
from lmms_eval_redundancy.codebook.store import load_codebook


def test_build_writes_a_codebook_the_loader_accepts_and_repeats_byte_for_byte(tiny_models, training_images, tmp_path):
    first = build_codebook(str(tiny_models["llava"]), training_images, tmp_path / "a", settings())
    codebook = load_codebook(first)
    codebook.check_hidden_size(64)
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["images"] == 9 and report["unreadable"] == 1
    assert 0 < report["low_information"] < report["probed_tokens"] == 8 * 16
    assert codebook.prototypes.shape[0] == report["prototypes"] == len(json.loads(codebook.meta["image_ids"]))
    assert (tmp_path / "a" / "report_scatter.png").is_file() and (tmp_path / "a" / "report_clusters.png").is_file()
    second = build_codebook(str(tiny_models["llava"]), training_images, tmp_path / "b", settings())
    assert same_codebook(first, second)


def test_no_passing_token_names_the_thresholds_to_relax(tiny_models, training_images, tmp_path):
    with pytest.raises(BuildError, match="relax prob_thres .* or jsd_thres"):
        build_codebook(str(tiny_models["llava"]), training_images, tmp_path, settings(jsd_thres=1e-9))


def test_unsupported_model_is_refused(training_images, tmp_path):
    from transformers import BertConfig

    from lmms_eval_redundancy.families import UnsupportedModelError

    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(tmp_path / "bert")
    with pytest.raises(UnsupportedModelError):
        build_codebook(str(tmp_path / "bert"), training_images, tmp_path / "out", settings())
