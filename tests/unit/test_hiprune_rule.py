"""HiPrune's rule against a plain loop reference and against the official outputs (fidelity cases)."""

from __future__ import annotations

import pytest
import torch
from conftest import fidelity_cases, fidelity_tensors, official_expected

from lmms_eval_redundancy.methods import hiprune

# ---- plain references of the official rule ----------------------------------------------------------

def reference_global_attention(attention: torch.Tensor, has_cls: bool) -> list[list[float]]:
    """Per view: the mean over heads and query rows of each key column, the [CLS] column dropped."""
    views, heads, queries, keys = attention.shape
    means = [[sum(float(attention[b, h, q, t]) for h in range(heads) for q in range(queries)) / (heads * queries)
              for t in range(keys)] for b in range(views)]
    return [row[1:] if has_cls else row for row in means]


def reference_select(objects: list[float], deep: list[float], k: int, alpha: float, width: int,
                     buffer: str = "official") -> list[int]:
    """Anchors, their four neighbours (wrapped and clamped, or only those on the grid), then registers:
    the best deep scores outside that set (ties to the lower index)."""
    n = len(objects)
    anchors = sorted(range(n), key=lambda p: (-objects[p], p))[:round(k * alpha / 5)]
    chosen = set()
    for p in anchors:
        for q, on_grid in ((p, True), (p - 1, p % width > 0), (p + 1, p % width < width - 1),
                           (p - width, p >= width), (p + width, p + width < n)):
            if buffer == "official":
                chosen.add(min(max(q, 0), n - 1))
            elif on_grid:
                chosen.add(q)
    adjusted = [deep[p] - (1 if p in chosen else 0) for p in range(n)]
    registers = sorted(range(n), key=lambda p: (-adjusted[p], p))[:max(k - len(chosen), 0)]
    return sorted(chosen | set(registers))


def scores_with_ties(n: int, generator: torch.Generator) -> torch.Tensor:
    """Scores from few distinct levels, so that ranking decides many ties."""
    return torch.randint(0, 6, (n,), generator=generator).float() / 8


# ---- against the references -------------------------------------------------------------------------

@pytest.mark.parametrize("has_cls", [True, False])
def test_global_attention_averages_heads_and_the_given_query_rows(has_cls):
    attention = torch.softmax(torch.randn(2, 3, 4, 10, generator=torch.Generator().manual_seed(0)), dim=-1)
    got = hiprune.global_attention(attention, has_cls=has_cls)
    torch.testing.assert_close(got, torch.tensor(reference_global_attention(attention, has_cls)), rtol=1e-6, atol=1e-7)
    assert got.shape == (2, 9 if has_cls else 10)
    assert hiprune.global_attention(attention, torch.float16).dtype == torch.float16


def test_official_budgets_and_anchor_counts():
    assert [hiprune.per_view_budget(r, v) for r, v in ((192, 1), (640, 5), (160, 5), (128, 3))] == [192, 128, 32, 42]
    assert [hiprune.anchor_count(k) for k in (192, 128, 64, 32, 25, 75, 125, 10)] == [4, 3, 1, 1, 0, 2, 2, 0]


