"""How the wrapper runs the LLM on a pruned batch: ``generate``'s KV cache, its compiled decoding step, and the
prompt's length.

A static cache (transformers' ``StaticCache``) holds room for the prompt and every new token from the start, so
a decoding step writes one position in place where the dynamic cache concatenates a step onto every layer's
keys and values; its fixed shapes let the step be compiled, which transformers does on its own on a GPU
(``CompileConfig``: CUDA graphs). Greedy outputs are those of the dynamic cache (tested). Methods inside the
LLM keep the dynamic cache: their layers hold different numbers of keys. With ``compile=true`` the LLM itself is
compiled (``runtime.compiling``): the prompt is padded on the left to a multiple of ``LENGTH_BUCKET``
positions (masked out: outputs do not change) so that its compiled graphs are reused, and the cache, sized to
a bucket too, is built before the compiled prefill fills it.
"""

from __future__ import annotations

import torch
from transformers import CompileConfig, StaticCache

from lmms_eval_redundancy.core.registry import Stage

LENGTH_BUCKET = 64  # prompt and cache lengths of a compiled LLM are multiples of this


def bucketed(length: int) -> int:
    """``length`` rounded up to a multiple of ``LENGTH_BUCKET``."""
    return -(-length // LENGTH_BUCKET) * LENGTH_BUCKET


def left_padded(inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch ``[B, T, D]`` padded on the left to ``length`` positions: zero embeddings, masked out."""
    extra = length - inputs_embeds.shape[1]
    return (torch.nn.functional.pad(inputs_embeds, (0, 0, extra, 0)),
            torch.nn.functional.pad(attention_mask, (extra, 0)))


def compile_everywhere() -> CompileConfig:
    """transformers' compile of the decoding step, on a CPU too (transformers compiles on accelerators only)."""
    config = CompileConfig(dynamic=False, mode="default")
    config._compile_all_devices = True  # transformers' own switch (its testing path) for compiling on a CPU
    return config


class Decoding:
    """The KV cache and compilation of ``generate``, and the prompt length of every LLM call.

    ``static_cache``: a ``StaticCache`` (else transformers' dynamic cache). ``transformers_compile``: transformers'
    compile of the decoding step: ``None`` its own rule (on a GPU, with a static cache), ``True`` on any device,
    ``False`` never. ``length_buckets``: the LLM is compiled (``compile=true``): prompts are left-padded to a
    multiple of ``LENGTH_BUCKET`` and the cache is built here, a bucket long, reused while its shape fits.
    """

    def __init__(self, static_cache: bool = True, transformers_compile: bool | None = None, length_buckets: bool = False):
        self.static_cache = static_cache
        self.transformers_compile = transformers_compile
        self.length_buckets = length_buckets
        self._cache: StaticCache | None = None

    @classmethod
    def default(cls, stage: Stage, compiled_llm: bool = False) -> Decoding:
        """Static cache for methods before the LLM and ``none`` (decoding compiled on a GPU); the dynamic one for
        methods inside the LLM. ``compiled_llm``: the LLM is compiled already (``compile=true``), so transformers
        does not compile the step again."""
        if stage is Stage.INSIDE_LLM:
            return cls(static_cache=False)
        return cls(transformers_compile=False, length_buckets=True) if compiled_llm else cls()

    def forward_inputs(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        """The prompt of an LLM call (left-padded to its bucket when the LLM is compiled)."""
        if self.length_buckets:
            inputs_embeds, attention_mask = left_padded(inputs_embeds, attention_mask, bucketed(inputs_embeds.shape[1]))
        return {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask}

    def generate_inputs(self, model, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                        num_beams: int = 1) -> dict:
        """``generate`` keyword arguments: the prompt, and the cache and compile settings."""
        inputs = self.forward_inputs(inputs_embeds, attention_mask)
        if not self.static_cache:
            return inputs
        if self.length_buckets:
            rows, length = inputs_embeds.shape[0] * num_beams, bucketed(inputs["inputs_embeds"].shape[1] + max_new_tokens)
            return {**inputs, "past_key_values": self._static_cache(model, rows, length), "disable_compile": True}
        compile_settings = {None: {}, True: {"compile_config": compile_everywhere()}, False: {"disable_compile": True}}
        return {**inputs, "cache_implementation": "static", **compile_settings[self.transformers_compile]}

    def _static_cache(self, model, rows: int, length: int) -> StaticCache:
        """An emptied static cache of ``rows`` x ``length`` positions, allocated up front (the compiled prefill
        writes into it); the previous one when it has that shape, so that compiled graphs see the same tensors."""
        cache = self._cache
        if cache is None or cache.layers[0].keys.shape[0] != rows or cache.layers[0].keys.shape[2] != length:
            text = model.config.get_text_config(decoder=True)
            cache = StaticCache(config=text, max_cache_len=length)
            head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
            cache.early_initialization(rows, text.num_key_value_heads, head_dim, model.dtype, model.device)
            self._cache = cache
        cache.reset()
        return cache
