"""The two kinds of pruning method: choosing tokens before the LLM, and acting inside it.

A method is one module in this package: a subclass of ``BeforeLLM`` or ``InsideLLM`` decorated with
``lmms_eval_redundancy.core.registry.register``, with a ``name``, the budgets it accepts and a ``Params`` dataclass of its typed
parameters (model_args keys). Model-specific pieces (layers, projections, rotary embeddings) come from
the ``family`` object handed to ``attach``; hooks go on that model instance and are removed by ``detach``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import typing
from dataclasses import dataclass, field

import torch

from lmms_eval_redundancy.core.budget import Budget
from lmms_eval_redundancy.core.files import content_id
from lmms_eval_redundancy.core.registry import (
    PATHS_KEY,
    MethodError,
    NoParams,
    Stage,
    is_file_param,
)
from lmms_eval_redundancy.core.timing import Stopwatch
from lmms_eval_redundancy.core.visuals import Selection, VisionNeed, VisualUnit

__all__ = ["BeforeLLM", "Cut", "InsideLLM", "MultiStageLLM", "PruningMethod", "Selection", "VisionNeed", "VisualUnit",
           "row_indices"]

SUPPORTED_ATTENTION = ("sdpa", "eager")  # implementations whose mask argument the multi-stage hooks can set


@dataclass
class PruningMethod:
    """What every method has: parameters, a budget, its settings record, hooks it can remove."""

    params: typing.Any
    budget: Budget
    name: typing.ClassVar[str] = ""
    stage: typing.ClassVar[Stage]
    budgets: typing.ClassVar[tuple[str, ...]] = ("retention", "tokens")
    Params: typing.ClassVar[type] = NoParams
    needs_grid: typing.ClassVar[bool] = False  # True: units must be plain token grids (not packed anyres views)
    needs_cls: typing.ClassVar[bool] = False  # True: only vision towers with a [CLS] token (CLIP, not SigLIP)
    selection: Stopwatch = field(default_factory=Stopwatch)  # time spent choosing tokens in the current batch
    _hooks: list = field(default_factory=list)

    def validate(self) -> None:
        """Check parameters against each other and the budget; raise ``MethodError`` when they clash."""

    def attach(self, model, family) -> None:
        """Bind to a loaded model (load data, check compatibility, install hooks with ``hook``)."""

    def hook(self, handle) -> None:
        """Keep a hook handle (from ``register_forward_pre_hook`` etc.) so that ``detach`` removes it."""
        self._hooks.append(handle)

    def detach(self) -> None:
        """Remove every hook this method installed."""
        while self._hooks:
            self._hooks.pop().remove()

    def settings(self) -> dict:
        """Effective settings, defaults included, as recorded in run summaries.

        File parameters appear as ``content_id`` (file stem and content hash); their paths go under ``paths``.
        """
        values = dataclasses.asdict(self.params)
        paths = {f.name: values[f.name] for f in dataclasses.fields(self.params) if is_file_param(f) and values[f.name]}
        values.update({name: content_id(path) for name, path in paths.items()})
        return {"method": self.name, "stage": self.stage.value, "budget": self.budget.describe(), **values,
                **({PATHS_KEY: paths} if paths else {})}


@dataclass
class BeforeLLM(PruningMethod):
    """Chooses among the projected tokens of each image or frame before they enter the LLM."""

    stage: typing.ClassVar[Stage] = Stage.BEFORE_LLM

    def vision_needs(self) -> tuple[VisionNeed, ...]:
        """What the method reads from inside the vision tower (after ``attach``); the family serves it to
        each unit as ``unit.vision`` and ``unit.tile_vision``."""
        return ()

    def select_unit(self, unit: VisualUnit) -> Selection:
        """One unit's selection. A method overrides this or ``select_units``; the other follows from it."""
        if type(self).select_units is BeforeLLM.select_units:
            raise NotImplementedError(f"{type(self).__name__} overrides neither select_unit nor select_units")
        return self.select_units([unit])[0]

    def select_units(self, units: list[VisualUnit]) -> list[Selection]:
        """Selections for every unit of a batch at once; override to batch the work (same picks as ``select_unit``)."""
        return [self.select_unit(unit) for unit in units]


def row_indices(mask: torch.Tensor) -> list[torch.Tensor]:
    """Ascending indices of the True entries of each row of ``mask [U, L]``, found for all rows at once (one
    device round trip for their positions, one for their counts)."""
    return list(torch.nonzero(mask)[:, 1].split(mask.sum(dim=1).tolist()))


