"""``none``: the unpruned reference; every visual token is kept."""

import torch

from lmms_eval_redundancy.core.registry import UNPRUNED, register
from lmms_eval_redundancy.methods.base import BeforeLLM, Selection, VisualUnit


def select(features: torch.Tensor) -> torch.Tensor:
    """All indices of ``features`` ``[N, D]``."""
    return torch.arange(features.shape[0], device=features.device)


@register
class NoPruning(BeforeLLM):
    name = UNPRUNED
    budgets = ()

    def select_unit(self, unit: VisualUnit) -> Selection:
        return Selection(select(unit.features))
