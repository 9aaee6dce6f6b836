"""``cdpruner``: conditional DPP over the projected patches, weighted by relevance to the instruction.

Official code: github.com/Theia-4869/CDPruner, commit 9541616c40fcd5625de1cdb8ea6c33c129eb7864
(llava/model/llava_arch.py ``encode_images``; llava/model/multimodal_encoder/clip_encoder.py ``forward``).

Rule, per view of ``N`` patches:

1. Similarity ``S``: cosines of the projector outputs ``F [N, D]`` (rows normalised, then a float32 product).
2. Relevance: for each patch, the mean over the instruction's text segments of the NEGATIVE cosine between
   its CLIP joint-space embedding (``visual_projection(post_layernorm(layer-R patch states))``) and the
   segment's ``text_embeds``; then ``(rel - min + 1e-6) / (max - min)`` with min and max over every view
   of the call (the sample's views in the project).
3. Kernel ``L = diag(rel) S diag(rel)``; greedy MAP (Chen et al.'s fast greedy): ``d2 = diag(L)``; each
   step picks ``j = argmax d2`` (first index on ties), ``e = (L[j] - sum_s c_s[j] c_s) / sqrt(d2[j])``,
   ``d2 -= e**2``, ``d2[j] = -inf``. No early stop. Keep the ``k`` picks, sorted.

The instruction is tokenised with BOS/EOS and no truncation, right-padded with zeros (ids and mask) to a
multiple of 77 and cut into 77-token segments, one ``text_embeds`` row each (``text_segments``). The project runs
the tower without the trailing positions that are padding in every segment of the batch: the tower is causal, so
the embeddings are the same (up to float rounding: no real token attends to padding).

Quirks and options:
- Normalising ``F`` happens in the model's dtype officially; ``dtype`` selects it (project: float32).
- ``theta``: the commented-out official variant ``rel <- exp(theta / (2 (1 - theta)) rel)``; off officially.
- The +1e-6 sits in the numerator only (the top patch maps slightly above 1); ``max == min`` gives inf/NaN,
  as officially.
- No stop once ``d2`` reaches zero (duplicate tokens, large ``k``): the later picks follow rounding noise,
  and a negative residual makes them NaN, where ``argmax`` takes the first NaN. Kept as officially.
- The official min-max spans the whole forward batch (batch 1 officially); the project calls
  ``relevance`` once per sample, over that sample's views.
- ``k >= N`` keeps every patch (the official code would repeat index 0).

The registered method (``CDPruner``) loads the text tower, its tokenizer and the vision checkpoint's
post-layernorm and visual projection from ``clip_text=`` (refusing a missing, non-CLIP or differently wide
checkpoint) and reads the instruction from each sample's prompt text (``instruction_text``; a pipeline called
without texts scores against the empty instruction).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmms_eval_redundancy.core.registry import MethodError, choice_param, register
from lmms_eval_redundancy.methods.base import (
    BeforeLLM,
    Selection,
    VisionNeed,
    VisualUnit,
)
from lmms_eval_redundancy.methods.views import positions_of, unit_views, view_counts

SEGMENT_LENGTH = 77  # CLIP text positions (max_position_embeddings)
PLACEHOLDERS = ("<image>", "<video>")
# answer-format lines the official eval scripts strip before the text tower (model_vqa_loader.py, model_vqa_science.py)
ANSWER_FORMATS = ("\nAnswer the question using a single word or phrase.",
                  "\nAnswer with the option's letter from the given choices directly.")
log = logging.getLogger(__name__)


def text_segments(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  segment_length: int = SEGMENT_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenised text ``[1, L]`` (ids and mask) right-padded with zeros to a multiple of ``segment_length``
    and cut into rows ``[M, segment_length]``, M = ceil(L / segment_length)."""
    segments = (input_ids.shape[1] - 1) // segment_length + 1
    padding = segments * segment_length - input_ids.shape[1]
    return tuple(torch.cat([t, t.new_zeros((t.shape[0], padding))], dim=1).reshape(-1, segment_length)
                 for t in (input_ids, attention_mask))


