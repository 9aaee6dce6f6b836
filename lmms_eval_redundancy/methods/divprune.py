"""``divprune``: greedy max-min diversity on post-projector tokens (distance ``1 - cos``).

First pick: the token whose nearest other token is farthest. Each next pick: the unpicked token whose
distance to the picked set is largest. A running minimum keeps the loop O(kN); picked tokens are
excluded, so exact duplicates never yield a repeated index (the official code can repeat one).
``precision=model`` computes the distances in the features' dtype (the model's, as officially) instead of float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmms_eval_redundancy.methods.base import (
    BeforeLLM,
    Selection,
    VisualUnit,
    choice_param,
    register,
)


def select(features: torch.Tensor, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sorted indices of ``k`` mutually distant rows of ``features [N, D]`` (ties to the lower index);
    distances computed in ``dtype``."""
    n = features.shape[0]
    k = min(k, n)
    unit = torch.nn.functional.normalize(features.to(dtype), dim=-1)
    distance = 1 - unit @ unit.T
    if n == 1:
        return torch.zeros(1, dtype=torch.long, device=features.device)
    nearest_other = distance.clone().fill_diagonal_(float("inf")).min(dim=1).values
    picked = torch.empty(k, dtype=torch.long, device=features.device)
    picked[0] = nearest_other.argmax()
    to_picked = distance[picked[0]].clone()
    to_picked[picked[0]] = -float("inf")
    for i in range(1, k):
        picked[i] = to_picked.argmax()
        to_picked = torch.minimum(to_picked, distance[picked[i]])  # earlier picks stay at -inf
        to_picked[picked[i]] = -float("inf")
    return picked.sort().values


@register
class DivPrune(BeforeLLM):
    name = "divprune"

    @dataclass
    class Params:
        precision: str = choice_param("float32", ("float32", "model"), official="model")  # distance dtype

    def select_unit(self, unit: VisualUnit) -> Selection:
        dtype = torch.float32 if self.params.precision == "float32" else unit.features.dtype
        return Selection(select(unit.features, self.budget.keep_count(unit.features.shape[0]), dtype))
