"""DART's rules against a loop reference of the official code and the official fidelity cases."""

from __future__ import annotations

import pytest
import torch
from conftest import fidelity_cases, fidelity_tensors, official_expected

from lmms_eval_redundancy.methods import dart
from lmms_eval_redundancy.methods.pdrop import rms_norm

# ---- a loop reference of get_retained_image_token (one sample) ------------------------------------------

def official_reference(features, keys, image_start, image_count, picks, pivot_image=4, pivot_text=4,
                       listed_order=False, dtype=torch.float32):
    """The official walk with Python sets, ties to the lower index: ``features [L, D]``, ``keys [H, L, d]``.
    Returns the retained set (in its iteration order) and the positions later layers see."""
    length = features.shape[0]
    norms = torch.norm(keys.to(dtype).permute(1, 0, 2).reshape(length, -1), p=1, dim=-1).tolist()
    image = range(image_start, image_start + image_count)
    image_pivots = sorted(image, key=lambda j: (-norms[j], j))[:pivot_image]
    text_pivots = sorted(range(image_start + image_count, length), key=lambda j: (-norms[j], j))[:pivot_text]
    retained = set(image_pivots + text_pivots)
    candidates = set(image) - set(image_pivots)
    vectors = features.to(dtype)
    for pivot in (image_pivots + text_pivots if listed_order else list(retained)):
        pool = list(candidates)
        cosine = torch.nn.functional.cosine_similarity(vectors[pivot], vectors[pool], dim=-1).tolist()
        chosen = [pool[i] for i in sorted(range(len(pool)), key=lambda i: (cosine[i], i))[:picks]]
        retained.update(chosen)
        candidates.difference_update(chosen)
    retained.difference_update(text_pivots)
    keep = [j for j in range(length) if j not in image or j in retained]
    return list(retained), keep


def official_set_order(selection: dart.DartSelection, row: int, pivot_image: int) -> list[int]:
    """The retained set rebuilt as the official code builds it, from the pivots and the picks in walk order."""
    pivots = [p for p in selection.pivots[row].tolist() if p >= 0]
    retained = set(pivots)
    for picks in selection.picks[row].tolist():
        retained.update(p for p in picks if p >= 0)
    retained.difference_update(pivots[pivot_image:])
    return list(retained)


