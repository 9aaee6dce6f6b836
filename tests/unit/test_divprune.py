"""DivPrune against a brute-force greedy max-min loop."""

from __future__ import annotations

import pytest
import torch

from lmms_eval_redundancy.methods import divprune


def select(features: torch.Tensor, k: int) -> torch.Tensor:
    """The shipped batched greedy on one unit."""
    return divprune.select_batch([features], [k])[0]


def brute_force(features: torch.Tensor, k: int) -> list[int]:
    """The greedy rule written out: recompute every distance to the picked set at every step."""
    rows = [torch.nn.functional.normalize(f.double(), dim=0) for f in features]
    n = len(rows)

    def distance(i, j):
        return 1 - float(rows[i] @ rows[j])

    if n == 1:
        return [0]
    nearest = [min(distance(i, j) for j in range(n) if j != i) for i in range(n)]
    picked = [max(range(n), key=lambda i: (nearest[i], -i))]
    while len(picked) < min(k, n):
        rest = [i for i in range(n) if i not in picked]
        picked.append(max(rest, key=lambda i: (min(distance(i, p) for p in picked), -i)))
    return sorted(picked)


@pytest.mark.parametrize("seed", range(8))
def test_divprune_equals_brute_force_greedy(seed):
    generator = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 40, (1,), generator=generator))
    features = torch.randn(n, 8, generator=generator)
    for k in (1, 3, n // 2 + 1, n, n + 5):
        assert select(features, k).tolist() == brute_force(features, k)


def test_divprune_is_permutation_equivariant():
    features = torch.randn(30, 16, generator=torch.Generator().manual_seed(1))
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(2))
    original = set(select(features, 7).tolist())
    permuted = {int(perm[i]) for i in select(features[perm], 7).tolist()}
    assert permuted == original


def test_divprune_never_repeats_an_index_with_duplicated_rows():
    base = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    features = base.repeat(4, 1)  # 12 rows, each direction four times
    keep = select(features, 8).tolist()
    assert len(keep) == len(set(keep)) == 8
    assert keep == sorted(keep)


def test_a_ragged_batch_picks_exactly_what_each_unit_picks_alone():
    generator = torch.Generator().manual_seed(0)
    units = [torch.randn(n, 8, generator=generator) for n in (1, 7, 30, 12, 30)]
    units[3][5] = units[3][2]  # exact duplicates inside one unit
    ks = [1, 3, 10, 12, 1]
    batched = divprune.select_batch(units, ks)
    assert [b.tolist() for b in batched] == [divprune.select_batch([u], [k])[0].tolist() for u, k in zip(units, ks)]
    assert [b.tolist() for b in batched] == [brute_force(u, k) for u, k in zip(units, ks)]
    half = divprune.select_batch([u.half() for u in units], ks, torch.float16)
    assert [h.tolist() for h in half] == [divprune.select_batch([u.half()], [k], torch.float16)[0].tolist()
                                          for u, k in zip(units, ks)]
