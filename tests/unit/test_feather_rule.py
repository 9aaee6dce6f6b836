"""FEATHER's rule against plain loop references and against the official outputs (fidelity cases)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import fidelity_cases, fidelity_tensors, official_expected

from lmms_eval_redundancy.methods import feather

# ---- plain references of the official rule ----------------------------------------------------------

def reference_criterion(last_query: torch.Tensor, image_keys: torch.Tensor) -> list[float]:
    """Per query head (key head h // groups): softmax of q·k/sqrt(d) over the image keys; mean over heads."""
    heads, width = last_query.shape
    groups = heads // image_keys.shape[0]
    scores = [0.0] * image_keys.shape[1]
    for h in range(heads):
        logits = [float(last_query[h].double() @ key.double()) / math.sqrt(width) for key in image_keys[h // groups]]
        top = max(logits)
        exps = [math.exp(x - top) for x in logits]
        for j, e in enumerate(exps):
            scores[j] += e / sum(exps) / heads
    return scores


def reference_grid(side_rows: int, side_cols: int, stride: int) -> list[int]:
    return [r * side_cols + c for r in range(0, side_rows, stride) for c in range(0, side_cols, stride)]


def reference_select(scores: list[float], count: int, protected: list[int]) -> list[int]:
    """Top ``count`` (ties to the lower index) united with the protected tokens, ascending."""
    top = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:count]
    return sorted(set(top) | set(protected))


# ---- against the references -------------------------------------------------------------------------

@pytest.mark.parametrize("key_heads", [4, 2, 1])
def test_criterion_equals_the_reference_with_grouped_keys(key_heads):
    generator = torch.Generator().manual_seed(key_heads)
    query, keys = torch.randn(4, 8, generator=generator), torch.randn(key_heads, 30, 8, generator=generator)
    torch.testing.assert_close(feather.criterion(query, keys), torch.tensor(reference_criterion(query, keys)))


@pytest.mark.parametrize("rows, cols, stride", [(24, 24, 3), (12, 12, 4), (5, 7, 2), (3, 3, 1), (4, 4, 5)])
def test_stride_grid_equals_the_reference(rows, cols, stride):
    grid = feather.stride_grid(rows, cols, stride)
    assert torch.nonzero(grid).flatten().tolist() == reference_grid(rows, cols, stride)


def test_keep_counts_follow_the_official_formulas():
    assert feather.keep_count(576, feather.KEEP_FRACTION, 1) == 172  # LLaVA-1.5: 172 united with 64 grid tokens
    assert feather.keep_count(729, feather.KEEP_FRACTION, 1) == 218  # Prismatic's 27 x 27
    assert feather.keep_count(282, feather.KEEP_FRACTION, 2) == 25  # int(n1 * q^2) of the survivors
    assert feather.stride_grid(24, 24, feather.STRIDE).sum() == 64
    with pytest.raises(ValueError):
        feather.keep_count(576, 0.3, 3)


@pytest.mark.parametrize("seed", range(4))
def test_a_ragged_batch_selects_the_reference_and_exactly_each_unit_alone(seed):
    generator = torch.Generator().manual_seed(seed)
    sides = [4, 12, 7, 1, 9]
    scores = [torch.rand(side * side, generator=generator) for side in sides]
    scores[1][10] = scores[1][3]  # a tie: the lower index first
    scores[2][:] = 0.5  # all tied
    counts = [feather.keep_count(s.numel(), 0.3 + 0.1 * seed, 1) for s in scores]
    grids = [feather.stride_grid(side, side, 2 + seed % 2) for side in sides]
    grids[4] = None
    batch = feather.select(scores, counts, grids)
    for u, kept in enumerate(batch):
        protected = [] if grids[u] is None else torch.nonzero(grids[u]).flatten().tolist()
        assert kept.tolist() == reference_select(scores[u].tolist(), counts[u], protected)
        assert torch.equal(kept, feather.select([scores[u]], [counts[u]], [grids[u]])[0])
    half = feather.select([s.half() for s in scores], counts)
    assert [h.tolist() for h in half] == [feather.select([s.half()], [c])[0].tolist() for s, c in zip(scores, counts)]


def test_keep_positions_keep_prefix_kept_image_tokens_and_text():
    kept = torch.tensor([0, 2, 5])
    assert feather.keep_positions(3, 6, 12, kept).tolist() == [0, 1, 2, 3, 5, 8, 9, 10, 11]
    assert feather.keep_positions(3, 6, 12, kept[:0]).tolist() == [0, 1, 2, 9, 10, 11]


# ---- the official outputs -----------------------------------------------------------------------------

@pytest.mark.parametrize("case", fidelity_cases("feather"))
def test_official_case(case):
    assert "official_error" not in case  # none recorded for FEATHER
    settings, tensors = case["settings"], fidelity_tensors("feather")
    inputs = {name: tensors[key] for name, key in case["inputs"].items()}
    expected, expected_tensors = official_expected(case)
    dtype = getattr(torch, settings["dtype"])
    offset, image, fraction = settings["image_offset"], settings["num_image_tokens"], settings["keep_fraction"]
    side = settings["grid_side"]
    assert side * side == image
    originals = torch.arange(image)
    for stage in (1, 2):
        if f"stage{stage}" not in expected:
            assert f"query_states_{stage}" not in inputs
            continue
        query, keys = inputs[f"query_states_{stage}"][0, :, -1], inputs[f"key_states_{stage}"][0]
        assert query.shape[0] == keys.shape[0] * settings["num_key_value_groups"]
        scores = feather.criterion(query, keys[:, offset:offset + image], dtype)
        grid = feather.stride_grid(side, side, settings["stride"]) if stage == 1 else None
        kept = feather.select([scores], [feather.keep_count(image, fraction, stage)], [grid])[0]
        keep = feather.keep_positions(offset, image, keys.shape[1], kept)
        originals = originals[kept]
        got = {"keep": keep.tolist(), "image_indices": (offset + torch.arange(kept.numel())).tolist(),
               "kept_original_positions": originals.tolist()}
        assert got == expected[f"stage{stage}"]
        torch.testing.assert_close(scores, tensors[expected_tensors[f"scores_{stage}"]])
        image = kept.numel()
        if f"key_states_{stage + 1}" in inputs:  # the next criterion runs on the shortened sequence
            assert inputs[f"key_states_{stage + 1}"].shape[2] == keep.numel()
