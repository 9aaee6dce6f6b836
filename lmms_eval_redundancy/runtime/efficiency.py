"""What each batch costs: its phases (host preparation, vision tower, selection, LLM prefill, decode), KV cache,
memory, FLOPs; and the quartiles that summarise per-sample figures and speed-ups."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import LogitsProcessor

from lmms_eval_redundancy.core.timing import elapsed, stamp, sync
from lmms_eval_redundancy.runtime.flops import (
    llm_prefill_flops,
    projector_flops,
    vision_flops,
)

# per-sample phase keys of the efficiency records, in the order a batch goes through them
PHASES = ("host_seconds", "vision_seconds", "selection_seconds", "llm_prefill_seconds", "device_prefill_seconds",
          "first_token_seconds", "decode_seconds")


class FirstTokenClock(LogitsProcessor):
    """Stamps when the first next-token logits exist (the end of prefill); passes scores through."""

    def __init__(self, device: torch.device):
        self.device = device
        self.first = None

    def __call__(self, input_ids, scores):
        if self.first is None:
            self.first = stamp(self.device)
        return scores


class BatchMeter:
    """The phases of one batch on the device's clock (``core.timing.stamp``), read after the one synchronise
    at its end.

    ``host``: from the start to the family's encode (loading visuals, the processor, the copy to the device);
    ``vision``: that encode (vision tower, projector, and the vision-tower data a method asks for);
    ``selection``: the method's ``selection`` blocks outside the encode (before the LLM: scoring, choosing,
    merging; inside it: its hooks during prefill); ``llm_prefill``: the rest of the time to the first next-token
    logits (splicing, the LLM forward), selection left out; ``first_token`` (time to first token) = host + vision
    + selection + llm_prefill; ``device_prefill`` = vision + selection + llm_prefill; ``decode``: from the first
    logits to the end. A forward without generation (loglikelihood) ends its prefill at the end of the block.
    """

    def __init__(self, device: torch.device, engine):
        self.device = device
        self.engine = engine
        self.clock = FirstTokenClock(device)

    def __enter__(self):
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start = stamp(self.device)
        return self

    def __exit__(self, *exc):
        self.end = stamp(self.device)
        sync(self.device)
        return False

    def phases(self) -> dict:
        vision, selection = self.engine.vision, self.engine.method.selection
        first = self.clock.first if self.clock.first is not None else self.end
        first_token = elapsed(self.start, first)
        host = elapsed(self.start, vision.spans[0][0])
        vision_seconds = vision.seconds
        selection_seconds = selection.seconds_since(self.engine.selection_in_vision)
        out = {"host_seconds": host, "vision_seconds": vision_seconds, "selection_seconds": selection_seconds,
               "llm_prefill_seconds": first_token - host - vision_seconds - selection_seconds,
               "device_prefill_seconds": first_token - host, "first_token_seconds": first_token,
               "decode_seconds": elapsed(first, self.end)}
        if self.device.type == "cuda":
            out["peak_memory_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return out


@dataclass(frozen=True)
class Quartiles:
    """The median of some values (per-document speed-ups, per-sample seconds) and their interquartile range."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values) -> Quartiles:
        low, median, high = np.percentile(list(values), [25, 50, 75])
        return cls(float(median), float(low), float(high))

    @property
    def unreliable(self) -> bool:
        """A speed-up whose interquartile range includes 1.0: faster or slower, the documents disagree."""
        return self.low <= 1 <= self.high

    def spread(self) -> str:
        """``"1.41-1.8"``, with `` unreliable`` appended when the range includes 1.0."""
        return f"{self.low:.3g}-{self.high:.3g}" + (" unreliable" if self.unreliable else "")

    def __str__(self) -> str:
        """``"1.62 (1.41-1.8)"`` or ``"0.9 (0.4-1.7) unreliable"``."""
        return with_spread(self.median, self.spread())


def with_spread(median: float, spread: str) -> str:
    """A median and its ``Quartiles.spread()`` text in one cell: ``"1.62 (1.41-1.8)"``, ``unreliable`` kept at the end."""
    quartiles, _, flag = spread.partition(" ")
    return f"{median:.3g} ({quartiles})" + (f" {flag}" if flag else "")


def after_warm_up(samples: list[dict]) -> list[dict]:
    """The per-sample records (ledger samples) with timings that count: those after their process's first batch
    of each request type (the warm-up: first calls allocate, tune kernels, compile)."""
    return [s for s in samples if s.get("efficiency", {}).get("batch_index", 0) > 0]


def cache_bytes(cache) -> int:
    """Bytes of the keys and values a transformers cache holds for the positions it has filled: a static cache,
    allocated for every new token up front, counts as the dynamic cache of the same generation."""
    total = 0
    for layer in cache.layers:
        if getattr(layer, "keys", None) is None or layer.keys.shape[-2] == 0:
            continue
        allocated = layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        total += allocated * min(int(layer.get_seq_length()), layer.keys.shape[-2]) // layer.keys.shape[-2]
    return total


def tokens_per_layer(valid_tokens: int, records: list, layers: int) -> list[int]:
    """Tokens each decoder layer processes for one sample: all of them, less the visual tokens a method
    inside the LLM has dropped before that layer (its records count visual tokens per layer)."""
    return [valid_tokens - sum(r.before - r.layers[layer] for r in records if r.layers is not None)
            for layer in range(layers)]


def unpruned_tokens(valid_tokens: int, records: list) -> int:
    """Tokens one sample would give the LLM unpruned: its tokens plus what methods before the LLM removed."""
    return valid_tokens + sum(r.before + r.newlines_before - r.after - r.newlines_after for r in records if r.layers is None)


def sample_flops(config, llm_tokens: list[int], tiles: int) -> dict:
    """Analytic prefill FLOPs of one sample: the LLM with ``llm_tokens[i]`` tokens at layer ``i``, and the vision
    tower with the projector over its ``tiles`` views; with those counts (LLM tokens as their mean over layers)."""
    tower = vision_flops(config.vision_config, tiles, config.vision_config.num_hidden_layers)
    return {"llm_prefill_flops": llm_prefill_flops(config.text_config, llm_tokens),
            "vision_flops": tower + projector_flops(config, tiles),
            "llm_tokens_layer_mean": sum(llm_tokens) / len(llm_tokens), "vision_tiles": tiles}
