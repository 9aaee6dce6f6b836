"""Budgets, the method registry, the random and codebook methods, and pruning packed visuals (``prune_batch``).

Every selection is checked against a plain reference written here with Python loops over rows
(cosines in float64 from lists), following the methods specification ("Budgets" and
"Redundancy codebook"): keep indices sorted ascending, ties to the lower index, threshold strict,
``retention=r`` keeps ``max(1, round(r * N))`` with Python's round (half to even).
"""

from __future__ import annotations

import math
import random as pyrandom
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from conftest import codebook_keep, method_cases, with_files

from lmms_eval_redundancy.codebook.store import Codebook, CodebookError, save_codebook
from lmms_eval_redundancy.core.budget import KEEP_ALL, Budget, BudgetError, parse_budget
from lmms_eval_redundancy.core.registry import (
    MethodError,
    NoParams,
    available_methods,
    build_method,
)
from lmms_eval_redundancy.core.units import prune_batch
from lmms_eval_redundancy.core.visuals import PackedVisual, Selection, VisualUnit
from lmms_eval_redundancy.methods import codebook as codebook_method
from lmms_eval_redundancy.methods import random as random_method
from lmms_eval_redundancy.methods.base import BeforeLLM

SEEDS = range(12)
MARGIN = 1e-4  # float32 (package) vs float64 (reference) scores differ by far less than this


# --------------------------------------------------------------------------------------------------
# Plain references
# --------------------------------------------------------------------------------------------------

def ref_cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return dot / (max(na, 1e-12) * max(nb, 1e-12))


def ref_scores(features: torch.Tensor, prototypes: torch.Tensor) -> list[float]:
    """max over prototypes of the cosine, per token, in float64 Python floats."""
    rows = features.double().tolist()
    protos = prototypes.double().tolist()
    scores = []
    for f in rows:
        best = -math.inf
        for c in protos:
            best = max(best, ref_cosine(f, c))
        scores.append(best)
    return scores


def ref_lowest_index(scores: list[float]) -> int:
    best = 0
    for i in range(1, len(scores)):
        if scores[i] < scores[best]:  # strict: a tie keeps the lower index
            best = i
    return best


def ref_threshold(scores: list[float], t: float) -> tuple[list[int], bool]:
    keep = []
    for i, s in enumerate(scores):
        if s < t:
            keep.append(i)
    if keep:
        return keep, False
    return [ref_lowest_index(scores)], True


def ref_keep_count(budget_kind: str, value: float, n: int) -> int:
    if budget_kind == "retention":
        return max(1, round(value * n))
    return min(n, int(value))


def ref_lowest_k(scores: list[float], k: int) -> list[int]:
    remaining = list(range(len(scores)))
    chosen = []
    for _ in range(min(k, len(scores))):
        best = remaining[0]
        for i in remaining[1:]:
            if scores[i] < scores[best]:  # ties keep the lower index
                best = i
        chosen.append(best)
        remaining.remove(best)
    return sorted(chosen)


def assert_index_tensor(keep: torch.Tensor, expected: list[int]) -> None:
    assert isinstance(keep, torch.Tensor)
    assert keep.dtype == torch.long
    assert keep.dim() == 1
    assert keep.tolist() == expected


