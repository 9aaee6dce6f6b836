"""FastV against plain references: eager attention rows and a no-cache generation that masks dropped keys."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from conftest import (
    FAMILIES,
    REPO,
    image,
    prefill_stages,
    pruned_reference_generate,
    requests_for,
    tiny_wrapper,
)
from transformers import AutoModelForImageTextToText

from lmms_eval_redundancy.core.budget import KEEP_ALL
from lmms_eval_redundancy.core.registry import NoParams
from lmms_eval_redundancy.methods import base as stages
from lmms_eval_redundancy.methods.base import Cut, MultiStageLLM
from lmms_eval_redundancy.runtime.engine import PruningEngine

DOCS = [
    {"question": "what color is this ?", "visuals": [image(32, 32, 0)], "target": " red"},
    {"question": "which image is blue ?", "visuals": [image(48, 32, 1), image(32, 56, 2)], "target": " first"},
    {"question": "what ?", "visuals": [image(64, 40, 3)], "target": " red"},
]


def test_retention_one_gives_the_output_of_method_none(tiny_models):
    for family in ("llava", "llava_next"):
        plain, keep_all = tiny_wrapper(tiny_models[family]), tiny_wrapper(tiny_models[family], method="fastv", retention=1.0)
        assert keep_all.generate_until(requests_for(keep_all, DOCS)) == plain.generate_until(requests_for(plain, DOCS))


def test_layer_k_minus_1_row_under_sdpa_equals_eager(tiny_models, monkeypatch):
    rows = []
    original = stages.last_token_attention
    monkeypatch.setattr(stages, "last_token_attention", lambda *a: rows.append(original(*a)) or rows[-1])
    w = tiny_wrapper(tiny_models["llava_next"], method="fastv", retention=0.5)
    _, batch, records = w._build([requests_for(w, DOCS[2:])[0].args])
    with torch.no_grad(), w.engine.around_llm(batch, records):
        w.model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask)
    eager = AutoModelForImageTextToText.from_pretrained(tiny_models["llava_next"], attn_implementation="eager").eval()
    with torch.no_grad():
        out = eager(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, output_attentions=True)
    expected = out.attentions[1][:, :, -1, :].mean(dim=1)  # layer K-1 = 1
    torch.testing.assert_close(rows[0], expected, atol=1e-5, rtol=1e-4)


def test_batch_of_two_with_different_image_sizes_equals_each_alone(tiny_models):
    one = tiny_wrapper(tiny_models["llava_next"], method="fastv", retention=0.3, batch_size=1)
    two = tiny_wrapper(tiny_models["llava_next"], method="fastv", retention=0.3, batch_size=2)
    assert two.generate_until(requests_for(two, DOCS)) == one.generate_until(requests_for(one, DOCS))
    ll_one = [r.text for r in one.loglikelihood(requests_for(one, DOCS, "loglikelihood"))]
    ll_two = [r.text for r in two.loglikelihood(requests_for(two, DOCS, "loglikelihood"))]
    assert [g for _, g in ll_one] == [g for _, g in ll_two]
    assert [s for s, _ in ll_one] == pytest.approx([s for s, _ in ll_two], abs=1e-4)
    after = lambda w: sorted((s["doc_id"], u["after"]) for s in w.ledger.samples for u in s["units"])  # noqa: E731
    assert after(one) == after(two)


def test_fastv_k_out_of_range_is_refused(tiny_models):
    from lmms_eval_redundancy.core.registry import MethodError

    with pytest.raises(MethodError, match="fastv_k=4 must be below"):
        tiny_wrapper(tiny_models["llava"], method="fastv", retention=0.5, fastv_k=4)


def test_eager_attention_gives_the_same_pruned_output_as_sdpa(tiny_models):
    sdpa = tiny_wrapper(tiny_models["llava_next"], method="fastv", retention=0.3, batch_size=2)
    eager = tiny_wrapper(tiny_models["llava_next"], method="fastv", retention=0.3, batch_size=2, attn_implementation="eager")
    assert eager.generate_until(requests_for(eager, DOCS)) == sdpa.generate_until(requests_for(sdpa, DOCS))


def test_anyres_policies_other_than_full_are_refused(tiny_models):
    from lmms_eval_redundancy.core.registry import MethodError

    with pytest.raises(MethodError, match="anyres=base_only applies to methods before the LLM"):
        tiny_wrapper(tiny_models["llava_next"], method="fastv", retention=0.5, anyres="base_only")


@pytest.mark.parametrize("family", FAMILIES)
def test_fastv_on_the_multi_stage_base_keeps_and_generates_what_the_single_stage_fastv_did(tiny_models, family):
    """``tests/data/fastv_single_stage.json``: kept indices and greedy generations of the single-stage FastV
    (before ``MultiStageLLM``) at retention 0.3, batch sizes 1 and 2, on the same tiny models."""
    expected = json.loads((REPO / "tests" / "data" / "fastv_single_stage.json").read_text())
    docs = [{"question": doc["question"], "visuals": doc["visuals"]} for doc in DOCS]
    for batch_size in (1, 2):
        w = tiny_wrapper(tiny_models[family], method="fastv", retention=0.3, batch_size=batch_size, log_keep_indices=True)
        texts = w.generate_until(requests_for(w, docs))
        keeps = sorted([s["doc_id"], u["visual"], u["unit"], u["keep"]] for s in w.ledger.samples for u in s["units"])
        assert {"texts": texts, "keeps": keeps} == expected[f"{family}/{batch_size}"]


@dataclass
class HalveTwice(MultiStageLLM):
    """Two cuts with original positions (not registered): half of the visual tokens from layer 1, half of those from layer 3."""

    name = "halve_twice"

    def cuts(self):
        return [Cut(1, keep=lambda n: max(1, n // 2)), Cut(3, keep=lambda n: max(1, n // 2))]


@dataclass
class HalveTwiceRenumbered(HalveTwice):
    name = "halve_twice_renumbered"
    renumber_positions = True


@pytest.mark.parametrize("renumber", [False, True])
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_two_cuts_equal_a_no_cache_reference_masking_each_stages_dropped_keys(tiny_models, family, renumber):
    w = tiny_wrapper(tiny_models[family])
    method = (HalveTwiceRenumbered if renumber else HalveTwice)(params=NoParams(), budget=KEEP_ALL)
    engine = PruningEngine(w.model, w.processor, w.engine.family, method)
    doc = DOCS[1] if family == "llava" else DOCS[2]
    inputs = engine.processor_inputs([w._prompt(doc["question"], len(doc["visuals"]), 0)], [doc["visuals"]], [])
    batch, records = engine.prune(inputs, [len(doc["visuals"])], [0], ["doc"])
    with torch.no_grad(), engine.around_llm(batch, records):
        out = w.model.generate(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, max_new_tokens=6,
                               do_sample=False, suppress_tokens=w.engine.family.placeholder_ids,
                               pad_token_id=w.tokenizer.pad_token_id, eos_token_id=w.tokenizer.eos_token_id)
        stages = method.state["stages"]
    engine.close()
    kept = []
    for stage in stages[1:]:
        mask = torch.zeros_like(batch.visual_mask)
        mask[0, stage.index[0][stage.valid[0]]] = True
        kept.append(mask & batch.visual_mask)
    n = int(batch.prunable_mask.sum())
    assert [int((k & batch.prunable_mask).sum()) for k in kept] == [n // 2, n // 4]
    assert [r.layers for r in records[0]] and sum(r.layers[3] for r in records[0]) == n // 4
    reference = pruned_reference_generate(tiny_models[family], batch, stages, [1, 3], renumber, 6, w.engine.family.placeholder_ids)
    assert out[0].tolist() == reference


BUILDERS = ("_layer_inputs", "_mask", "_prepare_decoding", "rotary_embeddings", "gather_positions")


@pytest.mark.parametrize("method_name", ["fastv", "pdrop"])
def test_stage_inputs_are_built_once_per_call_whatever_the_decode_steps(tiny_models, monkeypatch, method_name):
    """Key masks, rotary embeddings and position gathers are built once per stage at prefill and once for the decode
    steps, never per layer or per step; a call decoding past the steps it announced grows them and decodes the same."""
    w = tiny_wrapper(tiny_models["llava"], method=method_name, retention=0.5)
    engine, method = w.engine, w.engine.method
    renumber, stages = method.renumber_positions, len(method.cuts())  # pdrop: 3 cuts, positions renumbered
    counts = {}

    def counting(owner, name):
        function = getattr(owner, name)

        def spy(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)

        monkeypatch.setattr(owner, name, spy)

    for builder in BUILDERS:
        counting(method if builder.startswith("_") else engine.family, builder)
    docs = DOCS[:2]
    inputs = engine.processor_inputs([w._prompt(d["question"], len(d["visuals"]), 0) for d in docs],
                                     [d["visuals"] for d in docs], [])

    def generate(tokens: int, announced: int) -> tuple[list, dict]:
        counts.update(dict.fromkeys(BUILDERS, 0))
        batch, records = engine.prune(inputs, [len(d["visuals"]) for d in docs], [0, 0], ["a", "b"])
        with torch.no_grad(), engine.around_llm(batch, records, announced):
            out = w.model.generate(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                                   max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                   suppress_tokens=engine.family.placeholder_ids, pad_token_id=w.tokenizer.pad_token_id)
        return out.tolist(), dict(counts)

    short, few = generate(3, 3)
    long, many = generate(8, 8)
    grown, regrown = generate(8, 2)
    assert few == many == {"_layer_inputs": stages, "_mask": stages, "_prepare_decoding": stages,
                           "rotary_embeddings": 2 * stages if renumber else 0, "gather_positions": 0 if renumber else stages}
    assert [row[:3] for row in long] == short
    assert grown == long and regrown["_prepare_decoding"] == 3 * stages  # 2 steps prepared, then 4, then 8


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generation_equals_the_no_cache_reference_masking_dropped_keys(tiny_models, family):
    w = tiny_wrapper(tiny_models[family], method="fastv", retention=0.3)
    doc = DOCS[1] if family == "llava" else DOCS[2]
    _, batch, records = w._build([requests_for(w, [doc])[0].args])
    stages = prefill_stages(w, batch, records)
    kept = int((stages[1].valid & batch.prunable_mask.gather(1, stages[1].index)).sum())
    assert kept == round(0.3 * int(batch.prunable_mask.sum()))
    with torch.no_grad(), w.engine.around_llm(batch, records):
        out = w.model.generate(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, max_new_tokens=6,
                               do_sample=False, suppress_tokens=w.engine.family.placeholder_ids,
                               pad_token_id=w.tokenizer.pad_token_id, eos_token_id=w.tokenizer.eos_token_id)
    reference = pruned_reference_generate(tiny_models[family], batch, stages, [2], False, 6, w.engine.family.placeholder_ids)
    assert out[0].tolist() == reference
