"""``vispruner``: selection rules of VisPruner (important tokens by [CLS] attention, then diverse tokens).

Official code: github.com/Theia-4869/VisPruner at aefa01adc7c7ce6334e880c88225e90cede760d1
(llava/model/llava_arch.py ``encode_images`` and ``prepare_inputs_labels_for_multimodal``,
llava/model/multimodal_encoder/clip_encoder.py and siglip_encoder.py ``feature_select``).

Rule, per view, for ``T`` kept tokens and important ratio ``r``: ``T_imp = int(T * r)`` (truncation),
``T_div = T - T_imp``. Patches are ranked by their [CLS]-row attention averaged over heads (layer R, the
layer LLaVA reads); the first ``T_imp`` are important, the rest form the residual list ``L`` in that
ranked order. Features (layer R patch hidden states, before the projector) are L2-normalised. While
``T_div > 0``: ``q = min(8, |L| - T_div)``, stop when ``q <= 0``; split ``L`` by position into
``A`` (entries 0, 2, 4, ...) and ``B`` (1, 3, 5, ...); score each ``a`` in ``A`` by its largest cosine with
any member of ``B``; sort ``A`` by that score, descending, and drop its first ``q``; the new ``L`` is the
surviving ``A`` in that order followed by ``B`` in its old order. Kept: important plus ``L``, exactly
``min(T, N)`` tokens, returned ascending (LLaVA takes them in raster order).

SigLIP (``siglip_scores``): the official SigLIP stub scores with the LAST layer's attention averaged over
the queries (then over heads, as above).

Project choices: scores and cosines in float32 (``dtype`` gives the official tower dtype); sorts are
stable (ties to the lower index; the official ``argsort`` order is unspecified). Residual lengths where
the official indexing fails (an odd ``|L|`` with ``|L| // 2 - q`` outside ``{-1, 0, 1}``, or ``q`` more
than one above ``|A|``) follow the same rule: drop ``min(q, |A|)`` members of ``A``. One odd length runs
officially but differently: ``|L| // 2 == q`` broadcasts to dropping ALL of ``A`` (``q + 1``, which can
leave ``T - 1`` tokens); ``official_odd_broadcast=True`` reproduces it.

``official_anyres_mask`` packs per-view keep masks in the official LLaVA-NeXT order: base view, then the
crops stitched into one grid, optionally unpadded (LLaVA's integer rule) with an always-kept newline
column. At aefa01ad the official code strips ``_unpad`` from ``mm_patch_merge_type`` before it tests for
it (llava_arch.py 207), so the branch that runs is ``unpad=False`` (no unpadding, no newlines).

The method (``VisPruner``) applies the rule to every view of an image (each on all its patches) with the
image's budget split evenly over them (``methods.views``): picks stay at their packed positions (those in the
padding drop out), or (``layout=official``) follow that official layout, picks in the padding projected from
their vision states. SigLIP towers score by mean received attention at the layer LLaVA reads.
"""

from __future__ import annotations

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

ROUND_CAP = 8  # official per-round cap on removed duplicates