@dataclass
class InsideLLM(PruningMethod):
    """Drops visual tokens from the hidden states at some decoder layer; its hooks act in ``around_llm``."""

    stage: typing.ClassVar[Stage] = Stage.INSIDE_LLM

    def around_llm(self, batch, records, log_keep: bool = False, new_tokens: int | None = None):
        """Context for one generate/forward call over ``batch``; fills ``records`` with what was kept.
        ``new_tokens``: how many tokens the call generates at most (None: unknown, or a forward call)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Cut:
    """One pruning stage inside the LLM: from decoder layer ``layer`` on, each sample keeps ``keep(n)`` of its
    ``n`` visual tokens still present (``keep=None``: as many as the method's ``keep_counts`` says), ranked by
    the method's ``score`` on the input of ``score_layer`` (``<= layer``; by default ``layer - 1``, the last
    layer that sees them all)."""

    layer: int
    keep: typing.Callable[[int], int] | None = None
    score_layer: int | None = None

    @property
    def scored_at(self) -> int:
        return self.layer - 1 if self.score_layer is None else self.score_layer


@dataclass
class StageState:
    """The sequence one group of decoder layers sees during one LLM call (prefill and its decode steps)."""

    index: torch.Tensor  # long [B, T_s]: original positions, sorted per row
    valid: torch.Tensor  # bool [B, T_s]: a real token (not padding, not a filler standing in for a dropped one)
    local: torch.Tensor | None = None  # long [B, T_s]: where the rows come from in the previous stage's sequence
    inserted: torch.Tensor | None = None  # bool [B, T_s]: new rows the cut inserted (``cut_rows``), e.g. merged tokens


DECODE_STEPS = 64  # one-token decode steps prepared at a time when the call does not say how many tokens it generates


@dataclass
class StageInputs:
    """What every decoder layer of one stage receives during one LLM call, built by the stage's first layer.

    ``prefill``: the layers' rotary embeddings, position ids and key mask at prefill. For the one-token decode steps
    ``first_step <= step < first_step + steps`` (step 0: the first token after prefill): ``keys``, the key mask over
    the stage's prompt and the decoded tokens (``[B, 1, 1, T_s + first_step + steps]``, bool, or additive for eager
    attention), and with renumbered positions the decoded tokens' ``rotary`` embeddings and ``position_ids``
    (``[B, steps, ...]``); a step takes slices of them once (``decoding``: the step and its layers' inputs).
    """

    prefill: dict | None = None
    keys: torch.Tensor | None = None
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None
    position_ids: torch.Tensor | None = None
    first_step: int = 0
    steps: int = 0
    decoding: tuple[int, dict] | None = None

    def prepared(self, step: int) -> bool:
        return self.first_step <= step < self.first_step + self.steps


REFERENCE_DEPTH = 32  # decoder layers of the LLMs (LLaMA-7B/Vicuna-7B) the official stage layers were set for


def fitted_layers(name: str, layers: typing.Sequence[int], depth: int, lowest: int, highest: int) -> list[int]:
    """``layers`` when they all lie in ``[lowest, highest]``; otherwise scaled by ``depth / 32`` (rounded, kept
    strictly increasing from ``lowest``) for an LLM of ``depth`` layers; ``MethodError`` when they do not fit."""
    if lowest <= min(layers) and max(layers) <= highest:
        return list(layers)
    scaled: list[int] = []
    for layer in layers:
        scaled.append(max(round(layer * depth / REFERENCE_DEPTH), scaled[-1] + 1 if scaled else lowest))
    if scaled[-1] > highest:
        raise MethodError(f"{name}: its {len(layers)} stage layers {list(layers)} do not fit an LLM of {depth} layers")
    return scaled


def last_token_attention(query: torch.Tensor, keys: torch.Tensor, scale: float, valid: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` head-mean attention probabilities of the last position (``query [B, H, 1, d]``) over ``keys
    [B, H, T, d]``, padding (``valid`` False) excluded."""
    logits = (query.float() @ keys.float().transpose(-1, -2)).squeeze(2) * scale  # [B, H, T]
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1)


