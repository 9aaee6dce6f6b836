"""Apply a before-LLM method to packed visuals and account for every image and frame."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lmms_eval_redundancy.adapters.base import PackedVisual
from lmms_eval_redundancy.registry import PruningMethod, VisualUnit

ANYRES_POLICIES = ("full", "base_only", "per_view")


@dataclass
class UnitRecord:
    """Token counts of one image or frame before and after pruning."""

    kind: str  # "image" | "frame"
    visual: int  # index of the image/video within its sample
    unit: int  # frame index within a video (0 for images)
    before: int
    after: int
    newlines_before: int
    newlines_after: int
    floor_hit: bool = False
    keep: list[int] | None = None


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


def prune_visual(visual: PackedVisual, method: PruningMethod, key: str, anyres: str = "full",
                 log_keep: bool = False) -> tuple[torch.Tensor, list[UnitRecord]]:
    """Kept features of ``visual`` (in original order) and one record per unit of ``policy_units``."""
    units, grids, keep_newlines = policy_units(visual, anyres)
    keep_mask = visual.newline.clone() if keep_newlines else torch.zeros_like(visual.newline)
    features = visual.features
    newlines_before = int(visual.newline.sum())
    records = []
    for index, (positions, grid) in enumerate(zip(units, grids)):
        unit_key = f"{key}/{visual.kind}{index}"
        scores = None if visual.scores is None else visual.scores[positions]
        selection = method.select_unit(VisualUnit(visual.features[positions], key=unit_key, grid=grid, scores=scores))
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


def prune_sample(visuals: list[PackedVisual], method: PruningMethod, key: str, anyres: str = "full",
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