def relevance(image_embeds: Sequence[torch.Tensor], text_embeds: torch.Tensor,
              theta: float | None = None) -> list[torch.Tensor]:
    """Per view ``[N_v]`` relevance of the patches' joint-space embeddings ``[N_v, C]`` to the text segments
    ``[M, C]``: negative cosine averaged over segments, min-max normalised over all the given views together
    (float32); ``theta`` applies the commented-out official exp variant."""
    embeds = torch.cat([view.float() for view in image_embeds])
    embeds = embeds / embeds.norm(dim=-1, keepdim=True)
    text = text_embeds.float()
    text = text / text.norm(dim=-1, keepdim=True)
    scores = (-(embeds @ text.t())).mean(dim=-1)
    scores = (scores - scores.min() + 1e-6) / (scores.max() - scores.min())
    if theta is not None:
        scores = torch.exp(theta / (2 * (1 - theta)) * scores)
    return list(scores.split([view.shape[0] for view in image_embeds]))


def conditional_kernel(features: torch.Tensor, scores: torch.Tensor,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``diag(scores) S diag(scores)`` ``[N, N]`` (float32): ``S`` the cosines of features ``[N, D]`` (rows
    normalised in ``dtype``), ``scores [N]`` the relevance."""
    rows = features.to(dtype)
    unit = (rows / rows.norm(dim=-1, keepdim=True)).float()
    return scores.float()[:, None] * (unit @ unit.t()) * scores.float()[None, :]


def greedy_map(kernels: Sequence[torch.Tensor], ks: Sequence[int]) -> list[torch.Tensor]:
    """Greedy MAP pick order (``min(k, N)`` indices) of each kernel ``[N_u, N_u]``, one loop for all units
    (zero-padded to the longest; padding is never picked), each unit's picks exactly as alone."""
    count, longest = len(kernels), max(k.shape[0] for k in kernels)
    device = kernels[0].device
    kernel = torch.zeros(count, longest, longest, device=device)
    for index, unit in enumerate(kernels):
        kernel[index, : unit.shape[0], : unit.shape[0]] = unit
    lengths = torch.tensor([k.shape[0] for k in kernels], device=device)
    residual = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    residual.masked_fill_(torch.arange(longest, device=device)[None, :] >= lengths[:, None], -float("inf"))
    steps = max(min(k, unit.shape[0]) for k, unit in zip(ks, kernels))
    directions = torch.zeros(steps, count, longest, device=device)
    picks = torch.empty(steps, count, dtype=torch.long, device=device)
    units = torch.arange(count, device=device)
    for step in range(steps):
        j = residual.argmax(dim=-1)
        picks[step] = j
        projection = torch.einsum("tb,tbn->bn", directions[:step, units, j], directions[:step])
        direction = (kernel[units, j] - projection) / torch.sqrt(residual[units, j]).unsqueeze(-1)
        directions[step] = direction
        residual -= direction.square()
        residual[units, j] = -float("inf")
    return [picks[: min(k, unit.shape[0]), index] for index, (k, unit) in enumerate(zip(ks, kernels))]


def select_batch(features: Sequence[torch.Tensor], scores: Sequence[torch.Tensor], ks: Sequence[int],
                 dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Sorted kept indices of each unit (features ``[N_u, D]``, relevance ``[N_u]``, budget ``k_u``)."""
    kernels = [conditional_kernel(f, s, dtype) for f, s in zip(features, scores)]
    return [order.sort().values for order in greedy_map(kernels, ks)]


def select(features: torch.Tensor, scores: torch.Tensor, k: int,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``select_batch`` for one unit."""
    return select_batch([features], [scores], [k], dtype)[0]


def instruction_text(prompt: str) -> str:
    """The question of a prompt as the official eval scripts give it to the text tower: image placeholders
    removed, the answer-format line stripped."""
    for piece in PLACEHOLDERS + ANSWER_FORMATS:
        prompt = prompt.replace(piece, "")
    return prompt.strip()


@register
class CDPruner(BeforeLLM):
    """The conditional DPP per view (each anyres view, image or frame), among all its patches, padding included,
    the unit's budget split evenly over its views (``views.view_counts``); relevance is min-max normalised once
    per sample over every view of that sample's units. Picks in unpadded-away patches are dropped."""

    name = "cdpruner"
    needs_cls = True

    @dataclass
    class Params:
        clip_text: str = ""  # CLIP checkpoint (folder or hub id) of the vision tower: text tower, tokenizer, projection
        theta: float | None = None  # the commented-out official exp variant of the relevance; off officially
        precision: str = choice_param("float32", ("float32", "model"), official="model")  # dtype normalising F

    def validate(self) -> None:
        if not self.params.clip_text:
            raise MethodError("cdpruner needs a CLIP text tower for its relevance term: clip_text= must name the CLIP "
                              "checkpoint of the model's vision tower, a folder or hub id (e.g. "
                              "clip_text=openai/clip-vit-large-patch14-336 for LLaVA-1.5 and LLaVA-NeXT)")
        if self.params.theta is not None and not 0 <= self.params.theta < 1:
            raise MethodError(f"theta={self.params.theta} must lie in [0, 1)")

    def attach(self, model, family) -> None:
        tower = model.config.vision_config
        if tower.model_type != "clip_vision_model" or not family.vision_has_cls:
            raise MethodError(f"cdpruner needs a CLIP vision tower with a [CLS] token (its relevance comes from the "
                              f"matching CLIP text tower); this model's tower is {tower.model_type} and the official "
                              "code has no path for it: choose another method for this model")
        self.text_model, self.tokenizer, self.joint = family.clip_text(self.params.clip_text)
        self.need = VisionNeed("hidden")
        self.layer = family.vision_feature_layer_index
        self.project = family.project

    def vision_needs(self) -> tuple[VisionNeed, ...]:
        return (self.need,)

    def settings(self) -> dict:
        return {**super().settings(), "vision_layer": self.layer, "relevance_dtype": "float32",
                "relevance_scope": "per sample (all its units)"}

    def text_embeds(self, texts: list[str]) -> list[torch.Tensor]:
        """``text_embeds [M, P]`` of each instruction's 77-token segments (BOS/EOS, no truncation), every segment in
        one text-tower call. Positions that are padding in every segment are left out: the tower is causal, so no
        real token attends to them, and the pooled (end-of-text) position is a real token."""
        segments = [text_segments(tokens["input_ids"], tokens["attention_mask"])
                    for tokens in (self.tokenizer(text, return_tensors="pt") for text in texts)]
        ids, mask = (torch.cat(parts) for parts in zip(*segments))
        used = int(mask.any(dim=0).nonzero().max()) + 1  # the tokenizer's tensors are on the CPU: no device round trip
        device = self.joint[1].weight.device
        embeds = self.text_model(input_ids=ids[:, :used].to(device), attention_mask=mask[:, :used].to(device)).text_embeds
        return list(embeds.split([segment_ids.shape[0] for segment_ids, _ in segments]))

    def view_features(self, unit: VisualUnit, tile: int) -> torch.Tensor:
        """The LLM-input tokens of every patch of a view ``[P, D]``: the unit's own where it has them, the
        projector's output of the view's vision states for the patches unpadding removed."""
        states = unit.tile_vision[self.need][tile]
        positions = torch.nonzero(unit.tiles == tile).flatten()
        present = unit.patches[positions]
        if present.numel() == states.shape[0]:
            return unit.features[positions[torch.argsort(present)]]
        features = self.project(states).to(unit.features.dtype)
        features[present] = unit.features[positions]
        return features

    def select_units(self, units: list[VisualUnit]) -> list[Selection]:
        """Relevance per sample (min-max over all its views), then one greedy loop over every view of the batch; the
        text tower and the joint-space map run once each for the whole batch."""
        if not units:
            return []
        views = [(index, tile) for index, unit in enumerate(units) for tile in unit_views(unit)]
        samples = list(dict.fromkeys(unit.sample for unit in units))
        texts = [instruction_text(next(unit.text for unit in units if unit.sample == sample) or "") for sample in samples]
        log.debug("cdpruner instructions of samples %s: %r", samples, texts)
        states = [units[index].tile_vision[self.need][tile] for index, tile in views]
        embeds = dict(zip(views, self.joint(torch.cat(states).float()).split([view.shape[0] for view in states])))
        scores: dict[tuple[int, int], torch.Tensor] = {}
        for sample, text in zip(samples, self.text_embeds(texts)):
            members = [view for view in views if units[view[0]].sample == sample]
            scores.update(zip(members, relevance([embeds[view] for view in members], text, self.params.theta)))
        ks = [k for unit in units
              for k in view_counts(self.budget, len(unit_views(unit)), unit.tile_vision[self.need].shape[1])]
        dtype = torch.float32 if self.params.precision == "float32" else units[0].features.dtype
        picks = select_batch([self.view_features(units[index], tile) for index, tile in views],
                             [scores[view] for view in views], ks, dtype)
        kept: list[list[torch.Tensor]] = [[] for _ in units]
        for (index, tile), chosen in zip(views, picks):
            kept[index].append(positions_of(units[index], tile, chosen))
        return [Selection(torch.cat(positions).sort().values) for positions in kept]
