"""VisionZip's selection rule against a plain loop reference and against the official cases."""

from __future__ import annotations

import pytest
import torch
from conftest import fidelity_cases, fidelity_tensors, official_expected

from lmms_eval_redundancy.methods import visionzip


def reference(hidden: torch.Tensor, scores: torch.Tensor, metric: torch.Tensor, dominant: int, contextual: int,
              has_cls: bool = True) -> tuple[list[float], list[int], list[int], list[int]]:
    """The rule written out in double precision: (tokens, dominant patches, targets, contextual slot per patch)."""
    offset = int(has_cls)
    n = scores.shape[0]
    patch_hidden, keys = hidden[offset:].double(), metric[offset:].double()
    keys = [k / k.norm() for k in keys]
    ranked = sorted(range(n), key=lambda i: (-float(scores[i]), i))
    chosen = sorted(ranked[: dominant - offset])
    rest = [i for i in range(n) if i not in chosen]
    slot_of = [-1] * n
    targets = []
    if contextual:
        step = max(1, len(rest) // contextual)
        targets = [rest[p] for p in range(0, len(rest), step)][:contextual]
        for i in rest:
            if i in targets:
                slot_of[i] = targets.index(i)
            else:
                similarities = [float(keys[i] @ keys[t]) for t in targets]
                slot_of[i] = similarities.index(max(similarities))
    merged = []
    for j, t in enumerate(targets):
        members = [i for i in rest if slot_of[i] == j and i != t]
        total = sum((patch_hidden[i] for i in members), torch.zeros_like(patch_hidden[t]))
        merged.append(patch_hidden[t] + total / max(1, len(members)))
    rows = [hidden[:offset].double(), patch_hidden[chosen], *(m[None] for m in merged)]
    return torch.cat(rows).tolist(), chosen, targets, slot_of


def random_view(generator: torch.Generator, n: int, heads: int = 3, has_cls: bool = True, quantised: bool = False):
    """Hidden states, [CLS] attention row, per-head keys of one view (``quantised``: attention in 1/16 steps, ties)."""
    t = n + int(has_cls)
    row = torch.rand(heads, t, generator=generator)
    if quantised:
        row = torch.floor(row * 4) / 16
    return torch.randn(t, 6, generator=generator), row, torch.randn(heads, t, 4, generator=generator)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("has_cls", [True, False])
def test_visionzip_equals_the_loop_reference(seed, has_cls):
    generator = torch.Generator().manual_seed(seed)
    n = int(torch.randint(6, 60, (1,), generator=generator))
    hidden, row, keys = random_view(generator, n, has_cls=has_cls, quantised=seed % 2 == 1)
    scores = visionzip.dominant_scores(row) if has_cls else row.sum(dim=0)
    metric = visionzip.head_mean_keys(keys)
    for dominant, contextual in ((1, 1), (4, 3), (n // 2, n // 4 + 1), (int(has_cls), n), (n // 3, 0)):
        merged = visionzip.select(hidden, scores, metric, dominant, contextual, has_cls)
        tokens, chosen, targets, slot_of = reference(hidden, scores, metric, dominant, contextual, has_cls)
        assert merged.dominant.tolist() == chosen
        assert merged.targets.tolist() == targets
        assert merged.merged_into.tolist() == slot_of
        torch.testing.assert_close(merged.tokens.double(), torch.tensor(tokens, dtype=torch.float64), rtol=1e-5, atol=1e-5)


def test_a_ragged_batch_equals_each_view_alone():
    generator = torch.Generator().manual_seed(0)
    views = [random_view(generator, n, quantised=i % 2 == 0) for i, n in enumerate((576, 16, 49, 100, 9))]
    dominant, contextual = [54, 4, 1, 30, 3], [10, 2, 5, 0, 6]
    for dtype in (torch.float32, torch.float16):
        hidden = [h.to(dtype) for h, _, _ in views]
        scores = [visionzip.dominant_scores(row, dtype) for _, row, _ in views]
        metric = [visionzip.head_mean_keys(keys, dtype) for _, _, keys in views]
        batched = visionzip.select_batch(hidden, scores, metric, dominant, contextual, dtype=dtype)
        for i, together in enumerate(batched):
            alone = visionzip.select(hidden[i], scores[i], metric[i], dominant[i], contextual[i], dtype=dtype)
            assert together.dominant.tolist() == alone.dominant.tolist()
            assert together.targets.tolist() == alone.targets.tolist()
            assert together.merged_into.tolist() == alone.merged_into.tolist()
            assert together.tokens.shape == (dominant[i] + contextual[i], 6) and together.tokens.dtype == dtype
            torch.testing.assert_close(together.tokens, alone.tokens)


def test_budget_split_and_counts():
    assert [visionzip.split_budget(k) for k in (64, 128, 192, 32, 16)] == [(54, 10), (108, 20), (162, 30), (27, 5), (13, 3)]
    hidden, row, keys = random_view(torch.Generator().manual_seed(1), 16)
    metric = visionzip.head_mean_keys(keys)
    only_dominant = visionzip.select(hidden, visionzip.dominant_scores(row), metric, 5, 0)
    assert only_dominant.tokens.shape[0] == 5 and only_dominant.targets.numel() == 0
    assert set(only_dominant.merged_into.tolist()) == {-1}
    with pytest.raises(ValueError):
        visionzip.select(hidden, visionzip.dominant_scores(row), metric, 10, 8)  # 9 patches + 8 targets > 16


def crop_layout_reference(crop_tokens: torch.Tensor, dominant: torch.Tensor, width: int, height: int, side: int):
    """Walk the stitched crop grid row by row and emit each dominant patch met, then [CLS] and contextual rows."""
    rows = []
    for y in range(height * side):
        for x in range(width * side):
            crop, patch = (y // side) * width + x // side, (y % side) * side + x % side
            kept = sorted(dominant[crop].tolist())
            if patch in kept:
                rows.append(crop_tokens[crop, 1 + kept.index(patch)])
    rows += [crop_tokens[crop, 0] for crop in range(width * height)]
    rows += [token for crop in range(width * height) for token in crop_tokens[crop, 1 + dominant.shape[1]:]]
    return torch.stack(rows)


@pytest.mark.parametrize("width,height", [(2, 2), (3, 1), (1, 2)])
def test_official_crop_layout_equals_the_grid_walk(width, height):
    generator = torch.Generator().manual_seed(width * 10 + height)
    side, kept, contextual = 4, 5, 2
    dominant = torch.stack([torch.randperm(side * side, generator=generator)[:kept] for _ in range(width * height)])
    crop_tokens = torch.randn(width * height, 1 + kept + contextual, 3, generator=generator)
    layout = visionzip.official_crop_layout(crop_tokens, dominant, width, height, side)
    assert torch.equal(layout, crop_layout_reference(crop_tokens, dominant, width, height, side))


# ---- official cases (the fidelity folder beside the repository: <repo>/../shared/fidelity) ----------------------------

@pytest.fixture
def one_thread():
    """The official outputs were computed with one thread; two threads change the last bit of some sums."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", fidelity_cases("visionzip", "select"))
def test_official_select_cases(case, one_thread):
    tensors = fidelity_tensors("visionzip")
    inputs, settings = case["inputs"], case["settings"]
    expected, expected_tensors = official_expected(case)
    hidden, row = tensors[inputs["hidden_states"]], tensors[inputs["attn_cls_row"]][:, :, 0]
    if "key_states" in inputs:
        metric = visionzip.head_mean_keys(tensors[inputs["key_states"]])
        assert torch.equal(metric, tensors[expected_tensors["metric"]])
    else:
        metric = tensors[inputs["metric"]]
    scores = visionzip.dominant_scores(row)
    views = hidden.shape[0]
    merged = visionzip.select_batch(list(hidden), list(scores), list(metric), [settings["dominant"]] * views,
                                    [settings["contextual"]] * views)
    ranked = visionzip.rank_patches(scores)[:, : settings["dominant_num"]] + 1
    assert [[0, *r.tolist()] for r in ranked] == expected["all_indices"]
    assert [[0, *(m.dominant + 1).tolist()] for m in merged] == expected["dominant_sorted"]
    assert torch.equal(torch.stack([m.tokens for m in merged]), tensors[expected_tensors["hidden_states_save"]])


@pytest.mark.parametrize("case", fidelity_cases("visionzip", "restore"))
def test_official_restore_cases(case):
    tensors = fidelity_tensors("visionzip")
    inputs, settings = case["inputs"], case["settings"]
    keep = tensors[inputs["cur_keep_idx"]]
    dominant = keep.sort(dim=1).values[:, 1:] - 1  # drop [CLS] (0), back to patch indices
    layout = visionzip.official_crop_layout(tensors[inputs["image_feature"]], dominant, settings["width"],
                                            settings["height"], settings["feature_side"])
    assert torch.equal(layout, tensors[case["expected_tensors"]["image_feature_select"]])


def test_dominant_and_contextual_set_the_split_and_clashes_are_refused():
    from types import SimpleNamespace

    from lmms_eval_redundancy.core.budget import KEEP_ALL, Budget
    from lmms_eval_redundancy.core.registry import MethodError, build_method
    from lmms_eval_redundancy.core.visuals import VisualUnit

    def kept(budget, **params):
        method = build_method("visionzip", budget, **params)
        method.attach(SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(model_type="clip_vision_model"))),
                      SimpleNamespace(vision_has_cls=True, vision_feature_layer_index=0))
        generator = torch.Generator().manual_seed(0)
        data = {need: torch.rand(1, 16, *{"hidden": (6,), "cls_hidden": (6,), "keys": (2, 3)}.get(need.kind, (2,)),
                                 generator=generator) for need in method.vision_needs()}
        unit = VisualUnit(torch.randn(16, 6, generator=generator), key="u", tiles=torch.zeros(16, dtype=torch.long),
                          patches=torch.arange(16), vision={need: d[0] for need, d in data.items()}, tile_vision=data)
        (selection,) = method.select_units([unit])
        return selection.keep.numel(), selection.merged.shape[0]

    # (kept patches, new tokens): split_budget(8) = (7, 1) keeps 6 patches, adds [CLS] and 1 contextual token
    assert kept(Budget("tokens", 8)) == (6, 2)
    assert kept(Budget("tokens", 8), contextual=3) == (4, 4)
    assert kept(KEEP_ALL, dominant=6, contextual=2) == (5, 3)
    with pytest.raises(MethodError, match="give only one of them"):
        kept(Budget("tokens", 8), dominant=6, contextual=3)
    with pytest.raises(MethodError, match="needs a budget"):
        build_method("visionzip", KEEP_ALL, dominant=6)
