"""``dart``: keep the image tokens least duplicated by a few pivot tokens, once, before decoder layer K.

Official code: ZichenWen1/DART (code read from the fork xqy1111111/DART, whose history equals upstream up to
commit 5a19452fc173017191c247848673e0bde755695a), ``llava/model/language_model/modeling_llama_self.py``
(``DART.forward``, ``get_retained_image_token``) and ``llava/eval/model_vqa_loader.py``.

Rule. After layer K-1 (K = 2): features X = that layer's output through the model's *final* RMSNorm;
keys = that layer's post-RoPE keys, heads concatenated. Pivots: the P_img image tokens with the largest
L1 key norm, then the P_txt tokens with the largest L1 key norm among all tokens after the image block
(tokens before the image are never pivots). The pivots are walked in the iteration order of the Python set
built from [image pivots, text pivots] (each in descending-norm order); each pivot takes the T remaining
image tokens with the *smallest* cosine similarity to it in X, which leave the candidate pool (image
pivots are never candidates). Kept image tokens: image pivots and all picks (P_img + (P_img + P_txt) T);
text pivots stay only as the text they are. Layers K... see the kept tokens at their *original* position
ids. T (``picks_per_pivot``): ``max_num_trunction // (P_img + P_txt)`` ("128" keeps 132), or
``(N (1 - reduction_ratio)) // (P_img + P_txt)`` when it is unset; the LLaVA-NeXT path (N = the packed
image length) uses ``min(retain_token_num_for_llava_next, N - P_img)`` (320 by default) instead.

Quirks and choices:
- The set order is CPython's (hash buckets), not score order, and it changes which tokens are kept; it is
  the default here as in the official code (``pivot_order="set"``; ``"listed"`` walks the list order).
- Cosine similarity and key norms are float32 by default; ``dtype=<model dtype>`` gives the official
  arithmetic.
- The official image block starts at the hard-coded position 35, batch 1; here each sample's image block
  and padding come from its own masks and every sample is selected alone.
- When 8T exceeds the candidates, the official ``topk`` raises; here the last pivots take what is left
  (every image token is then kept). Missing pivots (fewer image or text tokens than asked) are skipped.
- Ties: lower position first (the official ``topk`` leaves the order unspecified).
- ``qwen_picks_per_pivot``: the Qwen2-VL port's count ``int(N (1 - r) / (P_img + P_txt))``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmms_eval_redundancy.core.registry import MethodError, choice_param, register
from lmms_eval_redundancy.methods.base import Cut, MultiStageLLM

PIVOT_ORDERS = ("set", "listed")


def picks_per_pivot(num_image_tokens: int, max_num_trunction: float | None = 128, reduction_ratio: float = 0.778,
                    pivot_image: int = 4, pivot_text: int = 4, llava_next_retain: int | None = None) -> int:
    """T, the tokens each pivot keeps, as the official LLaVA code counts it (``llava_next_retain`` set: the
    LLaVA-NeXT path, where ``N`` is the packed image length)."""
    pivots = pivot_image + pivot_text
    if llava_next_retain is not None:
        return int(min(llava_next_retain, num_image_tokens - pivot_image) // pivots)
    budget = max_num_trunction if max_num_trunction is not None else num_image_tokens * (1 - reduction_ratio)
    return math.ceil(budget // pivots)


def qwen_picks_per_pivot(num_image_tokens: int, reduction_ratio: float, pivot_image: int = 4, pivot_text: int = 4) -> int:
    """T as the official Qwen2-VL port counts it: ``int(N (1 - r) / (P_img + P_txt))``."""
    return int(num_image_tokens * (1 - reduction_ratio) / (pivot_image + pivot_text))


def walk_order(pivots: list[int], pivot_order: str = "set") -> list[int]:
    """The order the pivots are visited: CPython's iteration order of ``set(pivots)`` (official), or the list's."""
    if pivot_order not in PIVOT_ORDERS:
        raise ValueError(f"pivot_order must be one of {', '.join(PIVOT_ORDERS)}, not {pivot_order!r}")
    return list(set(pivots)) if pivot_order == "set" else list(pivots)


@dataclass
class DartSelection:
    """The result for a batch; -1 fills the slots a sample does not use."""

    keep: torch.Tensor  # bool [B, L]: the positions layers >= K see (their original positions are their position ids)
    pivots: torch.Tensor  # long [B, P_img + P_txt]: image pivots, then text pivots, each by descending key norm
    walk: torch.Tensor  # long [B, P_img + P_txt]: the pivots in the order they were visited
    picks: torch.Tensor  # long [B, P_img + P_txt, max T]: each visited pivot's picks, most dissimilar first


def top_positions(values: torch.Tensor, mask: torch.Tensor, count: int) -> torch.Tensor:
    """``long [B, count]``: per row the positions of the ``count`` largest ``values`` inside ``mask``
    (ties to the lower position), -1 where the row has fewer."""
    ranked = torch.sort(values.masked_fill(~mask, -math.inf), dim=1, descending=True, stable=True).indices[:, :count]
    return ranked.masked_fill(~mask.gather(1, ranked), -1)


def select(features: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, image_mask: torch.Tensor,
           per_pivot: Sequence[int], pivot_image: int = 4, pivot_text: int = 4, pivot_order: str = "set",
           dtype: torch.dtype = torch.float32, block_mask: torch.Tensor | None = None) -> DartSelection:
    """DART's cut for a batch: ``features [B, L, D]`` (layer K-1's output after the final norm), ``keys
    [B, Hkv, L, d]`` (layer K-1's post-RoPE keys), ``valid [B, L]`` (attention mask), ``image_mask [B, L]``
    (the sample's image block) and ``per_pivot[b]`` = T of sample b (``picks_per_pivot``). Text pivots are chosen among the real
    tokens after the sample's last image token (of ``block_mask`` when given: a block that also holds tokens
    never pruned, such as LLaVA-NeXT's newlines). Norms and cosines are computed in ``dtype``."""
    batch, length = valid.shape
    device = valid.device
    positions = torch.arange(length, device=device)
    norms = torch.linalg.vector_norm(keys.to(dtype).permute(0, 2, 1, 3).reshape(batch, length, -1), ord=1, dim=-1)
    block = image_mask if block_mask is None else block_mask
    last_image = positions.masked_fill(~block, -1).max(dim=1).values
    after_image = valid & (positions[None, :] > last_image[:, None]) & (last_image[:, None] >= 0)
    pivots = torch.cat([top_positions(norms, image_mask, pivot_image), top_positions(norms, after_image, pivot_text)], dim=1)
    walk = pivots.gather(1, torch.sort((pivots < 0).to(torch.uint8), dim=1, stable=True).indices)  # listed, missing last
    if pivot_order != "listed":
        # CPython's set order depends on the values: walk the pivots by their index in the sample's unpadded sequence,
        # one row at a time on the host.
        unpadded = (valid.long().cumsum(dim=1) - 1).gather(1, pivots.clamp(min=0))
        walks = []
        for row, row_unpadded in zip(pivots.tolist(), unpadded.tolist()):
            by_index = {index: pivot for pivot, index in zip(row, row_unpadded) if pivot >= 0}
            walks.append([by_index[index] for index in walk_order(list(by_index), pivot_order)])
        walk = torch.tensor([w + [-1] * (pivots.shape[1] - len(w)) for w in walks], dtype=torch.long, device=device)

    kept = (positions[None, :, None] == pivots[:, None, :pivot_image]).any(dim=-1)  # image pivots
    candidates = image_mask & ~kept
    vectors = features.to(dtype)
    counts = torch.as_tensor(per_pivot, device=device)
    widest = max(per_pivot, default=0)
    rows = torch.arange(batch, device=device)
    steps = []
    for step in range(walk.shape[1]):
        pivot = walk[:, step]
        similarity = torch.nn.functional.cosine_similarity(vectors[rows, pivot.clamp(min=0)][:, None, :], vectors, dim=-1)
        ranked = torch.sort((-similarity).masked_fill(~candidates, -math.inf), dim=1, descending=True, stable=True).indices
        taken = (positions[None, :] < counts[:, None]) & (pivot >= 0)[:, None] & candidates.gather(1, ranked)
        picked = torch.zeros_like(candidates).scatter_(1, ranked, taken)
        steps.append(ranked[:, :widest].masked_fill(~taken[:, :widest], -1))
        kept |= picked
        candidates &= ~picked
    picks = torch.stack(steps, dim=1) if steps else torch.empty(batch, 0, widest, dtype=torch.long, device=device)
    return DartSelection(valid & (kept | ~image_mask), pivots, walk, picks)


COUNT_RULES = ("llava", "llava_next", "qwen")


@register
class Dart(MultiStageLLM):
    """DART on the multi-stage base: one cut at layer K, chosen in layer K's pre-hook from what layer K-1 produced
    (its post-RoPE keys and its output through the final norm), original positions kept.

    Budget in the paper's convention, the count after the cut: ``tokens=m`` is ``max_num_trunction`` (T = m // 8
    picks per pivot: "128" keeps 4 + 8 * 16 = 132), ``retention=r`` the official ``reduction_ratio`` 1 - r
    (T = N r // 8). ``count=llava_next`` is the official LLaVA-NeXT rule T = min(m, N - 4) // 8 (m = 320 unless
    ``tokens=`` is given), ``count=qwen`` the Qwen2-VL port's int(N r / 8). Newline tokens are never pruned.
    """

    name = "dart"

    @dataclass
    class Params:
        layer: int = 2  # K: the first layer that sees the reduced sequence
        pivot_image: int = 4
        pivot_text: int = 4
        count: str = choice_param("llava", COUNT_RULES)
        pivot_order: str = choice_param("listed", PIVOT_ORDERS, official="set")  # set: CPython set order of the pivots
        precision: str = choice_param("float32", ("float32", "model"), official="model")  # key norms and cosines

    def validate(self) -> None:
        super().validate()
        p = self.params
        if p.layer < 1:
            raise MethodError(f"layer={p.layer} is out of range; DART prunes before decoder layer K >= 1 (default 2)")
        if p.pivot_image < 0 or p.pivot_text < 0 or p.pivot_image + p.pivot_text < 1:
            raise MethodError(f"pivot_image={p.pivot_image}, pivot_text={p.pivot_text}: give counts >= 0, at least one pivot")
        if p.count == "qwen" and self.budget.kind != "retention":
            raise MethodError("count=qwen counts from a ratio: give retention= (1 - reduction_ratio)")
        self.captured: dict = {}

    def bind(self, model, family) -> None:
        if self.params.layer >= self.layer_count:
            raise MethodError(f"layer={self.params.layer} must be below the LLM's {self.layer_count} layers")
        self.final_norm = model.model.language_model.norm
        previous = family.decoder_layers[self.params.layer - 1]
        self.hook(previous.self_attn.register_forward_pre_hook(self._keys_hook, with_kwargs=True))
        self.hook(previous.register_forward_hook(self._output_hook))

    def cuts(self) -> list[Cut]:
        return [Cut(layer=self.params.layer, score_layer=self.params.layer)]

    def _prefill(self, hidden_states) -> bool:
        return self.state is not None and len(self.state["stages"]) == 1 and hidden_states.shape[1] == self.state["length"]

    def _keys_hook(self, module, args, kwargs):
        """Layer K-1's post-RoPE keys at prefill (key heads as the model stores them)."""
        hidden_states = args[0] if args else kwargs["hidden_states"]
        if self._prefill(hidden_states):
            _, keys, _ = self.family.text_query_key(module, hidden_states, kwargs["position_embeddings"])
            groups = module.config.num_attention_heads // module.config.num_key_value_heads
            self.captured["keys"] = keys[:, ::groups]

    def _output_hook(self, module, args, output):
        """Layer K-1's output at prefill."""
        hidden_states = output[0] if isinstance(output, tuple) else output
        if self._prefill(hidden_states):
            self.captured["output"] = hidden_states

    def per_pivot(self, num_image_tokens: int) -> int:
        """T for a sample with ``num_image_tokens`` prunable visual tokens."""
        p, budget = self.params, self.budget
        if budget.kind == "all":
            return num_image_tokens
        if p.count == "qwen":
            return qwen_picks_per_pivot(num_image_tokens, 1 - budget.value, p.pivot_image, p.pivot_text)
        if p.count == "llava_next":
            retain = int(budget.value) if budget.kind == "tokens" else 320
            return picks_per_pivot(num_image_tokens, pivot_image=p.pivot_image, pivot_text=p.pivot_text, llava_next_retain=retain)
        if budget.kind == "tokens":
            return picks_per_pivot(num_image_tokens, budget.value, pivot_image=p.pivot_image, pivot_text=p.pivot_text)
        return picks_per_pivot(num_image_tokens, None, 1 - budget.value, p.pivot_image, p.pivot_text)

    def score(self, stage, attention, hidden_states, position_embeddings, valid):
        """1 at the positions DART keeps, 0 elsewhere."""
        p, state = self.params, self.state
        captured, self.captured = self.captured, {}
        features = self.final_norm(captured["output"])
        image_mask = state["prunable"] & valid
        counts = self.original_visual_counts(state).tolist()
        dtype = features.dtype if p.precision == "model" else torch.float32
        chosen = select(features, captured["keys"], valid, image_mask, [self.per_pivot(n) for n in counts], p.pivot_image,
                        p.pivot_text, p.pivot_order, dtype, block_mask=state["visual"] & valid)
        return chosen.keep.float()

    def keep_counts(self, stage, scores, present, state) -> list[int]:
        return ((scores > 0) & present).sum(dim=1).tolist()

    def settings(self) -> dict:
        return {**super().settings(), "selection": "least duplicated image tokens (cosine to key-norm pivots) after layer K-1; "
                "original positions"}
