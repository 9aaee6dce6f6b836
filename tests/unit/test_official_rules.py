"""The official code's quirks, each selectable and checked against a plain reference of the official rule."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from lmms_eval_redundancy.codebook.store import Codebook, save_codebook
from lmms_eval_redundancy.core.budget import Budget
from lmms_eval_redundancy.core.registry import MethodError, build_method
from lmms_eval_redundancy.core.visuals import VisionNeed, VisualUnit
from lmms_eval_redundancy.methods.base import row_indices
from lmms_eval_redundancy.methods.codebook import keep_strictly_below_cut


def double_softmax_scores_reference(features, prototypes) -> list[float]:
    n, p = features.shape[0], prototypes.shape[0]
    cos = [[float(torch.nn.functional.cosine_similarity(features[i].double(), prototypes[j].double(), dim=0))
            for j in range(p)] for i in range(n)]
    over_tokens = [[math.exp(cos[i][j]) / sum(math.exp(cos[m][j]) for m in range(n)) for j in range(p)] for i in range(n)]
    over_protos = [[math.exp(cos[i][j]) / sum(math.exp(cos[i][q]) for q in range(p)) for j in range(p)] for i in range(n)]
    return [max(over_tokens[i][j] * over_protos[i][j] for j in range(p)) for i in range(n)]


def official_strict_cut(scores: list[float], r: float) -> list[int]:
    """Drop the round(N(1-r)) highest scores and everything equal to the lowest of them; keep the rest."""
    drop = round(len(scores) * (1 - r))
    if drop == 0:
        return list(range(len(scores)))
    cut = sorted(scores, reverse=True)[drop - 1]
    kept = [i for i, s in enumerate(scores) if s < cut]
    return kept or [min(range(len(scores)), key=lambda i: (scores[i], i))]


def codebook_method(tmp_path, prototypes, budget, **params):
    path = save_codebook(Codebook(prototypes, {"model": "unit test"}), tmp_path / "cb.safetensors")
    method = build_method("codebook", budget, codebook=str(path), **params)
    method.attach(SimpleNamespace(config=SimpleNamespace(text_config=SimpleNamespace(hidden_size=prototypes.shape[1]))), None)
    return method


def test_strict_cut_drops_ties_at_the_cut():
    # rows: two identical scores at the cut (the count keeps 2 of 4, the official cut keeps 1); all tied (nothing is
    # strictly below, the floor keeps one); nothing to drop; a shorter unit padded with +inf
    inf = float("inf")
    scores = torch.tensor([[0.1, 0.5, 0.5, 0.9], [0.3] * 4, [0.1, 0.5, 0.5, 0.9], [0.7, 0.2, inf, inf]])
    keep, floor_hit = keep_strictly_below_cut(scores, torch.tensor([2, 2, 4, 1]))
    assert [row.tolist() for row in row_indices(keep)] == [[0], [0], [0, 1, 2, 3], [1]]
    assert floor_hit.tolist() == [False, True, False, False]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("r", [0.25, 0.5])
def test_double_softmax_strict_ties_equal_the_official_reference_with_duplicated_tokens(tmp_path, seed, r):
    generator = torch.Generator().manual_seed(seed)
    features, prototypes = torch.randn(12, 6, generator=generator), torch.randn(5, 6, generator=generator)
    features[7] = features[3]  # an exact duplicate: tied scores
    features[9] = features[3]
    strict = codebook_method(tmp_path, prototypes, Budget("retention", r), variant="double_softmax", ties="strict")
    selection = strict.select_unit(VisualUnit(features, key="k"))
    assert selection.keep.tolist() == official_strict_cut(double_softmax_scores_reference(features, prototypes), r)
    count = codebook_method(tmp_path, prototypes, Budget("retention", r), variant="double_softmax")
    assert count.params.ties == "count"  # the project's default: exactly the count
    assert len(count.select_unit(VisualUnit(features, key="k")).keep) == 12 - round(12 * (1 - r))


def full_view_reference(view_scores: list[float], view_patches: list[int], k: int) -> list[int]:
    """Top k of the whole view (padding included, ties to the lower index), then only tokens that exist."""
    picks = sorted(range(len(view_scores)), key=lambda p: (-view_scores[p], p))[:k]
    return [j for j, patch in enumerate(view_patches) if patch in picks]


def attached_fastervlm(budget: Budget, **params):
    """FasterVLM bound to a CLIP tower (a [CLS] token) without loading a model."""
    method = build_method("fastervlm", budget, **params)
    method.attach(SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(model_type="clip_vision_model"))),
                  SimpleNamespace(vision_has_cls=True, vision_feature_layer_index=0))
    return method


@pytest.mark.parametrize("seed", range(6))
def test_fastervlm_full_view_rule_equals_the_official_reference(seed):
    generator = torch.Generator().manual_seed(seed)
    view_scores = torch.rand(16, generator=generator)
    view_scores[5] = view_scores[2]  # a tie
    view_patches = torch.tensor([0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14])  # the last column was padding
    need = VisionNeed("cls_attention")
    unit = VisualUnit(torch.randn(12, 4, generator=generator), key="k", tiles=torch.zeros(12, dtype=torch.long),
                      patches=view_patches, vision={need: view_scores[view_patches]}, tile_vision={need: view_scores[None]})
    official = attached_fastervlm(Budget("tokens", 5), per_view_topk="full_view").select_unit(unit)
    assert official.keep.tolist() == full_view_reference(view_scores.tolist(), view_patches.tolist(), 5)
    default = attached_fastervlm(Budget("tokens", 5)).select_unit(unit)
    assert len(default.keep) == 5 and len(official.keep) <= 5


def test_faithful_selects_every_official_value_and_explicit_values_win(tmp_path):
    assert build_method("fastervlm", Budget("tokens", 4), faithful=True).params.per_view_topk == "full_view"
    assert build_method("fastervlm", Budget("tokens", 4), faithful=True, per_view_topk="unpadded").params.per_view_topk == "unpadded"
    official = codebook_method(tmp_path, torch.randn(3, 4), Budget("retention", 0.5), faithful=True, variant="double_softmax")
    assert official.params.ties == "strict" and official.settings()["ties"] == "strict"
    assert build_method("random", Budget("tokens", 4), faithful=True).params.seed == 0  # nothing official to change


def test_an_unknown_choice_names_the_choices():
    with pytest.raises(MethodError, match="unpadded, full_view"):
        build_method("fastervlm", Budget("tokens", 4), per_view_topk="fullview")


# ---- precision: scoring in the model's dtype ---------------------------------------------------------

def fp16_cosines_as_officially(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """The official expression in fp16: normalise both sides, multiply (no float32 anywhere)."""
    f = torch.nn.functional.normalize(features.half(), p=2, dim=-1)
    c = torch.nn.functional.normalize(prototypes.half(), p=2, dim=-1)
    return torch.matmul(f, c.transpose(0, 1))


@pytest.mark.parametrize("seed", range(4))
def test_codebook_model_precision_scores_like_the_official_fp16_code(tmp_path, seed):
    generator = torch.Generator().manual_seed(seed)
    features, prototypes = torch.randn(40, 16, generator=generator).half(), torch.randn(6, 16, generator=generator).half()
    scores = fp16_cosines_as_officially(features, prototypes).max(dim=-1).values.tolist()
    threshold = sorted(scores)[20]
    expected = [i for i, s in enumerate(scores) if s < threshold]
    method = codebook_method(tmp_path, prototypes, Budget("threshold", threshold), precision="model")
    assert method.select_unit(VisualUnit(features, key="k")).keep.tolist() == expected
    default = codebook_method(tmp_path, prototypes, Budget("threshold", threshold))
    float32 = torch.nn.functional.normalize(features.float(), dim=-1) @ torch.nn.functional.normalize(prototypes.float(), dim=-1).T
    assert default.select_unit(VisualUnit(features, key="k")).keep.tolist() == torch.nonzero(
        float32.max(dim=-1).values < threshold).flatten().tolist()


def greedy_max_min(distance: list[list[float]], k: int) -> list[int]:
    """DivPrune's greedy rule over a given distance matrix, written out (ties to the lower index)."""
    n = len(distance)
    nearest = [min(distance[i][j] for j in range(n) if j != i) for i in range(n)]
    picked = [max(range(n), key=lambda i: (nearest[i], -i))]
    while len(picked) < k:
        rest = [i for i in range(n) if i not in picked]
        picked.append(max(rest, key=lambda i: (min(distance[i][p] for p in picked), -i)))
    return sorted(picked)


@pytest.mark.parametrize("seed", range(4))
def test_divprune_model_precision_picks_like_the_official_fp16_distances(seed):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(30, 16, generator=generator).half()
    distance = (1 - fp16_cosines_as_officially(features, features)).tolist()
    method = build_method("divprune", Budget("tokens", 8), precision="model")
    assert method.select_unit(VisualUnit(features, key="k")).keep.tolist() == greedy_max_min(distance, 8)
