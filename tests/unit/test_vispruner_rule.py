"""VisPruner's selection rule against a plain loop reference and against the official cases."""

from __future__ import annotations

import pytest
import torch
from conftest import fidelity_cases, fidelity_tensors, official_expected

from lmms_eval_redundancy.methods import vispruner


def reference(features: torch.Tensor, scores: torch.Tensor, tokens: int, ratio: float,
              official_odd_broadcast: bool = False) -> list[int]:
    """The rule written out on Python lists, over a float32 cosine table (exact duplicates tie exactly)."""
    n = features.shape[0]
    important_count = int(tokens * ratio)
    diverse_count = tokens - important_count
    ranked = sorted(range(n), key=lambda i: (-float(scores[i]), i))
    important, residual = ranked[:important_count], ranked[important_count:]
    unit = features / features.norm(dim=-1, keepdim=True)
    cosine = (unit @ unit.T).tolist()
    while diverse_count > 0:
        cap = min(8, len(residual) - diverse_count)
        if cap <= 0:
            break
        even, odd = residual[0::2], residual[1::2]
        duplication = [max(cosine[a][b] for b in odd) for a in even]
        by_duplication = sorted(range(len(even)), key=lambda k: (-duplication[k], k))
        dropped = min(cap, len(even))
        if official_odd_broadcast and len(residual) % 2 == 1 and len(residual) // 2 == cap:
            dropped = len(even)
        residual = [even[k] for k in by_duplication[dropped:]] + odd
    return sorted(important + (residual if diverse_count > 0 else []))


def random_view(generator: torch.Generator, n: int, distinct: int | None = None):
    """Features ``[n, 5]`` (``distinct``: only that many different rows) and attention scores ``[n]``."""
    features = torch.randn(n, 5, generator=generator)
    if distinct:
        features = features[torch.randint(0, distinct, (n,), generator=generator)]
    return features, torch.rand(n, generator=generator)


BUDGETS = [(8, 0.5), (12, 0.25), (20, 0.75), (16, 0.0), (10, 1.0), (64, 0.5), (7, 0.5)]


@pytest.mark.parametrize("seed", range(6))
def test_vispruner_equals_the_loop_reference(seed):
    generator = torch.Generator().manual_seed(seed)
    n = int(torch.randint(9, 70, (1,), generator=generator))
    features, scores = random_view(generator, n, distinct=6 if seed % 3 == 0 else None)
    if seed % 2:
        scores = torch.floor(scores * 4) / 4  # score ties
    for tokens, ratio in BUDGETS:
        keep = vispruner.select(features, scores, tokens, ratio)
        assert keep.tolist() == reference(features, scores, tokens, ratio)
        assert len(keep) == min(tokens, n)


@pytest.mark.parametrize("n,tokens,ratio", [(20, 12, 0.25), (25, 16, 0.5), (20, 10, 0.5)])
def test_official_odd_broadcast_reproduces_the_official_odd_residual_run(n, tokens, ratio):
    # |L| = 17 with q = 8 = |L| // 2: the official broadcast drops all 9 even entries; |L| = 15 agrees either way
    features, scores = random_view(torch.Generator().manual_seed(n + tokens), n)
    official = vispruner.select(features, scores, tokens, ratio, official_odd_broadcast=True)
    assert official.tolist() == reference(features, scores, tokens, ratio, official_odd_broadcast=True)
    assert len(vispruner.select(features, scores, tokens, ratio)) == tokens
    if (n, tokens) == (20, 12):
        assert len(official) == tokens - 1


def test_a_ragged_batch_equals_each_view_alone():
    generator = torch.Generator().manual_seed(0)
    views = [random_view(generator, n, distinct=d) for n, d in ((576, None), (16, None), (41, 5), (100, None), (9, None))]
    budgets = [128, 8, 20, 40, 20]
    scores = [s for _, s in views]
    for dtype, ratio, odd in ((torch.float32, 0.5, False), (torch.float32, 0.3, True), (torch.float32, 1.0, False),
                              (torch.float16, 0.5, False)):
        features = [f.to(dtype) for f, _ in views]
        batched = vispruner.select_batch(features, scores, budgets, ratio, dtype, odd)
        alone = [vispruner.select(f, s, t, ratio, dtype, odd) for f, s, t in zip(features, scores, budgets)]
        assert [b.tolist() for b in batched] == [a.tolist() for a in alone]
        if not odd:
            assert [len(b) for b in batched] == [min(t, len(f)) for t, f in zip(budgets, features)]


