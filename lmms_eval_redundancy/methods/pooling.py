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
    """Average-pool raster tokens ``[rows*cols, D]`` to about ``k`` tokens, returned in raster order."""
    rows, cols = grid
    out_rows, out_cols = pooled_shape(rows, cols, k)
    image = features.T.reshape(1, -1, rows, cols)
    pooled = torch.nn.functional.adaptive_avg_pool2d(image.float(), (out_rows, out_cols))
    return pooled.reshape(features.shape[1], -1).T.to(features.dtype)


@register
class Pooling(BeforeLLM):
    name = "pooling"
    needs_grid = True

    def select_unit(self, unit: VisualUnit) -> Selection:
        if unit.grid is None:
            raise MethodError(
                "pooling needs a token grid, and an anyres image is a packed sequence of views: "
                "use anyres=base_only with LLaVA-NeXT/OneVision single images, or another method"
            )
        pooled = pool(unit.features, unit.grid, self.budget.keep_count(unit.features.shape[0]))
        slots = torch.arange(pooled.shape[0], device=pooled.device)  # pooled token j takes the place of token j
        return Selection(slots[:0], merged=pooled, merged_after=slots)