def ranked_positions(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``long [B, T]``: per row the ``candidates`` positions by descending score (ties to the lower index), then the
    other positions."""
    by_score = torch.sort(scores, dim=1, descending=True, stable=True).indices
    candidates_first = torch.sort((~candidates.gather(1, by_score)).to(torch.uint8), dim=1, stable=True).indices
    return by_score.gather(1, candidates_first)


def first_columns(counts: typing.Sequence[int], width: int, device: torch.device) -> torch.Tensor:
    """``bool [B, width]``: True in the first ``counts[b]`` columns of row b."""
    return torch.arange(width, device=device)[None, :] < torch.as_tensor(list(counts), device=device)[:, None]


def keep_positions(scores: torch.Tensor, prunable: torch.Tensor, keep_counts: typing.Sequence[int]) -> torch.Tensor:
    """``bool [B, T]``: per row every non-prunable position plus the ``keep_counts[b]`` top-scoring prunable ones
    (ties to the lower index), for the whole batch at once."""
    top = first_columns(keep_counts, scores.shape[1], scores.device)
    return ~prunable | torch.zeros_like(prunable).scatter_(1, ranked_positions(scores, prunable), top)


def rectangular(kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad each row's kept positions (``kept``, ``bool [B, T]``) with its lowest dropped positions to a common width.

    Returns ``gather [B, T']`` (sorted per row) and ``kept_mask [B, T']`` (False at fillers).
    """
    counts = kept.sum(dim=1)
    width = int(counts.max())
    dropped = ~kept
    taken = kept | (dropped & (dropped.cumsum(dim=1) <= (width - counts)[:, None]))
    gather = torch.sort((~taken).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    return gather, kept.gather(1, gather)


@dataclass
class MultiStageLLM(InsideLLM):
    """Drops visual tokens inside the LLM at the stages ``cuts()`` lists, chosen once at prefill.

    A pre-hook on each scoring layer ranks the visual tokens still present (``score``, from the query/key rows
    the family computes under any attention implementation); pre-hooks on the later layers gather hidden
    states and give them their stage's positions and key mask, built once per call (``StageInputs``: a decode
    step's layer takes slices). Each layer's KV cache holds what that layer saw, so decoding stays consistent. ``renumber_positions``: False keeps the original RoPE positions (gaps
    allowed); True numbers each stage's tokens contiguously and lowers decoded positions to match.
    Rows of a batch keep different numbers of tokens; shorter rows are filled with dropped positions that
    are masked out as keys, so every layer sees one rectangular batch.
    """

    renumber_positions: typing.ClassVar[bool] = False

    def cuts(self) -> list[Cut]:
        """The stages, by increasing ``layer`` (available after ``attach``)."""
        raise NotImplementedError

    def score(self, stage: int, attention: torch.nn.Module, hidden_states: torch.Tensor, position_embeddings,
              valid: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` ranking of the current positions for stage ``stage`` (higher is kept first), from the input
        ``hidden_states`` of the scoring layer's ``attention`` module. Default: the last token's head-mean
        attention there."""
        query, keys, scale = self.family.text_query_key(attention, hidden_states, position_embeddings)
        return last_token_attention(query, keys, scale, valid)

    def keep_counts(self, stage: int, scores: torch.Tensor, present: torch.Tensor, state: dict) -> list[int]:
        """How many of the ``present [B, T]`` visual tokens each row keeps at stage ``stage`` (the top-scoring ones).
        Default: the cut's ``keep`` of the number present."""
        return [self.cuts()[stage].keep(n) for n in present.sum(dim=1).tolist()]

    def kept_positions(self, stage: int, scores: torch.Tensor, present: torch.Tensor, state: dict) -> torch.Tensor:
        """``bool [B, T]``: the current positions kept at stage ``stage``: all but the ``present`` visual tokens, and
        the ``keep_counts`` top-scoring of those (override to choose otherwise)."""
        return keep_positions(scores, present, self.keep_counts(stage, scores, present, state))

    def original_visual_counts(self, state: dict) -> torch.Tensor:
        """``long [B]``: each row's prunable visual tokens before the first cut."""
        return (state["prunable"] & state["stages"][0].valid).sum(dim=1)

    def validate(self) -> None:
        self.state: dict | None = None

    def attach(self, model, family) -> None:
        implementation = family.text_attention_implementation
        if implementation not in SUPPORTED_ATTENTION:
            raise MethodError(f"{self.name} runs with attn_implementation {' or '.join(SUPPORTED_ATTENTION)}, "
                              f"not {implementation!r}")
        self.family = family
        self.float_mask = implementation == "eager"
        self.layer_count = len(family.decoder_layers)
        self.bind(model, family)
        cuts = self.cuts()
        for cut in cuts:
            if not 0 <= cut.scored_at <= cut.layer < self.layer_count:
                raise MethodError(f"{self.name}: a cut at layer {cut.layer} scored at layer {cut.scored_at} must lie "
                                  f"within the LLM's {self.layer_count} layers")
        if [c.layer for c in cuts] != sorted({c.layer for c in cuts}):
            raise MethodError(f"{self.name}: cut layers must increase")
        layers = family.decoder_layers
        for stage, cut in enumerate(cuts):
            if cut.scored_at < cut.layer:
                self.hook(layers[cut.scored_at].self_attn.register_forward_pre_hook(self._score_hook(stage), with_kwargs=True))
        self.layer_stages = [self.stage_of(index) for index in range(self.layer_count)]
        for index in range(cuts[0].layer, self.layer_count):
            self.hook(layers[index].register_forward_pre_hook(self._layer_hook(index), with_kwargs=True))

    def bind(self, model, family) -> None:
        """Check the method's parameters against the model before its cuts are read (override as needed)."""

    @contextlib.contextmanager
    def around_llm(self, batch, records, log_keep: bool = False, new_tokens: int | None = None):
        """Arm the hooks for one generate/forward call over ``batch`` and fill ``records`` after prefill; each stage's
        layer inputs are built once (``StageInputs``: at prefill, and for ``new_tokens`` decode steps when the first
        is decoded)."""
        valid = batch.attention_mask.bool()
        first = StageState(torch.arange(valid.shape[1], device=valid.device).expand_as(valid), valid)
        self.state = {"prunable": batch.prunable_mask, "visual": batch.visual_mask, "unit_ids": batch.unit_ids,
                      "length": valid.shape[1], "stages": [first], "inputs": {},
                      "decode_steps": new_tokens or DECODE_STEPS}
        try:
            yield
            self._record(records, log_keep)
        finally:
            self.state = None

    def stage_of(self, layer_index: int) -> int:
        """How many cuts a decoder layer's input has been through (``layer_stages[layer_index]`` after ``attach``)."""
        return sum(cut.layer <= layer_index for cut in self.cuts())

    def _score_hook(self, stage: int):
        """A pre-hook on the scoring layer's attention module: rank the tokens once, at prefill."""

        def hook(module, args, kwargs):
            state = self.state
            hidden_states = args[0] if args else kwargs["hidden_states"]
            if state is None or len(state["stages"]) != stage + 1 or hidden_states.shape[1] != state["stages"][-1].index.shape[1]:
                return None
            with self.selection.timing(hidden_states.device):
                self._choose(stage, module, hidden_states, kwargs["position_embeddings"], state)
            return None

        return hook

    def _layer_hook(self, layer_index: int):
        """A pre-hook on a decoder layer after the first cut: rank (for a cut scored on this layer's own input),
        gather the kept tokens where a cut starts, and give the layer its stage's positions and key mask."""
        cuts = self.cuts()
        scoring = [i for i, cut in enumerate(cuts) if cut.scored_at == cut.layer == layer_index]
        starting = [i for i, cut in enumerate(cuts) if cut.layer == layer_index]

        def hook(module, args, kwargs):
            state = self.state
            if state is None:
                return None
            hidden_states = args[0] if args else kwargs.pop("hidden_states")
            prefill = self.family.layer_positions(kwargs) == state["length"]
            if prefill:
                for stage in scoring:
                    current = len(state["stages"]) - 1
                    position_embeddings = kwargs["position_embeddings"] if current == 0 else self._stage_inputs(
                        current, hidden_states, kwargs, layer_index, prefill)["position_embeddings"]
                    with self.selection.timing(hidden_states.device):
                        self._choose(stage, module.self_attn, self.family.attention_input(module, hidden_states),
                                     position_embeddings, state)
                if starting and state["stages"][starting[0] + 1].local is not None:
                    local = state["stages"][starting[0] + 1].local
                    source = self.cut_rows(starting[0], hidden_states, state)
                    hidden_states = source.gather(1, local[..., None].expand(-1, -1, hidden_states.shape[-1]))
            number = self.layer_stages[layer_index]
            stage = state["stages"][number]
            if stage.local is None and stage.index is state["stages"][0].index:
                return (hidden_states,), kwargs  # nothing dropped so far: the layer runs as it is
            kwargs.update(self._stage_inputs(number, hidden_states, kwargs, layer_index, prefill))
            return (hidden_states,), kwargs

        return hook

    def _choose(self, stage: int, attention, hidden_states, position_embeddings, state) -> None:
        """Rank the current positions and set up the next stage's sequence."""
        current = state["stages"][-1]
        scores = self.score(stage, attention, hidden_states, position_embeddings, current.valid)
        state["stages"].append(self.next_stage(stage, scores, current, state))

    def next_stage(self, stage: int, scores: torch.Tensor, current: StageState, state: dict) -> StageState:
        """The sequence after cut ``stage`` given the ``scores [B, T]`` of the ``current`` one (override to insert
        rows: their ``local`` indices count on past the current sequence, into what ``cut_rows`` appends)."""
        prunable = state["prunable"].gather(1, current.index)
        present = prunable & current.valid
        kept = self.kept_positions(stage, scores, present, state) & (current.valid | ~prunable)  # fillers go again
        if bool(kept.all()):
            return StageState(current.index, current.valid)  # nothing to drop
        local, is_kept = rectangular(kept)
        return StageState(current.index.gather(1, local), is_kept & current.valid.gather(1, local), local)

    def cut_rows(self, stage: int, hidden_states: torch.Tensor, state: dict) -> torch.Tensor:
        """The rows cut ``stage`` gathers from at prefill: the cut layer's input ``[B, T, D]``, plus any rows the method
        appends along dim 1 (default: none)."""
        return hidden_states

    def _stage_inputs(self, number: int, hidden_states: torch.Tensor, kwargs: dict, layer_index: int,
                      prefill: bool) -> dict:
        """The rotary embeddings, position ids and key mask a layer of stage ``number`` receives (``kwargs``: the
        layer's own): at prefill as the stage's first layer built them, at a one-token decode step the slices of what
        the stage prepared for decoding that its first layer took (``StageInputs``), otherwise (several tokens after
        prefill) built anew."""
        stage, inputs = self.state["stages"][number], self.state["inputs"].get(number)
        if inputs is None:
            inputs = self.state["inputs"][number] = StageInputs()
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length(layer_index) if cache is not None else 0
        if prefill:
            if inputs.prefill is None:
                inputs.prefill = self._layer_inputs(hidden_states, kwargs, stage, past, prefill)
            return inputs.prefill
        if hidden_states.shape[1] != 1 or cache is None:
            return self._layer_inputs(hidden_states, kwargs, stage, past, prefill)
        step = past - stage.index.shape[1]
        if inputs.decoding is None or inputs.decoding[0] != step:
            if not inputs.prepared(step):
                self._prepare_decoding(inputs, stage, hidden_states, kwargs, step)
            moved = {"attention_mask": inputs.keys[..., :past + 1]}
            if inputs.rotary is not None:
                at = slice(step - inputs.first_step, step - inputs.first_step + 1)
                moved["position_embeddings"] = (inputs.rotary[0][:, at], inputs.rotary[1][:, at])
                if kwargs.get("position_ids") is not None:
                    moved["position_ids"] = inputs.position_ids[:, at]
            inputs.decoding = (step, moved)
        return inputs.decoding[1]

    def _prepare_decoding(self, inputs: StageInputs, stage: StageState, hidden_states: torch.Tensor, kwargs: dict,
                          step: int) -> None:
        """Build a stage's key mask (and, with ``renumber_positions``, rotary embeddings) for the decode steps from
        ``step`` on: as many as the call generates, twice as many as before when it runs past them. Decoded position
        ids go up by one per step, as ``generate`` and the model itself number them."""
        steps = max(self.state["decode_steps"], 2 * inputs.steps)
        valid = torch.cat([stage.valid, stage.valid.new_ones(stage.valid.shape[0], step + steps)], dim=1)
        inputs.keys = self._attention_mask(valid[:, None, None, :], hidden_states.dtype)
        if self.renumber_positions:
            first = self.state["stages"][0]
            dropped = first.valid.sum(dim=1) - stage.valid.sum(dim=1)
            given = kwargs["position_ids"].expand(dropped.shape[0], -1)
            inputs.position_ids = given - dropped[:, None] + torch.arange(steps, device=given.device)
            inputs.rotary = self.family.rotary_embeddings(hidden_states, inputs.position_ids)
        inputs.first_step, inputs.steps = step, steps

    def _layer_inputs(self, hidden_states: torch.Tensor, kwargs: dict, stage: StageState, past: int, prefill: bool) -> dict:
        """A layer's rotary embeddings, position ids and key mask for a stage's tokens, built from its ``kwargs``."""
        moved = {key: kwargs[key] for key in ("position_embeddings", "position_ids") if key in kwargs}
        self._positions(moved, hidden_states, stage, prefill)
        moved["attention_mask"] = self._mask(hidden_states, past, stage.valid)
        return moved

    def _positions(self, kwargs: dict, hidden_states: torch.Tensor, stage: StageState, prefill: bool) -> None:
        """Move a layer's rotary embeddings and position ids to a stage's tokens: their original positions, or
        (``renumber_positions``) those positions lowered by the tokens dropped before them."""
        if not self.renumber_positions:
            if prefill:
                self.family.gather_positions(kwargs, stage.index)
            return
        state = self.state
        first = state["stages"][0]
        given = kwargs.get("position_ids")
        if prefill and stage.inserted is not None:  # rows in sequence order, numbered on from each row's first position
            full = given if given is not None else torch.arange(state["length"], device=stage.index.device)[None]
            start = full.expand_as(first.valid).masked_fill(~first.valid, torch.iinfo(full.dtype).max).min(dim=1).values
            position_ids = start[:, None] + stage.valid.long().cumsum(dim=1) - 1
        elif prefill:
            full = given if given is not None else torch.arange(state["length"], device=stage.index.device)[None]
            kept = torch.zeros_like(first.valid).scatter_(1, stage.index, stage.valid)
            dropped_before = (first.valid & ~kept).long().cumsum(dim=1)
            position_ids = (full.expand_as(dropped_before) - dropped_before).gather(1, stage.index)
        else:
            dropped = first.valid.sum(dim=1) - stage.valid.sum(dim=1)
            position_ids = given.expand(dropped.shape[0], -1) - dropped[:, None]
        kwargs["position_embeddings"] = self.family.rotary_embeddings(hidden_states, position_ids)
        if given is not None:
            kwargs["position_ids"] = position_ids

    def _mask(self, hidden_states: torch.Tensor, past: int, kept_valid: torch.Tensor) -> torch.Tensor:
        """Causal mask over a stage's kept keys (fillers and padding excluded) for the ``hidden_states`` of one layer
        call after ``past`` cached tokens."""
        queries = hidden_states.shape[1]
        total = past + queries
        valid = torch.cat([kept_valid, kept_valid.new_ones(kept_valid.shape[0], total - kept_valid.shape[1])], dim=1)
        key_index = torch.arange(total, device=hidden_states.device)
        query_index = torch.arange(past, total, device=hidden_states.device)
        allowed = (key_index[None, :] <= query_index[:, None])[None] & valid[:, None, :]
        return self._attention_mask(allowed[:, None], hidden_states.dtype)  # [B, 1, Q, K]

    def _attention_mask(self, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``allowed`` (bool) as the attention implementation takes it: as it is for sdpa, additive for eager."""
        if not self.float_mask:
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)

    def _record(self, records, log_keep: bool) -> None:
        """Per image/frame: visual tokens at every layer, kept after the last cut (and, with ``log_keep``, which).
        An inserted row counts in the unit of the original position its ``index`` names; it is no kept index."""
        state = self.state
        stages, length = state["stages"], state["length"]
        kept_per_stage = []
        for stage in stages:
            kept = torch.zeros(stage.index.shape[0], length, dtype=torch.bool, device=stage.index.device)
            kept.scatter_(1, stage.index, stage.valid)
            kept_per_stage.append(kept | ~stages[0].valid)
        last = stages[-1]
        inserted = torch.zeros_like(kept_per_stage[-1])
        if last.inserted is not None:
            inserted.scatter_(1, last.index, last.inserted & last.valid)
        layer_stage = [min(stage, len(stages) - 1) for stage in self.layer_stages]
        for row, row_records in enumerate(records):
            for index, record in enumerate(row_records):
                in_unit = state["unit_ids"][row] == index
                counts = [int(kept[row][in_unit].sum()) for kept in kept_per_stage]
                record.layers = [counts[stage] for stage in layer_stage]
                record.after = counts[-1]
                record.merged = int(inserted[row][in_unit].sum()) or record.merged
                if log_keep:
                    record.keep = torch.nonzero((kept_per_stage[-1][row] & ~inserted[row])[in_unit]).flatten().tolist()
