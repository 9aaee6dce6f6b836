"""``fastervlm``: keep the patches the vision tower's [CLS] token attends to most.

Score of a patch: the attention probability of the [CLS] query on it, averaged over heads, in the
encoder layer whose output LLaVA reads (``vision_feature_layer``). SigLIP towers (OneVision) have no
[CLS]; there the score is the mean attention the patch receives from all queries. Only that one row
(or column mean) is computed, from the layer's own query/key projections, by a forward pre-hook on
that layer's attention module instance; the rest of the model keeps its attention implementation.
"""

from __future__ import annotations

import contextlib
import time

import torch

from lmms_eval_redundancy.efficiency import sync
from lmms_eval_redundancy.registry import MethodError, PruningMethod, Selection, VisualUnit, register


def encoder_layers(vision_tower) -> torch.nn.ModuleList:
    """The encoder layers of a CLIP/SigLIP tower (the ``vision_model`` wrapper went away during 5.x)."""
    for owner in (vision_tower, getattr(vision_tower, "vision_model", None)):
        encoder = getattr(owner, "encoder", None)
        if encoder is not None and hasattr(encoder, "layers"):
            return encoder.layers
    raise MethodError(f"cannot find encoder layers in vision tower {type(vision_tower).__name__}")


def feature_layer_index(vision_feature_layer: int, num_layers: int) -> int:
    """Index of the encoder layer whose output is ``hidden_states[vision_feature_layer]``."""
    position = vision_feature_layer if vision_feature_layer >= 0 else num_layers + 1 + vision_feature_layer
    if not 1 <= position <= num_layers:
        raise MethodError(f"vision_feature_layer={vision_feature_layer} does not name an encoder layer output")
    return position - 1


def attention_scores(attention: torch.nn.Module, hidden_states: torch.Tensor, has_cls: bool) -> torch.Tensor:
    """``[B, patches]`` head-mean attention scores computed from one layer's projections.

    With a [CLS] token: the [CLS] query's probabilities over the patch keys (the [CLS] column dropped).
    Without: the mean probability each patch receives over all queries.
    """
    batch, length, _ = hidden_states.shape
    heads, head_dim = attention.num_heads, attention.head_dim
    keys = attention.k_proj(hidden_states).view(batch, length, heads, head_dim).transpose(1, 2)
    query_states = hidden_states[:, :1] if has_cls else hidden_states
    queries = attention.q_proj(query_states).view(batch, -1, heads, head_dim).transpose(1, 2)
    probs = torch.softmax((queries.float() @ keys.float().transpose(-1, -2)) * attention.scale, dim=-1)
    if has_cls:
        return probs[:, :, 0, 1:].mean(dim=1)
    return probs.mean(dim=(1, 2))


@register
class FasterVLM(PruningMethod):
    name = "fastervlm"
    needs_vision_scores = True

    def attach(self, model) -> None:
        vision_config = model.config.vision_config
        self.has_cls = model.config.vision_feature_select_strategy == "default"
        layers = encoder_layers(model.model.vision_tower)
        self.layer = feature_layer_index(model.config.vision_feature_layer, len(layers))
        self._captured: list[torch.Tensor] | None = None
        self.score_kind = "cls_attention" if self.has_cls else f"mean_received_attention ({vision_config.model_type} has no [CLS])"
        layers[self.layer].self_attn.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module, args, kwargs):
        if self._captured is not None:
            started = time.perf_counter()
            hidden_states = args[0] if args else kwargs["hidden_states"]
            self._captured.append(attention_scores(module, hidden_states, self.has_cls))
            sync(hidden_states.device)
            self.selection_seconds += time.perf_counter() - started

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
        k = self.budget.keep_count(unit.features.shape[0])
        order = torch.sort(unit.scores, descending=True, stable=True).indices
        return Selection(order[:k].sort().values)
