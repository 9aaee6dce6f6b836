"""The data that flows between model families, pruning methods and the engine."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

VISION_NEED_KINDS = ("hidden", "keys", "cls_attention", "received_attention", "cls_hidden")


@dataclass(frozen=True)
class VisionNeed:
    """Something a method reads from inside the vision tower, for every patch of every tile.

    ``kind``: ``hidden`` (the output of encoder layer ``layer``, before the projector, ``[C]`` per patch),
    ``keys`` (that layer's keys, heads concatenated, ``[C]``), ``cls_attention`` (the [CLS] query's head-mean
    attention probability on each patch) or ``received_attention`` (the head-mean probability each patch
    receives, averaged over all queries) or ``cls_hidden`` (the [CLS] token's output of that layer, ``[C]``,
    repeated for every patch of its tile). ``layer``: encoder layer index; ``None`` is the layer LLaVA reads.
    ``per_head``: keys ``[H, d]`` and attention ``[H]`` per patch, one entry per head (no head mean).
    """

    kind: str
    layer: int | None = None
    per_head: bool = False


@dataclass
class PackedVisual:
    """One image or one video, as the packed token sequence its placeholders stand for, built whole by the family.

    ``units`` index the prunable tokens of each image or frame inside ``features`` (newline tokens are in
    no unit); ``base`` indexes the base (global) view of an anyres image, when it has crops. ``tiles`` and
    ``patches`` give each token's vision tile (anyres view, or video frame) and its patch (pooled cell for
    video) in that tile; both are -1 where ``newline`` is True. ``vision`` holds the data of each requested
    ``VisionNeed`` aligned to the packed tokens (NaN at newlines), ``tile_vision`` the same data for every
    patch of every tile of this visual, padding included (``[tiles, patches, ...]``).
    """

    features: torch.Tensor  # [L, D]
    kind: str  # "image" | "video"
    units: list[torch.Tensor]
    newline: torch.Tensor  # bool [L]
    tiles: torch.Tensor  # long [L]
    patches: torch.Tensor  # long [L]
    grids: list[tuple[int, int] | None] = field(default_factory=list)
    base: torch.Tensor | None = None
    vision: dict[VisionNeed, torch.Tensor] = field(default_factory=dict)
    tile_vision: dict[VisionNeed, torch.Tensor] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return int(self.features.shape[0])


@dataclass
class VisualUnit:
    """The tokens of one image (or one video frame, or one anyres view) that a method chooses from.

    ``features`` are post-projector tokens ``[N, D]`` with newline tokens already removed; ``key``
    identifies the unit across runs (used to seed random choices); ``grid`` is the (rows, cols) of
    the token grid when the unit is a plain raster (``None`` for packed anyres sequences). ``tiles`` and
    ``patches`` are each token's tile and patch; ``vision`` the requested vision-tower data of each token
    (``[N, ...]``), ``tile_vision`` that data for every patch of every tile of the unit's image or video.
    ``sample`` is the index of the unit's sample in the batch, ``text`` that sample's prompt text when the
    pipeline was given it (methods conditioned on the instruction read it).
    """

    features: torch.Tensor
    key: str
    grid: tuple[int, int] | None = None
    tiles: torch.Tensor | None = None
    patches: torch.Tensor | None = None
    vision: dict[VisionNeed, torch.Tensor] = field(default_factory=dict)
    tile_vision: dict[VisionNeed, torch.Tensor] = field(default_factory=dict)
    sample: int = 0
    text: str | None = None


@dataclass
class Selection:
    """What a method makes of one unit: sorted keep indices, and optionally new (merged) tokens.

    ``merged`` are new tokens ``[M, C]``: LLM inputs (``merged_space="llm"``) or vision-tower states that the
    family's projector turns into LLM inputs (``"vision"``). Merged token ``j`` is placed right after unit
    token ``merged_after[j]`` (-1: before the unit's first token), whether or not that token is kept.
    ``drop_newlines``: the visual's newline tokens are dropped (a layout without them).
    """

    keep: torch.Tensor
    floor_hit: bool = False
    merged: torch.Tensor | None = None
    merged_after: torch.Tensor | None = None
    merged_space: str = "llm"
    drop_newlines: bool = False  # True: the visual loses its newline tokens (official layouts without them)


@dataclass
class UnitRecord:
    """Token counts of one image or frame before and after pruning.

    ``after`` counts every token the LLM receives for the unit, ``merged`` of them new (merged) tokens;
    ``keep`` (when logged) the kept original tokens. ``layers``: for methods inside the LLM, the unit's
    visual tokens at each decoder layer.
    """

    kind: str  # "image" | "frame"
    visual: int  # index of the image/video within its sample
    unit: int  # frame index within a video (0 for images)
    before: int
    after: int
    newlines_before: int
    newlines_after: int
    floor_hit: bool = False
    keep: list[int] | None = None
    merged: int | None = None
    layers: list[int] | None = None
