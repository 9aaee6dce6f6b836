"""``sparsevlm``: text-rated pruning inside the LLM, the pruned tokens partly recycled into merged tokens.

Official code: github.com/Gumpest/SparseVLMs. v1.5 = tag ``v1.5``, commit b9619e61a6f840d7aa9817eadd68bb5e84ce7b95
(the project default); v1 = commit b72c5d62fa7004c2f1440c75975981bddf6c66c7. Files:
``llava/model/language_model/modelling_sparse_llama.py`` (raters, sparse layers), ``score.py`` (per-stage
budgets, v1's rank rule), ``utils.py`` (``cluster_and_merge``).

Rule, per sample:

1. Raters, once per prompt, from the LLM input embeddings: for each visual embedding a softmax over the raw
   dot products with the text embeddings (every token after the image block); the mean of these
   distributions over the visual tokens gives one weight per text token. Raters are the text tokens whose
   weight is strictly above the mean weight, kept as offsets from the text start for every stage.
2. Stages at layers 2, 6, 15 (v1.5) or 2, 6, 15, 19 (v1). The stage layer runs on the current sequence; its
   OUTPUT is cut. Relation of each visual token: that layer's attention probabilities (q·kᵀ/√d after RoPE
   plus the causal mask, softmax over all keys), averaged over heads, rows = raters at the current text
   start + offset, columns = the current visual block, then averaged over the raters.
3. Keep ``k`` top-relation visual tokens: v1.5 ``k = min(b, v - 1)`` with the per-stage budget ``b``
   (``STAGE_BUDGETS``); v1 ``k = min(int(rank * scale + bias), v - 1)`` with ``rank`` the float32 matrix
   rank of the raters x visual block, and no cut at all when ``rank == v``.
4. Recycling: of the ``v - k`` pruned tokens, the ``m = int(0.3 (v - k)) + 1`` with the highest relation
   (in score order) are clustered into ``c = int(m / 10) + 1`` groups by DPC-kNN on the layer output:
   distance ``|x_i - x_j| / sqrt(D)``; density ``exp(-mean of the c smallest squared distances, self
   included) + 1e-6 * noise``; delta = distance to the nearest denser token (the largest distance of the
   matrix if none); centres = the ``c`` largest ``delta * density``; each token joins its nearest centre
   (first centre on ties), each centre its own group; merged token = sum of members / (count + 1e-6).
5. New sequence: prefix, kept visual tokens (original order), the ``c`` merged tokens (centre order), text.
   Merged tokens are visual tokens at later stages: ``v <- k + c``. Positions are renumbered 0..L'-1.

Quirks and options:
- The official code computes raters, probabilities and the clustering in the model's dtype (fp16, the
  softmax without an fp32 upcast); every float function takes ``dtype`` (project float32).
- The density noise is unseeded ``torch.rand`` officially; here it is an argument ``[m]`` (drawn by the
  caller, ``recycled_count`` gives ``m``) cast to ``dtype``. In fp16 it is below half a unit in the last
  place for densities above about 0.002, so equal densities fall to the centre ranking's tie order.
- Ties in every top-k go to the lower index (the project's rule; ``topk`` order is unspecified).
- Grouped-query keys are repeated as the model's attention does (the official score code does not
  repeat them, which only works without GQA).
- Batch 1 officially; here scores are per unit, and the cut runs once for the batch.
Scores (``rater_offsets``, ``rater_attention``, ``rank_keep_count``) are computed per unit: a softmax or mean
over a padded row changes the last bits and so could change a pick. ``cut_stage`` (top-k, recycling,
clustering, merging) runs once for all units, padded only where no value can change.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmms_eval_redundancy.core.registry import MethodError, choice_param, register
from lmms_eval_redundancy.methods.base import (
    Cut,
    MultiStageLLM,
    StageState,
    first_columns,
    fitted_layers,
    keep_positions,
    ranked_positions,
)
from lmms_eval_redundancy.methods.random import unit_generator

STAGE_LAYERS = {"v1.5": (2, 6, 15), "v1": (2, 6, 15, 19)}
# v1.5 per-stage budgets by retained tokens (score.py; 96 only on main, commit 26a5f488).
STAGE_BUDGETS = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
V1_SCALE_BIAS = {192: (13.5, 0.0), 128: (9.0, 6.0), 64: (0.8, 0.0)}  # v1 README
RECYCLE_FRACTION = 0.3
TOKENS_PER_CLUSTER = 10
DENSITY_NOISE = 1e-6
MERGE_EPS = 1e-6
_CHUNK_ELEMENTS = 1 << 24  # bound on the materialised pairwise differences of one chunk


def rater_offsets(visual_embeds: torch.Tensor, text_embeds: torch.Tensor,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Ascending offsets (from the text start) of the rater tokens: input embeddings of the visual block
    ``[V, D]`` and of every token after it ``[T, D]``; weight = visual-mean softmax over text, strictly above
    its mean."""
    products = visual_embeds.to(dtype)[None] @ text_embeds.to(dtype)[None].transpose(1, 2)  # [1, V, T]
    weights = products.softmax(dim=2).mean(dim=1)
    return torch.nonzero(weights[0] > weights.mean()).flatten()


