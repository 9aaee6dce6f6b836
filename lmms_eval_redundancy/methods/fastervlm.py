"""``fastervlm``: keep the patches the vision tower's [CLS] token attends to most.

Score of a patch: the attention probability of the [CLS] query on it, averaged over heads, in the
encoder layer whose output LLaVA reads (``vision_feature_layer``). SigLIP towers (OneVision) have no
[CLS]; there the score is the mean attention the patch receives from all queries. The method declares
that need; the family computes only that row (or column mean) from the layer's own query/key
projections, whatever attention implementation the model runs.

With ``anyres=per_view`` each view (base, each crop) gets the budget. ``per_view_topk=unpadded`` (default)
picks ``k`` among the view's tokens that survive unpadding; ``full_view`` is the official rule: the top
``k`` of all the view's patches, padding included, of which only the unpadded ones remain (so a crop can
keep fewer than ``k``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmms_eval_redundancy.core.registry import choice_param, register
from lmms_eval_redundancy.methods.base import (
    BeforeLLM,
    Selection,
    VisionNeed,
    VisualUnit,
)


def top_k_batch(scores: list[torch.Tensor], ks: list[int]) -> list[torch.Tensor]:
    """Sorted indices of the ``k`` highest scores of each vector (ties to the lower index), in one sort over
    vectors padded with ``-inf`` (the same picks as one vector at a time)."""
    padded = torch.nn.utils.rnn.pad_sequence(scores, batch_first=True, padding_value=-float("inf"))
    order = torch.sort(padded, dim=1, descending=True, stable=True).indices
    return [order[row, :k].sort().values for row, k in enumerate(ks)]


@register
class FasterVLM(BeforeLLM):
    name = "fastervlm"

    @dataclass
    class Params:
        per_view_topk: str = choice_param("unpadded", ("unpadded", "full_view"), official="full_view")

    def attach(self, model, family) -> None:
        tower = model.config.vision_config.model_type
        self.need = VisionNeed("cls_attention" if family.vision_has_cls else "received_attention")
        self.layer = family.vision_feature_layer_index
        self.score_kind = "cls_attention" if family.vision_has_cls else f"mean_received_attention ({tower} has no [CLS])"

    def vision_needs(self) -> tuple[VisionNeed, ...]:
        return (self.need,)

    def settings(self) -> dict:
        return {**super().settings(), "vision_layer": self.layer, "score": self.score_kind}

    def select_units(self, units: list[VisualUnit]) -> list[Selection]:
        """Every unit's top ``k`` in one padded sort; ``full_view`` units that are one view pick among all its patches."""
        full_view = [self.params.per_view_topk == "full_view" and unit.tiles is not None
                     and bool((unit.tiles == unit.tiles[0]).all()) for unit in units]
        scores = [unit.tile_vision[self.need][int(unit.tiles[0])] if whole else unit.vision[self.need]
                  for unit, whole in zip(units, full_view)]
        picks = top_k_batch(scores, [self.budget.keep_count(s.numel()) for s in scores]) if units else []
        return [Selection(torch.nonzero(torch.isin(unit.patches, chosen)).flatten() if whole else chosen)
                for unit, whole, chosen in zip(units, full_view, picks)]
