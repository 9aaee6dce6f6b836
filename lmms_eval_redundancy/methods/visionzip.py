"""``visionzip``: selection rules of VisionZip (dominant tokens plus merged contextual tokens), before the projector.

Official code: github.com/dvlab-research/VisionZip at 3151f6df4fca36a4cd1c985e5956e725b1f9ad02
(visionzip/clip_encoder.py ``CLIPVisionTower_VisionZip.forward``, visionzip/utils.py head-mean keys,
visionzip/main.py, visionzip/llava_arch.py ``restore_image_features_sorted``).

Rule, per view, at the vision layer LLaVA reads (``hidden_states[-2]``, layer R):
1. Dominant: score each patch by the [CLS] query's attention probability on it, SUMMED over heads; the top
   ``d - 1`` patches (``d`` counts the [CLS] token) and the [CLS] token are kept as they are, laid out as
   [CLS] then the chosen patches in raster order.
2. Contextual: the other ``M`` patches, in raster order, with layer R's keys averaged over heads and
   L2-normalised. Targets are list positions ``0, s, 2s, ...`` (first ``c``), ``s = max(1, M // c)``. Every
   other remaining patch joins the target whose key has the largest dot product with its own (first target
   on ties). Contextual token = target hidden state + MEAN of its members' hidden states (the target is
   not averaged in; a target without members passes unchanged).
3. Output: ``[CLS, dominant patches in raster order, contextual tokens in target order]``: ``d + c`` new
   vision-space rows (layer R hidden states) that then go through the projector.

Project choices (the official behaviour, where it differs, is an argument): scores, keys, similarity and
merge in float32 (``dtype`` gives the official tower dtype); top-k ties to the lower index (official tie
order is unspecified); ``c = 0`` keeps the dominant tokens only (officially a division by zero); a tower
without [CLS] (SigLIP, not supported officially) picks ``d`` patches by the scores it is given and adds no
[CLS]. ``split_budget`` gives ``(d, c)`` for any budget ``k``: ``c = round(5k/32)`` (halves up), ``d = k - c``
(54/10, 108/20, 162/30, 27/5 for 64/128/192/32). ``official_crop_layout`` reproduces the official LLaVA-NeXT
layout of the crops (dominant patches on the stitched crop grid, then the crops' [CLS] tokens, then their
contextual tokens; no unpadding, no newlines).

The method (``VisionZip``) applies the rule to every view of an image (base view and crops, each on all its
patches) with the image's budget split evenly over them (``methods.views``); kept dominant patches stay at their
packed positions, the [CLS] and contextual tokens are new vision-space rows that the family projects (recorded
as merged): one view gives the official order, several views end with each view's [CLS] and contextual tokens,
or (``layout=official``) follow the official LLaVA-NeXT layout. SigLIP towers score by mean received attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lmms_eval_redundancy.core.registry import MethodError, choice_param, register
from lmms_eval_redundancy.methods.base import (
    BeforeLLM,
    Selection,
    VisionNeed,
    VisualUnit,
)
from lmms_eval_redundancy.methods.views import (
    positions_of,
    stitched_placement,
    unit_views,
    view_counts,
)


@dataclass
class Merged:
    """One view's VisionZip output and its provenance (patch indices exclude the [CLS] token)."""

    tokens: torch.Tensor  # [d + c, C]: [CLS] (if any), dominant patches in raster order, contextual tokens
    dominant: torch.Tensor  # long [d - 1] (no [CLS]: [d]): dominant patches, ascending
    targets: torch.Tensor  # long [c]: the target patch of each contextual token
    merged_into: torch.Tensor  # long [N]: contextual token of each patch (targets included), -1 if dominant or dropped


def split_budget(tokens: int) -> tuple[int, int]:
    """``(dominant, contextual)`` for ``tokens`` per view: ``c = round(5 k / 32)`` (halves up), ``d = k - c``."""
    contextual = (5 * tokens + 16) // 32
    return tokens - contextual, contextual


