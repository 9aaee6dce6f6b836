"""``none``: the unpruned reference; every visual token is kept."""

import torch

from lmms_eval_redundancy.registry import PruningMethod, Selection, VisualUnit, register


def select(features: torch.Tensor) -> torch.Tensor:
    """All indices of ``features`` ``[N, D]``."""
    return torch.arange(features.shape[0], device=features.device)


@register
class NoPruning(PruningMethod):
    name = "none"
    budgets = ()

    def select_unit(self, unit: VisualUnit) -> Selection:
        return Selection(select(unit.features))
