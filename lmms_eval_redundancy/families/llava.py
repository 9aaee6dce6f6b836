"""LLaVA-1.5 (``LlavaForConditionalGeneration``): one fixed grid of tokens per image."""

import math

import torch
from transformers import LlavaForConditionalGeneration

from lmms_eval_redundancy.core.visuals import PackedVisual
from lmms_eval_redundancy.families.base import Family


class Llava(Family):
    name = "llava"
    model_class = LlavaForConditionalGeneration

    def image_features(self, inputs):
        out = self.model.model.get_image_features(pixel_values=inputs["pixel_values"], **self._feature_kwargs())
        return list(out.pooler_output)

    def pack_image(self, features):
        n = features.shape[0]
        side = math.isqrt(n)
        return PackedVisual(
            features=features,
            kind="image",
            units=[torch.arange(n, device=features.device)],
            newline=torch.zeros(n, dtype=torch.bool, device=features.device),
            grids=[(side, side) if side * side == n else None],
        )

    def image_scores(self, tile_scores, inputs):
        return list(tile_scores)
