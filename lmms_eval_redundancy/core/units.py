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
        units = [torch.nonzero(visual.tiles == v).flatten() for v in visual.tiles[~visual.newline].unique()]
        return units, [None] * len(units), True
    return visual.units, visual.grids, True


def visual_units(visual: PackedVisual, key: str, anyres: str = "full", sample: int = 0,
                 text: str | None = None) -> tuple[list[torch.Tensor], list[VisualUnit], bool]:
    """The positions and ``VisualUnit`` of each unit of ``policy_units`` (of batch sample ``sample``, whose
    prompt text is ``text``), and whether newline tokens are kept."""
    positions, grids, keep_newlines = policy_units(visual, anyres)
    units = [VisualUnit(visual.features[where], key=f"{key}/{visual.kind}{index}", grid=grid, tiles=visual.tiles[where],
                        patches=visual.patches[where], vision={need: data[where] for need, data in visual.vision.items()},
                        tile_vision=visual.tile_vision, sample=sample, text=text)
             for index, (where, grid) in enumerate(zip(positions, grids))]
    return positions, units, keep_newlines


def apply_selections(visual: PackedVisual, positions: list[torch.Tensor], selections: list[Selection],
                     keep_newlines: bool, log_keep: bool = False, project=None) -> tuple[torch.Tensor, list[UnitRecord]]:
    """The LLM-input tokens of ``visual`` given each unit's selection, and one record per unit.

    Kept tokens stay in their original order; merged tokens go where their selection places them
    (vision-space ones through ``project``, the family's projector).
    """
    keep_newlines = keep_newlines and not any(selection.drop_newlines for selection in selections)
    keep_mask = visual.newline.clone() if keep_newlines else torch.zeros_like(visual.newline)
    newlines_before = int(visual.newline.sum())
    merged_tokens, merged_slots, records = [], [], []
    for index, (where, selection) in enumerate(zip(positions, selections)):
        kept = where[selection.keep]
        keep_mask[kept] = True
        merged = 0
        if selection.merged is not None:
            tokens = project(selection.merged) if selection.merged_space == "vision" else selection.merged
            after = selection.merged_after
            anchors = where[after.clamp(min=0)]
            merged_tokens.append(tokens.to(visual.features.dtype))
            merged_slots.append((anchors, after < 0))
            merged = int(tokens.shape[0])
        records.append(UnitRecord(
            kind="frame" if visual.kind == "video" else "image",
            visual=0,
            unit=index,
            before=int(where.numel()),
            after=int(kept.numel()) + merged,
            newlines_before=newlines_before if index == 0 else 0,
            newlines_after=0,
            floor_hit=selection.floor_hit,
            keep=selection.keep.tolist() if log_keep else None,
            merged=merged or None,
        ))
    if records:
        records[0].newlines_after = int((keep_mask & visual.newline).sum())
    if not merged_tokens:
        return visual.features[keep_mask], records
    return place_merged(visual.features, keep_mask, merged_tokens, merged_slots), records


def place_merged(features: torch.Tensor, keep_mask: torch.Tensor, merged: list[torch.Tensor], slots: list) -> torch.Tensor:
    """Kept rows of ``features`` in order, each merged token right after (flagged: right before) its anchor row."""
    count = sum(tokens.shape[0] for tokens in merged)
    stride = 2 * count + 2  # room for every merged token on either side of one row
    middle = count + 1
    keys = [torch.nonzero(keep_mask).flatten() * stride + middle]
    offset = 0
    for tokens, (anchors, before) in zip(merged, slots):
        order = torch.arange(offset, offset + tokens.shape[0], device=anchors.device)
        keys.append(anchors * stride + torch.where(before, order, middle + 1 + order))
        offset += tokens.shape[0]
    rows = torch.cat([features[keep_mask]] + merged)
    return rows[torch.argsort(torch.cat(keys), stable=True)]


def prune_batch(samples: list[list[PackedVisual]], method, keys: list[str], anyres: str = "full",
                log_keep: bool = False, project=None,
                texts: list[str] | None = None) -> list[tuple[list[torch.Tensor], list[UnitRecord], list]]:
    """Prune every visual of every sample with one ``method.select_units`` call over all their units
    (``texts``: each sample's prompt text, handed to its units).

    Per sample: the LLM-input tokens of each visual, the records of its units (``visual`` = index in the
    sample) and, aligned with the records, each unit's positions in its visual.
    """
    texts = texts or [None] * len(samples)
    plans = [[visual_units(visual, f"{key}/{index}", anyres, row, texts[row]) for index, visual in enumerate(sample)]
             for row, (sample, key) in enumerate(zip(samples, keys))]
    selections = iter(method.select_units([unit for plan in plans for _, units, _ in plan for unit in units]))
    pruned = []
    for sample, plan in zip(samples, plans):
        kept, records, unit_positions = [], [], []
        for index, (visual, (positions, units, keep_newlines)) in enumerate(zip(sample, plan)):
            features, unit_records = apply_selections(visual, positions, [next(selections) for _ in units],
                                                      keep_newlines, log_keep, project)
            for record in unit_records:
                record.visual = index
            kept.append(features)
            records.extend(unit_records)
            unit_positions.extend(positions)
        pruned.append((kept, records, unit_positions))
    return pruned


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
