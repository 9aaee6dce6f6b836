"""``feather``: two-stage pruning inside the LLM by a RoPE-free last-token criterion plus a uniform grid.

Official code: github.com/markendo/FEATHER, commit c2a09b2765967601054c7b1fd513ac3e94ee4fc9
(``prismatic-vlms/prismatic/models/backbones/llm/llama2_models.py``: ``FastVLlamaModel.forward`` lines 135-211,
``calculate_attention_weight`` lines 250-279; settings ``vlm-evaluation/scripts/eval_feather.sh``:
``--fastv_k "[8, 16]" --fastv_ratio 0.7 --fastv_predefined_mask "no_rope_s=3"``). The official code targets
Prismatic VLMs (image right after BOS); the LLaVA port takes the image block where the sample has it.

Rule, per sample, stage layers ``(K1, K2) = (8, 16)``, keep fraction ``q = 1 - 0.7 = 0.3``, stride ``S = 3``:

1. Criterion for stage ``K``, computed on the input of layer ``K - 1`` (after any earlier cut): that layer's
   query of the LAST token and its keys of the current image tokens, both from the normed input and
   WITHOUT RoPE; key heads repeated for grouped-query attention; ``q·kᵀ / sqrt(d)``, softmax over the image
   keys only in float32, cast back to the model's dtype, mean over heads.
2. Stage 1 (before layer K1): the top ``int(N * q)`` image tokens by the criterion, united with a uniform
   grid (rows and columns 0, S, 2S, ... of the sqrt(N) x sqrt(N) image grid); sorted, duplicates removed.
3. Stage 2 (before layer K2): of the ``n1`` survivors, the top ``int(n1 * (q * q))`` by the layer K2-1
   criterion; the grid is not protected any more.
4. The sequence keeps its prefix, the kept image tokens and the text; ORIGINAL position ids are kept (gaps).

Quirks: only two stages (the official code asserts it); the stage-2 count is ``q²`` of the survivors, not of
``N``; a code comment says stage 2 scores only the non-grid tokens, but all survivors are scored; the
softmax over image keys only weights heads unlike FastV's full-row softmax; the model itself keeps RoPE.
``N`` must be a perfect square officially; ``stride_grid`` takes any rows x cols grid (LLaVA-NeXT crops,
OneVision views), the layout being the method class's. Ties go to the lower index (the project's rule;
``topk`` order is unspecified). ``dtype``: the official criterion runs in the model's dtype around the
float32 softmax; project float32.
Criteria are computed per unit (a softmax over a padded row changes the last bits, so could change a
pick); ``select`` picks for all units at once.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmms_eval_redundancy.core.registry import MethodError, choice_param, register
from lmms_eval_redundancy.core.visuals import PackedVisual
from lmms_eval_redundancy.methods.base import Cut, MultiStageLLM, fitted_layers
from lmms_eval_redundancy.methods.base import keep_positions as keep_top_scoring

STAGE_LAYERS = (8, 16)
KEEP_FRACTION = 1 - 0.7  # the official command line gives the pruned fraction
STRIDE = 3


def criterion(last_query: torch.Tensor, image_keys: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[n]`` head-mean float32 softmax (cast to ``dtype``) of the last token's query ``[H, d]`` over the image
    keys ``[Hk, n, d]`` (both without RoPE; key heads repeated ``H / Hk`` times as the model does)."""
    heads, width = last_query.shape
    keys = image_keys.repeat_interleave(heads // image_keys.shape[0], dim=0).to(dtype).contiguous()
    logits = torch.matmul(last_query.to(dtype)[None, :, None, :], keys[None].transpose(2, 3)) / math.sqrt(width)
    return torch.softmax(logits, dim=-1, dtype=torch.float32).to(dtype).mean(dim=1)[0, 0]


def keep_count(image_count: int, keep_fraction: float, stage: int) -> int:
    """Top-scoring tokens kept at ``stage`` 1 (``int(N * q)``) or 2 (``int(n1 * (q * q))``)."""
    if stage not in (1, 2):
        raise ValueError(f"FEATHER has two stages, not stage {stage}")
    return int(image_count * (keep_fraction if stage == 1 else keep_fraction * keep_fraction))


def stride_grid(rows: int, cols: int, stride: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``bool [rows * cols]`` (raster order): True on rows and columns ``0, stride, 2 stride, ...``."""
    if stride < 1:
        raise ValueError(f"stride must be at least 1, got {stride}")
    grid = torch.zeros(rows, cols, dtype=torch.bool, device=device)
    grid[::stride, ::stride] = True
    return grid.flatten()


def select(scores: Sequence[torch.Tensor], counts: Sequence[int],
           protected: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
    """Per unit, ascending image indices: the ``counts[u]`` top scores of ``scores[u] [n_u]`` (ties to the lower
    index) united with ``protected[u]`` (``bool [n_u]``, e.g. ``stride_grid``; None: nothing protected); the units
    padded into one batch."""
    if not scores:
        return []
    device = scores[0].device
    lengths = [s.numel() for s in scores]
    widest = max(lengths)
    padded = torch.zeros(len(scores), widest, dtype=scores[0].dtype, device=device)
    present = torch.zeros(len(scores), widest, dtype=torch.bool, device=device)
    grid = torch.zeros_like(present)
    for u, row in enumerate(scores):
        padded[u, :row.numel()] = row
        present[u, :row.numel()] = True
        if protected is not None and protected[u] is not None:
            grid[u, :row.numel()] = protected[u]
    picked = keep_top_scoring(padded, present, counts) & present | grid
    return [torch.nonzero(picked[u, :n]).flatten() for u, n in enumerate(lengths)]


def keep_positions(image_start: int, image_count: int, length: int, kept: torch.Tensor) -> torch.Tensor:
    """Ascending sequence positions that stay: the prefix, ``image_start + kept`` and everything after the
    image block (sequence of ``length``); the kept tokens keep their original position ids."""
    device = kept.device
    return torch.cat([torch.arange(image_start, device=device), image_start + kept,
                      torch.arange(image_start + image_count, length, device=device)])


def _raster_grid(rows: torch.Tensor, cols: torch.Tensor, stride: int) -> torch.Tensor:
    return (rows % stride == 0) & (cols % stride == 0)


def packed_stride_grid(visual: PackedVisual, stride: int) -> torch.Tensor:
    """``bool [L]``: the tokens of a packed visual on the stride grid of their own view (``stride_grid`` applied to
    each 2-D grid: the image or frame; for anyres images the base view and the unpadded crop grid, whose rows
    end at newline tokens). Newline tokens are not on it (they are always kept); a unit without a known grid has
    no grid tokens."""
    on_grid = torch.zeros(visual.length, dtype=torch.bool, device=visual.features.device)
    if visual.base is None:
        for where, grid in zip(visual.units, visual.grids):
            if grid is not None:
                on_grid[where] = _raster_grid(visual.patches[where] // grid[1], visual.patches[where] % grid[1], stride)
        return on_grid
    side = math.isqrt(visual.base.numel())
    patches = visual.patches[visual.base]
    on_grid[visual.base] = _raster_grid(patches // side, patches % side, stride)
    start = visual.base.numel()
    newline = visual.newline[start:].long()
    row = newline.cumsum(0) - newline  # newlines before each crop-grid token
    positions = torch.arange(newline.numel(), device=newline.device)
    row_start = torch.cat([positions.new_zeros(1), positions[newline.bool()] + 1])
    col = positions - row_start[row]
    on_grid[start:] = _raster_grid(row, col, stride) & ~visual.newline[start:]
    return on_grid


def layer_mean(image_count: int, grid_count: int, keep_fraction: float, stage_layers: Sequence[int], depth: int) -> float:
    """Expected visual tokens per decoder layer: ``N`` before K1, ``n1 = |top int(N q) ∪ grid|`` (the top set
    counted as independent of the grid) until K2, ``int(n1 q²)`` after."""
    top = keep_count(image_count, keep_fraction, 1)
    first = top + grid_count - (top * grid_count / image_count if image_count else 0)
    second = int(first * keep_fraction * keep_fraction)
    k1, k2 = stage_layers
    return (image_count * k1 + first * (k2 - k1) + second * (depth - k2)) / depth


@register
class Feather(MultiStageLLM):
    """FEATHER ported to LLaVA on the multi-stage base: cuts at K1 and K2, each scored on layer K-1's input by
    ``criterion`` (no RoPE, softmax over the sample's visual tokens); stage 1 unites the top ``int(N q)`` with each
    view's stride grid, stage 2 keeps ``int(n1 q²)``; original positions kept.

    ``retention=q`` is the official keep fraction (0.3 = the official ``--fastv_ratio 0.7``); ``tokens=k`` is the layer
    mean (``layer_mean``), ``q`` solved per sample. Newline tokens are always kept and never scored. The stage
    layers (8, 16) are scaled to a shallower LLM's depth (``fitted_layers``: 1, 2 on 4 layers).
    """

    name = "feather"

    @dataclass
    class Params:
        stride: int = STRIDE
        precision: str = choice_param("float32", ("float32", "model"), official="model")  # criterion dtype

    def validate(self) -> None:
        super().validate()
        if self.params.stride < 1:
            raise MethodError(f"feather stride={self.params.stride} must be at least 1 (official 3)")

    def bind(self, model, family) -> None:
        self.stage_layers = fitted_layers(self.name, STAGE_LAYERS, self.layer_count, 1, self.layer_count - 1)

    def cuts(self) -> list[Cut]:
        return [Cut(layer=layer) for layer in self.stage_layers]

    @contextlib.contextmanager
    def around_llm(self, batch, records, log_keep: bool = False, new_tokens: int | None = None):
        with super().around_llm(batch, records, log_keep, new_tokens):
            grid = torch.zeros_like(batch.visual_mask)
            for row, visuals in enumerate(batch.visuals):
                if visuals:
                    grid[row, batch.visual_mask[row]] = torch.cat([packed_stride_grid(v, self.params.stride) for v in visuals])
            self.state["grid"] = grid & batch.prunable_mask
            yield

    def keep_fraction(self, image_count: int, grid_count: int) -> float:
        """``q`` for a sample: the retention, or solved on a 0.001 grid for the ``tokens`` layer mean (ties: smaller)."""
        if self.budget.kind != "tokens":
            return self.budget.value
        return min((step / 1000 for step in range(1, 1001)), key=lambda q: abs(
            layer_mean(image_count, grid_count, q, self.stage_layers, self.layer_count) - self.budget.value))

    def score(self, stage, attention, hidden_states, position_embeddings, valid):
        """``criterion`` of each sample's present visual tokens (0 elsewhere), one sample at a time."""
        current = self.state["stages"][-1]
        query, keys, _ = self.family.text_query_key(attention, hidden_states, position_embeddings, rotary=False)
        present = self.state["prunable"].gather(1, current.index) & valid
        dtype = hidden_states.dtype if self.params.precision == "model" else torch.float32
        scores = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
        for row in range(valid.shape[0]):
            columns = torch.nonzero(present[row]).flatten()
            if columns.numel():
                scores[row, columns] = criterion(query[row, :, 0], keys[row][:, columns], dtype).float()
        return scores

    def kept_positions(self, stage, scores, present, state):
        current = state["stages"][-1]
        originals = self.original_visual_counts(state).tolist()
        initial_grid = (state["grid"] & state["stages"][0].valid).sum(dim=1).tolist()
        counts = [keep_count(n, self.keep_fraction(original, grid), stage + 1)
                  for n, original, grid in zip(present.sum(dim=1).tolist(), originals, initial_grid)]
        kept = keep_top_scoring(scores, present, counts)
        return kept | (state["grid"].gather(1, current.index) & present) if stage == 0 else kept

    def settings(self) -> dict:
        fraction = "solved per sample for the layer mean" if self.budget.kind == "tokens" else self.budget.value
        return {**super().settings(), "stage_layers": self.stage_layers, "keep_fraction": fraction,
                "port": "LLaVA port of the Prismatic (LLaMA-2) official code: image block from the sample's tokens, "
                        "stride grid per view, newlines kept",
                "selection": "last token's RoPE-free attention over the visual tokens at layer K-1, head mean; "
                             "stage 1 united with a uniform stride grid; original positions"}
