"""LLaVA-OneVision: anyres single images, base-view multi-image, and 2x2-pooled video frames."""

import math

import torch
from transformers import LlavaOnevisionForConditionalGeneration

from lmms_eval_redundancy.core.visuals import PackedVisual
from lmms_eval_redundancy.families.llava_next import NEWLINE_SCORE, LlavaNext


class LlavaOnevision(LlavaNext):
    name = "llava_onevision"
    model_class = LlavaOnevisionForConditionalGeneration
    native_video = True

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
            videos.append(PackedVisual(
                features=features,
                kind="video",
                units=list(torch.arange(frames * per_frame, device=device).view(frames, per_frame)),
                newline=newline,
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

    def pack_scores(self, per_image, image_sizes):
        return self.model.model.pack_image_features(
            per_image, image_sizes, image_newline=NEWLINE_SCORE, vision_aspect_ratio=self.config.vision_aspect_ratio
        )[0]

    def video_scores(self, frame_scores, inputs):
        frames = inputs["pixel_values_videos"].shape[1]
        pooled = self.model.model.apply_pooling(frame_scores[..., None])[..., 0]  # [videos * frames, per_frame]
        newline = NEWLINE_SCORE.to(pooled.device, pooled.dtype)
        return [torch.cat([video.flatten(), newline]) for video in pooled.split(frames)]
