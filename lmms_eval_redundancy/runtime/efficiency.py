"""What each batch costs: preparation (vision + pruning), LLM prefill, decode, KV cache, memory, FLOPs."""

from __future__ import annotations

import time

import torch
from transformers import LogitsProcessor

from lmms_eval_redundancy.core.timing import sync
from lmms_eval_redundancy.runtime.flops import llm_prefill_flops, vision_flops


class FirstTokenClock(LogitsProcessor):
    """Notes when the first next-token logits exist (the end of prefill); passes scores through."""

    def __init__(self, device: torch.device):
        self.device = device
        self.first: float | None = None

    def __call__(self, input_ids, scores):
        if self.first is None:
            sync(self.device)
            self.first = time.perf_counter()
        return scores


class BatchMeter:
    """Wall-clock phases of one batch, measured with device synchronisation.

    ``prefill`` runs from the start of input preparation (vision tower, pruning, splicing) to the first
    next-token logits; ``decode`` from there to the end.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.clock = FirstTokenClock(device)

    def __enter__(self):
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.end = time.perf_counter()
        return False

    def phases(self) -> dict:
        first = self.clock.first or self.end
        out = {"prefill_seconds": first - self.start, "decode_seconds": self.end - first}
        if self.device.type == "cuda":
            out["peak_memory_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return out


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
    """Analytic prefill FLOPs of one sample: the LLM with ``llm_tokens[i]`` tokens at layer ``i`` and the
    vision tower over its ``tiles`` views."""
    return {"llm_prefill_flops": llm_prefill_flops(config.text_config, llm_tokens),
            "vision_flops": vision_flops(config.vision_config, tiles, config.vision_config.num_hidden_layers)}
