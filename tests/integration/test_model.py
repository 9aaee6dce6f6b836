"""The llava_redundancy wrapper in-process: exactness against plain transformers, batching, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    FAMILIES,
    image,
    method_cases,
    requests_for,
    supports,
    tiny_wrapper,
    with_files,
)

from lmms_eval_redundancy.codebook.store import CodebookError
from lmms_eval_redundancy.core.budget import BudgetError
from lmms_eval_redundancy.core.registry import MethodError, Stage
from lmms_eval_redundancy.lmms.model import LlavaRedundancy

DOCS = [
    {"question": "what color is this ?", "visuals": [image(32, 32, 0)], "target": " red"},
    {"question": "which image is blue ?", "visuals": [image(48, 32, 1), image(32, 56, 2)], "target": " first"},
    {"question": "what does this image show ?", "visuals": [image(64, 40, 3)], "target": " circle"},
    {"question": "is it yes or no ?", "visuals": [], "target": " yes"},
]


def plain_generate(w: LlavaRedundancy, doc: dict, max_new_tokens: int = 6) -> list[int]:
    """Transformers' own generate on the same prompt, no pruning machinery involved."""
    prompt = w._prompt(doc["question"], len(doc["visuals"]), 0)
    images = [doc["visuals"]] if doc["visuals"] else None
    inputs = w.processor(text=[prompt], images=images, return_tensors="pt")
    out = w.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                           suppress_tokens=w.engine.family.placeholder_ids,
                           pad_token_id=w.tokenizer.pad_token_id, eos_token_id=w.tokenizer.eos_token_id)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def pruned_generate(w: LlavaRedundancy, doc: dict, max_new_tokens: int = 6) -> list[int]:
    requests = requests_for(w, [doc])
    _, batch, _ = w._build([requests[0].args])
    out = w.model.generate(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                           max_new_tokens=max_new_tokens, do_sample=False,
                           suppress_tokens=w.engine.family.placeholder_ids,
                           pad_token_id=w.tokenizer.pad_token_id, eos_token_id=w.tokenizer.eos_token_id)
    return out[0].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_method_none_gives_the_tokens_of_plain_generate(tiny_models, family):
    w = tiny_wrapper(tiny_models[family])
    for doc in DOCS:
        expected = plain_generate(w, doc)
        assert len(expected) == 6  # a real continuation, not an immediate stop
        assert pruned_generate(w, doc) == expected


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", [{"method": "none"}, {"method": "random", "retention": 0.5}])
def test_batch_of_two_equals_batch_of_one(tiny_models, family, method):
    one = tiny_wrapper(tiny_models[family], batch_size=1, **method)
    two = tiny_wrapper(tiny_models[family], batch_size=2, **method)
    assert two.generate_until(requests_for(two, DOCS)) == one.generate_until(requests_for(one, DOCS))
    ll_one = one.loglikelihood(requests_for(one, DOCS, "loglikelihood"))
    ll_two = two.loglikelihood(requests_for(two, DOCS, "loglikelihood"))
    assert [r.text[1] for r in ll_one] == [r.text[1] for r in ll_two]
    assert [r.text[0] for r in ll_one] == pytest.approx([r.text[0] for r in ll_two], abs=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_loglikelihood_scores_the_continuation_as_a_suffix(tiny_models, family):
    w = tiny_wrapper(tiny_models[family])
    results = w.loglikelihood(requests_for(w, DOCS, "loglikelihood"))
    for doc, result in zip(DOCS, results):
        prompt = w._prompt(doc["question"], len(doc["visuals"]), 0)
        full = w.processor(text=[prompt + doc["target"]], images=[doc["visuals"]] if doc["visuals"] else None,
                           return_tensors="pt")
        n = len(w.tokenizer(prompt + doc["target"]).input_ids) - len(w.tokenizer(prompt).input_ids)
        with torch.no_grad():
            logits = w.model(**full).logits[0]
        target = full["input_ids"][0, -n:]
        expected = torch.log_softmax(logits[-n - 1:-1], -1).gather(-1, target[:, None]).sum().item()
        assert result.text[0] == pytest.approx(expected, abs=1e-4)


def test_pruning_changes_what_the_llm_sees_and_is_recorded(tiny_models):
    w = tiny_wrapper(tiny_models["llava"], method="random", tokens=3)
    w.generate_until(requests_for(w, DOCS[:2]))
    units = [u for sample in w.ledger.samples for u in sample["units"]]
    assert [u["before"] for u in units] == [16, 16, 16]
    assert [u["after"] for u in units] == [3, 3, 3]


def test_two_wrappers_with_different_methods_do_not_interfere(tiny_models):
    from transformers import LlavaForConditionalGeneration, LlavaModel

    classes = (LlavaRedundancy, LlavaForConditionalGeneration, LlavaModel)
    before = {cls: dict(vars(cls)) for cls in classes}
    plain = tiny_wrapper(tiny_models["llava"])
    reference = plain.generate_until(requests_for(plain, DOCS))
    pruned = tiny_wrapper(tiny_models["llava"], method="random", tokens=1)
    pruned_out = pruned.generate_until(requests_for(pruned, DOCS))
    assert plain.generate_until(requests_for(plain, DOCS)) == reference
    assert {cls: dict(vars(cls)) for cls in classes} == before
    assert pruned.engine.method is not plain.engine.method
    assert pruned_out is not None


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"method": "magic"}, MethodError, ["unknown method 'magic'", "codebook", "random"]),
        ({"method": "random", "retention": 0.5, "colour": 1}, MethodError, ["colour", "accepted keys", "seed", "pretrained"]),
        ({"method": "codebook", "threshold": 0.5}, MethodError, ["codebook=PATH"]),
        ({"method": "codebook", "threshold": 0.5, "codebook": "/nonexistent.safetensors"}, CodebookError, ["not found"]),
        ({"method": "random", "retention": 1.5}, BudgetError, ["retention=1.5", "out of range"]),
        ({"method": "random", "retention": 0.5, "tokens": 3}, BudgetError, ["two budgets"]),
        ({"method": "random", "threshold": 0.5}, MethodError, ["does not accept a threshold"]),
        ({"method": "none", "anyres": "tiles"}, MethodError, ["anyres='tiles'", "base_only"]),
    ],
)
def test_bad_input_is_refused_with_a_message_naming_it(tiny_models, kwargs, error, words):
    with pytest.raises(error) as caught:
        tiny_wrapper(tiny_models["llava"], **kwargs)
    for word in words:
        assert word in str(caught.value)


