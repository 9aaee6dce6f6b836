"""LLaVA-OneVision: anyres single images, base-view multi-image, and 2x2-pooled video frames."""

import math

import torch
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
)

from lmms_eval_redundancy.core.visuals import PackedVisual
from lmms_eval_redundancy.families.llava_next import LlavaNext
from lmms_eval_redundancy.families.tiny import CHAT_TEMPLATE, tiny_pinpoints


class LlavaOnevision(LlavaNext):
    name = "llava_onevision"
    model_class = LlavaOnevisionForConditionalGeneration
    native_video = True
    tiny_tower = "siglip"
    tiny_text_model = "qwen2"

    def image_features(self, inputs):
        out = self.model.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            image_sizes=inputs["image_sizes"],
            vision_aspect_ratio=self.config.vision_aspect_ratio,
            batch_num_images=inputs.get("batch_num_images"),
            **self._feature_kwargs(),
        )
        return list(out.pooler_output)

    def video_features(self, inputs):
        pixels = inputs["pixel_values_videos"]
        out = self.model.model.get_video_features(pixel_values_videos=pixels, **self._feature_kwargs())
        side = self.patch_grid
        pooled = (math.ceil(side / 2), math.ceil(side / 2))
        per_frame = pooled[0] * pooled[1]
        frames = pixels.shape[1]
        videos = []
        for features in out.pooler_output:  # [frames * per_frame + 1, D], newline last
            device = features.device
            newline = torch.zeros(features.shape[0], dtype=torch.bool, device=device)
            newline[-1] = True
            minus_one = torch.full((1,), -1, device=device)
            videos.append(PackedVisual(
                features=features,
                kind="video",
                units=list(torch.arange(frames * per_frame, device=device).view(frames, per_frame)),
                newline=newline,
                tiles=torch.cat([torch.arange(frames, device=device).repeat_interleave(per_frame), minus_one]),
                patches=torch.cat([torch.arange(per_frame, device=device).repeat(frames), minus_one]),
                grids=[pooled] * frames,
            ))
        return videos

    def tiles_per_image(self, inputs):
        tiles = super().tiles_per_image(inputs)
        counts = inputs.get("batch_num_images")
        if counts is None:
            return tiles
        single = [int(n) == 1 for n in counts for _ in range(int(n))]
        return [t if alone else 1 for t, alone in zip(tiles, single)]

    def pack_data(self, per_image, image_sizes, newline):
        return self.model.model.pack_image_features(
            per_image, image_sizes, image_newline=newline, vision_aspect_ratio=self.config.vision_aspect_ratio
        )[0]

    def align_video(self, frame_data, inputs):
        frames = inputs["pixel_values_videos"].shape[1]
        channels = frame_data.shape[2:]
        pooled = self.model.model.apply_pooling(frame_data.reshape(*frame_data.shape[:2], -1))  # [videos * frames, cells, C]
        newline = torch.full((1, pooled.shape[-1]), float("nan"), dtype=pooled.dtype, device=pooled.device)
        per_video = pooled.split(frames)
        aligned = [torch.cat([video.flatten(0, 1), newline]).reshape(-1, *channels) for video in per_video]
        return aligned, [video.reshape(*video.shape[:2], *channels) for video in per_video]

    @classmethod
    def tiny_config(cls, tokenizer, image_size: int, patch_size: int, tower: str, vision: dict | None = None,
                    text: dict | None = None):
        return LlavaOnevisionConfig(**cls._tiny_parts(tokenizer, image_size, patch_size, tower, vision, text),
                                    video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
                                    image_grid_pinpoints=tiny_pinpoints(image_size), vision_feature_layer=-1,
                                    vision_feature_select_strategy="default" if tower == "clip" else "full",
                                    vision_aspect_ratio="anyres_max_9")

    @classmethod
    def tiny_processor(cls, tokenizer, image_size: int, patch_size: int, tower: str):
        square = {"height": image_size, "width": image_size}
        return LlavaOnevisionProcessor(
            image_processor=LlavaOnevisionImageProcessor(size=square, image_grid_pinpoints=tiny_pinpoints(image_size)),
            tokenizer=tokenizer,
            video_processor=LlavaOnevisionVideoProcessor(size=square),
            num_image_tokens=(image_size // patch_size) ** 2 + (tower == "clip"),
            vision_feature_select_strategy="default" if tower == "clip" else "full",
            chat_template=CHAT_TEMPLATE,
        )
