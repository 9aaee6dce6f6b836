"""What a model family provides: visual features as the LLM receives them, and the model's inner parts.

Vision side: encode processor outputs into ``PackedVisual`` lists (one per sample), align per-patch
scores to the packed order, the encoder layers and the layer LLaVA reads, query/key projections of a
vision attention module. LLM side: the decoder layers, query/key projections with rotary embeddings,
and the per-position inputs of a decoder layer. Methods use only these, never model internals.
"""

from __future__ import annotations

import sys

import torch

from lmms_eval_redundancy.core.errors import UserError
from lmms_eval_redundancy.core.visuals import PackedVisual


def patch_grid(vision_config) -> int:
    """Patches per side of one vision tile."""
    return vision_config.image_size // vision_config.patch_size


class FamilyError(UserError):
    """The model does not have the structure this family expects."""


class Family:
    """One LLaVA family bound to a loaded model (and its processor, when inputs come from one)."""

    name = ""
    model_class: type = None
    native_video = False

    def __init__(self, model, processor=None):
        self.model = model
        self.processor = processor
        self.config = model.config
        self.image_token_id = self.config.image_token_id
        self.video_token_id = getattr(self.config, "video_token_id", None)

    # ---- geometry ----------------------------------------------------------------------------------

    @property
    def placeholder_ids(self) -> list[int]:
        return [i for i in (self.image_token_id, self.video_token_id) if i is not None]

    @property
    def patch_grid(self) -> int:
        """Patches per side of one vision tile."""
        return patch_grid(self.config.vision_config)

    def tiles_per_image(self, inputs) -> list[int]:
        """Vision tiles of each image in the batch (1 unless the family uses anyres crops)."""
        return [1] * inputs["pixel_values"].shape[0]

    # ---- visual features ---------------------------------------------------------------------------

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
        raise NotImplementedError(f"{self.name} has no native video input")

    def image_scores(self, tile_scores: torch.Tensor, inputs) -> list[torch.Tensor]:
        """Per-patch scores of every vision tile, aligned to each image's packed sequence."""
        raise NotImplementedError

    def video_scores(self, frame_scores: torch.Tensor, inputs) -> list[torch.Tensor]:
        raise NotImplementedError(f"{self.name} has no native video input")

    def attach_views(self, grouped: list[list[PackedVisual]], inputs) -> None:
        """Label each token of every anyres image with the view (base, crop 1, ...) and the patch it came from."""
        images = [v for sample in grouped for v in sample if v.kind == "image"]
        if not images:
            return
        patches, device = self.patch_grid ** 2, images[0].features.device
        tiles = self.tiles_per_image(inputs)
        view_map = torch.cat([torch.arange(n, dtype=torch.float32)[:, None].expand(n, patches) for n in tiles])
        patch_map = torch.arange(patches, dtype=torch.float32).repeat(sum(tiles), 1)
        views, patch_ids = self.image_scores(view_map.to(device), inputs), self.image_scores(patch_map.to(device), inputs)
        for visual, view, patch in zip(images, views, patch_ids):
            visual.views, visual.patches = view, patch

    def attach_scores(self, grouped: list[list[PackedVisual]], captured: list[torch.Tensor], inputs) -> None:
        """Give each visual its scores; ``captured`` holds one tensor per vision forward (images, then videos)."""
        visuals = [v for sample in grouped for v in sample]
        captured = list(captured)
        for kind, align in (("image", self.image_scores), ("video", self.video_scores)):
            of_kind = [v for v in visuals if v.kind == kind]
            if of_kind:
                tile_scores = captured.pop(0)
                for visual, scores in zip(of_kind, align(tile_scores, inputs)):
                    visual.scores = scores
                if kind == "image":
                    for visual, tiles in zip(of_kind, tile_scores.split(self.tiles_per_image(inputs))):
                        visual.tile_scores = tiles

    def encode(self, inputs, images_per_sample: list[int], videos_per_sample: list[int]) -> list[list[PackedVisual]]:
        """All visuals of the batch, grouped per sample in placeholder order."""
        images = [self.pack_image(f) for f in self.image_features(inputs)] if sum(images_per_sample) else []
        videos = self.video_features(inputs) if sum(videos_per_sample) else []
        grouped, i, v = [], 0, 0
        for n_img, n_vid in zip(images_per_sample, videos_per_sample):
            grouped.append(images[i:i + n_img] + videos[v:v + n_vid])
            i, v = i + n_img, v + n_vid
        return grouped

    # ---- vision tower internals --------------------------------------------------------------------

    @property
    def vision_encoder_layers(self) -> torch.nn.ModuleList:
        """The encoder layers of the CLIP/SigLIP tower (the ``vision_model`` wrapper went away during 5.x)."""
        tower = self.model.model.vision_tower
        for owner in (tower, getattr(tower, "vision_model", None)):
            encoder = getattr(owner, "encoder", None)
            if encoder is not None and hasattr(encoder, "layers"):
                return encoder.layers
        raise FamilyError(f"cannot find encoder layers in vision tower {type(tower).__name__}")

    @property
    def vision_feature_layer_index(self) -> int:
        """Index of the encoder layer whose output LLaVA reads (``hidden_states[vision_feature_layer]``)."""
        layer, count = self.config.vision_feature_layer, len(self.vision_encoder_layers)
        position = layer if layer >= 0 else count + 1 + layer
        if not 1 <= position <= count:
            raise FamilyError(f"vision_feature_layer={layer} does not name an encoder layer output")
        return position - 1

    @property
    def vision_has_cls(self) -> bool:
        """Whether the tower's first token is a [CLS] token that LLaVA drops (the ``default`` strategy)."""
        return self.config.vision_feature_select_strategy == "default"

    @staticmethod
    def vision_query_key(attention: torch.nn.Module, hidden_states: torch.Tensor, queries: slice = slice(None)):
        """``(q [B, H, Q, d], k [B, H, T, d], scale)`` of a CLIP/SigLIP attention module for the query rows ``queries``."""
        batch, length, _ = hidden_states.shape
        heads, head_dim = attention.num_heads, attention.head_dim
        keys = attention.k_proj(hidden_states).view(batch, length, heads, head_dim).transpose(1, 2)
        query = attention.q_proj(hidden_states[:, queries]).view(batch, -1, heads, head_dim).transpose(1, 2)
        return query, keys, attention.scale

    # ---- LLM internals -----------------------------------------------------------------------------

    @property
    def decoder_layers(self) -> torch.nn.ModuleList:
        return self.model.model.language_model.layers

    @property
    def text_attention_implementation(self) -> str:
        return self.config.text_config._attn_implementation or "eager"

    @staticmethod
    def text_query_key(attention: torch.nn.Module, hidden_states: torch.Tensor, position_embeddings):
        """``(q [B, H, 1, d], k [B, H, T, d], scale)`` of the last position over all keys of a decoder attention
        module, rotary embeddings applied and grouped key heads repeated (any attention implementation)."""
        rotary = sys.modules[type(attention).__module__].apply_rotary_pos_emb
        batch, length, _ = hidden_states.shape
        head_dim = attention.head_dim
        query = attention.q_proj(hidden_states[:, -1:]).view(batch, 1, -1, head_dim).transpose(1, 2)
        key = attention.k_proj(hidden_states).view(batch, length, -1, head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        query, _ = rotary(query, query, cos[:, -1:], sin[:, -1:])
        _, key = rotary(key, key, cos, sin)
        return query, key.repeat_interleave(query.shape[1] // key.shape[1], dim=1), attention.scaling

    @staticmethod
    def gather_positions(layer_kwargs: dict, index: torch.Tensor) -> None:
        """Move a decoder layer's per-position inputs (rotary cos/sin, position ids) to the positions ``index [B, T']``."""
        cos, sin = layer_kwargs["position_embeddings"]
        take = index[..., None].expand(-1, -1, cos.shape[-1])
        layer_kwargs["position_embeddings"] = (cos.expand(index.shape[0], -1, -1).gather(1, take),
                                               sin.expand(index.shape[0], -1, -1).gather(1, take))
        if layer_kwargs.get("position_ids") is not None:
            layer_kwargs["position_ids"] = layer_kwargs["position_ids"].expand(index.shape[0], -1).gather(1, index)

    @staticmethod
    def layer_positions(layer_kwargs: dict) -> int:
        """How many positions a decoder layer call covers (its rotary embeddings' length)."""
        return layer_kwargs["position_embeddings"][0].shape[1]


def newline_mask(features: torch.Tensor, image_newline: torch.Tensor) -> torch.Tensor:
    """Rows of ``features`` that are exactly the model's ``image_newline`` vector."""
    return (features == image_newline.to(features.device, features.dtype)).all(dim=-1)
