"""Per-view selection inside packed images: the granularity of the official methods that act on the vision tower.

A unit's tokens carry their vision tile (view) and patch; the official rules choose among all patches of
each 336px view (padding included). ``view_counts`` splits a unit's budget evenly over its views,
``positions_of`` maps picks back to the unit (picks in the padding HF's unpadding removed drop out), and
``stitched_placement`` places picks in the official LLaVA-NeXT order: base view, then the crops stitched into
one grid read row-major, without unpadding (picks the unit lacks become new tokens after the unit token they
follow). ``placed`` gives a unit's selection in either layout.
"""

from __future__ import annotations

import math

import torch

from lmms_eval_redundancy.core.budget import Budget
from lmms_eval_redundancy.core.visuals import Selection, VisionNeed, VisualUnit


def unit_views(unit: VisualUnit) -> list[int]:
    """The vision tiles (views) the unit's tokens come from, ascending."""
    return sorted(set(unit.tiles.tolist()))


def view_counts(budget: Budget, views: int, patches: int) -> list[int]:
    """Tokens per view: the budget of ``views`` full views of ``patches`` each, split evenly (earlier views get
    the remainder)."""
    total = budget.keep_count(views * patches)
    return [total // views + (view < total % views) for view in range(views)]


def positions_of(unit: VisualUnit, tile: int, patches: torch.Tensor) -> torch.Tensor:
    """Ascending unit indices of the tokens of ``tile`` whose patch is in ``patches``."""
    return torch.nonzero((unit.tiles == tile) & torch.isin(unit.patches, patches)).flatten()


def crop_grid_width(crop_tiles: torch.Tensor, side: int) -> int:
    """Crops per row of the stitched grid, read off the tile of each crop token in packed (raster) order."""
    runs, lengths = torch.unique_consecutive(crop_tiles, return_counts=True)
    seen = set()
    for index, tile in enumerate(runs.tolist()):
        if tile in seen:
            return index
        seen.add(tile)
    return 1 if bool((lengths > side).any()) else len(runs)


def stitched_placement(unit: VisualUnit, tiles: torch.Tensor, patches: torch.Tensor,
                       side: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crop picks (``tiles >= 1``, ``patches``) in stitched-grid raster order: the unit indices of those the unit
    has, and for the others (in the padding) their index in the picks and the unit token each follows."""
    crop = unit.tiles > 0
    crop_positions = torch.nonzero(crop).flatten()
    width = crop_grid_width(unit.tiles[crop], side)

    def key(tile: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
        column = (tile - 1) % width * side + patch % side
        return ((tile - 1) // width * side + patch // side) * width * side + column

    unit_keys = key(unit.tiles[crop], unit.patches[crop])
    pick_keys = key(tiles, patches)
    order = torch.argsort(pick_keys)
    found = torch.searchsorted(unit_keys, pick_keys[order])
    inside = (found < len(unit_keys)) & (unit_keys[found.clamp(max=len(unit_keys) - 1)] == pick_keys[order])
    before = found[~inside] - 1
    anchors = torch.where(before >= 0, crop_positions[before.clamp(min=0)], torch.nonzero(~crop).flatten()[-1])
    return crop_positions[found[inside]], order[~inside], anchors


def placed(unit: VisualUnit, views: list[tuple[int, torch.Tensor]], states: VisionNeed, official: bool) -> Selection:
    """The unit's picks ``views`` (per view: its tile and chosen patches) at their packed positions (picks in the
    padding dropped), or with ``official`` (several views) in the official LLaVA-NeXT order, base view then the
    stitched crop grid without unpadding or newline tokens; picks in the padding then become new tokens,
    projected from their vision states ``unit.tile_vision[states]``."""
    keep = [positions_of(unit, tile, patches) for tile, patches in views]
    if not official or len(views) == 1:
        return Selection(torch.cat(keep).sort().values)
    crops = views[1:]
    tiles = torch.cat([torch.full_like(patches, tile) for tile, patches in crops])
    patches = torch.cat([patches for _, patches in crops])
    side = math.isqrt(unit.tile_vision[states].shape[1])
    inside, padded, anchors = stitched_placement(unit, tiles, patches, side)
    new = unit.tile_vision[states][tiles[padded], patches[padded]]
    return Selection(torch.cat([keep[0], inside]).sort().values, merged=new if padded.numel() else None,
                     merged_after=anchors, merged_space="vision", drop_newlines=True)
