"""``fastv``: drop visual tokens inside the LLM, at decoder layer K, by the last token's attention at K-1.

One cut of the multi-stage base (``MultiStageLLM``): at prefill, the last token's attention probabilities
over all keys at layer K-1, averaged over heads (from that layer's own query/key projections and rotary
embeddings, so any attention implementation works), rank the visual tokens of each sample (all its
images and frames together; newline tokens are always kept). Layers >= K see the top-k with their
original RoPE positions (gaps allowed); their KV cache holds only kept tokens while layers < K keep
everything, and decoding reuses both.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmms_eval_redundancy.core.registry import MethodError, register
from lmms_eval_redundancy.methods.base import Cut, MultiStageLLM


@register
class FastV(MultiStageLLM):
    name = "fastv"

    @dataclass
    class Params:
        fastv_k: int = 2

    def validate(self) -> None:
        super().validate()
        if self.params.fastv_k < 1:
            raise MethodError(f"fastv_k={self.params.fastv_k} is out of range; FastV prunes after layer K >= 1 (default 2)")

    def bind(self, model, family) -> None:
        if self.params.fastv_k >= self.layer_count:
            raise MethodError(f"fastv_k={self.params.fastv_k} must be below the LLM's {self.layer_count} layers")

    def cuts(self) -> list[Cut]:
        return [Cut(layer=self.params.fastv_k, keep=self.budget.keep_count)]

    def settings(self) -> dict:
        return {**super().settings(), "selection": "last token attention, head mean, at layer K-1"}