def rater_attention(queries: torch.Tensor, keys: torch.Tensor, query_positions: torch.Tensor,
                    visual_start: int, visual_count: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[R, v]`` head-mean attention probabilities of the rater rows on the visual block.

    ``queries [H, R, d]`` are the stage layer's queries at the rater positions ``query_positions [R]`` (current
    sequence coordinates), ``keys [Hk, L, d]`` all its keys (both after RoPE); causal softmax over all keys in
    ``dtype``. The relation of each visual token is the mean over raters (``.mean(dim=0)``).
    """
    heads, width = queries.shape[0], queries.shape[-1]
    keys = keys.repeat_interleave(heads // keys.shape[0], dim=0)
    logits = queries.to(dtype) @ keys.to(dtype).transpose(1, 2) * (1 / math.sqrt(width))  # [H, R, L]
    future = torch.arange(keys.shape[1], device=keys.device)[None, :] > query_positions[:, None]
    probabilities = logits.masked_fill(future, float("-inf")).softmax(dim=-1).mean(dim=0)
    return probabilities[:, visual_start:visual_start + visual_count]


def budget_keep_count(budget: int, visual_count: int) -> int | None:
    """v1.5: ``min(budget, v - 1)`` visual tokens kept; None (no cut) without visual tokens."""
    return min(budget, visual_count - 1) if visual_count else None


def rank_keep_count(block: torch.Tensor, scale: float, bias: float) -> int | None:
    """v1: ``min(int(rank * scale + bias), v - 1)`` from the float32 rank of the raters x visual block
    ``[R, v]``; None (no cut) when the rank equals ``v``."""
    rank = int(torch.linalg.matrix_rank(block.float()[None])[0])
    visual_count = block.shape[1]
    return None if rank == visual_count else min(int(rank * scale + bias), visual_count - 1)


def recycled_count(pruned: int) -> int:
    """Pruned tokens taken for merging: ``int(0.3 * pruned) + 1`` (the noise of ``cut_stage`` has this length)."""
    return int(pruned * RECYCLE_FRACTION) + 1


def cluster_count(recycled: int) -> int:
    """Clusters (merged tokens) made of ``recycled`` tokens: ``int(m / 10) + 1``."""
    return int(recycled / TOKENS_PER_CLUSTER) + 1


@dataclass(frozen=True)
class Clusters:
    """DPC-kNN result for one unit's ``m`` tokens."""

    cluster: torch.Tensor  # long [m]: cluster of each token (its centre's rank)
    centers: torch.Tensor  # long [c]: the centre tokens, in centre-score order
    merged: torch.Tensor  # [c, D]: member means, in centre order


