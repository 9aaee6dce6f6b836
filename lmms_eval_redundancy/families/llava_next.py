"""LLaVA-NeXT (anyres): base view, then the unpadded crop grid with one ``image_newline`` per row."""

import torch
from transformers import LlavaNextForConditionalGeneration
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from lmms_eval_redundancy.core.visuals import PackedVisual
from lmms_eval_redundancy.families.base import Family, newline_mask

NEWLINE_SCORE = torch.tensor([float("nan")])  # stands in for image_newline when packing score maps


class LlavaNext(Family):
    name = "llava_next"
    model_class = LlavaNextForConditionalGeneration

    @property
    def base_tokens(self) -> int:
        return self.patch_grid ** 2

    def image_features(self, inputs):
        out = self.model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"], **self._feature_kwargs()
        )
        return list(out.pooler_output)

    def pack_image(self, features):
        newline = newline_mask(features, self.model.model.image_newline)
        prunable = torch.nonzero(~newline).flatten()
        side = self.patch_grid
        has_crops = features.shape[0] > self.base_tokens + 1
        return PackedVisual(
            features=features,
            kind="image",
            units=[prunable],
            newline=newline,
            grids=[None if has_crops else (side, side)],
            base=torch.arange(self.base_tokens, device=features.device) if has_crops else None,
        )

    def tiles_per_image(self, inputs) -> list[int]:
        """Vision tiles (base view + crops) of each image, as ``get_image_features`` splits them."""
        return [image_size_to_num_patches(size, self.config.image_grid_pinpoints, self.config.vision_config.image_size)
                for size in inputs["image_sizes"]]

    def pack_scores(self, per_image: list[torch.Tensor], image_sizes) -> list[torch.Tensor]:
        return self.model.model.pack_image_features(
            per_image, image_sizes, self.config.vision_feature_select_strategy, image_newline=NEWLINE_SCORE
        )[0]

    def image_scores(self, tile_scores, inputs):
        per_image = torch.split(tile_scores[..., None], self.tiles_per_image(inputs))
        return [packed[:, 0] for packed in self.pack_scores(list(per_image), inputs["image_sizes"])]
