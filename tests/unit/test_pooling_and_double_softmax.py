"""Pooling and the codebook's double-softmax variant against plain references."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import codebook_keep

from lmms_eval_redundancy.core.budget import Budget
from lmms_eval_redundancy.core.registry import MethodError, build_method
from lmms_eval_redundancy.core.visuals import VisualUnit
from lmms_eval_redundancy.methods import codebook, pooling


def test_pooling_averages_blocks_in_raster_order():
    rows, cols, dim = 24, 24, 5
    features = torch.randn(rows * cols, dim, dtype=torch.float64)
    pooled = pooling.pool(features, (rows, cols), 64)
    grid = features.reshape(rows, cols, dim)
    expected = torch.stack([grid[r * 3:(r + 1) * 3, c * 3:(c + 1) * 3].reshape(-1, dim).mean(0)
                            for r in range(8) for c in range(8)])
    assert pooled.shape == (64, dim)
    torch.testing.assert_close(pooled, expected)


@pytest.mark.parametrize(("k", "shape"), [(64, (8, 8)), (128, (11, 11)), (192, (14, 14)), (1, (1, 1)), (576, (24, 24))])
def test_pooled_grid_is_closest_to_the_budget_with_the_same_aspect(k, shape):
    assert pooling.pooled_shape(24, 24, k) == shape


def test_pooling_method_replaces_a_unit_and_refuses_packed_anyres():
    method = build_method("pooling", Budget("tokens", 4))
    selection = method.select_unit(VisualUnit(torch.randn(16, 3), key="k", grid=(4, 4)))
    assert selection.keep.tolist() == [] and selection.merged.shape == (4, 3)  # recorded as merged, not kept
    assert selection.merged_after.tolist() == [0, 1, 2, 3]
    with pytest.raises(MethodError, match="anyres=base_only"):
        method.select_unit(VisualUnit(torch.randn(20, 3), key="k", grid=None))


def double_softmax_reference(features, prototypes, r):
    n, p = features.shape[0], prototypes.shape[0]
    cos = [[float(torch.nn.functional.cosine_similarity(features[i].double(), prototypes[j].double(), dim=0))
            for j in range(p)] for i in range(n)]
    over_tokens = [[math.exp(cos[i][j]) / sum(math.exp(cos[m][j]) for m in range(n)) for j in range(p)] for i in range(n)]
    over_protos = [[math.exp(cos[i][j]) / sum(math.exp(cos[i][q]) for q in range(p)) for j in range(p)] for i in range(n)]
    scores = [max(over_tokens[i][j] * over_protos[i][j] for j in range(p)) for i in range(n)]
    keep = n - round(n * (1 - r))
    return sorted(sorted(range(n), key=lambda i: (scores[i], i))[:keep])


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("r", [0.1, 0.25, 0.5])
def test_double_softmax_equals_plain_reference(seed, r, tmp_path):
    generator = torch.Generator().manual_seed(seed)
    features, prototypes = torch.randn(30, 6, generator=generator), torch.randn(7, 6, generator=generator)
    keep = codebook_keep(tmp_path, features, prototypes, Budget("retention", r), variant="double_softmax")
    assert keep.tolist() == double_softmax_reference(features, prototypes, r)


def test_double_softmax_count_is_the_official_rounding():
    # N=5, r=0.5: round(2.5) = 2 pruned, so 3 kept, whereas round(r*N) keeps 2
    assert codebook.double_softmax_keep_count(5, Budget("retention", 0.5)) == 3
    assert Budget("retention", 0.5).keep_count(5) == 2