def _padded(rows: Sequence[torch.Tensor], fill: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Stack ``rows [n_u, ...]`` into ``[U, max n_u, ...]``, filling the tail with ``fill``."""
    longest = max(row.shape[0] for row in rows)
    dtype = dtype or rows[0].dtype
    out = torch.full((len(rows), longest, *rows[0].shape[1:]), fill, dtype=dtype, device=rows[0].device)
    for index, row in enumerate(rows):
        out[index, :row.shape[0]] = row.to(dtype)
    return out


def _descending_order(scores: torch.Tensor) -> torch.Tensor:
    """Row-wise indices by descending score, ties to the lower index."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices


def _scaled_distances(x: torch.Tensor) -> torch.Tensor:
    """``[U, M, M]`` official distances ``(x_i - x_j).norm() / sqrt(D)`` of ``x [U, M, D]`` (the difference
    materialised as officially, in chunks of rows to bound memory)."""
    _, tokens, width = x.shape
    rows = max(1, _CHUNK_ELEMENTS // max(1, x.shape[0] * tokens * width))
    distance = torch.cat([(x[:, start:start + rows, None, :] - x[:, None, :, :]).norm(dim=-1, p=2)
                          for start in range(0, tokens, rows)], dim=1)
    return distance / (width ** 0.5)


def cluster_and_merge(features: Sequence[torch.Tensor], counts: Sequence[int], noise: Sequence[torch.Tensor],
                      dtype: torch.dtype = torch.float32) -> list[Clusters]:
    """Official DPC-kNN (neighbours = clusters = ``counts[u]``) and member means, for units ``[m_u, D]`` with
    their uniform noise ``[m_u]``, all in ``dtype``; one pass for all units (padding changes no value)."""
    if not features:
        return []
    sizes = [f.shape[0] for f in features]
    x = _padded(features, 0.0, dtype)  # [U, M, D]
    units, tokens, width = x.shape
    device = x.device
    valid = first_columns(sizes, tokens, device)
    distance = _scaled_distances(x)
    density = torch.empty(units, tokens, dtype=dtype, device=device)
    for count in sorted(set(counts)):  # the mean runs over exactly ``count`` values, as officially
        group = torch.tensor([u for u, c in enumerate(counts) if c == count], device=device)
        nearest = distance[group].masked_fill(~valid[group][:, None, :], float("inf"))
        nearest = torch.topk(nearest, k=count, dim=-1, largest=False).values
        density[group] = (-(nearest ** 2).mean(dim=-1)).exp()
    density = density + _padded(noise, 0.0, dtype) * DENSITY_NOISE
    pairs = valid[:, :, None] & valid[:, None, :]
    largest = distance.masked_fill(~pairs, float("-inf")).flatten(1).max(dim=1).values
    denser = (density[:, None, :] > density[:, :, None]) & valid[:, None, :]
    delta = torch.where(denser, distance, largest[:, None, None]).min(dim=-1).values
    widest = max(counts)
    centers = _descending_order((delta * density).masked_fill(~valid, float("-inf")))[:, :widest]  # [U, C]
    is_center = first_columns(counts, widest, device)
    to_center = distance.gather(1, centers[:, :, None].expand(-1, -1, tokens))
    cluster = to_center.masked_fill(~is_center[:, :, None], float("inf")).argmin(dim=1)  # [U, M]
    rows, slots = torch.nonzero(is_center, as_tuple=True)
    cluster[rows, centers[rows, slots]] = slots
    target = (cluster + torch.arange(units, device=device)[:, None] * widest)[valid]  # unit-major, token order
    weight = x.new_ones(target.shape[0], 1)
    totals = x.new_zeros(units * widest, 1).index_add_(0, target, weight) + MERGE_EPS
    merged = x.new_zeros(units * widest, width).index_add_(0, target, x[valid] * (weight / totals[target]))
    merged = merged.reshape(units, widest, width)
    return [Clusters(cluster[u, :size], centers[u, :count], merged[u, :count])
            for u, (size, count) in enumerate(zip(sizes, counts))]


@dataclass(frozen=True)
class StageCut:
    """One unit's cut at a stage layer (positions are in the stage layer's output sequence)."""

    keep: torch.Tensor  # long: kept positions, ascending (prefix, kept visual tokens, text)
    kept_visual: int
    visual_start: int
    recycled: torch.Tensor  # long [m]: positions of the pruned tokens taken for merging, in score order
    clusters: Clusters | None  # None when the stage does not cut (v1 rank == v, or no visual tokens)

    @property
    def cut(self) -> bool:
        return self.clusters is not None

    @property
    def merged_count(self) -> int:
        return 0 if self.clusters is None else self.clusters.centers.numel()

    @property
    def visual_count(self) -> int:
        """Visual tokens of the next layers: kept plus merged."""
        return self.kept_visual + self.merged_count

    @property
    def text_start(self) -> int:
        return self.visual_start + self.visual_count

    @property
    def length(self) -> int:
        """New sequence length (the renumbered position ids are ``0..length-1``)."""
        return self.keep.numel() + self.merged_count


def cut_stage(relations: Sequence[torch.Tensor], layer_outputs: Sequence[torch.Tensor],
              visual_starts: Sequence[int], keep_counts: Sequence[int | None], noise: Sequence[torch.Tensor | None],
              dtype: torch.dtype = torch.float32) -> list[StageCut]:
    """Per unit: keep the ``keep_counts[u]`` top-relation visual tokens (None: no cut), recycle and merge the
    best pruned ones. ``relations[u] [v]``, ``layer_outputs[u] [L, D]`` (the stage layer's output),
    ``noise[u] [recycled_count(v - k)]``; clustering in ``dtype``."""
    if not relations:
        return []
    device = relations[0].device
    visual = [r.numel() for r in relations]
    widest = max(visual)
    scores = _padded(relations, float("-inf")) if widest else torch.zeros(len(relations), 0, device=device)
    valid = first_columns(visual, widest, device)
    order = _descending_order(scores)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(widest, device=device).expand_as(order))
    kept_counts = [v if k is None else k for v, k in zip(visual, keep_counts)]
    kept = rank < torch.tensor(kept_counts, device=device)[:, None]
    recycle_order = _descending_order(scores.masked_fill(kept | ~valid, float("-inf")))
    cutting = [u for u, k in enumerate(keep_counts) if k is not None]
    recycled = {u: recycle_order[u, :recycled_count(visual[u] - kept_counts[u])] for u in cutting}
    for u in cutting:
        if noise[u] is None or noise[u].shape != recycled[u].shape:
            raise ValueError(f"unit {u}: the density noise must have shape [{recycled[u].numel()}] "
                             f"(recycled_count(v - k)), got {None if noise[u] is None else tuple(noise[u].shape)}")
    clusters = dict(zip(cutting, cluster_and_merge(
        [layer_outputs[u][visual_starts[u] + recycled[u]] for u in cutting],
        [cluster_count(recycled[u].numel()) for u in cutting], [noise[u] for u in cutting], dtype)))
    cuts = []
    for u, (start, output) in enumerate(zip(visual_starts, layer_outputs)):
        keep = torch.cat([torch.arange(start, device=device), start + torch.nonzero(kept[u]).flatten(),
                          torch.arange(start + visual[u], output.shape[0], device=device)])
        empty = torch.zeros(0, dtype=torch.long, device=device)
        cuts.append(StageCut(keep, kept_counts[u], start, start + recycled.get(u, empty), clusters.get(u)))
    return cuts


def shortened(layer_output: torch.Tensor, cut: StageCut) -> torch.Tensor:
    """The next layer's input ``[L', D]``: prefix and kept visual tokens, the merged tokens, then the text."""
    kept = layer_output[cut.keep]
    if cut.clusters is None:
        return kept
    split = cut.visual_start + cut.kept_visual
    return torch.cat([kept[:split], cut.clusters.merged.to(layer_output.dtype), kept[split:]])


REFERENCE_TOKENS = 576  # LLaVA-1.5's visual tokens per image, for which the official budgets were set


def official_layer_mean(visual_count: int, stage_layers: Sequence[int], budgets: Sequence[int], depth: int) -> float:
    """The official code's token mean of a v1.5 run: visual tokens after each decoder layer (a stage layer counted
    at its post-cut size, merged tokens included), averaged over the ``depth`` layers."""
    counts, visual = [], visual_count
    for layer in range(depth):
        if layer in stage_layers:
            kept = budget_keep_count(budgets[stage_layers.index(layer)], visual)
            if kept is not None:
                visual = kept + cluster_count(recycled_count(visual - kept))
        counts.append(visual)
    return sum(counts) / depth


def scaled_budgets(budgets: Sequence[int], factor: float) -> tuple[int, ...]:
    """Per-stage budgets scaled by ``factor`` (rounded, at least 1)."""
    return tuple(max(1, round(b * factor)) for b in budgets)


@register
class SparseVLM(MultiStageLLM):
    """SparseVLM on the multi-stage base: each stage layer's rater rows rank the visual tokens, the layer's output is
    cut (kept tokens, then the merged recycled ones, then the text) and positions are renumbered.

    ``tokens=k`` is the official layer mean (``official_layer_mean``): 192/128/96/64 take the official per-stage
    lists, other values the nearest list scaled by one factor solved for ``k``; ``retention=r`` means
    ``tokens=r*576``. A sample with ``N`` visual tokens (LLaVA-NeXT/OneVision) uses the lists scaled by ``N/576``.
    ``variant=v1``: stages 2, 6, 15, 19 and the rank rule (``tokens`` 192/128/64 only). Stage layers that do not
    fit a shallower LLM are scaled to its depth (``fitted_layers``: 0, 1, 2 on 4 layers).
    """

    name = "sparsevlm"
    renumber_positions = True

    @dataclass
    class Params:
        variant: str = choice_param("v1.5", tuple(STAGE_LAYERS))
        precision: str = choice_param("float32", ("float32", "model"), official="model")  # raters, scores, merging
        seed: int = 0  # of the DPC-kNN density noise, drawn per sample and stage

    def validate(self) -> None:
        super().validate()
        target = self.target_tokens()
        if self.params.variant == "v1" and target not in V1_SCALE_BIAS:
            raise MethodError(f"sparsevlm variant=v1 has official settings for tokens={'/'.join(map(str, V1_SCALE_BIAS))} "
                              f"only, not {target:g}; use one of them or variant=v1.5")

    def target_tokens(self) -> float:
        """The layer-mean budget at 576 visual tokens."""
        if self.budget.kind == "tokens":
            return self.budget.value
        if self.budget.kind == "retention":
            return self.budget.value * REFERENCE_TOKENS
        raise MethodError(f"sparsevlm takes tokens= or retention=, not {self.budget.describe()}")

    def bind(self, model, family) -> None:
        self.stage_layers = fitted_layers(self.name, STAGE_LAYERS[self.params.variant], self.layer_count, 0, self.layer_count - 2)
        target = self.target_tokens()
        nearest = min(STAGE_BUDGETS, key=lambda k: (abs(k - target), k))
        self.factor = 1.0 if target in STAGE_BUDGETS else min(
            (step / 1000 for step in range(1, 5001)),
            key=lambda f: abs(official_layer_mean(REFERENCE_TOKENS, self.stage_layers, scaled_budgets(STAGE_BUDGETS[nearest], f),
                                                  self.layer_count) - target))
        self.budget_list = STAGE_BUDGETS[nearest]

    def cuts(self) -> list[Cut]:
        return [Cut(layer=layer + 1, score_layer=layer) for layer in self.stage_layers]

    def dtype(self, hidden_states: torch.Tensor) -> torch.dtype:
        return hidden_states.dtype if self.params.precision == "model" else torch.float32

    @contextlib.contextmanager
    def around_llm(self, batch, records, log_keep: bool = False, new_tokens: int | None = None):
        with super().around_llm(batch, records, log_keep, new_tokens):
            self.state.update(raters=self.raters(batch), keys=batch.keys, plans={}, blocks={})
            yield

    def raters(self, batch) -> list[torch.Tensor]:
        """Per row, the original positions of its rater tokens (``rater_offsets`` on the input embeddings: the
        visual tokens, newlines included, against every token after the last of them; the last token if none)."""
        raters = []
        for embeds, visual, valid in zip(batch.inputs_embeds, batch.visual_mask, batch.attention_mask.bool()):
            visual_positions = torch.nonzero(visual & valid).flatten()
            after = visual_positions.max() + 1 if visual_positions.numel() else 0
            text = torch.nonzero(valid).flatten()
            text = text[text >= after]
            offsets = rater_offsets(embeds[visual_positions], embeds[text], self.dtype(embeds)) if visual_positions.numel() else text[:0]
            raters.append(text[offsets] if offsets.numel() else text[-1:])
        return raters

    def score(self, stage, attention, hidden_states, position_embeddings, valid):
        """Mean rater attention on each current position (``rater_attention``, one sample at a time)."""
        state = self.state
        state["model_dtype"] = hidden_states.dtype
        current = state["stages"][-1]
        rows = [torch.nonzero(torch.isin(index, raters) & row_valid).flatten()
                for index, raters, row_valid in zip(current.index, state["raters"], valid)]
        width = max(r.numel() for r in rows)
        queries = torch.stack([torch.cat([r, r.new_full((width - r.numel(),), valid.shape[1] - 1)]) for r in rows])
        query, keys, _ = self.family.text_query_key(attention, hidden_states, position_embeddings, queries=queries)
        visual = state["prunable"].gather(1, current.index) & valid
        scores = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
        for row, rater_rows in enumerate(rows):
            columns = torch.nonzero(valid[row]).flatten()
            probabilities = rater_attention(query[row, :, :rater_rows.numel()], keys[row][:, columns],
                                            torch.searchsorted(columns, rater_rows), 0, columns.numel(),
                                            self.dtype(hidden_states))
            scores[row, columns] = probabilities.mean(dim=0).float()
            state["blocks"][row] = probabilities[:, visual[row, columns]]
        return scores

    def keep_count(self, stage: int, row: int, visual_count: int, original_count: int) -> int | None:
        """Visual tokens row ``row`` keeps at ``stage`` (None: no cut)."""
        if self.params.variant == "v1":
            return rank_keep_count(self.state["blocks"][row], *V1_SCALE_BIAS[self.target_tokens()]) if visual_count else None
        factor = self.factor * original_count / REFERENCE_TOKENS
        return budget_keep_count(scaled_budgets(self.budget_list, factor)[stage], visual_count)

    def next_stage(self, stage, scores, current, state):
        """Kept tokens (``keep_positions``), then the recycled tokens' merged rows right after the visual block, fillers
        in front; a merged row's ``index`` is that of the recycled token of its rank (distinct, dropped)."""
        batch, length = current.index.shape
        device = current.index.device
        prunable = state["prunable"].gather(1, current.index)
        present = prunable & current.valid
        visual = (state["visual"].gather(1, current.index) | prunable) & current.valid
        originals = self.original_visual_counts(state).tolist()
        present_counts = present.sum(dim=1).tolist()
        counts = [self.keep_count(stage, row, n, originals[row]) for row, n in enumerate(present_counts)]
        if all(c is None for c in counts):
            return StageState(current.index, current.valid)
        kept = keep_positions(scores, present, [n if c is None else c for c, n in zip(counts, present_counts)])
        kept &= current.valid | ~prunable
        pruned = present & ~kept
        recycling = ranked_positions(scores, pruned)  # each row's pruned tokens by relation, the best first
        cutting = [c is not None for c in counts]
        recycled = [recycled_count(n) if cut else 0 for n, cut in zip(pruned.sum(dim=1).tolist(), cutting)]
        merged = [cluster_count(n) if cut else 0 for n, cut in zip(recycled, cutting)]
        plans = {}
        for row, (n, cut) in enumerate(zip(recycled, cutting)):
            if cut:
                seeded = unit_generator(self.params.seed, f"{state['keys'][row]}/stage{stage}")
                noise = torch.rand(n, generator=seeded, dtype=state["model_dtype"]).to(device)
                plans[row] = (recycling[row, :n], merged[row], noise)
        state["plans"][stage] = plans
        # One row per kept token and per merged token, filled up with the lowest other positions to a common width,
        # ordered: fillers, kept tokens up to the visual block's end, merged tokens, the other kept tokens.
        slots = max(merged)
        is_merged = first_columns(merged, slots, device)
        merged_from = recycling[:, :slots]
        taken = kept | torch.zeros_like(kept).scatter_(1, merged_from, is_merged)
        width = max(n + m for n, m in zip(kept.sum(dim=1).tolist(), merged))
        free = ~taken
        fillers = free & (free.cumsum(dim=1) <= (width - taken.sum(dim=1))[:, None])
        positions = torch.arange(length, device=device).expand(batch, -1)
        block_end = positions.masked_fill(~visual, -1).max(dim=1).values
        group = torch.full_like(positions, 4)  # not in the new sequence
        group[fillers] = 0
        group[kept & (positions <= block_end[:, None])] = 1
        group[kept & (positions > block_end[:, None])] = 3
        group = torch.cat([group, torch.where(is_merged, 2, 4)], dim=1)
        columns = group.shape[1]
        local = torch.sort(group * columns + torch.arange(columns, device=device), dim=1).indices[:, :width]
        index = torch.cat([current.index, current.index.gather(1, merged_from)], dim=1).gather(1, local)
        valid = torch.cat([current.valid & ~fillers, is_merged], dim=1).gather(1, local)
        return StageState(index, valid, local, local >= length)

    def cut_rows(self, stage, hidden_states, state):
        """The stage layer's output and, after it, each row's merged tokens (``cluster_and_merge`` of its recycled rows)."""
        plans = state["plans"][stage]
        rows = sorted(plans)
        merged = cluster_and_merge([hidden_states[row, plans[row][0]] for row in rows], [plans[row][1] for row in rows],
                                   [plans[row][2] for row in rows], self.dtype(hidden_states))
        widest = max(plans[row][1] for row in rows)
        extra = hidden_states.new_zeros(hidden_states.shape[0], widest, hidden_states.shape[2])
        for row, clusters in zip(rows, merged):
            extra[row, :clusters.merged.shape[0]] = clusters.merged.to(hidden_states.dtype)
        return torch.cat([hidden_states, extra], dim=1)

    def settings(self) -> dict:
        counts = {} if self.params.variant == "v1" else {
            "stage_budgets": list(scaled_budgets(self.budget_list, self.factor)), "budget_scale": self.factor,
            "layer_mean_at_576": round(official_layer_mean(REFERENCE_TOKENS, self.stage_layers,
                                                           scaled_budgets(self.budget_list, self.factor), self.layer_count), 2)}
        return {**super().settings(), "stage_layers": self.stage_layers, **counts,
                "selection": "rater text tokens' attention at each stage layer, its output cut; pruned tokens recycled "
                             "into merged ones after the kept visual tokens; positions renumbered"}