def random_case(seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    rng = pyrandom.Random(seed)
    n, d, p = rng.randint(1, 50), rng.randint(2, 16), rng.randint(1, 10)
    features = torch.randn(n, d, generator=gen).to(dtype)
    prototypes = torch.randn(p, d, generator=gen).to(dtype)
    return features, prototypes


def decisive_thresholds(scores: list[float]) -> list[float]:
    """Thresholds at least MARGIN away from every score: midpoints of wide gaps, below all, above all."""
    ordered = sorted(scores)
    candidates = [ordered[0] - 0.05, ordered[-1] + 0.05]
    for lo, hi in zip(ordered, ordered[1:]):
        if hi - lo > 2 * MARGIN:
            candidates.append((lo + hi) / 2)
    return [t for t in candidates if -1 <= t <= 1 and all(abs(s - t) > MARGIN for s in scores)]


def lowest_is_decisive(scores: list[float]) -> bool:
    ordered = sorted(scores)
    return len(ordered) == 1 or ordered[1] - ordered[0] > MARGIN


def kth_is_decisive(scores: list[float], k: int) -> bool:
    ordered = sorted(scores)
    return k >= len(ordered) or ordered[k] - ordered[k - 1] > MARGIN


def assert_lowest_k_up_to_near_ties(keep: torch.Tensor, scores: list[float], k: int) -> None:
    """Exactly the reference when the k-th and (k+1)-th scores are apart; otherwise k sorted distinct
    indices with every kept score <= every dropped score (up to float32 rounding)."""
    if kth_is_decisive(scores, k):
        assert_index_tensor(keep, ref_lowest_k(scores, k))
        return
    values = keep.tolist()
    assert keep.dtype == torch.long and values == sorted(set(values)) and len(values) == k
    dropped = [s for i, s in enumerate(scores) if i not in values]
    assert max(scores[i] for i in values) <= min(dropped) + MARGIN


# Exactly representable scores against the prototype e1 = [1, 0, 0, 0] (float32 computes them exactly).
E1 = [1.0, 0.0, 0.0, 0.0]
SCORE_VECTORS = {
    1.0: [2.0, 0.0, 0.0, 0.0],
    0.5: [3.0, 3.0, 3.0, 3.0],
    0.0: [0.0, 5.0, 0.0, 0.0],
    -0.5: [-1.0, 1.0, 1.0, 1.0],
    -1.0: [-4.0, 0.0, 0.0, 0.0],
}


def exact_features(scores: list[float]) -> torch.Tensor:
    return torch.tensor([SCORE_VECTORS[s] for s in scores])


def write_codebook(tmp_path, prototypes: torch.Tensor, name: str = "cb.safetensors"):
    return save_codebook(Codebook(prototypes, {"model": "unit test"}), tmp_path / name)


def fake_model(hidden_size: int):
    return SimpleNamespace(config=SimpleNamespace(text_config=SimpleNamespace(hidden_size=hidden_size)))


def attached_codebook_method(tmp_path, prototypes: torch.Tensor, budget: Budget):
    path = write_codebook(tmp_path, prototypes)
    method = build_method("codebook", budget, codebook=str(path))
    method.attach(fake_model(prototypes.shape[1]), None)
    return method


# --------------------------------------------------------------------------------------------------
# Codebook: threshold variant
# --------------------------------------------------------------------------------------------------

def test_exact_feature_vectors_have_the_intended_scores():
    features = exact_features([1.0, 0.5, 0.0, -0.5, -1.0])
    assert codebook_method.redundancy_scores(features, torch.tensor([E1])).tolist() == [1.0, 0.5, 0.0, -0.5, -1.0]
    assert ref_scores(features, torch.tensor([E1])) == [1.0, 0.5, 0.0, -0.5, -1.0]


@pytest.mark.parametrize("seed", SEEDS)
def test_threshold_select_matches_loop_reference_on_random_inputs(seed, tmp_path):
    features, prototypes = random_case(seed)
    scores = ref_scores(features, prototypes)
    thresholds = decisive_thresholds(scores)
    assert thresholds, "no threshold far enough from every score"
    for t in thresholds:
        expected, floor = ref_threshold(scores, t)
        if floor and not lowest_is_decisive(scores):
            continue  # the floor index would depend on float32 rounding
        keep = codebook_keep(tmp_path, features, prototypes, Budget("threshold", t))
        assert_index_tensor(keep, expected)


@pytest.mark.parametrize("seed", SEEDS)
def test_threshold_select_matches_loop_reference_on_float16_inputs(seed, tmp_path):
    features, prototypes = random_case(1000 + seed, dtype=torch.float16)
    scores = ref_scores(features, prototypes)
    for t in decisive_thresholds(scores):
        expected, floor = ref_threshold(scores, t)
        if floor and not lowest_is_decisive(scores):
            continue
        keep = codebook_keep(tmp_path, features, prototypes, Budget("threshold", t))
        assert_index_tensor(keep, expected)


def test_threshold_is_strict_score_equal_to_threshold_is_dropped(tmp_path):
    # token 1 is exactly the prototype direction (score 1.0); with t=1.0 it must be dropped.
    prototypes = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    features = torch.tensor([[1.0, 0.0, 0.0, 0.0],      # cos 0.5
                             [3.0, 3.0, 3.0, 3.0],      # cos 1.0 (same direction as the prototype)
                             [0.0, 0.0, -2.0, 0.0],     # cos -0.5
                             [1.0, 1.0, 1.0, 1.0]])     # cos 1.0
    assert ref_scores(features, prototypes) == [0.5, 1.0, -0.5, 1.0]
    keep = codebook_keep(tmp_path, features, prototypes, Budget("threshold", 1.0))
    assert_index_tensor(keep, [0, 2])
    keep = codebook_keep(tmp_path, features, prototypes, Budget("threshold", 0.5))
    assert_index_tensor(keep, [2])


# --------------------------------------------------------------------------------------------------
# Codebook: the floor (threshold keeps nothing)
# --------------------------------------------------------------------------------------------------

def test_floor_keeps_exactly_the_lowest_scoring_token_ties_to_lower_index(tmp_path):
    scores = [1.0, 0.5, 1.0, 0.5, 0.5]
    features, prototypes = exact_features(scores), torch.tensor([E1])
    assert ref_threshold(scores, 0.5) == ([1], True)
    keep = codebook_keep(tmp_path, features, prototypes, Budget("threshold", 0.5))
    assert_index_tensor(keep, [1])


def test_floor_keeps_lowest_scoring_token_on_random_inputs(tmp_path):
    checked = 0
    for seed in SEEDS:
        features, prototypes = random_case(seed)
        scores = ref_scores(features, prototypes)
        if not lowest_is_decisive(scores) or min(scores) - MARGIN < -1:
            continue
        t = min(scores) - MARGIN
        keep = codebook_keep(tmp_path, features, prototypes, Budget("threshold", t))
        assert_index_tensor(keep, [ref_lowest_index(scores)])
        checked += 1
    assert checked >= len(SEEDS) // 2


def test_floor_select_unit_reports_floor_hit(tmp_path):
    scores = [1.0, 0.5, 1.0, 0.5, 0.5]
    method = attached_codebook_method(tmp_path, torch.tensor([E1]), Budget("threshold", 0.5))
    selection = method.select_unit(VisualUnit(exact_features(scores), key="img"))
    assert isinstance(selection, Selection)
    assert_index_tensor(selection.keep, [1])
    assert selection.floor_hit is True


def test_threshold_select_unit_without_floor_reports_no_floor_hit(tmp_path):
    scores = [1.0, 0.5, -1.0, 0.0, 0.5]
    method = attached_codebook_method(tmp_path, torch.tensor([E1]), Budget("threshold", 0.5))
    selection = method.select_unit(VisualUnit(exact_features(scores), key="img"))
    assert_index_tensor(selection.keep, ref_threshold(scores, 0.5)[0])
    assert selection.keep.tolist() == [2, 3]
    assert selection.floor_hit is False


@pytest.mark.parametrize("seed", SEEDS)
def test_threshold_select_unit_matches_loop_reference(tmp_path, seed):
    features, prototypes = random_case(seed)
    scores = ref_scores(features, prototypes)
    thresholds = decisive_thresholds(scores)
    t = thresholds[len(thresholds) // 2]
    expected, floor = ref_threshold(scores, t)
    assert not floor or lowest_is_decisive(scores)
    method = attached_codebook_method(tmp_path, prototypes, Budget("threshold", t))
    selection = method.select_unit(VisualUnit(features, key="img"))
    assert_index_tensor(selection.keep, expected)
    assert selection.floor_hit is floor


# --------------------------------------------------------------------------------------------------
# Codebook: ratio variant
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, r, k", [(5, 0.5, 2), (7, 0.5, 4), (3, 0.5, 2), (1, 0.5, 1), (1, 0.1, 1),
                                     (9, 0.5, 4), (576, 1 / 9, 64), (576, 2 / 9, 128), (576, 1 / 3, 192)])
