"""LLaVA-NeXT (anyres): base view, then the unpadded crop grid with one ``image_newline`` per row."""

import torch
from transformers import (
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
)
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from lmms_eval_redundancy.core.visuals import PackedVisual
from lmms_eval_redundancy.families.base import newline_mask
from lmms_eval_redundancy.families.llava import Llava
from lmms_eval_redundancy.families.tiny import tiny_pinpoints


class LlavaNext(Llava):
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

    def pack_image(self, features, tiles, patches):
        newline = newline_mask(features, self.model.model.image_newline)
        prunable = torch.nonzero(~newline).flatten()
        side = self.patch_grid
        has_crops = features.shape[0] > self.base_tokens + 1
        return PackedVisual(
            features=features,
            kind="image",
            units=[prunable],
            newline=newline,
            tiles=tiles,
            patches=patches,
            grids=[None if has_crops else (side, side)],
            base=torch.arange(self.base_tokens, device=features.device) if has_crops else None,
        )

    def tiles_per_image(self, inputs) -> list[int]:
        """Vision tiles (base view + crops) of each image, as ``get_image_features`` splits them."""
        return [image_size_to_num_patches(size, self.config.image_grid_pinpoints, self.config.vision_config.image_size)
                for size in inputs["image_sizes"]]

    def pack_data(self, per_image: list[torch.Tensor], image_sizes, newline: torch.Tensor) -> list[torch.Tensor]:
        return self.model.model.pack_image_features(
            per_image, image_sizes, self.config.vision_feature_select_strategy, image_newline=newline
        )[0]

    def align_image(self, tile_data, inputs):
        channels = tile_data.shape[2:]
        flat = tile_data.reshape(*tile_data.shape[:2], -1)
        newline = torch.full(flat.shape[-1:], float("nan"), dtype=flat.dtype, device=flat.device)
        packed = self.pack_data(list(torch.split(flat, self.tiles_per_image(inputs))), inputs["image_sizes"], newline)
        return [p.reshape(p.shape[0], *channels) for p in packed]

    @classmethod
    def tiny_config(cls, tokenizer, image_size: int, patch_size: int, tower: str, vision: dict | None = None,
                    text: dict | None = None):
        return LlavaNextConfig(**cls._tiny_parts(tokenizer, image_size, patch_size, tower, vision, text),
                               vision_feature_layer=-2, vision_feature_select_strategy="default",
                               image_grid_pinpoints=tiny_pinpoints(image_size))

    @classmethod
    def tiny_processor(cls, tokenizer, image_size: int, patch_size: int, tower: str):
        image_processor = LlavaNextImageProcessor(size={"shortest_edge": image_size},
                                                     crop_size={"height": image_size, "width": image_size},
                                                     image_grid_pinpoints=tiny_pinpoints(image_size))
        return LlavaNextProcessor(image_processor=image_processor, **cls._tiny_processor_parts(tokenizer, patch_size))
