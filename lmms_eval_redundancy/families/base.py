"""What a model family provides: visual features as the LLM receives them, and the model's inner parts.

Vision side: encode processor outputs into complete ``PackedVisual`` lists (one per sample), serve the
vision-tower data methods declare (``VisionNeed``) through hooks that compute only what is asked, align
per-patch data to the packed order, project vision states into the LLM's input space. LLM side: the
decoder layers, query/key projections with rotary embeddings,
and the per-position inputs of a decoder layer. Methods use only these, never model internals.
"""

from __future__ import annotations

import contextlib
import sys

import torch

from lmms_eval_redundancy.core.errors import UserError
from lmms_eval_redundancy.core.visuals import (
    VISION_NEED_KINDS,
    PackedVisual,
    VisionNeed,
)

LAYER_OUTPUT_NEEDS = ("hidden", "cls_hidden")  # served by a hook on the encoder layer; the others inside its attention


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
    tiny_tower = "clip"  # the vision tower of the real checkpoints, which tiny ones copy
    tiny_text_model = "llama"

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

    # ---- visual features ----------------------------------------------------------------------------

    def _feature_kwargs(self) -> dict:
        return {
            "vision_feature_layer": self.config.vision_feature_layer,
            "vision_feature_select_strategy": self.config.vision_feature_select_strategy,
        }

    def image_features(self, inputs) -> list[torch.Tensor]:
        """Packed projector outputs, one tensor per image in the batch (flat, sample order)."""
        raise NotImplementedError

    def pack_image(self, features: torch.Tensor, tiles: torch.Tensor, patches: torch.Tensor) -> PackedVisual:
        """One image's ``PackedVisual`` from its packed features and each token's tile and patch ids."""
        raise NotImplementedError

    def video_features(self, inputs) -> list[PackedVisual]:
        raise NotImplementedError(f"{self.name} has no native video input")

    def align_image(self, tile_data: torch.Tensor, inputs) -> list[torch.Tensor]:
        """Per-patch data of every vision tile ``[tiles, patches, ...]`` aligned to each image's packed sequence
        (NaN at newlines), as the family packs features."""
        raise NotImplementedError

    def align_video(self, frame_data: torch.Tensor, inputs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-patch data of every frame, per video: aligned to its packed sequence, and per frame as pooled."""
        raise NotImplementedError(f"{self.name} has no native video input")

    def image_token_ids(self, inputs) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image: the tile (0 = base view) and patch each packed token comes from, -1 at newlines."""
        patches, device = self.patch_grid ** 2, inputs["pixel_values"].device
        tiles = self.tiles_per_image(inputs)
        tile_map = torch.cat([torch.arange(n, dtype=torch.float32)[:, None].expand(n, patches) for n in tiles])
        patch_map = torch.arange(patches, dtype=torch.float32).repeat(sum(tiles), 1)
        ids = self.align_image(torch.stack([tile_map, patch_map], dim=-1).to(device), inputs)
        return [tuple(torch.nan_to_num(packed, nan=-1).round().long().unbind(-1)) for packed in ids]

    def clip_text(self, source: str) -> tuple:
        """``(text tower, tokenizer, joint-space map)`` of the CLIP checkpoint ``source`` for this model's vision
        tower, on its device (``families.clip_text``)."""
        from lmms_eval_redundancy.families.clip_text import load_clip_text

        return load_clip_text(source, self.model.config.vision_config.hidden_size, self.model.device)

    def project(self, vision_states: torch.Tensor) -> torch.Tensor:
        """LLM-input tokens ``[M, D]`` from vision-tower states ``[M, C]`` (the multimodal projector)."""
        return self.model.model.multi_modal_projector(vision_states)

    def encode(self, inputs, images_per_sample: list[int], videos_per_sample: list[int], needs=(),
               stopwatch=None) -> list[list[PackedVisual]]:
        """All visuals of the batch, grouped per sample in placeholder order, each with the vision-tower data
        of ``needs`` (computed inside the tower by hooks; their time goes to ``stopwatch``)."""
        with self.serving(needs, stopwatch) as captured:
            images = self.image_features(inputs) if sum(images_per_sample) else []
            videos = self.video_features(inputs) if sum(videos_per_sample) else []
        images = [self.pack_image(f, *ids) for f, ids in zip(images, self.image_token_ids(inputs) if images else [])]
        for need, per_forward in captured.items():
            per_forward = list(per_forward)
            if images:
                data = self.patch_data(need, per_forward.pop(0))
                for visual, aligned, tiles in zip(images, self.align_image(data, inputs),
                                                  data.split(self.tiles_per_image(inputs))):
                    visual.vision[need], visual.tile_vision[need] = aligned, tiles
            if videos:
                aligned, frames = self.align_video(self.patch_data(need, per_forward.pop(0)), inputs)
                for visual, tokens, per_frame in zip(videos, aligned, frames):
                    visual.vision[need], visual.tile_vision[need] = tokens, per_frame
        grouped, i, v = [], 0, 0
        for n_img, n_vid in zip(images_per_sample, videos_per_sample):
            grouped.append(images[i:i + n_img] + videos[v:v + n_vid])
            i, v = i + n_img, v + n_vid
        return grouped

    def patch_data(self, need: VisionNeed, data: torch.Tensor) -> torch.Tensor:
        """``[tiles, patches, ...]``: one tower forward's data of ``need`` without the [CLS] position."""
        if need.kind == "cls_hidden":  # the [CLS] state, repeated for every patch of its tile
            return data[:, :1].expand(-1, data.shape[1] - 1, -1)
        return data[:, 1:] if self.vision_has_cls and need.kind != "cls_attention" else data

    # ---- vision-tower needs ------------------------------------------------------------------------

    @contextlib.contextmanager
    def serving(self, needs, stopwatch=None):
        """Hooks on this model's vision encoder layers that compute ``needs`` during the block; yields
        ``{need: [one tensor per tower forward, [tiles, tokens, ...]]}``."""
        captured = {need: [] for need in needs}
        handles = []
        timing = (lambda device: stopwatch.timing(device)) if stopwatch else (lambda device: contextlib.nullcontext())
        for index, layer_needs in self.needs_by_layer(needs).items():
            layer = self.vision_encoder_layers[index]
            attention_needs = [n for n in layer_needs if n.kind not in LAYER_OUTPUT_NEEDS]
            if attention_needs:
                handles.extend(self._attention_hooks(layer.self_attn, attention_needs, captured, timing))
            for need in layer_needs:
                if need.kind == "cls_hidden" and not self.vision_has_cls:
                    raise FamilyError(f"{type(self.model.model.vision_tower).__name__} has no [CLS] token")
                if need.kind in LAYER_OUTPUT_NEEDS:
                    handles.append(layer.register_forward_hook(
                        lambda module, args, output, need=need: captured[need].append(
                            output[0] if isinstance(output, tuple) else output)))
        try:
            yield captured
        finally:
            for handle in handles:
                handle.remove()

    def needs_by_layer(self, needs) -> dict[int, list[VisionNeed]]:
        """``needs`` grouped by the index of the vision encoder layer that serves them."""
        by_layer: dict[int, list[VisionNeed]] = {}
        for need in needs:
            if need.kind not in VISION_NEED_KINDS:
                raise FamilyError(f"unknown vision need {need.kind!r}; one of {', '.join(VISION_NEED_KINDS)}")
            by_layer.setdefault(self.vision_feature_layer_index if need.layer is None else need.layer, []).append(need)
        return by_layer

    def attention_hooked_layers(self, needs) -> set[int]:
        """Indices of the vision encoder layers whose attention module ``serving`` hooks to serve ``needs``."""
        return {index for index, layer_needs in self.needs_by_layer(needs).items()
                if any(n.kind not in LAYER_OUTPUT_NEEDS for n in layer_needs)}

    def _attention_hooks(self, attention: torch.nn.Module, needs: list[VisionNeed], captured: dict, timing) -> list:
        """Hooks on a vision attention module computing the rows ``needs`` ask for from the queries and keys the
        module projects itself (read off its q/k projections as they run, not projected again); returns the handles."""
        if any(n.kind == "cls_attention" for n in needs) and not self.vision_has_cls:
            tower = type(self.model.model.vision_tower).__name__
            raise FamilyError(f"{tower} has no [CLS] token to read attention from")
        all_rows = any(n.kind == "received_attention" for n in needs)
        projected: dict[str, torch.Tensor] = {}

        def keep(name: str):
            def hook(module, args, output):
                projected[name] = output
            return hook

        def compute(module, args, output):
            keys, queries = projected.pop("keys"), projected.pop("queries", None)
            with timing(keys.device):
                batch, length, _ = keys.shape
                keys = keys.view(batch, length, module.num_heads, module.head_dim)  # [B, T, H, d]
                probs = None
                for need in needs:
                    if need.kind == "keys":
                        captured[need].append(keys if need.per_head else keys.flatten(2))
                        continue
                    if probs is None:
                        rows = queries if all_rows else queries[:, :1]
                        query = rows.view(batch, -1, module.num_heads, module.head_dim).transpose(1, 2)  # [B, H, Q, d]
                        logits = query.float() @ keys.float().permute(0, 2, 3, 1)
                        probs = torch.softmax(logits * module.scale, dim=-1)
                    if need.per_head:  # [B, patches, H]
                        rows = probs[:, :, 0, 1:] if need.kind == "cls_attention" else probs.mean(dim=2)
                        captured[need].append(rows.transpose(1, 2))
                    elif need.kind == "cls_attention":
                        captured[need].append(probs[:, :, 0, 1:].mean(dim=1))
                    else:
                        captured[need].append(probs.mean(dim=(1, 2)))

        handles = [attention.k_proj.register_forward_hook(keep("keys"))]
        if any(n.kind != "keys" for n in needs):
            handles.append(attention.q_proj.register_forward_hook(keep("queries")))
        return handles + [attention.register_forward_hook(compute)]

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

    # ---- LLM internals -----------------------------------------------------------------------------

    @property
    def language_model(self) -> torch.nn.Module:
        """The decoder stack (embeddings aside, no LM head)."""
        return self.model.model.language_model

    @property
    def decoder_layers(self) -> torch.nn.ModuleList:
        return self.language_model.layers

    @property
    def text_attention_implementation(self) -> str:
        return self.config.text_config._attn_implementation or "eager"

    @staticmethod
    def attention_input(layer: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """What a decoder layer's attention module receives from the layer's input (its input norm)."""
        return layer.input_layernorm(hidden_states)

    @staticmethod
    def text_query_key(attention: torch.nn.Module, hidden_states: torch.Tensor, position_embeddings,
                       queries: slice | torch.Tensor = slice(-1, None), rotary: bool = True):
        """``(q [B, H, Q, d], k [B, H, T, d], scale)`` of a decoder attention module for the query rows ``queries``
        (a slice, or per-row positions ``[B, Q]``) over all keys, rotary embeddings applied unless ``rotary=False``
        and grouped key heads repeated (any attention implementation)."""
        rotate = sys.modules[type(attention).__module__].apply_rotary_pos_emb
        batch, length, _ = hidden_states.shape
        head_dim = attention.head_dim
        if isinstance(queries, slice):
            rows = torch.arange(length, device=hidden_states.device)[queries].expand(batch, -1)
        else:
            rows = queries
        picked = hidden_states.gather(1, rows[..., None].expand(-1, -1, hidden_states.shape[-1]))
        query = attention.q_proj(picked).view(batch, rows.shape[1], -1, head_dim).transpose(1, 2)
        key = attention.k_proj(hidden_states).view(batch, length, -1, head_dim).transpose(1, 2)
        if rotary:
            cos, sin = position_embeddings
            cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)
            take = rows[..., None].expand(-1, -1, cos.shape[-1])
            query, _ = rotate(query, query, cos.gather(1, take), sin.gather(1, take))
            _, key = rotate(key, key, cos, sin)
        return query, key.repeat_interleave(query.shape[1] // key.shape[1], dim=1), attention.scaling

    def rotary_embeddings(self, hidden_states: torch.Tensor, position_ids: torch.Tensor):
        """The LLM's rotary ``(cos, sin)`` at ``position_ids [B, T]``."""
        return self.language_model.rotary_emb(hidden_states, position_ids=position_ids)

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