def test_ratio_keep_count_is_python_round_half_to_even_at_least_one(n, r, k, tmp_path):
    assert ref_keep_count("retention", r, n) == k
    features = torch.randn(n, 6, generator=torch.Generator().manual_seed(n))
    prototypes = torch.randn(3, 6, generator=torch.Generator().manual_seed(n + 1))
    keep = codebook_keep(tmp_path, features, prototypes, Budget("retention", r))
    assert keep.numel() == k


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("r", [0.1, 0.25, 1 / 3, 0.5, 0.75, 1.0])
def test_ratio_select_matches_loop_reference_on_random_inputs(seed, r, tmp_path):
    features, prototypes = random_case(seed)
    scores = ref_scores(features, prototypes)
    k = ref_keep_count("retention", r, len(scores))
    keep = codebook_keep(tmp_path, features, prototypes, Budget("retention", r))
    assert_lowest_k_up_to_near_ties(keep, scores, k)


def test_ratio_ties_go_to_lower_index(tmp_path):
    scores = [0.5, 1.0, 0.5, 0.0, 0.5, 0.5, -1.0]
    features, prototypes = exact_features(scores), torch.tensor([E1])
    # N=7, r=0.5 -> round(3.5) = 4: -1.0 (6), 0.0 (3), then the two lowest-index 0.5s (0, 2)
    assert ref_lowest_k(scores, 4) == [0, 2, 3, 6]
    keep = codebook_keep(tmp_path, features, prototypes, Budget("retention", 0.5))
    assert_index_tensor(keep, [0, 2, 3, 6])
    keep = codebook_keep(tmp_path, features, prototypes, Budget("tokens", 3))
    assert_index_tensor(keep, [0, 3, 6])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("tokens", [1, 3, 10, 64])
