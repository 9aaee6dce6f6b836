"""Whole codebook builds in-process on a tiny model: loadable, repeatable, clear refusals (bad settings named)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import build_settings as settings
from conftest import same_codebook

from lmms_eval_redundancy.codebook.builder import (
    BuildError,
    build_codebook,
)
from lmms_eval_redundancy.codebook.store import load_codebook
from lmms_eval_redundancy.core.errors import UserError


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


# ---- the probe settings: article skip on every probe kind, pad embedding, exact prompt text -------------

def prober(tiny_models, **changes):
    from lmms_eval_redundancy.codebook.builder import Prober
    from lmms_eval_redundancy.runtime.loading import load

    loaded = load(str(tiny_models["llava"]), device="cpu")
    return Prober(loaded.model, loaded.processor, loaded.family, settings(**changes))


def test_an_article_first_token_is_skipped_by_reading_the_next_token(tiny_models):
    plain = prober(tiny_models, skip_article=False)
    tokens = torch.randn(3, 1, plain.embed.weight.shape[1])
    first = plain.first_token_logits(tokens).argmax(-1)
    word = plain.processor.tokenizer.convert_ids_to_tokens(int(first[0]))
    skipping = prober(tiny_models, skip_article=True, articles=(word,))
    assert skipping.article_ids == [int(first[0])]
    skipped = skipping.first_token_logits(tokens, skip_article=True)
    for row in range(3):  # the official rule: the greedy next step after the article
        embeds = torch.cat([plain.prefix[0], tokens[row], plain.suffix[0]])
        if first[row] == first[0]:
            embeds = torch.cat([embeds, plain.embed(first[row:row + 1])])
        with torch.no_grad():
            expected = plain.model(inputs_embeds=embeds[None]).logits[0, -1]
        torch.testing.assert_close(skipped[row], expected.float(), rtol=1e-4, atol=1e-4)


def test_every_probe_kind_skips_the_article(tiny_models, monkeypatch):
    probe = prober(tiny_models, skip_article=True)
    calls = []
    original = probe.first_token_logits
    monkeypatch.setattr(probe, "first_token_logits", lambda visual, skip_article=False: calls.append(skip_article)
                        or original(visual, skip_article))
    probe.probe(torch.randn(16, probe.embed.weight.shape[1]), (4, 4))
    assert calls == [True, True, True, True]  # single tokens, context windows, the full image, the padded images


def test_pad_embedding_and_prompt_text_are_the_settings(tiny_models):
    probe = prober(tiny_models, pad_token_id=5, prompt_text="user : <image> what color ? assistant :")
    torch.testing.assert_close(probe.pad, probe.embed.weight[5])
    tokenizer = probe.processor.tokenizer
    torch.testing.assert_close(probe.prefix[0], probe.embed(torch.tensor(tokenizer("user : ").input_ids)))
    torch.testing.assert_close(probe.suffix[0], probe.embed(torch.tensor(
        tokenizer(" what color ? assistant :", add_special_tokens=False).input_ids)))
    default = prober(tiny_models, pad_token_id=None, prompt_text=None)
    torch.testing.assert_close(default.pad, default.embed.weight[tokenizer.pad_token_id])
    with pytest.raises(BuildError, match="exactly once"):
        prober(tiny_models, prompt_text="no image here")


# ---- refusals before any probing: settings, the output folder -------------------------------------------

@pytest.mark.parametrize(("changes", "message"), [
    ({"batch_size": 0}, "build setting batch_size=0 is not a whole number >= 1"),
    ({"jsd_thres": "low"}, "build setting jsd_thres='low' is not a finite number"),
    ({"skip_article": "yes"}, "build setting skip_article='yes' is not true or false"),
    ({"prob_thresh": 0.1}, r"unknown build setting\(s\) prob_thresh \(did you mean prob_thres\?\)"),
])
def test_bad_build_settings_are_refused_naming_the_setting(tmp_path, changes, message):
    from lmms_eval_redundancy.codebook.builder import load_settings

    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump({"preset": "llava15", **changes}))
    with pytest.raises(BuildError, match=message):
        load_settings(path)


def test_a_number_yaml_reads_as_text_is_taken_as_the_number(tmp_path):
    from lmms_eval_redundancy.codebook.builder import load_settings

    path = tmp_path / "settings.yaml"
    path.write_text("preset: llava15\njsd_thres: 2e-3\n")  # YAML 1.1 reads 2e-3 (no dot) as a string
    assert load_settings(path).jsd_thres == 0.002


def test_an_output_folder_that_cannot_be_made_is_refused_before_probing(tiny_models, training_images, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="cannot create the output folder"):
        build_codebook(str(tiny_models["llava"]), training_images, tmp_path / "file" / "out", settings())
