"""``fastervlm``: keep the patches the vision tower's [CLS] token attends to most.

Score of a patch: the attention probability of the [CLS] query on it, averaged over heads, in the
encoder layer whose output LLaVA reads (``vision_feature_layer``). SigLIP towers (OneVision) have no
[CLS]; there the score is the mean attention the patch receives from all queries. Only that one row
(or column mean) is computed, from the layer's own query/key projections, by a forward pre-hook on
that layer's attention module instance; the rest of the model keeps its attention implementation.

With ``anyres=per_view`` each view (base, each crop) gets the budget. ``per_view_topk=unpadded`` (default)
picks ``k`` among the view's tokens that survive unpadding; ``full_view`` is the official rule: the top
``k`` of all the view's patches, padding included, of which only the unpadded ones remain (so a crop can
keep fewer than ``k``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from lmms_eval_redundancy.methods.base import (
    BeforeLLM,
    Selection,
    VisualUnit,
    choice_param,
    register,
)


def attention_scores(query: torch.Tensor, keys: torch.Tensor, scale: float, has_cls: bool) -> torch.Tensor:
    """``[B, patches]`` head-mean attention scores from one layer's queries ``[B, H, Q, d]`` and keys ``[B, H, T, d]``.

    With a [CLS] token (``Q = 1``): the [CLS] query's probabilities over the patch keys (the [CLS] column
    dropped). Without (``Q = T``): the mean probability each patch receives over all queries.
    """
    probs = torch.softmax((query.float() @ keys.float().transpose(-1, -2)) * scale, dim=-1)
    if has_cls:
        return probs[:, :, 0, 1:].mean(dim=1)
    return probs.mean(dim=(1, 2))


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted indices of the ``k`` highest scores (ties to the lower index)."""
    return torch.sort(scores, descending=True, stable=True).indices[:k].sort().values


@register
class FasterVLM(BeforeLLM):
    name = "fastervlm"

    @dataclass
    class Params:
        per_view_topk: str = choice_param("unpadded", ("unpadded", "full_view"), official="full_view")

    def attach(self, model, family) -> None:
        self.family = family
        self.has_cls = family.vision_has_cls
        self.layer = family.vision_feature_layer_index
        self._captured: list[torch.Tensor] | None = None
        tower = model.config.vision_config.model_type
        self.score_kind = "cls_attention" if self.has_cls else f"mean_received_attention ({tower} has no [CLS])"
        attention = family.vision_encoder_layers[self.layer].self_attn
        self.hook(attention.register_forward_pre_hook(self._capture, with_kwargs=True))

    def _capture(self, module, args, kwargs):
        if self._captured is not None:
            hidden_states = args[0] if args else kwargs["hidden_states"]
            with self.selection.timing(hidden_states.device):
                query, keys, scale = self.family.vision_query_key(module, hidden_states,
                                                                  slice(0, 1) if self.has_cls else slice(None))
                self._captured.append(attention_scores(query, keys, scale, self.has_cls))

    @contextlib.contextmanager
    def observing_vision(self):
        """Collect one ``[tiles, patches]`` score tensor per vision-tower forward inside the block."""
        self._captured = []
        try:
            yield self._captured
        finally:
            self._captured = None

    def settings(self) -> dict:
        return {**super().settings(), "vision_layer": self.layer, "score": self.score_kind}

    def select_unit(self, unit: VisualUnit) -> Selection:
        if self.params.per_view_topk == "full_view" and unit.view_scores is not None:
            picks = top_k(unit.view_scores, self.budget.keep_count(unit.view_scores.numel()))
            return Selection(torch.nonzero(torch.isin(unit.view_patches, picks)).flatten())
        return Selection(top_k(unit.scores, self.budget.keep_count(unit.features.shape[0])))