def test_ratio_tokens_budget_matches_loop_reference_clipped_to_n(seed, tokens, tmp_path):
    features, prototypes = random_case(seed)
    scores = ref_scores(features, prototypes)
    k = ref_keep_count("tokens", tokens, len(scores))
    assert k == min(tokens, len(scores))
    keep = codebook_keep(tmp_path, features, prototypes, Budget("tokens", tokens))
    assert_lowest_k_up_to_near_ties(keep, scores, k)


def test_ratio_select_unit_matches_reference_and_reports_no_floor_hit(tmp_path):
    scores = [0.5, 1.0, 0.5, 0.0, 0.5]
    method = attached_codebook_method(tmp_path, torch.tensor([E1]), Budget("retention", 0.5))
    assert method.params.variant == "ratio"
    selection = method.select_unit(VisualUnit(exact_features(scores), key="img"))
    assert_index_tensor(selection.keep, ref_lowest_k(scores, 2))  # N=5, r=0.5 -> round(2.5) = 2
    assert selection.keep.tolist() == [0, 3]
    assert selection.floor_hit is False


def test_codebook_attach_rejects_a_model_of_another_hidden_size(tmp_path):
    path = write_codebook(tmp_path, torch.randn(3, 8))
    method = build_method("codebook", Budget("threshold", 0.5), codebook=str(path))
    with pytest.raises(CodebookError):
        method.attach(fake_model(16), None)


# --------------------------------------------------------------------------------------------------
# Budgets
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [dict(retention=0.5, tokens=64), dict(retention=0.5, threshold=0.4),
                                    dict(tokens=64, threshold=0.4), dict(retention=0.5, tokens=3, threshold=0.1)])
def test_parse_budget_rejects_two_budgets_at_once(kwargs):
    with pytest.raises(BudgetError, match="two budgets"):
        parse_budget(**kwargs)


@pytest.mark.parametrize("value", [0, 0.0, -0.5, 1.0001, 2, float("nan")])
def test_parse_budget_rejects_retention_outside_zero_one(value):
    with pytest.raises(BudgetError):
        parse_budget(retention=value)


@pytest.mark.parametrize("value", [0, -3, 2.5, "2.5", 0.5])
def test_parse_budget_rejects_tokens_zero_negative_or_non_integer(value):
    with pytest.raises(BudgetError):
        parse_budget(tokens=value)


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_parse_budget_rejects_non_finite_tokens_with_budget_error(value):
    with pytest.raises(BudgetError):
        parse_budget(tokens=value)


@pytest.mark.parametrize("value", [1.0001, -1.0001, 2, -5, float("nan")])
def test_parse_budget_rejects_threshold_outside_minus_one_one(value):
    with pytest.raises(BudgetError):
        parse_budget(threshold=value)


@pytest.mark.parametrize("kwargs", [dict(retention="abc"), dict(tokens="many"), dict(threshold="high"),
                                    dict(retention=[0.5]), dict(tokens=object())])
def test_parse_budget_rejects_a_non_number(kwargs):
    with pytest.raises(BudgetError, match="not a number"):
        parse_budget(**kwargs)


def test_parse_budget_accepts_valid_budgets_and_none():
    assert parse_budget() is None
    assert parse_budget(retention=1) == Budget("retention", 1.0)
    assert parse_budget(retention="0.111") == Budget("retention", 0.111)
    assert parse_budget(tokens=64) == Budget("tokens", 64.0)
    assert parse_budget(tokens="64") == Budget("tokens", 64.0)
    assert parse_budget(threshold=-1) == Budget("threshold", -1.0)
    assert parse_budget(threshold=1) == Budget("threshold", 1.0)
    assert parse_budget(threshold=0.45) == Budget("threshold", 0.45)


def test_keep_count_follows_round_half_even_at_least_one_and_clips_tokens():
    for n in range(1, 60):
        for r in (0.01, 0.1, 0.25, 1 / 3, 0.5, 0.75, 0.9, 1.0):
            assert Budget("retention", r).keep_count(n) == max(1, round(r * n)), (n, r)
        for k in (1, 2, 5, 64, 1000):
            assert Budget("tokens", k).keep_count(n) == min(n, k), (n, k)
        assert KEEP_ALL.keep_count(n) == n
    assert Budget("retention", 0.5).keep_count(5) == 2
    assert Budget("retention", 0.5).keep_count(7) == 4
    assert Budget("retention", 0.5).keep_count(3) == 2
    assert Budget("retention", 1 / 9).keep_count(576) == 64


def test_keep_count_of_a_threshold_budget_raises():
    with pytest.raises(BudgetError):
        Budget("threshold", 0.5).keep_count(10)


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

def test_build_method_unknown_name_lists_available_methods():
    with pytest.raises(MethodError) as info:
        build_method("no-such-method", Budget("retention", 0.5))
    message = str(info.value)
    assert "no-such-method" in message
    for name in ("codebook", "none", "random"):
        assert name in available_methods()
        assert name in message


