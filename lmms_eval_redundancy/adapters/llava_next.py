"""LLaVA-NeXT (anyres): base view, then the unpadded crop grid with one ``image_newline`` per row."""

import torch

from lmms_eval_redundancy.adapters.base import FamilyAdapter, PackedVisual, newline_mask


class LlavaNextAdapter(FamilyAdapter):
    family = "llava_next"

    @property
    def base_tokens(self) -> int:
        vision = self.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2

    def image_features(self, inputs):
        out = self.model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"], **self._feature_kwargs()
        )
        return list(out.pooler_output)

    def pack_image(self, features):
        newline = newline_mask(features, self.model.model.image_newline)
        prunable = torch.nonzero(~newline).flatten()
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        has_crops = features.shape[0] > self.base_tokens + 1
        return PackedVisual(
            features=features,
            placeholder_id=self.image_token_id,
            kind="image",
            units=[prunable],
            newline=newline,
            grids=[None if has_crops else (side, side)],
            base=torch.arange(self.base_tokens, device=features.device) if has_crops else None,
        )