def test_codebook_hidden_size_mismatch_is_refused(tiny_models, tmp_path):
    from lmms_eval_redundancy.codebook.store import Codebook, save_codebook

    path = save_codebook(Codebook(torch.randn(4, 4096), {"model": "llava-1.5-7b"}), tmp_path / "big.safetensors")
    with pytest.raises(CodebookError, match="size 4096.*hidden size is 64"):
        tiny_wrapper(tiny_models["llava"], method="codebook", codebook=str(path), threshold=0.4)


def test_unsupported_model_type_is_refused(tmp_path):
    from transformers import BertConfig

    from lmms_eval_redundancy.families import UnsupportedModelError

    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="'bert' is not supported.*llava_onevision"):
        tiny_wrapper(tmp_path)


def test_unsupported_transformers_version_is_refused(monkeypatch):
    from lmms_eval_redundancy.core import versions

    monkeypatch.setattr(versions, "version", lambda name: "5.10.0" if name == "transformers" else "0.7.3")
    with pytest.raises(versions.UnsupportedVersionError, match="transformers 5.10.0 is not supported.*>=5.23.0"):
        versions.check_versions()


def test_missing_torchvision_is_refused_before_loading_with_the_fix(tiny_models, monkeypatch):
    import transformers.utils

    from lmms_eval_redundancy.core.errors import UserError

    monkeypatch.setattr(transformers.utils, "is_torchvision_available", lambda: False)
    with pytest.raises(UserError, match="torchvision is not installed.*pip install torchvision"):
        tiny_wrapper(tiny_models["llava"])


def test_multi_round_generation_refuses_clearly(tiny_models):
    with pytest.raises(NotImplementedError, match="multi-round"):
        tiny_wrapper(tiny_models["llava"]).generate_until_multi_round([])


