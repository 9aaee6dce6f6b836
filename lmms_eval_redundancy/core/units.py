"""Units a method chooses within (images, frames, anyres views) and the records of what it kept."""

from __future__ import annotations

import math

import torch

from lmms_eval_redundancy.core.visuals import PackedVisual, UnitRecord, VisualUnit

ANYRES_POLICIES = ("full", "base_only", "per_view")


def policy_units(visual: PackedVisual, anyres: str) -> tuple[list[torch.Tensor], list, bool]:
    """The units a method chooses within, their grids, and whether newline tokens are kept.

    Default: the visual's own units (the image, or each frame), newlines kept. ``base_only``: only the
    base view of an anyres image, crops and newlines dropped. ``per_view``: each view of an anyres
    image (base, then each crop) is a unit with its own budget.
    """
    if anyres == "base_only" and visual.base is not None:
        side = math.isqrt(visual.base.numel())  # the base view is a square grid
        return [visual.base], [(side, side)], False
    if anyres == "per_view" and visual.base is not None:
        views = visual.views.round()
        units = [torch.nonzero(views == v).flatten() for v in views[~visual.newline].unique()]
        return units, [None] * len(units), True
    return visual.units, visual.grids, True


def prune_visual(visual: PackedVisual, method, key: str, anyres: str = "full",
                 log_keep: bool = False) -> tuple[torch.Tensor, list[UnitRecord]]:
    """Kept features of ``visual`` (in original order) and one record per unit of ``policy_units``.

    ``method`` is a before-LLM method: its ``select_unit`` maps a ``VisualUnit`` to a ``Selection``.
    """
    units, grids, keep_newlines = policy_units(visual, anyres)
    keep_mask = visual.newline.clone() if keep_newlines else torch.zeros_like(visual.newline)
    features = visual.features
    newlines_before = int(visual.newline.sum())
    records = []
    per_view = anyres == "per_view" and visual.base is not None
    for index, (positions, grid) in enumerate(zip(units, grids)):
        unit = VisualUnit(visual.features[positions], key=f"{key}/{visual.kind}{index}", grid=grid,
                          scores=None if visual.scores is None else visual.scores[positions])
        if per_view and visual.tile_scores is not None:
            unit.view_scores = visual.tile_scores[int(visual.views[positions[0]].round())]
            unit.view_patches = visual.patches[positions].round().long()
        selection = method.select_unit(unit)
        kept = positions[selection.keep]
        keep_mask[kept] = True
        if selection.features is not None:
            if features is visual.features:
                features = features.clone()
            features[kept] = selection.features.to(features.dtype)
        records.append(UnitRecord(
            kind="frame" if visual.kind == "video" else "image",
            visual=0,
            unit=index,
            before=int(positions.numel()),
            after=int(kept.numel()),
            newlines_before=newlines_before if index == 0 else 0,
            newlines_after=int((keep_mask & visual.newline).sum()) if index == 0 else 0,
            floor_hit=selection.floor_hit,
            keep=selection.keep.tolist() if log_keep and selection.features is None else None,
        ))
    return features[keep_mask], records


def prune_sample(visuals: list[PackedVisual], method, key: str, anyres: str = "full",
                 log_keep: bool = False) -> tuple[list[torch.Tensor], list[UnitRecord]]:
    """Prune every visual of one sample; records carry the visual's index within the sample."""
    kept_features, records = [], []
    for index, visual in enumerate(visuals):
        features, unit_records = prune_visual(visual, method, f"{key}/{index}", anyres, log_keep)
        for record in unit_records:
            record.visual = index
        kept_features.append(features)
        records.extend(unit_records)
    return kept_features, records


def keep_all_records(visuals: list[PackedVisual]) -> list[UnitRecord]:
    """Keep-all records of a sample's images/frames, for methods that decide inside the LLM."""
    records = []
    for index, visual in enumerate(visuals):
        newlines = int(visual.newline.sum())
        for unit, positions in enumerate(visual.units):
            records.append(UnitRecord(kind="frame" if visual.kind == "video" else "image", visual=index, unit=unit,
                                      before=positions.numel(), after=positions.numel(),
                                      newlines_before=newlines if unit == 0 else 0,
                                      newlines_after=newlines if unit == 0 else 0))
    return records


def unit_map(visual_mask: torch.Tensor, visuals: list[list[PackedVisual]]) -> torch.Tensor:
    """``[B, T]``: at each visual position, the index of its record (as ``keep_all_records`` numbers them);
    -1 at text, padding and newline positions."""
    ids = torch.full(visual_mask.shape, -1, dtype=torch.long, device=visual_mask.device)
    for row, sample_visuals in enumerate(visuals):
        per_token, offset = [], 0
        for visual in sample_visuals:
            labels = torch.full((visual.length,), -1, dtype=torch.long, device=visual_mask.device)
            for unit, positions in enumerate(visual.units):
                labels[positions] = offset + unit
            offset += len(visual.units)
            per_token.append(labels)
        if per_token:
            ids[row, visual_mask[row]] = torch.cat(per_token)
    return ids