def anyres_reference(view_masks: torch.Tensor, image_size, width: int, height: int, side: int, unpad: bool) -> list[bool]:
    """Walk the stitched crop grid row by row (unpadded by LLaVA's integer rule, a kept newline after each row)."""
    packed = view_masks[0].tolist()
    if view_masks.shape[0] == 1:
        return packed + [True] * unpad
    rows, columns = range(height * side), range(width * side)
    if unpad:
        original_width, original_height = image_size
        if original_width / original_height > (width * side) / (height * side):
            padding = (height * side - int(original_height * (width * side) / original_width)) // 2
            rows = range(padding, height * side - padding)
        else:
            padding = (width * side - int(original_width * (height * side) / original_height)) // 2
            columns = range(padding, width * side - padding)
    for y in rows:
        for x in columns:
            packed.append(bool(view_masks[1 + (y // side) * width + x // side, (y % side) * side + x % side]))
        packed += [True] * unpad
    return packed


@pytest.mark.parametrize("image_size", [(1000, 700), (600, 1100), (672, 672), (500, 90)])
@pytest.mark.parametrize("width,height", [(2, 2), (3, 1), (1, 2)])
def test_official_anyres_mask_equals_the_grid_walk(image_size, width, height):
    generator = torch.Generator().manual_seed(width + 3 * height)
    side = 6
    view_masks = torch.rand(1 + width * height, side * side, generator=generator) < 0.3
    for unpad in (True, False):
        packed = vispruner.official_anyres_mask(view_masks, image_size, width, height, side, unpad)
        assert packed.tolist() == anyres_reference(view_masks, image_size, width, height, side, unpad)
        single = vispruner.official_anyres_mask(view_masks[:1], image_size, 1, 1, side, unpad)
        assert single.tolist() == anyres_reference(view_masks[:1], image_size, 1, 1, side, unpad)


# ---- official cases (the fidelity folder beside the repository: <repo>/../shared/fidelity) ----------------------------

@pytest.mark.parametrize("case", fidelity_cases("vispruner", "select"))
def test_official_select_cases(case):
    tensors = fidelity_tensors("vispruner")
    inputs, settings = case["inputs"], case["settings"]
    features, attentions = tensors[inputs["image_features"]], tensors[inputs["image_attentions"]]
    tokens, ratio = settings["visual_token_num"], settings["important_ratio"]
    scores = vispruner.head_mean(attentions)
    kept = [k.tolist() for k in vispruner.select_batch(list(features), list(scores), [tokens] * len(features), ratio)]
    if case.get("official_error"):
        # the project's behaviour where the official indexing raises: the same rule, min(q, |A|) dropped
        assert kept == [reference(f, s, tokens, ratio) for f, s in zip(features, scores)]
        assert all(len(k) == min(tokens, settings["num_patches"]) for k in kept)
    else:
        assert kept == official_expected(case)[0]["kept"]


@pytest.mark.parametrize("case", fidelity_cases("vispruner", "siglip_select"))
def test_official_siglip_select_cases(case):
    tensors = fidelity_tensors("vispruner")
    inputs, settings = case["inputs"], case["settings"]
    per_head = vispruner.siglip_scores(tensors[inputs["last_layer_attentions"]])
    assert torch.equal(per_head, tensors[case["expected_tensors"]["image_attentions"]])
    features = tensors[inputs["image_features"]]
    kept = vispruner.select_batch(list(features), list(vispruner.head_mean(per_head)),
                                  [settings["visual_token_num"]] * len(features), settings["important_ratio"])
    assert [k.tolist() for k in kept] == official_expected(case)[0]["kept"]


@pytest.mark.parametrize("case", fidelity_cases("vispruner", "anyres_mask"))
def test_official_anyres_mask_cases(case):
    tensors = fidelity_tensors("vispruner")
    settings = case["settings"]
    packed = vispruner.official_anyres_mask(tensors[case["inputs"]["index_mask"]], tuple(settings["image_size"]),
                                            settings["num_patch_width"], settings["num_patch_height"],
                                            settings["side"], settings["unpad"])
    assert len(packed) == case["expected"]["length"]
    assert torch.nonzero(packed).flatten().tolist() == case["expected"]["true_positions"]