def test_build_method_unknown_parameter_lists_the_methods_parameters():
    with pytest.raises(MethodError) as info:
        build_method("random", Budget("retention", 0.5), sede=3)
    assert "sede" in str(info.value)
    assert "seed" in str(info.value).replace("sede", "")
    with pytest.raises(MethodError) as info:
        build_method("codebook", Budget("threshold", 0.5), prototypes="x.pt")
    assert "codebook" in str(info.value) and "variant" in str(info.value)


def test_build_method_wrong_budget_kind_raises_method_error():
    with pytest.raises(MethodError, match="threshold"):
        build_method("random", Budget("threshold", 0.5))
    with pytest.raises(MethodError):
        build_method("none", Budget("retention", 0.5))


def test_build_codebook_without_codebook_path_raises_method_error():
    with pytest.raises(MethodError, match="codebook="):
        build_method("codebook", Budget("threshold", 0.45))


def test_build_codebook_with_missing_file_raises_codebook_error(tmp_path):
    with pytest.raises(CodebookError, match="not found"):
        build_method("codebook", Budget("threshold", 0.45), codebook=str(tmp_path / "missing.safetensors"))


def test_build_method_coerces_parameter_types_and_rejects_bad_values():
    method = build_method("random", Budget("tokens", 4), seed="7")
    assert method.params.seed == 7
    with pytest.raises(MethodError):
        build_method("random", Budget("tokens", 4), seed="1.5")
    with pytest.raises(MethodError):
        build_method("random", Budget("tokens", 4), seed="abc")


# --------------------------------------------------------------------------------------------------
# Random
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, k", [(1, 1), (10, 1), (10, 10), (100, 10), (576, 64), (50, 49)])
def test_random_select_returns_k_distinct_sorted_indices(n, k):
    for seed in range(5):
        keep = random_method.select(n, k, torch.Generator().manual_seed(seed))
        values = keep.tolist()
        assert keep.dtype == torch.long
        assert len(values) == k
        assert len(set(values)) == k
        assert values == sorted(values)
        assert all(0 <= v < n for v in values)


def test_random_select_unit_is_deterministic_for_same_seed_and_key():
    features = torch.randn(100, 4)
    a = build_method("random", Budget("tokens", 10), seed=3)
    b = build_method("random", Budget("tokens", 10), seed=3)
    first = a.select_unit(VisualUnit(features, key="doc1/0/image0")).keep
    again = a.select_unit(VisualUnit(features, key="doc1/0/image0")).keep
    other = b.select_unit(VisualUnit(torch.zeros(100, 4), key="doc1/0/image0")).keep
    assert first.tolist() == again.tolist() == other.tolist()
    assert len(set(first.tolist())) == 10 and first.tolist() == sorted(first.tolist())


def test_random_select_unit_differs_for_different_keys_and_seeds():
    features = torch.randn(100, 4)
    method = build_method("random", Budget("tokens", 10), seed=0)
    picks = {tuple(method.select_unit(VisualUnit(features, key=f"doc{i}")).keep.tolist()) for i in range(5)}
    assert len(picks) == 5
    other_seed = build_method("random", Budget("tokens", 10), seed=1)
    assert (other_seed.select_unit(VisualUnit(features, key="doc0")).keep.tolist()
            != method.select_unit(VisualUnit(features, key="doc0")).keep.tolist())


def test_random_select_unit_keeps_round_half_even_retention_count():
    method = build_method("random", Budget("retention", 0.5), seed=0)
    for n, k in ((5, 2), (7, 4), (3, 2), (1, 1), (100, 50)):
        assert method.select_unit(VisualUnit(torch.randn(n, 2), key="x")).keep.numel() == k


def test_none_keeps_every_index():
    method = build_method("none", KEEP_ALL)
    assert method.select_unit(VisualUnit(torch.randn(7, 3), key="x")).keep.tolist() == list(range(7))


# --------------------------------------------------------------------------------------------------
# prune_batch on one visual
# --------------------------------------------------------------------------------------------------

@dataclass
class EveryOtherStub(BeforeLLM):
    """Keeps indices 0, 2, 4, ... of each unit and remembers what it was given (not registered)."""

    seen: list = None

    def select_unit(self, unit: VisualUnit) -> Selection:
        self.seen.append(unit)
        return Selection(torch.arange(0, unit.features.shape[0], 2))


def prune_visual(visual: PackedVisual, method, key: str, anyres: str = "full", log_keep: bool = False):
    """One visual through the shipped ``prune_batch``: its kept features and its records."""
    ((features,), records, _), = prune_batch([[visual]], method, [key], anyres, log_keep)
    return features, records