def random_sample(generator, dim=12, heads=2, head_dim=6):
    before = int(torch.randint(0, 20, (1,), generator=generator))
    count = int(torch.randint(30, 90, (1,), generator=generator))
    after = int(torch.randint(1, 14, (1,), generator=generator))
    length = before + count + after
    features = torch.randn(length, dim, generator=generator)
    keys = torch.randn(heads, length, head_dim, generator=generator)
    features[before + 7] = features[before + 3]  # duplicated image tokens: cosine ties
    picks = int(torch.randint(1, (count - 4) // 8 + 1, (1,), generator=generator))
    return features, keys, before, count, picks


def run(samples, left: list[bool], dtype=torch.float32, pivot_order="set"):
    """Stack samples of different lengths, each padded on its side, and select; returns the selection and offsets."""
    length = max(s[0].shape[0] for s in samples) + 3
    noise = torch.Generator().manual_seed(length)
    features, keys, valid, image, offsets = [], [], [], [], []
    for (feature, key, start, count, _), on_left in zip(samples, left):
        offset = length - feature.shape[0] if on_left else 0
        rows = slice(offset, offset + feature.shape[0])
        f = torch.randn(length, feature.shape[1], generator=noise) * 9  # padding holds garbage
        k = torch.randn(key.shape[0], length, key.shape[2], generator=noise) * 9
        f[rows], k[:, rows] = feature, key
        real, block = torch.zeros(length, dtype=torch.bool), torch.zeros(length, dtype=torch.bool)
        real[rows] = True
        block[offset + start: offset + start + count] = True
        features.append(f)
        keys.append(k)
        valid.append(real)
        image.append(block)
        offsets.append(offset)
    selection = dart.select(torch.stack(features).to(dtype), torch.stack(keys).to(dtype), torch.stack(valid),
                            torch.stack(image), [s[4] for s in samples], pivot_order=pivot_order, dtype=dtype)
    return selection, offsets


@pytest.mark.parametrize("pivot_order", dart.PIVOT_ORDERS)
@pytest.mark.parametrize("seed", range(8))
def test_one_sample_equals_the_official_reference(seed, pivot_order):
    generator = torch.Generator().manual_seed(seed)
    sample = random_sample(generator)
    retained, keep = official_reference(*sample, listed_order=pivot_order == "listed")
    selection, _ = run([sample], left=[False], pivot_order=pivot_order)
    assert selection.keep[0].nonzero().flatten().tolist() == keep
    if pivot_order == "set":
        assert official_set_order(selection, 0, 4) == retained


def unshift(positions: torch.Tensor, offset: int) -> torch.Tensor:
    """Batch positions back to the sample's own (-1 fillers stay)."""
    return positions.where(positions < 0, positions - offset)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("seed", range(4))
def test_a_ragged_padded_batch_picks_exactly_what_each_sample_picks_alone(seed, dtype):
    generator = torch.Generator().manual_seed(100 + seed)
    samples = [random_sample(generator) for _ in range(5)]
    batch, offsets = run(samples, left=[True, False, True, False, True], dtype=dtype)
    for index, sample in enumerate(samples):
        alone, _ = run([sample], left=[False], dtype=dtype)
        rows = slice(offsets[index], offsets[index] + sample[0].shape[0])
        assert torch.equal(batch.keep[index, rows], alone.keep[0, : sample[0].shape[0]])
        assert batch.keep[index].sum() == alone.keep[0].sum()
        walk, picks = (unshift(t[index], offsets[index]) for t in (batch.walk, batch.picks))
        assert torch.equal(walk, alone.walk[0])
        width = alone.picks.shape[2]
        assert torch.equal(picks[:, :width], alone.picks[0]) and (picks[:, width:] == -1).all()
        assert official_set_order(alone, 0, 4) == official_reference(*sample, dtype=dtype)[0]


def test_budget_arithmetic_matches_the_spec():
    assert [4 + 8 * dart.picks_per_pivot(576, m) for m in (192, 128, 64)] == [196, 132, 68]
    assert dart.picks_per_pivot(576, 100) == 12
    assert dart.picks_per_pivot(100, None, 0.778) == 2 and dart.picks_per_pivot(150, None, 0.5) == 9
    assert dart.picks_per_pivot(2000, 128, llava_next_retain=320) == 40
    assert dart.picks_per_pivot(110, 128, llava_next_retain=320) == 13  # min(320, N - 4) // 8
    assert dart.picks_per_pivot(120, 60, pivot_image=2, pivot_text=3) == 12
    assert dart.qwen_picks_per_pivot(576, 0.778) == 15


def test_a_budget_beyond_the_image_keeps_every_image_token_and_missing_pivots_are_skipped():
    generator = torch.Generator().manual_seed(3)
    features, keys = torch.randn(1, 30, 12, generator=generator), torch.randn(1, 2, 30, 6, generator=generator)
    valid, image = torch.ones(1, 30, dtype=torch.bool), torch.zeros(1, 30, dtype=torch.bool)
    image[0, 2:28] = True  # two text tokens after the image: two text pivots of four
    selection = dart.select(features, keys, valid, image, [9])
    assert selection.keep.all()
    assert (selection.pivots[0] >= 0).sum() == 6 and (selection.walk[0] >= 0).sum() == 6
    assert sorted(p for p in selection.picks[0].flatten().tolist() if p >= 0) == [p for p in range(2, 28)
                                                                                   if p not in selection.pivots[0]]


def test_an_unknown_pivot_order_is_refused():
    with pytest.raises(ValueError, match="set, listed"):
        dart.walk_order([3, 1], "sorted")


# ---- the official cases ----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", fidelity_cases("dart"))
def test_official_case(case):
    settings, config, tensors = case["settings"], case["settings"]["config"], fidelity_tensors("dart")
    inputs = {name: tensors[key] for name, key in case["inputs"].items()}
    dtype = torch.float16 if case["dtype"] == "float16" else torch.float32
    if "hidden_pre_norm" in inputs:
        features = rms_norm(inputs["hidden_pre_norm"], inputs["norm_weight"], settings["rms_eps"])
        assert torch.equal(features, tensors[case["expected_tensors"]["last_layer_state"]])
    else:
        features = inputs["last_layer_state"]
    keys = inputs["key_states"]
    length = keys.shape[2]
    next_path = settings["text_length"] is not None
    count = length - settings["text_length"] if next_path else config["image_token_length"]
    start = config["image_token_start_index"]
    picks = dart.picks_per_pivot(count, config["max_num_trunction"], config["reduction_ratio"], config["pivot_image_token"],
                                 config["pivot_text_token"], config["retain_token_num_for_llava_next"] if next_path else None)
    image = torch.zeros(1, length, dtype=torch.bool)
    image[0, start:start + count] = True
    selection = dart.select(features, keys, torch.ones(1, length, dtype=torch.bool), image, [picks],
                            config["pivot_image_token"], config["pivot_text_token"], dtype=dtype)
    if case.get("official_error"):  # 8T exceeds the candidates: the project keeps every image token
        assert 8 * picks > count - 4 and selection.keep.all()
        return
    expected = official_expected(case)[0]
    assert selection.keep[0].nonzero().flatten().tolist() == expected["keep"]
    assert (selection.keep[0] & image[0]).nonzero().flatten().tolist() == sorted(expected["retained"])
    assert official_set_order(selection, 0, config["pivot_image_token"]) == expected["retained"]
