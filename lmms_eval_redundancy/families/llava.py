"""LLaVA-1.5 (``LlavaForConditionalGeneration``): one fixed grid of tokens per image."""

import math

import torch
from transformers import (
    CLIPImageProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from lmms_eval_redundancy.core.visuals import PackedVisual
from lmms_eval_redundancy.families.base import Family
from lmms_eval_redundancy.families.tiny import (
    CHAT_TEMPLATE,
    tiny_text_config,
    tiny_vision_config,
)


class Llava(Family):
    name = "llava"
    model_class = LlavaForConditionalGeneration

    def image_features(self, inputs):
        out = self.model.model.get_image_features(pixel_values=inputs["pixel_values"], **self._feature_kwargs())
        return list(out.pooler_output)

    def pack_image(self, features, tiles, patches):
        n = features.shape[0]
        side = math.isqrt(n)
        return PackedVisual(
            features=features,
            kind="image",
            units=[torch.arange(n, device=features.device)],
            newline=torch.zeros(n, dtype=torch.bool, device=features.device),
            tiles=tiles,
            patches=patches,
            grids=[(side, side) if side * side == n else None],
        )

    def align_image(self, tile_data, inputs):
        return list(tile_data)

    # ---- tiny checkpoints --------------------------------------------------------------------------

    @classmethod
    def tiny_config(cls, tokenizer, image_size: int, patch_size: int, tower: str, vision: dict | None = None,
                    text: dict | None = None):
        """Config of a tiny random model that agrees with ``families.tiny.build_tokenizer``."""
        return LlavaConfig(**cls._tiny_parts(tokenizer, image_size, patch_size, tower, vision, text),
                           vision_feature_layer=-2, vision_feature_select_strategy="default")

    @classmethod
    def _tiny_parts(cls, tokenizer, image_size, patch_size, tower, vision, text) -> dict:
        return dict(vision_config=tiny_vision_config(tower, image_size, patch_size, **(vision or {})),
                    text_config=tiny_text_config(cls.tiny_text_model, len(tokenizer), **(text or {})),
                    image_token_id=tokenizer.convert_tokens_to_ids("<image>"))

    @classmethod
    def tiny_processor(cls, tokenizer, image_size: int, patch_size: int, tower: str):
        """The processor matching ``tiny_config`` (same patch size, image size and tower)."""
        square = {"height": image_size, "width": image_size}
        return LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=square),
                              **cls._tiny_processor_parts(tokenizer, patch_size))

    @staticmethod
    def _tiny_processor_parts(tokenizer, patch_size: int) -> dict:
        return dict(tokenizer=tokenizer, patch_size=patch_size, vision_feature_select_strategy="default",
                    num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