def dominant_scores(cls_attention: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[..., N]`` patch scores from the [CLS] query row ``[..., H, N+1]``: head SUM, [CLS] column dropped."""
    return cls_attention[..., 1:].to(dtype).sum(dim=-2)


def head_mean_keys(key_states: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[..., T, dm]`` merge metric from per-head keys ``[..., H, T, dm]``: the mean over heads."""
    return key_states.to(dtype).mean(dim=-3)


def rank_patches(scores: torch.Tensor) -> torch.Tensor:
    """Patch indices of each row of ``scores [U, N]`` by descending score (ties to the lower index)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def select(hidden_states: torch.Tensor, scores: torch.Tensor, metric: torch.Tensor, dominant: int, contextual: int,
           has_cls: bool = True, dtype: torch.dtype = torch.float32) -> Merged:
    """VisionZip for one view: ``hidden_states``/``metric`` ``[T, C]``/``[T, dm]`` (``T = N + 1`` with [CLS] first
    when ``has_cls``), patch ``scores [N]``; ``dominant`` counts the [CLS] token when there is one."""
    return select_batch([hidden_states], [scores], [metric], [dominant], [contextual], has_cls, dtype)[0]


def select_batch(hidden_states: list[torch.Tensor], scores: list[torch.Tensor], metric: list[torch.Tensor],
                 dominant: list[int], contextual: list[int], has_cls: bool = True,
                 dtype: torch.dtype = torch.float32) -> list[Merged]:
    """``select`` for several views at once (ragged: views may differ in patches and counts), padded internally;
    each view's picks are exactly those of the view alone."""
    offset = int(has_cls)
    patches = [s.shape[-1] for s in scores]
    picks = [d - offset for d in dominant]
    for n, p, c in zip(patches, picks, contextual):
        if p < 0 or c < 0 or p + c > n:
            raise ValueError(f"VisionZip needs 0 <= dominant patches ({p}) and contextual ({c}) with their sum <= {n} patches")
    count, longest, device = len(scores), max(patches), scores[0].device
    arange = torch.arange(longest, device=device)
    n_t, picks_t, c_t = (torch.tensor(v, device=device) for v in (patches, picks, contextual))
    valid = arange < n_t[:, None]  # [U, N]

    # 1. dominant patches: the top `picks` by score
    padded_scores = torch.full((count, longest), float("-inf"), dtype=dtype, device=device)
    for row, s in zip(padded_scores, scores):
        row[: s.shape[-1]] = s.to(dtype)
    rank_of = torch.empty((count, longest), dtype=torch.long, device=device)
    rank_of.scatter_(1, rank_patches(padded_scores), arange.expand(count, -1))
    is_dominant = rank_of < picks_t[:, None]

    # 2. remaining patches in raster order; target list positions 0, s, 2s, ... (first c)
    remaining = torch.sort((~valid | is_dominant).to(torch.int8), dim=1, stable=True).indices  # raster order first
    m_t = n_t - picks_t
    step = torch.clamp(m_t // c_t.clamp(min=1), min=1)
    is_target = (arange % step[:, None] == 0) & (arange // step[:, None] < c_t[:, None]) & (arange < m_t[:, None])
    is_member = ~is_target & (arange < m_t[:, None]) & (c_t[:, None] > 0)
    width = max(max(contextual), 1)
    target_slot = torch.arange(width, device=device)
    target_position = (target_slot * step[:, None]).clamp(max=longest - 1)  # [U, c] list position of each target
    targets = remaining.gather(1, target_position)  # [U, c] patch index of each target

    # 3. assignment on normalised head-mean keys (metric rows of the patches: index + offset)
    keys = _pad([m.to(dtype) for m in metric], longest + offset)[:, offset:]  # [U, N, dm]
    keys = keys / keys.norm(dim=-1, keepdim=True)
    remaining_keys = keys.gather(1, remaining[..., None].expand(-1, -1, keys.shape[-1]))
    target_keys = remaining_keys.gather(1, target_position[..., None].expand(-1, -1, keys.shape[-1]))
    similarity = torch.bmm(remaining_keys, target_keys.transpose(1, 2))  # [U, N, c]
    similarity = similarity.masked_fill(target_slot >= c_t[:, None, None], float("-inf"))
    assigned = similarity.argmax(dim=2)  # [U, N] contextual slot of each remaining patch (list order)
    assigned = torch.where(is_target, arange // step[:, None], assigned)

    # 4. merge: target + mean of its members, summed in member (raster) order as officially
    hidden = _pad([h.to(dtype) for h in hidden_states], longest + offset)  # [U, T, C]
    patch_hidden = hidden[:, offset:]
    member_order = torch.sort((~is_member).to(torch.int8), dim=1, stable=True).indices  # members first, list order
    member_patch = remaining.gather(1, member_order)
    one_hot = torch.zeros((count, longest, width), dtype=dtype, device=device)
    one_hot.scatter_(2, assigned.gather(1, member_order)[..., None], 1)
    one_hot *= is_member.gather(1, member_order)[..., None]
    counts = one_hot.sum(dim=1).clamp(min=1)[..., None]  # [U, c, 1]
    members_hidden = patch_hidden.gather(1, member_patch[..., None].expand(-1, -1, hidden.shape[-1]))
    aggregated = torch.bmm(one_hot.transpose(1, 2), members_hidden) / counts
    contextual_tokens = patch_hidden.gather(1, targets[..., None].expand(-1, -1, hidden.shape[-1])) + aggregated

    merged_into = torch.full((count, longest), -1, dtype=torch.long, device=device)
    merged_into.scatter_(1, remaining, torch.where(is_target | is_member, assigned, -1))
    outputs = []
    for u in range(count):
        kept = torch.nonzero(is_dominant[u]).flatten()
        rows = [hidden[u, :offset], patch_hidden[u, kept], contextual_tokens[u, : contextual[u]]]
        outputs.append(Merged(torch.cat(rows), kept, targets[u, : contextual[u]], merged_into[u, : patches[u]]))
    return outputs


def official_crop_layout(crop_tokens: torch.Tensor, dominant: torch.Tensor, grid_width: int, grid_height: int,
                         side: int) -> torch.Tensor:
    """Official LLaVA-NeXT layout of the crops (base view excluded): ``crop_tokens [crops, d + c, D]`` (rows as
    ``select`` returns them), ``dominant [crops, d - 1]`` their dominant patch indices (any order), crops in
    row-major order on a ``grid_width`` x ``grid_height`` grid of ``side`` x ``side`` patches. Returns
    ``[crops * (d + c), D]``: the dominant tokens read row-major over the stitched crop grid, then each
    crop's [CLS] token, then each crop's contextual tokens."""
    crops, dominant_count = dominant.shape
    if crops != grid_width * grid_height:
        raise ValueError(f"{crops} crops do not fill a {grid_width} x {grid_height} grid")
    patches = dominant.sort(dim=1).values
    crop = torch.arange(crops, device=dominant.device)[:, None]
    row = (crop // grid_width) * side + patches // side
    column = (crop % grid_width) * side + patches % side
    order = torch.argsort((row * grid_width * side + column).flatten())
    dominant_rows = crop_tokens[:, 1 : 1 + dominant_count].reshape(-1, crop_tokens.shape[-1])[order]
    contextual_rows = crop_tokens[:, 1 + dominant_count :].reshape(-1, crop_tokens.shape[-1])
    return torch.cat([dominant_rows, crop_tokens[:, 0], contextual_rows])


def _pad(rows: list[torch.Tensor], length: int) -> torch.Tensor:
    """``[U, length, width]`` zero-padded stack of ``[T_u, width]`` tensors."""
    out = rows[0].new_zeros((len(rows), length, rows[0].shape[-1]))
    for target, source in zip(out, rows):
        target[: source.shape[0]] = source
    return out


@register
class VisionZip(BeforeLLM):
    """Each view's dominant tokens ([CLS] attention) and contextual tokens (merged before the projector)."""

    name = "visionzip"

    @dataclass
    class Params:
        dominant: int | None = None  # tokens per view kept by attention, [CLS] included (default: the rest)
        contextual: int | None = None  # merged tokens per view (default: round(5k/32))
        layout: str = choice_param("project", ("project", "official"), official="official")  # LLaVA-NeXT order
        precision: str = choice_param("float32", ("float32", "model"), official="model")  # scoring and merging dtype

    def validate(self) -> None:
        for key in ("dominant", "contextual"):
            value = getattr(self.params, key)
            if value is not None and value < 0:
                raise MethodError(f"{key}={value} is negative; give a number of tokens per view >= 0")
        if self.budget.kind == "all" and (self.params.dominant is None) != (self.params.contextual is None):
            raise MethodError("visionzip needs a budget (tokens= or retention=), or both dominant= and contextual=")

    def attach(self, model, family) -> None:
        self.has_cls = family.vision_has_cls
        self.layer = family.vision_feature_layer_index
        self.tower = model.config.vision_config.model_type
        self.hidden, self.keys = VisionNeed("hidden"), VisionNeed("keys", per_head=True)
        self.score = VisionNeed("cls_attention", per_head=True) if self.has_cls else VisionNeed("received_attention")
        self.cls = VisionNeed("cls_hidden") if self.has_cls else None

    def vision_needs(self) -> tuple[VisionNeed, ...]:
        return tuple(need for need in (self.score, self.hidden, self.keys, self.cls) if need is not None)

    def settings(self) -> dict:
        score = ("cls_attention (head sum)" if self.has_cls
                 else f"mean_received_attention ({self.tower} has no [CLS]; not an official setting)")
        given = self.params.dominant is not None or self.params.contextual is not None
        return {**super().settings(), "vision_layer": self.layer, "score": score,
                "split": "as given" if given else "contextual = round(5k/32), dominant = k - contextual"}

    def split(self, tokens: int, patches: int) -> tuple[int, int]:
        """``(dominant, contextual)`` for ``tokens`` in a view of ``patches`` patches."""
        dominant, contextual = self.params.dominant, self.params.contextual
        if dominant is None and contextual is None:
            dominant, contextual = split_budget(tokens)
        elif dominant is None:
            dominant = tokens - contextual
        elif contextual is None:
            contextual = tokens - dominant
        elif self.budget.kind != "all" and dominant + contextual != tokens:
            raise MethodError(f"dominant={dominant} + contextual={contextual} make {dominant + contextual} tokens per "
                              f"view, but the budget gives {tokens}: give only one of them, or no budget")
        if dominant < int(self.has_cls) or contextual < 0 or dominant - int(self.has_cls) + contextual > patches:
            raise MethodError(f"visionzip cannot keep {dominant} dominant (the [CLS] token counted) and {contextual} "
                              f"contextual tokens of a view of {patches} patches: lower dominant= or contextual=")
        return dominant, contextual

    def select_units(self, units: list[VisualUnit]) -> list[Selection]:
        """Every view of every unit in one ``select_batch`` call, then each unit's tokens in its layout."""
        keep_all = self.budget.kind == "all" and self.params.dominant is None and self.params.contextual is None
        if not units or keep_all:
            return [Selection(torch.arange(unit.features.shape[0], device=unit.features.device)) for unit in units]
        dtype = torch.float32 if self.params.precision == "float32" else units[0].tile_vision[self.hidden].dtype
        hidden, scores, metric, dominant, contextual = [], [], [], [], []
        for unit in units:
            views = unit_views(unit)
            patches = unit.tile_vision[self.hidden].shape[1]
            for tile, tokens in zip(views, view_counts(self.budget, len(views), patches)):
                d, c = self.split(tokens, patches)
                states, keys = unit.tile_vision[self.hidden][tile], unit.tile_vision[self.keys][tile]
                view_scores = unit.tile_vision[self.score][tile]
                if self.has_cls:  # rows as the rule takes them: [CLS] first
                    states = torch.cat([unit.tile_vision[self.cls][tile][:1], states])
                    keys = torch.cat([keys[:1] * 0, keys])
                    view_scores = dominant_scores(torch.nn.functional.pad(view_scores.T, (1, 0)), dtype)
                hidden.append(states)
                metric.append(head_mean_keys(keys.transpose(0, 1), dtype))
                scores.append(view_scores.to(dtype))
                dominant.append(d)
                contextual.append(c)
        merged = iter(select_batch(hidden, scores, metric, dominant, contextual, self.has_cls, dtype))
        return [self.place(unit, [(tile, next(merged)) for tile in unit_views(unit)]) for unit in units]

    def place(self, unit: VisualUnit, views: list[tuple[int, Merged]]) -> Selection:
        """The unit's kept dominant patches and new tokens ([CLS], contextual; official: dominant patches in the
        padding) in the unit's layout: one view as officially ([CLS], dominant, contextual); several views with
        the dominant patches at their packed positions, then each view's [CLS] and contextual tokens, or
        (``layout=official``) in the official LLaVA-NeXT order without newline tokens."""
        offset, last = int(self.has_cls), unit.features.shape[0] - 1
        head = lambda m: m.tokens[:offset]
        tail = lambda m: m.tokens[offset + m.dominant.numel():]
        slots = lambda count, after: torch.full((count,), after, dtype=torch.long, device=unit.features.device)
        keep = [positions_of(unit, tile, m.dominant) for tile, m in views]
        official = self.params.layout == "official" and len(views) > 1
        if len(views) == 1:
            (_, m), = views
            rows, after = [head(m), tail(m)], [slots(offset, -1), slots(tail(m).shape[0], last)]
        elif not official:
            rows = [part for _, m in views for part in (head(m), tail(m))]
            after = [slots(part.shape[0], last) for part in rows]
        else:
            (_, base), crops = views[0], views[1:]
            tiles = torch.cat([torch.full_like(m.dominant, tile) for tile, m in crops])
            patches = torch.cat([m.dominant for _, m in crops])
            dominant_rows = torch.cat([m.tokens[offset:offset + m.dominant.numel()] for _, m in crops])
            inside, padded, anchors = stitched_placement(unit, tiles, patches, math.isqrt(unit.tile_vision[self.hidden].shape[1]))
            keep = keep[:1] + [inside]
            base_last = int(torch.nonzero(unit.tiles == views[0][0]).flatten()[-1])
            rows = [head(base), tail(base), dominant_rows[padded]] + [head(m) for _, m in crops] + [tail(m) for _, m in crops]
            after = [slots(offset, -1), slots(tail(base).shape[0], base_last), anchors]
            after += [slots(part.shape[0], last) for part in rows[3:]]
        keep = torch.cat(keep).sort().values
        states = torch.cat(rows)
        if not states.shape[0]:
            return Selection(keep)
        dtype = unit.tile_vision[self.hidden].dtype
        return Selection(keep, merged=states.to(dtype), merged_after=torch.cat(after), merged_space="vision",
                         drop_newlines=official)
