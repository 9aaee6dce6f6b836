"""The data that flows between model families, pruning methods and the engine."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PackedVisual:
    """One image or one video, as the packed token sequence its placeholders stand for.

    ``units`` index the prunable tokens of each image or frame inside ``features`` (newline tokens
    are in no unit); ``base`` indexes the base (global) view of an anyres image, when it has crops.
    """

    features: torch.Tensor  # [L, D]
    kind: str  # "image" | "video"
    units: list[torch.Tensor]
    newline: torch.Tensor  # bool [L]
    grids: list[tuple[int, int] | None] = field(default_factory=list)
    base: torch.Tensor | None = None
    scores: torch.Tensor | None = None  # [L] vision attention scores aligned to ``features`` (NaN at newlines)
    views: torch.Tensor | None = None  # [L] anyres view of each token (0 = base view; NaN at newlines)
    patches: torch.Tensor | None = None  # [L] each token's patch within its view (NaN at newlines)
    tile_scores: torch.Tensor | None = None  # [views, patches] scores of every patch of every view, padding included

    @property
    def length(self) -> int:
        return int(self.features.shape[0])


@dataclass
class VisualUnit:
    """The tokens of one image (or one video frame) that a method chooses from.

    ``features`` are post-projector tokens ``[N, D]`` with newline tokens already removed; ``key``
    identifies the unit across runs (used to seed random choices); ``grid`` is the (rows, cols) of
    the token grid when the unit is a plain raster (``None`` for packed anyres sequences); ``scores``
    are per-token vision-tower attention scores for methods that ask for them. When the unit is one anyres
    view, ``view_scores`` are the scores of all the view's patches (padding included) and ``view_patches``
    the patch each unit token came from.
    """

    features: torch.Tensor
    key: str
    grid: tuple[int, int] | None = None
    scores: torch.Tensor | None = None
    view_scores: torch.Tensor | None = None
    view_patches: torch.Tensor | None = None


@dataclass
class Selection:
    """Sorted keep indices into a unit, and how the budget was met.

    Methods that merge tokens (pooling) also return ``features``, the tokens that replace the unit; they
    take the places of its first ``len(features)`` tokens (``keep`` then is ``arange(len(features))``).
    """

    keep: torch.Tensor
    floor_hit: bool = False
    features: torch.Tensor | None = None


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