def token_ids(newline: torch.Tensor, tiles: torch.Tensor | None = None) -> dict:
    """``tiles``/``patches`` of a packed visual: one tile (unless given), patches in order, -1 at newlines."""
    tiles = torch.zeros(newline.shape, dtype=torch.long) if tiles is None else tiles
    patches = torch.arange(newline.numel())
    return {"tiles": tiles.masked_fill(newline, -1), "patches": patches.masked_fill(newline, -1)}


def stub_method() -> EveryOtherStub:
    return EveryOtherStub(params=NoParams(), budget=Budget("retention", 0.5), seen=[])


def distinct_features(length: int, dim: int = 3) -> torch.Tensor:
    return torch.arange(length * dim, dtype=torch.float32).reshape(length, dim) + 1


def anyres_visual(with_base: bool = True) -> PackedVisual:
    """Base view of 4 tokens (2x2), then a crop grid of 2 rows x 3 tokens, each row ended by a newline."""
    newline_vector = torch.tensor([-7.0, -7.0, -7.0])
    features = distinct_features(12)
    newline = torch.zeros(12, dtype=torch.bool)
    newline[[7, 11]] = True
    features[newline] = newline_vector
    return PackedVisual(features=features, kind="image", units=[torch.nonzero(~newline).flatten()], newline=newline,
                        grids=[None], base=torch.arange(4) if with_base else None, **token_ids(newline))


def ref_prune(visual: PackedVisual, unit_keeps: list[list[int]], units=None, keep_newlines=True):
    units = visual.units if units is None else units
    kept = set()
    for positions, keep in zip(units, unit_keeps):
        positions = positions.tolist()
        for j in keep:
            kept.add(positions[j])
    if keep_newlines:
        for i, is_newline in enumerate(visual.newline.tolist()):
            if is_newline:
                kept.add(i)
    return sorted(kept)


def test_prune_visual_full_keeps_all_newline_tokens_and_returns_sorted_kept_rows():
    visual = anyres_visual()
    method = stub_method()
    features, records = prune_visual(visual, method, key="doc")
    # unit positions: [0,1,2,3,4,5,6,8,9,10]; every other -> 0,2,4,6,9 ; plus newlines 7, 11
    expected = ref_prune(visual, [list(range(0, 10, 2))])
    assert expected == [0, 2, 4, 6, 7, 9, 11]
    assert torch.equal(features, visual.features[expected])
    assert len(method.seen) == 1
    assert torch.equal(method.seen[0].features, visual.features[visual.units[0]])
    assert [r.kind for r in records] == ["image"]
    record = records[0]
    assert (record.before, record.after, record.newlines_before, record.newlines_after) == (10, 5, 2, 2)
    assert (record.visual, record.unit, record.floor_hit) == (0, 0, False)


def test_prune_visual_newlines_are_kept_even_when_a_unit_keeps_one_token():
    visual = anyres_visual()
    method = build_method("random", Budget("tokens", 1), seed=0)
    features, records = prune_visual(visual, method, key="doc")
    assert features.shape[0] == 3
    assert (features == torch.tensor([-7.0, -7.0, -7.0])).all(dim=-1).sum() == 2
    assert records[0].after == 1 and records[0].newlines_after == 2


def test_prune_visual_base_only_considers_only_base_tokens_and_drops_newlines_and_crops():
    visual = anyres_visual()
    method = stub_method()
    features, records = prune_visual(visual, method, key="doc", anyres="base_only")
    assert len(method.seen) == 1
    assert torch.equal(method.seen[0].features, visual.features[:4])
    expected = ref_prune(visual, [[0, 2]], units=[visual.base], keep_newlines=False)
    assert expected == [0, 2]
    assert torch.equal(features, visual.features[expected])
    record = records[0]
    assert (record.kind, record.before, record.after, record.newlines_before, record.newlines_after) == \
        ("image", 4, 2, 2, 0)


def test_prune_visual_base_only_without_base_prunes_the_full_unit():
    visual = anyres_visual(with_base=False)
    features, records = prune_visual(visual, stub_method(), key="doc", anyres="base_only")
    expected = ref_prune(visual, [list(range(0, 10, 2))])
    assert torch.equal(features, visual.features[expected])
    assert (records[0].before, records[0].after, records[0].newlines_after) == (10, 5, 2)


def test_prune_visual_returns_features_at_sorted_kept_positions_for_scattered_units():
    # a unit whose positions are not in order, and a method that returns indices of it
    features = distinct_features(8)
    newline = torch.zeros(8, dtype=torch.bool)
    newline[3] = True
    unit = torch.tensor([7, 0, 5, 1, 2, 4, 6])
    visual = PackedVisual(features=features, kind="image", units=[unit], newline=newline, grids=[None],
                          **token_ids(newline))
    out, records = prune_visual(visual, stub_method(), key="k")  # keeps unit[0,2,4,6] = 7,5,2,6
    expected = ref_prune(visual, [[0, 2, 4, 6]])
    assert expected == [2, 3, 5, 6, 7]
    assert torch.equal(out, features[expected])
    assert (records[0].before, records[0].after, records[0].newlines_before, records[0].newlines_after) == (7, 4, 1, 1)