def test_log_keep_indices_records_sorted_kept_indices_per_image(tiny_models):
    w = tiny_wrapper(tiny_models["llava"], method="random", tokens=3, log_keep_indices=True)
    w.generate_until(requests_for(w, DOCS[:2]))
    keeps = [u["keep"] for sample in w.ledger.samples for u in sample["units"]]
    assert len(keeps) == 3
    assert all(len(k) == 3 and k == sorted(set(k)) and max(k) < 16 for k in keeps)


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_anyres_base_only_keeps_the_base_view_and_drops_crops_and_newlines(tiny_models, family):
    full = tiny_wrapper(tiny_models[family], method="random", retention=0.5)
    base = tiny_wrapper(tiny_models[family], method="random", retention=0.5, anyres="base_only")
    doc = {"question": "what is it ?", "visuals": [image(64, 40, 3)], "target": " red"}
    full.generate_until(requests_for(full, [doc]))
    base.generate_until(requests_for(base, [doc]))
    (full_unit,) = full.ledger.samples[0]["units"]
    (base_unit,) = base.ledger.samples[0]["units"]
    assert full_unit["before"] > 16 and full_unit["newlines_after"] == full_unit["newlines_before"] > 0
    assert base_unit == {**base_unit, "before": 16, "after": 8, "newlines_after": 0}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", method_cases().values(), ids=lambda m: m["method"])
def test_every_method_batch_of_two_equals_batch_of_one(tiny_models, tiny_codebook, family, method):
    if not supports(method["method"], family):
        pytest.skip(f"{method['method']} needs a [CLS] token; the tiny {family} tower has none")
    method = with_files(method, tiny_codebook[0])
    one = tiny_wrapper(tiny_models[family], batch_size=1, **method)
    two = tiny_wrapper(tiny_models[family], batch_size=2, **method)
    assert two.generate_until(requests_for(two, DOCS)) == one.generate_until(requests_for(one, DOCS))
    kept = lambda w: sorted((s["doc_id"], u["visual"], u["unit"], u["after"], u.get("layers"))  # noqa: E731
                            for s in w.ledger.samples for u in s["units"])
    assert kept(one) == kept(two)
    units = [u for s in one.ledger.samples for u in s["units"]]
    assert any(u["after"] < u["before"] for u in units)
    if one.engine.method.stage is Stage.INSIDE_LLM:  # every decoder layer's visual tokens, from all to what is kept
        layers = one.model.config.text_config.num_hidden_layers
        assert all(len(u["layers"]) == layers and u["layers"][0] == u["before"] and u["layers"][-1] == u["after"] for u in units)


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_anyres_per_view_gives_each_view_its_own_budget(tiny_models, family):
    w = tiny_wrapper(tiny_models[family], method="fastervlm", tokens=4, anyres="per_view")
    w.generate_until(requests_for(w, [{"question": "what is it ?", "visuals": [image(64, 40, 3)]}]))
    units = w.ledger.samples[0]["units"]
    assert [(u["unit"], u["before"], u["after"]) for u in units] == [(0, 16, 4)] + [(i, 12, 4) for i in range(1, 5)]
    assert units[0]["newlines_after"] == units[0]["newlines_before"] > 0


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_faithful_per_view_takes_the_top_k_of_each_full_view_then_drops_padding(tiny_models, family):
    w = tiny_wrapper(tiny_models[family], method="fastervlm", tokens=4, anyres="per_view", faithful=True, log_keep_indices=True)
    assert w.engine.settings()["per_view_topk"] == "full_view"
    doc = {"question": "what is it ?", "visuals": [image(64, 40, 3)]}
    w.generate_until(requests_for(w, [doc]))
    units = w.ledger.samples[0]["units"]
    assert [(u["unit"], u["before"]) for u in units] == [(0, 16)] + [(i, 12) for i in range(1, 5)]
    assert units[0]["after"] == 4 and all(u["after"] <= 4 for u in units)  # the base view has no padding
    inputs = w.processor(text=[w._prompt("q", 1, 0)], images=[doc["visuals"]], return_tensors="pt")
    (visual,) = w.engine.pipeline(inputs, [1], [0], ["doc"]).visuals[0]
    for unit in units[1:]:  # each crop: what it kept lies within the top 4 of all 16 patches of its view
        view = visual.tile_vision[w.engine.method.need][unit["unit"]]
        top = set(torch.sort(view, descending=True, stable=True).indices[:4].tolist())
        positions = torch.nonzero(visual.tiles == unit["unit"]).flatten()
        kept_patches = {int(visual.patches[positions[i]]) for i in unit["keep"]}
        assert kept_patches <= top and len(kept_patches) == unit["after"]
