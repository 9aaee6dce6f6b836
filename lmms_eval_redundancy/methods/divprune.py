"""``divprune``: greedy max-min diversity on post-projector tokens (distance ``1 - cos``).

First pick: the token whose nearest other token is farthest. Each next pick: the unpicked token whose
distance to the picked set is largest. A running minimum keeps the loop O(kN); picked tokens are
excluded, so exact duplicates never yield a repeated index (the official code can repeat one). The loop
runs once for all images and frames of a batch (``select_units``), not once per unit.
``precision=model`` computes the distances in the features' dtype (the model's, as officially) instead of float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmms_eval_redundancy.core.registry import choice_param, register
from lmms_eval_redundancy.methods.base import BeforeLLM, Selection, VisualUnit


def select_batch(features: list[torch.Tensor], ks: list[int], dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Sorted indices of ``k_u`` mutually distant rows of each unit ``[N_u, D]`` (ties to the lower index;
    distances in ``dtype``), each unit's picks exactly as alone: its distances come from its own product,
    and one greedy loop runs over all units together (padded to the longest)."""
    count, longest = len(features), max(f.shape[0] for f in features)
    device = features[0].device
    distance = torch.full((count, longest, longest), float("inf"), dtype=dtype, device=device)
    for index, rows in enumerate(features):
        unit = torch.nn.functional.normalize(rows.to(dtype), dim=-1)
        distance[index, : rows.shape[0], : rows.shape[0]] = 1 - unit @ unit.T
    lengths = torch.tensor([f.shape[0] for f in features], device=device)
    padding = torch.arange(longest, device=device)[None, :] >= lengths[:, None]  # [U, L]
    batch = torch.arange(count, device=device)
    nearest_other = distance.clone()
    nearest_other[:, torch.arange(longest), torch.arange(longest)] = float("inf")
    nearest_other = nearest_other.min(dim=2).values.masked_fill(padding, -float("inf"))
    picked = [nearest_other.argmax(dim=1)]
    to_picked = distance[batch, picked[0]].masked_fill(padding, -float("inf"))
    to_picked[batch, picked[0]] = -float("inf")
    for _ in range(1, max(ks)):
        picked.append(to_picked.argmax(dim=1))
        to_picked = torch.minimum(to_picked, distance[batch, picked[-1]])  # earlier picks and padding stay at -inf
        to_picked[batch, picked[-1]] = -float("inf")
    picks = torch.stack(picked, dim=1)
    return [picks[index, : min(k, rows.shape[0])].sort().values for index, (rows, k) in enumerate(zip(features, ks))]


@register
class DivPrune(BeforeLLM):
    name = "divprune"

    @dataclass
    class Params:
        precision: str = choice_param("float32", ("float32", "model"), official="model")  # distance dtype

    def select_units(self, units: list[VisualUnit]) -> list[Selection]:
        """All units of a batch in one greedy loop (``select_batch``)."""
        if not units:
            return []
        dtype = torch.float32 if self.params.precision == "float32" else units[0].features.dtype
        ks = [self.budget.keep_count(unit.features.shape[0]) for unit in units]
        return [Selection(keep) for keep in select_batch([unit.features for unit in units], ks, dtype)]
