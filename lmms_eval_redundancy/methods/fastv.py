"""``fastv``: drop visual tokens inside the LLM, at decoder layer K, by the last token's attention at K-1.

At prefill, a pre-hook on layer K-1's attention module computes the one needed row: the last token's
attention probabilities over all keys, averaged over heads (from that layer's own query/key projections
and rotary embeddings, so any attention implementation works). The top-k visual positions of each sample
(all its images and frames together; newline tokens are always kept) survive. Pre-hooks on layers >= K
gather hidden states, rotary embeddings and position ids at the kept positions (original positions,
so RoPE positions have gaps) and give those layers a mask over the kept keys. The KV cache of layers
>= K then holds only kept tokens while layers < K keep everything; decoding reuses both.

Rows of a batch keep different numbers of tokens; shorter rows are filled up with dropped positions
that are masked out as keys, so every layer >= K sees one rectangular batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from lmms_eval_redundancy.core.registry import MethodError, register
from lmms_eval_redundancy.methods.base import InsideLLM

SUPPORTED_ATTENTION = ("sdpa", "eager")


@dataclass
class PrefillState:
    """What one LLM call (prefill plus its decode steps) needs to know about the batch."""

    prunable: torch.Tensor  # bool [B, T]: visual positions that may be dropped (newlines excluded)
    valid: torch.Tensor  # bool [B, T]: the 2-D attention mask (left padding is False)
    unit_ids: torch.Tensor  # long [B, T]: index into the row's records, -1 elsewhere
    gather: torch.Tensor | None = None  # long [B, T']: positions kept for layers >= K
    gathered_valid: torch.Tensor | None = None  # bool [B, T']: kept (True) or filler/padding (False)


def last_token_attention(query: torch.Tensor, keys: torch.Tensor, scale: float, valid: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` head-mean attention probabilities of the last position (``query [B, H, 1, d]``) over ``keys
    [B, H, T, d]``, padding (``valid`` False) excluded."""
    logits = (query.float() @ keys.float().transpose(-1, -2)).squeeze(2) * scale  # [B, H, T]
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1)


def keep_positions(scores: torch.Tensor, prunable: torch.Tensor, keep_counts: list[int]) -> list[torch.Tensor]:
    """Per row: every non-prunable position plus the ``k`` top-scoring prunable ones (ties to lower index)."""
    kept = []
    for row_scores, row_prunable, k in zip(scores, prunable, keep_counts):
        candidates = torch.nonzero(row_prunable).flatten()
        order = torch.sort(row_scores[candidates], descending=True, stable=True).indices[:k]
        keep = ~row_prunable
        keep[candidates[order]] = True
        kept.append(torch.nonzero(keep).flatten())
    return kept


