"""CDPruner's rule against a plain loop reference and against the official outputs (fidelity cases)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import fidelity_cases, fidelity_tensors, official_expected

from lmms_eval_redundancy.methods import cdpruner

# ---- plain references of the official rule ----------------------------------------------------------

def reference_segments(tokens: list[int]) -> list[list[int]]:
    """Zero-pad to a multiple of 77, then cut into rows of 77."""
    rows = -(-len(tokens) // 77)
    padded = tokens + [0] * (rows * 77 - len(tokens))
    return [padded[r * 77:(r + 1) * 77] for r in range(rows)]


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def reference_relevance(views: list[torch.Tensor], text: torch.Tensor) -> list[list[float]]:
    """Mean negative cosine over segments per patch; min-max (+1e-6 on top) over all views together."""
    raw = [[sum(-cosine(patch, segment) for segment in text.tolist()) / len(text) for patch in view.tolist()]
           for view in views]
    low, high = min(map(min, raw)), max(map(max, raw))
    return [[(r - low + 1e-6) / (high - low) for r in view] for view in raw]


def reference_greedy_log_det(features: torch.Tensor, scores: list[float], k: int) -> list[int]:
    """Greedy MAP written out: each step adds the token that maximises det(L_S), L = diag(r) S diag(r)
    (float64, ties to the lower index)."""
    rows = features.double().tolist()
    n = len(rows)
    kernel = torch.tensor([[scores[i] * cosine(rows[i], rows[j]) * scores[j] for j in range(n)] for i in range(n)],
                          dtype=torch.float64)
    picked: list[int] = []
    for _ in range(min(k, n)):
        rest = [j for j in range(n) if j not in picked]
        picked.append(max(rest, key=lambda j: (float(torch.det(kernel[picked + [j]][:, picked + [j]])), -j)))
    return picked


# ---- against the references -------------------------------------------------------------------------

@pytest.mark.parametrize("length", [1, 12, 76, 77, 78, 154, 155, 200])
def test_text_segments_equal_the_reference(length):
    tokens = torch.randint(1, 49408, (1, length), generator=torch.Generator().manual_seed(length))
    ids, mask = cdpruner.text_segments(tokens, torch.ones_like(tokens))
    assert ids.tolist() == reference_segments(tokens[0].tolist())
    assert mask.tolist() == reference_segments([1] * length)


@pytest.mark.parametrize("seed", range(4))
def test_relevance_equals_the_reference_over_all_views_jointly(seed):
    generator = torch.Generator().manual_seed(seed)
    views = [torch.randn(n, 6, generator=generator) for n in (9, 4, 9)]
    text = torch.randn(1 + seed % 3, 6, generator=generator)
    computed = cdpruner.relevance(views, text)
    for got, expected in zip(computed, reference_relevance(views, text)):
        torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-5)
    assert max(float(v.max()) for v in computed) > 1  # the +1e-6 sits in the numerator only
    theta = cdpruner.relevance(views, text, theta=0.5)
    assert all(torch.equal(t, torch.exp(0.5 * c)) for t, c in zip(theta, computed))


@pytest.mark.parametrize("seed", range(6))
def test_greedy_map_equals_greedy_log_det(seed):
    generator = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 25, (1,), generator=generator))
    features = torch.randn(n, 32, generator=generator)
    scores = torch.rand(n, generator=generator) + 0.1
    for k in (1, n // 3 + 1, n):
        order = cdpruner.greedy_map([cdpruner.conditional_kernel(features, scores)], [k])[0]
        assert order.tolist() == reference_greedy_log_det(features, scores.tolist(), k)
        assert cdpruner.select(features, scores, k).tolist() == sorted(order.tolist())


def test_a_ragged_batch_picks_exactly_what_each_unit_picks_alone():
    generator = torch.Generator().manual_seed(0)
    features = [torch.randn(n, 24, generator=generator) for n in (5, 30, 17, 30, 1)]
    scores = [torch.rand(f.shape[0], generator=generator) for f in features]
    ks = [3, 12, 17, 2, 4]  # a full unit, and one with k > N (keeps everything)
    for dtype in (torch.float32, torch.float16):
        batched = cdpruner.select_batch(features, scores, ks, dtype)
        alone = [cdpruner.select(f, s, k, dtype) for f, s, k in zip(features, scores, ks)]
        assert [b.tolist() for b in batched] == [a.tolist() for a in alone]
    kernels = [cdpruner.conditional_kernel(f, s) for f, s in zip(features, scores)]
    orders = cdpruner.greedy_map(kernels, ks)
    assert [o.tolist() for o in orders] == [cdpruner.greedy_map([kl], [k])[0].tolist() for kl, k in zip(kernels, ks)]
    assert [o.tolist() for o in orders] == [reference_greedy_log_det(f, s.tolist(), k)
                                            for f, s, k in zip(features, scores, ks)]
    assert [len(o) for o in orders] == [3, 12, 17, 2, 1]


# ---- official cases ---------------------------------------------------------------------------------

@pytest.mark.parametrize("case", fidelity_cases("cdpruner", "select"))
def test_official_select_cases(case):
    tensors = fidelity_tensors("cdpruner")
    inputs = {name: tensors[key] for name, key in case["inputs"].items()}
    expected = official_expected(case)[0]
    scores = cdpruner.relevance(list(inputs["image_embeds"]), inputs["text_embeds"])
    assert torch.equal(torch.stack(scores), tensors[case["expected_tensors"]["relevance"]])  # same ops, float32
    dtype = getattr(torch, case["dtype"])  # the official normalisation runs in the features' dtype
    kernels = [cdpruner.conditional_kernel(f, s, dtype) for f, s in zip(inputs["image_features"], scores)]
    k = case["settings"]["visual_token_num"]
    orders = cdpruner.greedy_map(kernels, [k] * len(kernels))
    assert [o.tolist() for o in orders] == expected["pick_order"]
    kept = cdpruner.select_batch(list(inputs["image_features"]), scores, [k] * len(kernels), dtype)
    assert [x.tolist() for x in kept] == expected["kept"]


@pytest.mark.parametrize("case", fidelity_cases("cdpruner", "text_segments"))
def test_official_text_segments_cases(case):
    tensors = fidelity_tensors("cdpruner")
    ids, mask = cdpruner.text_segments(tensors[case["inputs"]["input_ids"]], tensors[case["inputs"]["attention_mask"]])
    assert ids.tolist() == case["expected"]["input_ids"]
    assert mask.tolist() == case["expected"]["attention_mask"]
