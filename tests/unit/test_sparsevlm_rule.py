"""SparseVLM's rule against plain loop references and against the official outputs (fidelity cases)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import fidelity_cases, fidelity_tensors, official_expected

from lmms_eval_redundancy.methods import sparsevlm

# ---- plain references of the official rule ----------------------------------------------------------

def reference_raters(visual: torch.Tensor, text: torch.Tensor) -> list[int]:
    """Per visual token a softmax over the text tokens; averaged over visual tokens; strictly above the mean."""
    v, t = visual.double().tolist(), text.double().tolist()
    weights = [0.0] * len(t)
    for row in v:
        products = [sum(a * b for a, b in zip(row, token)) for token in t]
        top = max(products)
        exps = [math.exp(p - top) for p in products]
        for j, e in enumerate(exps):
            weights[j] += e / sum(exps) / len(v)
    mean = sum(weights) / len(weights)
    return [j for j, w in enumerate(weights) if w > mean]


def reference_relation(queries, keys, positions, visual_start, visual_count) -> list[float]:
    """Per head and rater: causal softmax of q·k/sqrt(d) over all keys (key head h // groups), averaged over
    heads, then the visual columns averaged over raters."""
    heads, _, width = queries.shape
    groups = heads // keys.shape[0]
    relation = [0.0] * visual_count
    for r, position in enumerate(positions):
        row = [0.0] * keys.shape[1]
        for h in range(heads):
            logits = [float(queries[h, r].double() @ keys[h // groups, j].double()) / math.sqrt(width)
                      for j in range(position + 1)]
            top = max(logits)
            exps = [math.exp(x - top) for x in logits]
            for j, e in enumerate(exps):
                row[j] += e / sum(exps) / heads
        for i in range(visual_count):
            relation[i] += row[visual_start + i] / len(positions)
    return relation


def reference_dpc(x: torch.Tensor, count: int, noise: list[float]) -> tuple[list[int], list[int], torch.Tensor]:
    """DPC-kNN written out (float64, densities rounded to float32 as the official float32 run has them: equal
    tokens can then tie, and a tied token is not denser): returns (cluster per token, centres, merged tokens)."""
    rows = x.double()
    m, width = rows.shape
    dist = [[float((rows[i] - rows[j]).norm()) / math.sqrt(width) for j in range(m)] for i in range(m)]
    density = [math.exp(-sum(d * d for d in sorted(dist[i])[:count]) / count) for i in range(m)]
    density = (torch.tensor(density, dtype=torch.float32) + torch.tensor(noise, dtype=torch.float32) * 1e-6).tolist()
    largest = max(max(r) for r in dist)
    delta = [min([dist[i][j] for j in range(m) if density[j] > density[i]], default=largest) for i in range(m)]
    score = [delta[i] * density[i] for i in range(m)]
    centres = sorted(range(m), key=lambda i: (-score[i], i))[:count]
    cluster = [min(range(count), key=lambda t: (dist[centres[t]][i], t)) for i in range(m)]
    for t, centre in enumerate(centres):
        cluster[centre] = t
    merged = torch.stack([sum((rows[i] for i in range(m) if cluster[i] == t), torch.zeros(width, dtype=torch.float64))
                          / (cluster.count(t) + 1e-6) for t in range(count)])
    return cluster, centres, merged


def reference_stage(relation: list[float], output: torch.Tensor, start: int, keep: int | None, noise: list[float]):
    """The official cut: top ``keep`` visual tokens, the top 30 % (+1) pruned ones clustered and merged."""
    v = len(relation)
    by_score = sorted(range(v), key=lambda i: (-relation[i], i))
    kept = sorted(by_score[:v if keep is None else keep])
    text = list(range(start + v, output.shape[0]))
    positions = list(range(start)) + [start + i for i in kept] + text
    if keep is None:
        return positions, [], None, output[positions].double()
    pruned = [i for i in by_score if i not in kept]
    recycled = pruned[:int(len(pruned) * 0.3) + 1]
    cluster, centres, merged = reference_dpc(output[[start + i for i in recycled]], int(len(recycled) / 10) + 1, noise)
    sequence = torch.cat([output[positions[:start + len(kept)]].double(), merged, output[text].double()])
    return positions, [start + i for i in recycled], (cluster, centres), sequence


def random_unit(generator, prefix: int, visual: int, text: int, width: int = 8):
    return torch.randn(prefix + visual + text, width, generator=generator), prefix, visual


# ---- against the references -------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_raters_equal_the_reference(seed):
    generator = torch.Generator().manual_seed(seed)
    visual, text = torch.randn(30, 8, generator=generator), torch.randn(3 + seed * 4, 8, generator=generator)
    assert sparsevlm.rater_offsets(visual, text).tolist() == reference_raters(visual, text)


@pytest.mark.parametrize("key_heads", [4, 2, 1])
def test_rater_relation_equals_the_reference_with_grouped_keys(key_heads):
    generator = torch.Generator().manual_seed(key_heads)
    length, start, visual = 40, 3, 20
    queries = torch.randn(4, length, 6, generator=generator)
    keys = torch.randn(key_heads, length, 6, generator=generator)
    positions = torch.tensor([23, 26, 30, 39])
    block = sparsevlm.rater_attention(queries[:, positions], keys, positions, start, visual)
    expected = reference_relation(queries[:, positions], keys, positions.tolist(), start, visual)
    torch.testing.assert_close(block.mean(dim=0), torch.tensor(expected, dtype=torch.float32))


def test_keep_counts_follow_the_official_formulas():
    assert sparsevlm.budget_keep_count(300, 576) == 300 and sparsevlm.budget_keep_count(303, 150) == 149
    assert sparsevlm.budget_keep_count(66, 0) is None
    assert [sparsevlm.recycled_count(p) for p in (1, 3, 4, 276)] == [1, 1, 2, 83]
    assert [sparsevlm.cluster_count(m) for m in (1, 9, 10, 83)] == [1, 1, 2, 9]
    base = torch.rand(3, 12, generator=torch.Generator().manual_seed(0))
    low_rank = torch.cat([base, base[:1] + base[1:2]])  # 4 raters, rank 3
    assert sparsevlm.rank_keep_count(low_rank, 2.5, 1.0) == 8
    assert sparsevlm.rank_keep_count(low_rank, 9.0, 6.0) == 11  # capped at v - 1
    assert sparsevlm.rank_keep_count(torch.rand(6, 4, generator=torch.Generator().manual_seed(1)), 9.0, 6.0) is None


@pytest.mark.parametrize("retained, mean, last", [(192, 192.0, 113), (128, 128.6, 39), (96, 96.9, 27), (64, 64.8, 18)])
def test_v15_lists_give_the_layer_means_of_the_spec(retained, mean, last):
    """LLaVA-1.5 (576 tokens, 32 layers): mean visual count after each layer, recycled tokens included."""
    counts, visual = [], 576
    for layer in range(32):
        if layer in sparsevlm.STAGE_LAYERS["v1.5"]:
            budget = sparsevlm.STAGE_BUDGETS[retained][sparsevlm.STAGE_LAYERS["v1.5"].index(layer)]
            keep = sparsevlm.budget_keep_count(budget, visual)
            visual = keep + sparsevlm.cluster_count(sparsevlm.recycled_count(visual - keep))
        counts.append(visual)
    assert round(sum(counts) / 32, 1) == mean and visual == last


@pytest.mark.parametrize("seed", range(5))
def test_a_stage_equals_the_reference(seed):
    generator = torch.Generator().manual_seed(100 + seed)
    output, start, visual = random_unit(generator, 4 + seed, 60 + 7 * seed, 12)
    relation = torch.rand(visual, generator=generator)
    relation[5] = relation[9]  # a tie: the lower index first
    keep = [None, 0, 1, 20, visual - 1][seed]
    pruned = visual - (visual if keep is None else keep)
    noise = torch.rand(sparsevlm.recycled_count(pruned), generator=generator)
    cut = sparsevlm.cut_stage([relation], [output], [start], [keep], [noise])[0]
    positions, recycled, clusters, sequence = reference_stage(relation.tolist(), output, start, keep, noise.tolist())
    assert cut.keep.tolist() == positions and cut.recycled.tolist() == recycled
    assert cut.cut == (keep is not None)
    if clusters is not None:
        assert cut.clusters.cluster.tolist() == clusters[0] and cut.clusters.centers.tolist() == clusters[1]
        assert cut.visual_count == keep + len(clusters[1]) and cut.text_start == start + cut.visual_count
    shortened = sparsevlm.shortened(output, cut)
    assert shortened.shape[0] == cut.length
    torch.testing.assert_close(shortened.double(), sequence, rtol=1e-5, atol=1e-6)


def test_dpc_with_duplicate_tokens_equals_the_reference():
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(25, 8, generator=generator)
    x[10:16] = x[3]  # distance 0: density 1 + 1e-6 noise, which float32 resolves in steps of 1.2e-7 only
    noise = torch.rand(25, generator=generator)
    result = sparsevlm.cluster_and_merge([x], [3], [noise])[0]
    cluster, centres, merged = reference_dpc(x, 3, noise.tolist())
    assert result.cluster.tolist() == cluster and result.centers.tolist() == centres
    assert len(set(centres) & {3, 10, 11, 12, 13, 14, 15}) == 2  # two equal tokens with equal density: both centres
    torch.testing.assert_close(result.merged.double(), merged, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_ragged_batch_cuts_exactly_as_each_unit_alone(dtype):
    generator = torch.Generator().manual_seed(3)
    shapes = [(5, 40, 10), (2, 1, 6), (9, 120, 30), (0, 33, 4), (3, 50, 8), (1, 0, 5)]
    keeps = [12, 0, 60, None, 49, None]
    outputs, starts, relations, noises = [], [], [], []
    for (prefix, visual, text), keep in zip(shapes, keeps):
        output, start, _ = random_unit(generator, prefix, visual, text, 16)
        outputs.append(output.to(dtype))
        starts.append(start)
        relations.append(torch.rand(visual, generator=generator).to(dtype))
        recycled = 0 if keep is None else sparsevlm.recycled_count(visual - keep)
        noises.append(None if keep is None else torch.rand(recycled, generator=generator))
    batch = sparsevlm.cut_stage(relations, outputs, starts, keeps, noises, dtype)
    for u, cut in enumerate(batch):
        alone = sparsevlm.cut_stage([relations[u]], [outputs[u]], [starts[u]], [keeps[u]], [noises[u]], dtype)[0]
        assert torch.equal(cut.keep, alone.keep) and torch.equal(cut.recycled, alone.recycled)
        assert cut.kept_visual == alone.kept_visual and cut.cut == alone.cut
        if cut.cut:
            for name in ("cluster", "centers", "merged"):
                assert torch.equal(getattr(cut.clusters, name), getattr(alone.clusters, name))
        assert torch.equal(sparsevlm.shortened(outputs[u], cut), sparsevlm.shortened(outputs[u], alone))


def test_noise_of_the_wrong_length_is_refused():
    output, start, visual = random_unit(torch.Generator().manual_seed(0), 2, 30, 5)
    with pytest.raises(ValueError, match=r"shape \[8\]"):
        sparsevlm.cut_stage([torch.rand(visual)], [output], [start], [5], [torch.rand(6)])


# ---- the official outputs -----------------------------------------------------------------------------

def stage_keep_count(settings: dict, stage: int, block: torch.Tensor) -> int | None:
    if settings["variant"] == "v1":
        return sparsevlm.rank_keep_count(block, settings["scale"], settings["bias"])
    layer = settings["stages"][stage]["layer_idx"]
    budget = sparsevlm.STAGE_BUDGETS[settings["retained_tokens"]][sparsevlm.STAGE_LAYERS["v1.5"].index(layer)]
    return sparsevlm.budget_keep_count(budget, block.shape[1])


@pytest.mark.parametrize("case", fidelity_cases("sparsevlm"))
def test_official_case(case):
    assert "official_error" not in case  # none recorded for SparseVLM
    settings, tensors = case["settings"], fidelity_tensors("sparsevlm")
    inputs = {name: tensors[key] for name, key in case["inputs"].items()}
    expected, expected_tensors = official_expected(case)
    dtype = getattr(torch, settings["dtype"])
    start, image = settings["pre_prompt_length"], settings["image_shape"]
    embeds = inputs["inputs_embeds"][0]
    offsets = sparsevlm.rater_offsets(embeds[start:start + image], embeds[start + image:], dtype)
    assert offsets.tolist() == expected["raters"]
    for j, (stage, want) in enumerate(zip(settings["stages"], expected["stages"])):
        visual, output = stage["v_token_num"], inputs[f"layer_output_{j}"][0]
        assert output.shape[0] == stage["seq_len"]
        positions = start + visual + offsets
        block = sparsevlm.rater_attention(inputs[f"query_states_{j}"][0][:, positions], inputs[f"key_states_{j}"][0],
                                          positions, start, visual, dtype)
        relation = block.mean(dim=0)
        noise = inputs.get(f"rand_{j}")
        cut = sparsevlm.cut_stage([relation], [output], [start], [stage_keep_count(settings, j, block)],
                                  [None if noise is None else noise[0]], dtype)[0]
        clusters = cut.clusters
        got = {"select_token_idx": cut.keep.tolist(), "kept_visual": cut.kept_visual, "recycled": cut.recycled.tolist(),
               "idx_cluster": clusters.cluster.tolist() if clusters else [],
               "cluster_centers": clusters.centers.tolist() if clusters else [], "cluster_num": cut.merged_count,
               "v_token_num": cut.visual_count, "text_token_start": cut.text_start, "s_flag": cut.cut,
               "new_length": cut.length, "position_ids_length": cut.length}
        assert got == want
        torch.testing.assert_close(relation, tensors[expected_tensors[f"relation_vis_text_{j}"]][0])
        merged = clusters.merged if clusters else output.new_zeros(0, output.shape[1])
        torch.testing.assert_close(merged, tensors[expected_tensors[f"merged_tokens_{j}"]][0])
        if j + 1 < len(settings["stages"]):  # the next stage runs on the shortened sequence
            assert sparsevlm.shortened(output, cut).shape[0] == settings["stages"][j + 1]["seq_len"]
            assert cut.visual_count == settings["stages"][j + 1]["v_token_num"]
