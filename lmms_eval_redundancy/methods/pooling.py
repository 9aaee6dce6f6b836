"""``pooling``: 2-D average pooling of each image's (or frame's) token grid to about the budget (merged tokens)."""

from __future__ import annotations

import math

import torch

from lmms_eval_redundancy.core.registry import MethodError, register
from lmms_eval_redundancy.methods.base import BeforeLLM, Selection, VisualUnit


def pooled_shape(rows: int, cols: int, k: int) -> tuple[int, int]:
    """The grid with the aspect of ``rows x cols`` whose size is closest to ``k`` tokens."""
    scale = math.sqrt(k / (rows * cols))
    return max(1, min(rows, round(rows * scale))), max(1, min(cols, round(cols * scale)))


def pool(features: torch.Tensor, grid: tuple[int, int], k: int) -> torch.Tensor:
    """Average-pool raster tokens ``[..., rows*cols, D]`` (any leading batch dimensions) to about ``k`` tokens,
    returned in raster order ``[..., k', D]``."""
    rows, cols = grid
    out_rows, out_cols = pooled_shape(rows, cols, k)
    leading, width = features.shape[:-2], features.shape[-1]
    image = features.transpose(-1, -2).reshape(-1, width, rows, cols)
    pooled = torch.nn.functional.adaptive_avg_pool2d(image.float(), (out_rows, out_cols))
    return pooled.reshape(*leading, width, -1).transpose(-1, -2).to(features.dtype)


@register
class Pooling(BeforeLLM):
    name = "pooling"
    needs_grid = True

    def select_units(self, units: list[VisualUnit]) -> list[Selection]:
        """One pooling call per grid shape of the batch (all images of a batch usually share one)."""
        if any(unit.grid is None for unit in units):
            raise MethodError(
                "pooling needs a token grid, and an anyres image is a packed sequence of views: "
                "use anyres=base_only with LLaVA-NeXT/OneVision single images, or another method"
            )
        groups: dict[tuple[int, int], list[int]] = {}
        for index, unit in enumerate(units):
            groups.setdefault(unit.grid, []).append(index)
        selections: list[Selection] = [None] * len(units)
        for grid, members in groups.items():
            stacked = pool(torch.stack([units[index].features for index in members]), grid,
                           self.budget.keep_count(grid[0] * grid[1]))
            slots = torch.arange(stacked.shape[1], device=stacked.device)  # pooled token j takes the place of token j
            for index, tokens in zip(members, stacked):
                selections[index] = Selection(slots[:0], merged=tokens, merged_after=slots)
        return selections