def rectangular(kept: list[torch.Tensor], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad each row's kept positions with its lowest dropped positions to a common width.

    Returns ``gather [B, T']`` (sorted per row) and ``kept_mask [B, T']`` (False at fillers).
    """
    width = max(k.numel() for k in kept)
    gathers, masks = [], []
    for keep in kept:
        is_kept = torch.zeros(length, dtype=torch.bool, device=keep.device)
        is_kept[keep] = True
        fillers = torch.nonzero(~is_kept).flatten()[: width - keep.numel()]
        positions = torch.cat([keep, fillers]).sort().values
        gathers.append(positions)
        masks.append(is_kept[positions])
    return torch.stack(gathers), torch.stack(masks)


@register
class FastV(InsideLLM):
    name = "fastv"

    @dataclass
    class Params:
        fastv_k: int = 2

    @property
    def first_pruned_layer(self) -> int:
        return self.params.fastv_k

    def validate(self) -> None:
        if self.params.fastv_k < 1:
            raise MethodError(f"fastv_k={self.params.fastv_k} is out of range; FastV prunes after layer K >= 1 (default 2)")
        self.state: PrefillState | None = None

    def attach(self, model, family) -> None:
        implementation = family.text_attention_implementation
        if implementation not in SUPPORTED_ATTENTION:
            raise MethodError(f"fastv runs with attn_implementation {' or '.join(SUPPORTED_ATTENTION)}, not {implementation!r}")
        layers = family.decoder_layers
        if self.params.fastv_k >= len(layers):
            raise MethodError(f"fastv_k={self.params.fastv_k} must be below the LLM's {len(layers)} layers")
        self.family = family
        self.float_mask = implementation == "eager"
        self.hook(layers[self.params.fastv_k - 1].self_attn.register_forward_pre_hook(self._select, with_kwargs=True))
        for index in range(self.params.fastv_k, len(layers)):
            hook = self._prune_layer_inputs(index)
            self.hook(layers[index].register_forward_pre_hook(hook, with_kwargs=True))

    def settings(self) -> dict:
        return {**super().settings(), "selection": "last token attention, head mean, at layer K-1"}

    @contextlib.contextmanager
    def around_llm(self, batch, records, log_keep: bool = False):
        """Arm the hooks for one generate/forward call over ``batch`` and fill ``records`` after prefill."""
        self.state = PrefillState(prunable=batch.prunable_mask, valid=batch.attention_mask.bool(), unit_ids=batch.unit_ids)
        try:
            yield
            self._record(records, log_keep)
        finally:
            self.state = None

    def _select(self, module, args, kwargs):
        state = self.state
        hidden_states = args[0] if args else kwargs["hidden_states"]
        if state is None or state.gather is not None or hidden_states.shape[1] != state.valid.shape[1]:
            return None
        with self.selection.timing(hidden_states.device):
            self._choose(module, hidden_states, kwargs, state)
        return None

    def _choose(self, module, hidden_states, kwargs, state: PrefillState) -> None:
        query, keys, scale = self.family.text_query_key(module, hidden_states, kwargs["position_embeddings"])
        scores = last_token_attention(query, keys, scale, state.valid)
        counts = [self.budget.keep_count(int(n)) for n in state.prunable.sum(dim=1)]
        kept = keep_positions(scores, state.prunable, counts)
        if all(k.numel() == state.valid.shape[1] for k in kept):
            return  # nothing to drop: leave the model untouched
        state.gather, is_kept = rectangular(kept, state.valid.shape[1])
        state.gathered_valid = is_kept & state.valid.gather(1, state.gather)

    def _prune_layer_inputs(self, layer_index: int):
        """A pre-hook for decoder layer ``layer_index`` (>= K): kept positions only, a mask over kept keys."""
        first_pruned_layer = layer_index == self.params.fastv_k

        def hook(module, args, kwargs):
            state = self.state
            if state is None or state.gather is None:
                return None
            hidden_states = args[0] if args else kwargs.pop("hidden_states")
            if self.family.layer_positions(kwargs) == state.valid.shape[1]:  # prefill: move to the kept positions
                index = state.gather
                if first_pruned_layer:
                    hidden_states = hidden_states.gather(1, index[..., None].expand(-1, -1, hidden_states.shape[-1]))
                self.family.gather_positions(kwargs, index)
            kwargs["attention_mask"] = self._mask(hidden_states, kwargs.get("past_key_values"), layer_index)
            return (hidden_states,), kwargs

        return hook

    def _mask(self, hidden_states, cache, layer_idx: int) -> torch.Tensor:
        """Causal mask over kept keys (fillers and padding excluded) for a layer >= K."""
        queries = hidden_states.shape[1]
        past = cache.get_seq_length(layer_idx) if cache is not None else 0
        kept_valid = self.state.gathered_valid
        total = past + queries
        valid = torch.cat([kept_valid, kept_valid.new_ones(kept_valid.shape[0], total - kept_valid.shape[1])], dim=1)
        key_index = torch.arange(total, device=hidden_states.device)
        query_index = torch.arange(past, total, device=hidden_states.device)
        allowed = (key_index[None, :] <= query_index[:, None])[None] & valid[:, None, :]
        allowed = allowed[:, None]  # [B, 1, Q, K]
        if not self.float_mask:
            return allowed
        blocked = torch.finfo(hidden_states.dtype).min
        return torch.zeros(allowed.shape, dtype=hidden_states.dtype, device=allowed.device).masked_fill(~allowed, blocked)

    def _record(self, records, log_keep: bool) -> None:
        """Kept counts (and, with ``log_keep``, kept indices) per image/frame, from the prefill choice."""
        state = self.state
        for row, row_records in enumerate(records):
            kept = torch.ones_like(state.valid[row])
            if state.gather is not None:
                kept = torch.zeros_like(kept)
                kept[state.gather[row][state.gathered_valid[row]]] = True
            for index, record in enumerate(row_records):
                in_unit = kept[state.unit_ids[row] == index]  # the unit's tokens in order: kept or not
                record.after = int(in_unit.sum())
                if log_keep:
                    record.keep = torch.nonzero(in_unit).flatten().tolist()