def test_prune_visual_plain_image_with_codebook_matches_reference(tmp_path):
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(24, 6, generator=gen)
    prototypes = torch.randn(4, 6, generator=gen)
    visual = PackedVisual(features=features, kind="image", units=[torch.arange(24)],
                          newline=torch.zeros(24, dtype=torch.bool), grids=[(4, 6)],
                          **token_ids(torch.zeros(24, dtype=torch.bool)))
    method = attached_codebook_method(tmp_path, prototypes, Budget("retention", 0.25))
    scores = ref_scores(features, prototypes)
    assert kth_is_decisive(scores, 6)
    expected = ref_lowest_k(scores, 6)
    out, records = prune_visual(visual, method, key="k", log_keep=True)
    assert torch.equal(out, features[expected])
    assert records[0].keep == expected
    assert (records[0].before, records[0].after, records[0].newlines_before, records[0].newlines_after) == (24, 6, 0, 0)


@pytest.mark.parametrize("r", [0.5, 0.25, 1 / 3])
def test_prune_visual_video_keeps_round_r_per_frame_and_records_frames(r):
    frames, per_frame = 3, 9
    length = frames * per_frame + 1  # OneVision style: frames, then one trailing newline
    features = distinct_features(length)
    newline = torch.zeros(length, dtype=torch.bool)
    newline[-1] = True
    units = [torch.arange(f * per_frame, (f + 1) * per_frame) for f in range(frames)]
    visual = PackedVisual(features=features, kind="video", units=units, newline=newline, grids=[(3, 3)] * frames,
                          **token_ids(newline, torch.arange(length) // per_frame))
    method = build_method("random", Budget("retention", r), seed=0)
    out, records = prune_visual(visual, method, key="doc", log_keep=True)
    k = max(1, round(r * per_frame))
    assert [rec.kind for rec in records] == ["frame"] * frames
    assert [rec.unit for rec in records] == list(range(frames))
    assert all(rec.before == per_frame and rec.after == k for rec in records)
    assert [rec.newlines_before for rec in records] == [1] + [0] * (frames - 1)
    assert [rec.newlines_after for rec in records] == [1] + [0] * (frames - 1)
    expected = ref_prune(visual, [rec.keep for rec in records])
    assert len(expected) == frames * k + 1
    assert torch.equal(out, features[expected])
    # frames are seeded by their own keys, so the same keep lists come back on a second call
    _, again = prune_visual(visual, method, key="doc", log_keep=True)
    assert [rec.keep for rec in again] == [rec.keep for rec in records]


# --------------------------------------------------------------------------------------------------
# Every method: one call over a ragged batch of units picks what one unit at a time picks
# --------------------------------------------------------------------------------------------------

def need_shape(need) -> tuple[int, ...]:
    """Per-patch shape of a vision need's data in these tests (width 6, two heads of width 3)."""
    if need.kind in ("hidden", "cls_hidden"):
        return (6,)
    if need.kind == "keys":
        return (2, 3) if need.per_head else (6,)
    return (2,) if need.per_head else ()


def ragged_units(method, sizes=(16, 9, 25, 4)) -> list[VisualUnit]:
    """Units of different sizes (square grids), with random data for each vision need of ``method``, and (for
    methods that take packed sequences) a unit of two 3x3 views whose second view lost two patches to unpadding."""
    generator = torch.Generator().manual_seed(0)
    layouts = [(torch.zeros(n, dtype=torch.long), torch.arange(n), (math.isqrt(n),) * 2) for n in sizes]
    if not method.needs_grid:
        kept = torch.tensor([0, 1, 2, 4, 5, 6, 7])
        layouts.append((torch.cat([torch.zeros(9, dtype=torch.long), torch.ones(7, dtype=torch.long)]),
                        torch.cat([torch.arange(9), kept]), None))
    units = []
    for index, (tiles, patches, grid) in enumerate(layouts):
        views, side = int(tiles.max()) + 1, math.isqrt(int(patches.max()) + 1)
        data = {need: torch.rand(views, side * side, *need_shape(need), generator=generator) for need in method.vision_needs()}
        units.append(VisualUnit(torch.randn(tiles.numel(), 6, generator=generator), key=f"u{index}", grid=grid,
                                tiles=tiles, patches=patches, vision={need: d[tiles, patches] for need, d in data.items()},
                                tile_vision=data))
    return units


BUDGET_VALUES = {"retention": 0.4, "tokens": 4, "threshold": 0.0}


@pytest.mark.parametrize("faithful", [False, True], ids=["project", "official"])
@pytest.mark.parametrize("case", method_cases().values(), ids=lambda case: case["method"])
def test_every_method_selects_a_ragged_batch_as_it_selects_one_unit_at_a_time(case, faithful, tmp_path):
    """Every budget kind the method takes, with the project's parameters and the official ones (``faithful``;
    the codebook then scores with its official multi-image rule, the double softmax)."""
    from lmms_eval_redundancy.core.registry import Stage, method_class, param_names

    if method_class(case["method"]).stage is not Stage.BEFORE_LLM:
        pytest.skip("chooses inside the LLM")
    if "clip_text" in case:
        pytest.skip("needs a CLIP checkpoint matching a real tower: tests/integration/test_cdpruner.py batches it")
    args = {k: v for k, v in with_files(case, write_codebook(tmp_path, torch.randn(5, 6))).items()
            if k not in ("anyres", *BUDGET_VALUES)}
    name = args.pop("method")
    for kind in method_class(name).budgets:
        official_variant = faithful and "variant" in param_names(name) and kind != "threshold"
        method = build_method(name, Budget(kind, BUDGET_VALUES[kind]), faithful=faithful, **args,
                              **({"variant": "double_softmax"} if official_variant else {}))
        method.attach(SimpleNamespace(config=SimpleNamespace(text_config=SimpleNamespace(hidden_size=6),
                                                             vision_config=SimpleNamespace(model_type="clip_vision_model"))),
                      SimpleNamespace(vision_has_cls=True, vision_feature_layer_index=0, project=lambda states: states,
                                      vision_encoder_layers=[None] * 2))
        units = ragged_units(method)
        together, alone = method.select_units(units), [method.select_unit(unit) for unit in units]
        for batched, single in zip(together, alone, strict=True):
            assert batched.keep.tolist() == single.keep.tolist() and batched.floor_hit == single.floor_hit, kind
            assert (batched.merged is None) == (single.merged is None)
            if batched.merged is not None:
                assert torch.equal(batched.merged, single.merged) and torch.equal(batched.merged_after, single.merged_after)


def loop_keep_positions(scores: torch.Tensor, prunable: torch.Tensor, keep_counts: list[int]) -> list[torch.Tensor]:
    """One row at a time: every non-prunable position plus the ``k`` top-scoring prunable ones (ties to lower index)."""
    kept = []
    for row_scores, row_prunable, k in zip(scores, prunable, keep_counts):
        candidates = torch.nonzero(row_prunable).flatten()
        order = torch.sort(row_scores[candidates], descending=True, stable=True).indices[:k]
        keep = ~row_prunable
        keep[candidates[order]] = True
        kept.append(torch.nonzero(keep).flatten())
    return kept


def loop_rectangular(kept: list[torch.Tensor], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One row at a time: the kept positions and the lowest dropped ones up to the widest row, sorted."""
    width = max(k.numel() for k in kept)
    gathers, masks = [], []
    for keep in kept:
        is_kept = torch.zeros(length, dtype=torch.bool)
        is_kept[keep] = True
        positions = torch.cat([keep, torch.nonzero(~is_kept).flatten()[: width - keep.numel()]]).sort().values
        gathers.append(positions)
        masks.append(is_kept[positions])
    return torch.stack(gathers), torch.stack(masks)


@pytest.mark.parametrize("seed", range(6))
def test_batched_keep_positions_and_rectangular_pick_as_one_row_at_a_time(seed):
    """Ragged rows (some without prunable tokens, budgets from 0 to more than present), scores with ties and -inf."""
    from lmms_eval_redundancy.methods.base import keep_positions, rectangular

    generator = torch.Generator().manual_seed(seed)
    rows, length = 5, 23
    scores = torch.randint(0, 4, (rows, length), generator=generator).float()  # few values: many ties
    scores[torch.rand(rows, length, generator=generator) < 0.1] = -math.inf
    prunable = torch.rand(rows, length, generator=generator) < torch.rand(rows, 1, generator=generator)
    prunable[seed % rows] = False
    counts = torch.randint(0, length + 2, (rows,), generator=generator).tolist()
    counts[(seed + 1) % rows] = 0
    expected = loop_keep_positions(scores, prunable, counts)
    kept = keep_positions(scores, prunable, counts)
    assert [torch.nonzero(row).flatten().tolist() for row in kept] == [row.tolist() for row in expected]
    gather, mask = rectangular(kept)
    expected_gather, expected_mask = loop_rectangular(expected, length)
    assert torch.equal(gather, expected_gather) and torch.equal(mask, expected_mask)