def head_mean(attentions: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[..., N]`` importance scores from per-head attention on the patches ``[..., H, N]``: the mean over heads."""
    return attentions.to(dtype).mean(dim=-2)


def siglip_scores(last_layer_attentions: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[..., H, N]`` per-head attention received by each patch: the last layer's ``[..., H, N, N]`` averaged
    over the queries (the official SigLIP ``feature_select``)."""
    return last_layer_attentions.to(dtype).mean(dim=-2)


def select(features: torch.Tensor, scores: torch.Tensor, tokens: int, important_ratio: float = 0.5,
           dtype: torch.dtype = torch.float32, official_odd_broadcast: bool = False) -> torch.Tensor:
    """Ascending indices of the patches VisPruner keeps from ``features [N, C]`` with head-mean ``scores [N]``."""
    return select_batch([features], [scores], [tokens], important_ratio, dtype, official_odd_broadcast)[0]


def removal_rounds(lengths: list[int], diverse: list[int],
                   official_odd_broadcast: bool = False) -> tuple[list[tuple[int, list[int]]], list[int]]:
    """The duplicate-removal schedule, which the counts alone decide (so the loop needs no device round trip): per
    round, the width of the longest residual list and the flat ``[residual lengths before it, members of A it
    drops (0: the view is done)]`` of the views; and the final residual lengths."""
    rounds = []
    while True:
        dropped = []
        for length, wanted in zip(lengths, diverse):
            cap = min(ROUND_CAP, length - wanted)
            even, odd = (length + 1) // 2, length // 2
            if wanted <= 0 or cap <= 0:
                dropped.append(0)
            elif official_odd_broadcast and length % 2 == 1 and odd == cap:
                dropped.append(even)
            else:
                dropped.append(min(cap, even))
        if not any(dropped):
            return rounds, lengths
        rounds.append((max(lengths), lengths + dropped))
        lengths = [length - drop for length, drop in zip(lengths, dropped)]


def select_batch(features: list[torch.Tensor], scores: list[torch.Tensor], tokens: list[int],
                 important_ratio: float = 0.5, dtype: torch.dtype = torch.float32,
                 official_odd_broadcast: bool = False) -> list[torch.Tensor]:
    """``select`` for several views at once (ragged: views may differ in patches and budgets): one
    duplicate-removal loop for all views, each view's picks exactly as alone (its cosines come from its own
    product)."""
    count, longest, device = len(features), max(f.shape[0] for f in features), features[0].device
    important_counts = [int(t * important_ratio) for t in tokens]
    diverse_counts = [t - i for t, i in zip(tokens, important_counts)]
    patches = torch.tensor([f.shape[0] for f in features], device=device)
    important, diverse = (torch.tensor(counts, device=device) for counts in (important_counts, diverse_counts))
    arange = torch.arange(longest, device=device)

    padded_scores = torch.full((count, longest), float("-inf"), dtype=dtype, device=device)
    # cosine table; row/column `longest` (and any padding) is -inf, so padding entries never win a max
    cosine = torch.full((count, longest + 1, longest + 1), float("-inf"), dtype=dtype, device=device)
    for index, (rows, row_scores) in enumerate(zip(features, scores)):
        padded_scores[index, : rows.shape[0]] = row_scores.to(dtype)
        unit = rows.to(dtype) / rows.to(dtype).norm(dim=-1, keepdim=True)
        cosine[index, : rows.shape[0], : rows.shape[0]] = unit @ unit.T
    ranked = torch.sort(padded_scores, dim=1, descending=True, stable=True).indices

    # residual list: the ranked patches after the important ones, left-aligned, padded with `longest`
    lengths = [max(f.shape[0] - i, 0) for f, i in zip(features, important_counts)]
    shift = (arange + important.clamp(max=longest)[:, None]).clamp(max=longest - 1)
    residual = torch.where(arange < torch.tensor(lengths, device=device)[:, None], ranked.gather(1, shift), longest)
    rounds, final_lengths = removal_rounds(lengths, diverse_counts, official_odd_broadcast)
    schedule = torch.tensor([round_counts for _, round_counts in rounds], device=device).view(len(rounds), 2, count)
    slots = torch.arange(longest + 1, device=device)
    for (width, _), (residual_length, dropped) in zip(rounds, schedule):
        active = dropped > 0
        residual = residual[:, :width]
        even, odd = residual[:, 0::2], residual[:, 1::2]
        even_count, odd_count = (residual_length + 1) // 2, residual_length // 2
        pairs = even[:, :, None] * (longest + 1) + odd[:, None, :]  # [U, |A|, |B|] flat index into the table
        duplication = cosine.flatten(1).gather(1, pairs.flatten(1)).view(pairs.shape).max(dim=2).values
        order = torch.sort(duplication, dim=1, descending=True, stable=True).indices
        survivors = even_count - dropped
        # new list: surviving A (after the dropped ones, in score order), then B in its old order
        candidates = torch.cat([even.gather(1, order), odd], dim=1)
        slot = slots[: candidates.shape[1]]
        from_even = slot < even.shape[1]
        odd_slot = slot - even.shape[1]
        position = torch.where(from_even, slot - dropped[:, None], survivors[:, None] + odd_slot)
        keep = torch.where(from_even, (slot >= dropped[:, None]) & (slot < even_count[:, None]), odd_slot < odd_count[:, None])
        updated = torch.full((count, residual.shape[1] + 1), longest, dtype=torch.long, device=device)
        updated.scatter_(1, torch.where(keep, position, residual.shape[1]), candidates)  # last column: discarded
        residual = torch.where(active[:, None], updated[:, :-1], residual)
    residual_length = torch.tensor(final_lengths, device=device)

    in_important = (arange < important[:, None]) & (arange < patches[:, None])
    in_residual = (arange < residual_length[:, None]) & (diverse > 0)[:, None]
    mask = torch.zeros((count, longest + 1), dtype=torch.bool, device=device)  # last column: discarded writes
    mask.scatter_(1, torch.where(in_important, ranked, longest), True)
    mask.scatter_(1, torch.where(in_residual[:, : residual.shape[1]], residual, longest), True)
    return row_indices(mask[:, :longest])


def llava_unpad(height: int, width: int, image_size: tuple[int, int]) -> tuple[slice, slice]:
    """Rows and columns of a ``height`` x ``width`` crop grid that LLaVA's ``unpad_image`` keeps for an image of
    ``image_size = (width, height)`` pixels (integer truncation, padding split evenly)."""
    original_width, original_height = image_size
    if original_width / original_height > width / height:
        padding = (height - int(original_height * (width / original_width))) // 2
        return slice(padding, height - padding), slice(None)
    padding = (width - int(original_width * (height / original_height))) // 2
    return slice(None), slice(padding, width - padding)


def official_anyres_mask(view_masks: torch.Tensor, image_size: tuple[int, int], grid_width: int, grid_height: int,
                         side: int, unpad: bool) -> torch.Tensor:
    """The packed LLaVA-NeXT keep mask of one image from per-view masks ``[views, side * side]`` (base view first,
    then the crops row-major on a ``grid_width`` x ``grid_height`` grid): the base view, then the stitched crop
    grid read row-major; with ``unpad``, the grid is unpadded and every row ends with a kept newline (a
    single-view image gets one kept newline)."""
    base = view_masks[0]
    if view_masks.shape[0] == 1:
        return torch.cat([base, base.new_ones(1)]) if unpad else base
    grid = view_masks[1:].view(grid_height, grid_width, side, side).permute(0, 2, 1, 3)
    grid = grid.reshape(grid_height * side, grid_width * side)
    if unpad:
        grid = grid[llava_unpad(*grid.shape, image_size)]
        grid = torch.cat([grid, grid.new_ones((grid.shape[0], 1))], dim=1)
    return torch.cat([base, grid.flatten()])


@register
class VisPruner(BeforeLLM):
    """Each view's important tokens ([CLS] attention) and diverse tokens (iterative duplicate removal)."""

    name = "vispruner"

    @dataclass
    class Params:
        important_ratio: float = 0.5  # share of each view's tokens chosen by attention (int() truncation)
        odd_residual: str = choice_param("rule", ("rule", "official"), official="official")  # see the module docstring
        layout: str = choice_param("project", ("project", "official"), official="official")  # LLaVA-NeXT order
        precision: str = choice_param("float32", ("float32", "model"), official="model")  # scoring dtype

    def validate(self) -> None:
        if not 0 <= self.params.important_ratio <= 1:
            raise MethodError(f"important_ratio={self.params.important_ratio} is out of range; use 0 <= important_ratio <= 1")

    def attach(self, model, family) -> None:
        self.has_cls = family.vision_has_cls
        self.layer = family.vision_feature_layer_index
        self.tower = model.config.vision_config.model_type
        self.hidden = VisionNeed("hidden")
        self.score = VisionNeed("cls_attention" if self.has_cls else "received_attention")

    def vision_needs(self) -> tuple[VisionNeed, ...]:
        return (self.score, self.hidden)

    def settings(self) -> dict:
        score = "cls_attention" if self.has_cls else f"mean_received_attention ({self.tower} has no [CLS])"
        return {**super().settings(), "vision_layer": self.layer, "score": score}

    def select_units(self, units: list[VisualUnit]) -> list[Selection]:
        """Every view of every unit in one ``select_batch`` call, then each unit's picks in its layout."""
        if not units:
            return []
        dtype = torch.float32 if self.params.precision == "float32" else units[0].tile_vision[self.hidden].dtype
        features, scores, tokens = [], [], []
        for unit in units:
            views = unit_views(unit)
            patches = unit.tile_vision[self.hidden].shape[1]
            for tile, count in zip(views, view_counts(self.budget, len(views), patches)):
                features.append(unit.tile_vision[self.hidden][tile])
                scores.append(unit.tile_vision[self.score][tile])
                tokens.append(count)
        picks = iter(select_batch(features, scores, tokens, self.params.important_ratio, dtype,
                                  self.params.odd_residual == "official"))
        return [placed(unit, [(tile, next(picks)) for tile in unit_views(unit)], self.hidden, self.params.layout == "official")
                for unit in units]
