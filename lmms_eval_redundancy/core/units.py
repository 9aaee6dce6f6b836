"""Units a method chooses within (images, frames, anyres views) and the records of what it kept."""

from __future__ import annotations

import math

import torch

from lmms_eval_redundancy.core.visuals import (
    PackedVisual,
    Selection,
    UnitRecord,
    VisualUnit,
)

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


def visual_units(visual: PackedVisual, key: str, anyres: str = "full") -> tuple[list[torch.Tensor], list[VisualUnit], bool]:
    """The positions and ``VisualUnit`` of each unit of ``policy_units``, and whether newline tokens are kept."""
    positions, grids, keep_newlines = policy_units(visual, anyres)
    per_view = anyres == "per_view" and visual.base is not None
    units = []
    for index, (where, grid) in enumerate(zip(positions, grids)):
        unit = VisualUnit(visual.features[where], key=f"{key}/{visual.kind}{index}", grid=grid,
                          scores=None if visual.scores is None else visual.scores[where])
        if per_view and visual.tile_scores is not None:
            unit.view_scores = visual.tile_scores[int(visual.views[where[0]].round())]
            unit.view_patches = visual.patches[where].round().long()
        units.append(unit)
    return positions, units, keep_newlines


def apply_selections(visual: PackedVisual, positions: list[torch.Tensor], selections: list[Selection],
                     keep_newlines: bool, log_keep: bool = False) -> tuple[torch.Tensor, list[UnitRecord]]:
    """Kept features of ``visual`` (in original order) and one record per unit, given each unit's selection."""
    keep_mask = visual.newline.clone() if keep_newlines else torch.zeros_like(visual.newline)
    features = visual.features
    newlines_before = int(visual.newline.sum())
    records = []
    for index, (where, selection) in enumerate(zip(positions, selections)):
        kept = where[selection.keep]
        keep_mask[kept] = True
        if selection.features is not None:
            if features is visual.features:
                features = features.clone()
            features[kept] = selection.features.to(features.dtype)
        records.append(UnitRecord(
            kind="frame" if visual.kind == "video" else "image",
            visual=0,
            unit=index,
            before=int(where.numel()),
            after=int(kept.numel()),
            newlines_before=newlines_before if index == 0 else 0,
            newlines_after=int((keep_mask & visual.newline).sum()) if index == 0 else 0,
            floor_hit=selection.floor_hit,
            keep=selection.keep.tolist() if log_keep and selection.features is None else None,
        ))
    return features[keep_mask], records


def prune_batch(samples: list[list[PackedVisual]], method, keys: list[str], anyres: str = "full",
                log_keep: bool = False) -> list[tuple[list[torch.Tensor], list[UnitRecord]]]:
    """Prune every visual of every sample with one ``method.select_units`` call over all their units.

    Per sample: the kept features of each visual and the records of its units (``visual`` = index in the sample).
    """
    plans = [[visual_units(visual, f"{key}/{index}", anyres) for index, visual in enumerate(sample)]
             for sample, key in zip(samples, keys)]
    selections = iter(method.select_units([unit for plan in plans for _, units, _ in plan for unit in units]))
    pruned = []
    for sample, plan in zip(samples, plans):
        kept, records = [], []
        for index, (visual, (positions, units, keep_newlines)) in enumerate(zip(sample, plan)):
            features, unit_records = apply_selections(visual, positions, [next(selections) for _ in units],
                                                      keep_newlines, log_keep)
            for record in unit_records:
                record.visual = index
            kept.append(features)
            records.extend(unit_records)
        pruned.append((kept, records))
    return pruned


def prune_visual(visual: PackedVisual, method, key: str, anyres: str = "full",
                 log_keep: bool = False) -> tuple[torch.Tensor, list[UnitRecord]]:
    """Kept features of one visual and one record per unit of ``policy_units`` (units keyed ``<key>/<kind><unit>``)."""
    positions, units, keep_newlines = visual_units(visual, key, anyres)
    return apply_selections(visual, positions, method.select_units(units), keep_newlines, log_keep)


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
