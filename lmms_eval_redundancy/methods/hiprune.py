"""``hiprune``: anchor tokens from a middle vision layer, their neighbours as buffers, registers from a deep layer.

Official code: github.com/Danielement321/HiPrune, commit 6e83a1240874e99a25df34f54221a29bb24b7bc2
(LLaVA/llava/model/llava_arch.py ``encode_images``; settings from bench_llava*.sh and the README).

Rule, per view of ``N`` patches on a ``w``-wide grid (CLIP-336: 576, 24), with budget ``k``:

1. Scores: attention probabilities of a layer, averaged over heads, then over the query rows (officially
   all 577, [CLS] included), the [CLS] column dropped afterwards without renormalising ("global
   attention"). Object layer: ``object_layer`` 9, i.e. ``attentions[8]``; deep layer: the layer LLaVA
   reads (``attentions[-2]``, index 22).
2. Anchors: the top ``round(k * alpha / 5)`` patches (Python round, half to even) of the object scores.
3. Buffers: each anchor's ``p - 1, p + 1, p - w, p + w``, clamped into ``[0, N - 1]``; with the anchors
   they form the set ``U``.
4. Registers: the top ``k - |U|`` of the deep scores minus 1 on ``U`` (scores lie in [0, 1], so ``U`` is
   excluded). Keep = ``U`` + registers, sorted: exactly ``k`` patches.

Defaults (README, bench scripts): ``alpha = 0.1``, ``object_layer = 9``; retention 192/128/64 (LLaVA-1.5),
640/320/160 (LLaVA-NeXT, per image).

Quirks and options:
- The official budget per view is ``int(retention / views in the forward call)`` (``per_view_budget``);
  the project budgets per image and the method class decides how to split it.
- Neighbours wrap across row ends (``p - 1`` at column 0 is the previous row's last patch) and the clamp
  turns off-grid neighbours of the top/bottom rows into patches 0 and ``N - 1``: ``buffer="official"``.
  ``buffer="grid"`` drops off-grid neighbours instead (a project option).
- The scores are computed in the tower's dtype officially; ``dtype`` selects it (project: float32).
- ``topk`` tie order is unspecified officially; here ties go to the lower index.
- ``k >= N`` keeps every patch (the official code raises once ``k - |U| > N``); ``k < |U|`` (only with a
  large ``alpha``) keeps ``U`` alone, where the official code raises.
- LLaVA-NeXT: the official code forces the ``spatial`` merge (llava_arch.py 203): the base view's picks, then
  the crops' picks on the stitched crop grid read row-major, without unpadding or newline tokens;
  ``layout=official`` (``faithful=true``) reproduces it, picks in the padding projected from their vision
  states (``views.placed``). The project layout keeps picks at their packed positions (unpadded grid, newlines).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmms_eval_redundancy.core.registry import MethodError, choice_param, register
from lmms_eval_redundancy.methods.base import (
    BeforeLLM,
    Selection,
    VisionNeed,
    VisualUnit,
    row_indices,
)
from lmms_eval_redundancy.methods.views import placed, unit_views, view_counts

ALPHA = 0.1
OFFICIAL_TOWER_LAYERS = 24  # CLIP-L/336, where the object layer 9 was set
OBJECT_LAYER = 9  # 1-based, as officially: attentions[OBJECT_LAYER - 1]
BUFFER_CHOICES = ("official", "grid")


def global_attention(attention: torch.Tensor, dtype: torch.dtype = torch.float32,
                     has_cls: bool = True) -> torch.Tensor:
    """``[B, N]`` scores from attention probabilities ``[B, H, Q, T]``: mean over heads, then over the ``Q``
    query rows given, in ``dtype``; the [CLS] column dropped afterwards when ``has_cls``."""
    scores = attention.to(dtype).mean(dim=1).mean(dim=1)
    return scores[:, 1:] if has_cls else scores


def per_view_budget(retention: int, views: int) -> int:
    """The official per-view budget: the retention divided by the views of the forward call, truncated."""
    return int(retention / views)


def anchor_count(budget: int, alpha: float = ALPHA) -> int:
    """Number of anchors for a per-view budget: ``round(budget * alpha / 5)`` (Python round)."""
    return round(budget * alpha / 5)


def select_batch(object_scores: Sequence[torch.Tensor], deep_scores: Sequence[torch.Tensor], ks: Sequence[int],
                 alpha: float = ALPHA, buffer: str = "official", grid_width: int | None = None) -> list[torch.Tensor]:
    """Sorted kept indices of each unit (object and deep scores ``[N_u]``, budget ``k_u``), all units at once
    (padded to the longest), each exactly as alone. ``grid_width`` defaults to ``sqrt(N_u)``."""
    if buffer not in BUFFER_CHOICES:
        raise ValueError(f"buffer must be one of {', '.join(BUFFER_CHOICES)}, not {buffer!r}")
    count, longest = len(object_scores), max(s.shape[0] for s in object_scores)
    device = object_scores[0].device
    lengths = torch.tensor([s.shape[0] for s in object_scores], device=device)
    widths = torch.tensor([grid_width or _square_width(s.shape[0]) for s in object_scores], device=device)
    valid = torch.arange(longest, device=device)[None, :] < lengths[:, None]

    def padded(scores: Sequence[torch.Tensor]) -> torch.Tensor:
        out = torch.full((count, longest), -float("inf"), dtype=scores[0].dtype, device=device)
        for index, unit in enumerate(scores):
            out[index, : unit.shape[0]] = unit
        return out

    anchors_wanted = torch.tensor([anchor_count(k, alpha) for k in ks], device=device)
    most = min(int(anchors_wanted.max()), longest)
    anchors = torch.sort(padded(object_scores), dim=1, descending=True, stable=True).indices[:, :most]
    is_anchor = torch.arange(most, device=device)[None, :] < torch.minimum(anchors_wanted, lengths)[:, None]

    # anchor itself, left, right, up, down: [U, A, 5]
    row_step = torch.tensor([0, 0, 0, -1, 1], device=device)
    column_step = torch.tensor([0, -1, 1, 0, 0], device=device)
    neighbours = anchors[:, :, None] + row_step * widths[:, None, None] + column_step
    if buffer == "official":
        neighbours = torch.minimum(neighbours.clamp(min=0), (lengths - 1)[:, None, None])
        kept = is_anchor[:, :, None].expand_as(neighbours)
    else:
        column = anchors[:, :, None] % widths[:, None, None] + column_step
        kept = (is_anchor[:, :, None] & (column >= 0) & (column < widths[:, None, None])
                & (neighbours >= 0) & (neighbours < lengths[:, None, None]))
    in_u = torch.zeros(count, longest + 1, dtype=torch.bool, device=device)  # last column: dropped entries
    in_u.scatter_(1, torch.where(kept, neighbours, longest).flatten(1), True)
    in_u = in_u[:, :longest]

    deep = padded(deep_scores)
    deep = (deep - in_u.to(deep.dtype)).masked_fill(~valid, -float("inf"))
    registers_wanted = (torch.tensor(list(ks), device=device) - in_u.sum(dim=1)).clamp(min=0)
    order = torch.sort(deep, dim=1, descending=True, stable=True).indices
    registers = torch.zeros_like(in_u).scatter_(
        1, order, torch.arange(longest, device=device)[None, :] < registers_wanted[:, None])
    keep = (in_u | registers) & valid
    return row_indices(keep)


def select(object_scores: torch.Tensor, deep_scores: torch.Tensor, k: int, alpha: float = ALPHA,
           buffer: str = "official", grid_width: int | None = None) -> torch.Tensor:
    """``select_batch`` for one unit."""
    return select_batch([object_scores], [deep_scores], [k], alpha, buffer, grid_width)[0]


def _square_width(patches: int) -> int:
    width = math.isqrt(patches)
    if width * width != patches:
        raise ValueError(f"{patches} patches are not a square grid; pass grid_width")
    return width


def default_object_layer(tower_layers: int) -> int:
    """The official object layer 9 on towers of 24 layers or more; on shorter towers the same depth, 9/24 of
    the tower, rounded (at least 1)."""
    if tower_layers >= OFFICIAL_TOWER_LAYERS:
        return OBJECT_LAYER
    return max(1, round(tower_layers * OBJECT_LAYER / OFFICIAL_TOWER_LAYERS))


@register
class HiPrune(BeforeLLM):
    """Each view of a unit (the image, each anyres view in it, or a frame) is selected on its full patch grid,
    padding included, with the unit's budget split evenly over its views (``views.view_counts``); picks in
    unpadded-away patches are dropped."""

    name = "hiprune"

    @dataclass
    class Params:
        alpha: float = ALPHA  # anchors: round(k * alpha / 5)
        object_layer: int | None = None  # 1-based; default 9 (official) on 24+ layer towers, 9/24 of shorter ones
        buffer: str = choice_param("official", BUFFER_CHOICES)
        layout: str = choice_param("project", ("project", "official"), official="official")  # LLaVA-NeXT order

    def validate(self) -> None:
        if not 0 < self.params.alpha <= 1:
            raise MethodError(f"alpha={self.params.alpha} must lie in (0, 1]")
        if self.params.object_layer is not None and self.params.object_layer < 1:
            raise MethodError(f"object_layer={self.params.object_layer} must be at least 1 (1-based, as officially)")

    def attach(self, model, family) -> None:
        layers = len(family.vision_encoder_layers)
        self.object_layer = self.params.object_layer or default_object_layer(layers)
        if self.object_layer > layers:
            raise MethodError(f"object_layer={self.object_layer} is beyond this vision tower's {layers} layers; "
                              f"give object_layer= between 1 and {layers}")
        self.deep_layer = family.vision_feature_layer_index
        self.object_need = VisionNeed("received_attention", self.object_layer - 1)
        self.deep_need = VisionNeed("received_attention")
        self.has_cls = family.vision_has_cls
        self.hidden = VisionNeed("hidden")  # the states new tokens are projected from (official layout)

    def vision_needs(self) -> tuple[VisionNeed, ...]:
        return (self.object_need, self.deep_need) + ((self.hidden,) if self.params.layout == "official" else ())

    def settings(self) -> dict:
        return {**super().settings(), "object_layer_used": self.object_layer, "deep_vision_layer": self.deep_layer,
                "score": "global attention (head mean, all query rows" + (", [CLS] column dropped)" if self.has_cls else ")"),
                "score_dtype": "float32", "budget_scope": "per image or frame, split evenly over its views"}

    def select_units(self, units: list[VisualUnit]) -> list[Selection]:
        """Every view of every unit in one ``select_batch`` call, then each unit's picks in its layout."""
        object_scores, deep_scores, ks = [], [], []
        for unit in units:
            tiles = unit_views(unit)
            patches = unit.tile_vision[self.deep_need].shape[1]
            for tile, k in zip(tiles, view_counts(self.budget, len(tiles), patches)):
                object_scores.append(unit.tile_vision[self.object_need][tile])
                deep_scores.append(unit.tile_vision[self.deep_need][tile])
                ks.append(k)
        picks = iter(select_batch(object_scores, deep_scores, ks, self.params.alpha, self.params.buffer) if units else [])
        return [placed(unit, [(tile, next(picks)) for tile in unit_views(unit)], self.hidden, self.params.layout == "official")
                for unit in units]
