"""What every model-family adapter provides: visual features as the LLM would receive them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PackedVisual:
    """One image or one video, as the packed token sequence its placeholders stand for.

    ``units`` index the prunable tokens of each image or frame inside ``features`` (newline tokens
    are in no unit); ``base`` indexes the base (global) view of an anyres image, when it has crops.
    """

    features: torch.Tensor  # [L, D]
    placeholder_id: int
    kind: str  # "image" | "video"
    units: list[torch.Tensor]
    newline: torch.Tensor  # bool [L]
    grids: list[tuple[int, int] | None] = field(default_factory=list)
    base: torch.Tensor | None = None
    scores: torch.Tensor | None = None  # [L] vision attention scores aligned to ``features`` (NaN at newlines)
    views: torch.Tensor | None = None  # [L] anyres view of each token (0 = base view; NaN at newlines)

    @property
    def length(self) -> int:
        return int(self.features.shape[0])


class FamilyAdapter:
    """Turns processor outputs into ``PackedVisual`` lists, one list per sample."""

    family = ""
    native_video = False

    def __init__(self, model, processor):
        self.model = model
        self.processor = processor
        self.config = model.config
        self.image_token_id = self.config.image_token_id
        self.video_token_id = getattr(self.config, "video_token_id", None)

    @property
    def placeholder_ids(self) -> list[int]:
        return [i for i in (self.image_token_id, self.video_token_id) if i is not None]

    def _feature_kwargs(self) -> dict:
        return {
            "vision_feature_layer": self.config.vision_feature_layer,
            "vision_feature_select_strategy": self.config.vision_feature_select_strategy,
        }

    def image_features(self, inputs) -> list[torch.Tensor]:
        """Packed projector outputs, one tensor per image in the batch (flat, sample order)."""
        raise NotImplementedError

    def pack_image(self, features: torch.Tensor) -> PackedVisual:
        raise NotImplementedError

    def video_features(self, inputs) -> list[PackedVisual]:
        raise NotImplementedError(f"{self.family} has no native video input")

    def tiles_per_image(self, inputs) -> list[int]:
        """Vision tiles of each image in the batch (1 unless the family uses anyres crops)."""
        return [1] * inputs["pixel_values"].shape[0]

    def image_scores(self, tile_scores: torch.Tensor, inputs) -> list[torch.Tensor]:
        """Per-patch scores of every vision tile, aligned to each image's packed sequence."""
        raise NotImplementedError

    def video_scores(self, frame_scores: torch.Tensor, inputs) -> list[torch.Tensor]:
        raise NotImplementedError(f"{self.family} has no native video input")

    def attach_views(self, grouped: list[list[PackedVisual]], inputs) -> None:
        """Label each token of every anyres image with the view (base, crop 1, ...) it came from."""
        images = [v for sample in grouped for v in sample if v.kind == "image"]
        if not images:
            return
        tiles = self.tiles_per_image(inputs)
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        index_map = torch.cat([torch.arange(n, dtype=torch.float32)[:, None].expand(n, side * side) for n in tiles])
        for visual, views in zip(images, self.image_scores(index_map.to(images[0].features.device), inputs)):
            visual.views = views

    def attach_scores(self, grouped: list[list[PackedVisual]], captured: list[torch.Tensor], inputs) -> None:
        """Give each visual its scores; ``captured`` holds one tensor per vision forward (images, then videos)."""
        visuals = [v for sample in grouped for v in sample]
        captured = list(captured)
        for kind, align in (("image", self.image_scores), ("video", self.video_scores)):
            of_kind = [v for v in visuals if v.kind == kind]
            if of_kind:
                for visual, scores in zip(of_kind, align(captured.pop(0), inputs)):
                    visual.scores = scores

    def encode(self, inputs, images_per_sample: list[int], videos_per_sample: list[int]) -> list[list[PackedVisual]]:
        """All visuals of the batch, grouped per sample in placeholder order."""
        images = [self.pack_image(f) for f in self.image_features(inputs)] if sum(images_per_sample) else []
        videos = self.video_features(inputs) if sum(videos_per_sample) else []
        grouped, i, v = [], 0, 0
        for n_img, n_vid in zip(images_per_sample, videos_per_sample):
            grouped.append(images[i:i + n_img] + videos[v:v + n_vid])
            i, v = i + n_img, v + n_vid
        return grouped


def newline_mask(features: torch.Tensor, image_newline: torch.Tensor) -> torch.Tensor:
    """Rows of ``features`` that are exactly the model's ``image_newline`` vector."""
    return (features == image_newline.to(features.device, features.dtype)).all(dim=-1)