@pytest.mark.parametrize("buffer", hiprune.BUFFER_CHOICES)
@pytest.mark.parametrize("seed", range(6))
def test_select_equals_the_reference(seed, buffer):
    generator = torch.Generator().manual_seed(seed)
    width = (24, 6, 27)[seed % 3]
    n = width * width
    ties = seed % 2 == 1
    objects = scores_with_ties(n, generator) if ties else torch.rand(n, generator=generator)
    deep = scores_with_ties(n, generator) if ties else torch.rand(n, generator=generator)
    objects[[0, width - 1, width, n - width, n - 1]] += 2  # anchors in the corners and at row ends
    for k, alpha in ((n // 3, 0.1), (n // 4, 0.5), (n // 5, 1.0), (n, 0.1), (n + 30, 0.1), (3, 0.1)):
        expected = reference_select(objects.tolist(), deep.tolist(), k, alpha, width, buffer)
        assert hiprune.select(objects, deep, k, alpha, buffer).tolist() == expected
        assert len(expected) == min(k, n)
    half = hiprune.select(objects.half(), deep.half(), n // 3, 0.1, buffer)
    assert half.tolist() == reference_select(objects.half().tolist(), deep.half().tolist(), n // 3, 0.1, width, buffer)


def test_official_neighbours_wrap_rows_and_clamp_while_grid_neighbours_stay_on_the_grid():
    objects = torch.zeros(16)  # a 4x4 grid
    objects[4] = objects[0] = 1  # two anchors (k = 10, alpha = 1): top left, and column 0 of row 2
    deep = torch.arange(16, dtype=torch.float32) / 100  # registers: the highest indices
    official = hiprune.select(objects, deep, 10, alpha=1.0)
    assert {0, 1, 3, 4, 5, 8}.issubset(official.tolist())  # 4 - 1 = 3 is the end of the first row
    grid = hiprune.select(objects, deep, 10, alpha=1.0, buffer="grid")
    assert 3 not in grid.tolist() and {0, 1, 4, 5, 8}.issubset(grid.tolist())
    assert len(official) == len(grid) == 10


def test_a_ragged_batch_picks_exactly_what_each_unit_picks_alone():
    generator = torch.Generator().manual_seed(0)
    sizes, ks = (576, 36, 729, 16, 576), (64, 12, 200, 20, 192)
    objects = [torch.rand(n, generator=generator) for n in sizes]
    deep = [scores_with_ties(n, generator) for n in sizes]
    for buffer in hiprune.BUFFER_CHOICES:
        for alpha in (0.1, 1.0):
            batched = hiprune.select_batch(objects, deep, ks, alpha, buffer)
            alone = [hiprune.select(o, d, k, alpha, buffer) for o, d, k in zip(objects, deep, ks)]
            assert [b.tolist() for b in batched] == [a.tolist() for a in alone]
            assert [b.tolist() for b in batched] == [
                reference_select(o.tolist(), d.tolist(), k, alpha, int(len(o) ** 0.5), buffer)
                for o, d, k in zip(objects, deep, ks)]


def test_a_budget_below_the_anchor_set_keeps_the_anchor_set():
    objects, deep = torch.rand(36), torch.rand(36)
    anchors_and_buffers = hiprune.select(objects, deep, 3, alpha=5.0)  # 3 anchors, up to 15 with buffers
    assert len(anchors_and_buffers) > 3
    assert anchors_and_buffers.tolist() == reference_select(objects.tolist(), deep.tolist(), 3, 5.0, 6)


def test_an_unknown_buffer_rule_names_the_choices():
    with pytest.raises(ValueError, match="official, grid"):
        hiprune.select(torch.rand(16), torch.rand(16), 4, buffer="wrap")


# ---- official cases ---------------------------------------------------------------------------------

@pytest.mark.parametrize("case", fidelity_cases("hiprune"))
def test_official_select_cases(case):
    tensors = fidelity_tensors("hiprune")
    assert case["kind"] == "select"
    settings = case["settings"]
    deep_attention = tensors[case["inputs"]["attn_deep"]]
    object_attention = tensors[case["inputs"].get("attn_object", case["inputs"]["attn_deep"])]  # hp19: same layer
    k = hiprune.per_view_budget(settings["retention"], settings["batch"])
    assert k == settings["per_view_budget"] and hiprune.anchor_count(k, settings["alpha"]) == settings["anchors"]
    views = settings["batch"]
    kept = hiprune.select_batch(list(hiprune.global_attention(object_attention)),
                                list(hiprune.global_attention(deep_attention)), [k] * views, settings["alpha"])
    if "official_error" in case:  # a budget beyond the patches: the project keeps every patch
        assert [x.tolist() for x in kept] == [list(range(settings["num_patches"]))] * views
        return
    expected = official_expected(case)[0]
    assert [x.tolist() for x in kept] == expected["kept"]
