"""``pdrop`` (PyramidDrop): rank image tokens by the last prompt token's attention at each stage layer.

Official code: Cooperx521/PyramidDrop, commit 6444f304aee4b7edcb022839fb9e8cd07859704a,
``llava/model/modeling_llama_pdrop.py`` (``pdrop_forward``, ``pdrop_rank_drop``).

Rule. Stage layers s_1 < ... < s_m and a ratio list r_0 = 1 > r_1 > ... > r_m; from stage j on a
sample keeps n_j = int(N * r_j) image tokens (truncated, always from the original N). Just before layer
s_j runs, that layer's own input RMSNorm, q/k projections and RoPE (at the current position ids) are
applied to the hidden states entering it. The query is one row, the sample's last prompt token; its
attention logits q k^T / sqrt(d) over every key it can see (the whole real prompt) go through a float32
softmax, are cast to the model dtype and averaged over heads (in that dtype). The n_j image tokens with
the highest score survive, in their original order; the image block stays contiguous, text is
untouched, and position ids are renumbered 0..L'-1. Decoding never re-selects: at each stage layer the
new token's position id is lowered by n_{j-1} - n_j.

Quirks and choices:
- The official score multiplies queries with unrepeated keys and fails with grouped-query attention;
  here key heads are repeated as the model's attention repeats them (query head h reads key head
  h // groups), the only possible behaviour on Qwen2.
- Scores are float32 by default; ``dtype=<model dtype>`` gives the official arithmetic (logits and the
  head mean in that dtype, softmax in float32 in between). Logits are per-key sums of products, not a
  matmul, so they do not depend on padding: float32 scores can differ from the official matmul's in the
  last bit (same picks on every official case), fp16 ones match exactly.
- The official code is batch 1 and right padding only. Here every sample of a batch is ranked alone,
  whatever its padding side; the query is the last real token, so the causal mask reduces to the
  padding mask.
- The image block is a mask (``image_mask``), one contiguous block officially; on LLaVA-NeXT the whole
  packed feature, newline tokens included, is ranked as one block. The official truncation of the
  shortened sequence to ``tokenizer_model_max_length`` is not reproduced.
- Ties: lower position first (the official ``topk`` leaves the order unspecified).
- Budget ``tokens=k`` is the layer mean (``layer_mean``): stages (2, 8, 16) and lambda solved on a
  two-decimal grid (``solve_lambda``); the official preset is (8, 16, 24) with ratios 1, 0.5, 0.25, 0.125.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmms_eval_redundancy.core.registry import MethodError, choice_param, register
from lmms_eval_redundancy.methods.base import Cut, MultiStageLLM, fitted_layers

OFFICIAL_LAYERS = (8, 16, 24)
OFFICIAL_RATIOS = (1.0, 0.5, 0.25, 0.125)
BUDGET_LAYERS = (2, 8, 16)


def ratios_for(lam: float, stages: int) -> list[float]:
    """The ratio list 1, lambda, lambda^2, ... with one entry per stage after the leading 1."""
    return [lam**j for j in range(stages + 1)]


def stage_counts(num_image_tokens: int, ratios: Sequence[float]) -> list[int]:
    """``int(N * r_j)`` for every ratio (the list starts with 1.0): image tokens seen from stage j on."""
    return [int(num_image_tokens * ratio) for ratio in ratios]


def layer_mean(num_image_tokens: int, layers: Sequence[int], ratios: Sequence[float], num_layers: int) -> float:
    """Mean over all decoder layers of the image tokens a layer handles (the paper's budget convention)."""
    bounds = [0, *layers, num_layers]
    counts = stage_counts(num_image_tokens, ratios)
    return sum(count * (end - start) for count, start, end in zip(counts, bounds, bounds[1:])) / num_layers


def solve_lambda(num_image_tokens: int, target: float, layers: Sequence[int] = BUDGET_LAYERS,
                 num_layers: int = 32) -> float:
    """The lambda in 0.01, 0.02, ..., 1.00 whose layer mean is closest to ``target`` (ties to the smaller);
    576 tokens, 32 layers: 0.56, 0.42, 0.19 for 192, 128, 64."""
    grid = [step / 100 for step in range(1, 101)]
    return min(grid, key=lambda lam: abs(layer_mean(num_image_tokens, layers, ratios_for(lam, len(layers)), num_layers) - target))


def decode_shift(position_ids: torch.Tensor, image_counts: Sequence[int], ratios: Sequence[float], stage: int) -> torch.Tensor:
    """Position ids ``[B, ...]`` of decoded tokens lowered at stage ``stage`` by ``n_stage - n_{stage+1}``
    of each sample (``image_counts[b]`` = its original N; 0 for a sample without image)."""
    shift = [counts[stage] - counts[stage + 1] for counts in (stage_counts(n, ratios) for n in image_counts)]
    shift = torch.tensor(shift, dtype=position_ids.dtype, device=position_ids.device)
    return position_ids - shift.view(-1, *([1] * (position_ids.dim() - 1)))


def last_token_attention(query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[B, L]`` head-mean attention probabilities of each sample's last real token over its keys.

    ``query [B, H, 1, d]`` is that token's post-RoPE query row, ``keys [B, Hkv, L, d]`` the layer's post-RoPE
    keys (query head h reads key head h // (H / Hkv), as ``repeat_kv`` does), ``valid [B, L]`` the attention
    mask. Logits and the head mean are computed in ``dtype``, the softmax in float32 (cast back to
    ``dtype``); padding scores 0.
    """
    batch, heads, _, dim = query.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    # Products summed per key (a matmul's rounding depends on the number of keys, so padding would shift it);
    # float32 sums of fp16 products round back to the official fp16 matmul's values.
    products = query.float().view(batch, kv_heads, heads // kv_heads, 1, dim) * keys.float()[:, :, None]
    logits = products.sum(dim=-1).view(batch, heads, length).to(dtype) / math.sqrt(dim)
    # Real keys first, in order, and rows no shorter than a vector register: each softmax then sums exactly
    # as for the sample alone, whatever its padding.
    order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices
    aligned = logits.gather(2, order[:, None, :].expand_as(logits))
    aligned = aligned.masked_fill(~valid.gather(1, order)[:, None, :], torch.finfo(dtype).min)
    aligned = torch.nn.functional.pad(aligned, (0, max(0, 64 - length)), value=torch.finfo(dtype).min)
    probs = torch.softmax(aligned, dim=-1, dtype=torch.float32)[..., :length].to(dtype)
    probs = probs.transpose(1, 2).contiguous().mean(dim=-1)  # heads innermost: each key's mean alone
    return torch.empty_like(probs).scatter_(1, order, probs)


def select(scores: torch.Tensor, valid: torch.Tensor, image_mask: torch.Tensor, keep_counts: Sequence[int]) -> torch.Tensor:
    """``bool [B, L]``: the positions that survive a stage: every real non-image token and the
    ``keep_counts[b]`` top-scoring image tokens of row b (``image_mask``; ties to the lower position)."""
    ranked = torch.sort(scores.masked_fill(~image_mask, -math.inf), dim=1, descending=True, stable=True).indices
    counts = torch.as_tensor(keep_counts, device=scores.device)
    top = torch.arange(scores.shape[1], device=scores.device)[None, :] < counts[:, None]
    kept_images = torch.zeros_like(image_mask).scatter_(1, ranked, top) & image_mask
    return valid & (kept_images | ~image_mask)


def renumbered_positions(keep: torch.Tensor) -> torch.Tensor:
    """``long [B, L]``: new position ids 0..L'-1 of the kept positions of each row, -1 elsewhere."""
    return (keep.long().cumsum(dim=1) - 1).masked_fill(~keep, -1)


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama/Qwen2 RMSNorm: normalise in float32, cast back to the input dtype, then scale."""
    hidden32 = hidden.float()
    return weight * (hidden32 * torch.rsqrt(hidden32.pow(2).mean(-1, keepdim=True) + eps)).to(hidden.dtype)


def rotary(states: torch.Tensor, position_ids: torch.Tensor, base: float) -> torch.Tensor:
    """Llama/Qwen2 RoPE of ``states [B, H, L, d]`` at ``position_ids [B, L]`` (cos/sin in float32, cast to
    the states' dtype; the second half of each head rotated against the first)."""
    dim = states.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=states.device).float() / dim))
    freqs = position_ids[..., None].float() * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]
    cos, sin = angles.cos().to(states.dtype), angles.sin().to(states.dtype)
    half = dim // 2
    rotated = torch.cat((-states[..., half:], states[..., :half]), dim=-1)
    return states * cos + rotated * sin


def stage(hidden: torch.Tensor, valid: torch.Tensor, position_ids: torch.Tensor, norm_weight: torch.Tensor,
          q_weight: torch.Tensor, k_weight: torch.Tensor, num_heads: int, num_kv_heads: int, rms_eps: float,
          rope_base: float, image_mask: torch.Tensor, keep_counts: Sequence[int], q_bias: torch.Tensor | None = None,
          k_bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """One stage from the hidden states ``[B, L, D]`` entering stage layer s and that layer's weights:
    input RMSNorm, q/k projections (biases as Qwen2) and RoPE in the hidden states' dtype, as the layer
    computes them, then the scores and the cut. Returns ``(scores [B, L], keep [B, L])``."""
    batch, length, _ = hidden.shape
    normed = rms_norm(hidden, norm_weight, rms_eps)
    query = torch.nn.functional.linear(normed, q_weight, q_bias).view(batch, length, num_heads, -1).transpose(1, 2)
    keys = torch.nn.functional.linear(normed, k_weight, k_bias).view(batch, length, num_kv_heads, -1).transpose(1, 2)
    query, keys = rotary(query, position_ids, rope_base), rotary(keys, position_ids, rope_base)
    last = torch.arange(length, device=hidden.device).masked_fill(~valid, -1).max(dim=1).values
    query_row = query[torch.arange(batch, device=hidden.device), :, last].unsqueeze(2)
    scores = last_token_attention(query_row, keys, valid, dtype)
    return scores, select(scores, valid, image_mask, keep_counts)


def parse_layers(text: str) -> list[int]:
    """``"8,16,24"`` -> ``[8, 16, 24]`` (strictly increasing, >= 1)."""
    try:
        layers = [int(part) for part in text.split(",")]
    except ValueError:
        layers = []
    if not layers or layers[0] < 1 or layers != sorted(set(layers)):
        raise MethodError(f"layers={text!r} must be strictly increasing decoder layers >= 1 separated by commas (e.g. 8,16,24)")
    return layers


@register
class PyramidDrop(MultiStageLLM):
    """PyramidDrop on the multi-stage base: one cut per stage layer, scored on that layer's own input.

    ``retention=r`` is the paper's per-stage ratio lambda (ratios 1, r, r^2, ...; ``retention=0.5`` with the default
    layers is the official preset 8, 16, 24); ``tokens=k`` is the layer-mean budget, lambda solved per sample
    (``solve_lambda``) with stages 2, 8, 16. ``layers=`` overrides the stage layers; default layers that do not fit
    the LLM are scaled to its depth (``base.fitted_layers``: 1, 2, 3 on a 4-layer LLM).
    """

    name = "pdrop"
    renumber_positions = True

    @dataclass
    class Params:
        layers: str = ""  # stage layers, e.g. "8,16,24"; empty: 8,16,24 for retention=, 2,8,16 for tokens=
        precision: str = choice_param("float32", ("float32", "model"), official="model")  # logits and head mean dtype

    def validate(self) -> None:
        super().validate()
        self.requested = parse_layers(self.params.layers) if self.params.layers else None

    def bind(self, model, family) -> None:
        default = BUDGET_LAYERS if self.budget.kind == "tokens" else OFFICIAL_LAYERS
        self.layers = self.requested or fitted_layers(self.name, default, self.layer_count, 1, self.layer_count - 1)

    def cuts(self) -> list[Cut]:
        return [Cut(layer=layer, score_layer=layer) for layer in self.layers]

    def ratio(self, num_image_tokens: int) -> float:
        """lambda for a sample with ``num_image_tokens`` visual tokens."""
        if self.budget.kind == "tokens":
            return solve_lambda(num_image_tokens, self.budget.value, self.layers, self.layer_count)
        return self.budget.value if self.budget.kind == "retention" else 1.0

    def keep_counts(self, stage: int, scores, present, state) -> list[int]:
        counts = self.original_visual_counts(state).tolist()
        return [stage_counts(n, ratios_for(self.ratio(n), len(self.layers)))[stage + 1] for n in counts]

    def score(self, stage, attention, hidden_states, position_embeddings, valid):
        positions = torch.arange(valid.shape[1], device=valid.device)
        last = positions.masked_fill(~valid, -1).max(dim=1).values
        query, keys, _ = self.family.text_query_key(attention, hidden_states, position_embeddings, queries=last[:, None])
        dtype = hidden_states.dtype if self.params.precision == "model" else torch.float32
        return last_token_attention(query, keys, valid, dtype)

    def settings(self) -> dict:
        lam = "solved per sample for the layer mean" if self.budget.kind == "tokens" else self.ratio(0)
        return {**super().settings(), "stage_layers": self.layers, "lambda": lam, "lambda_at_576": self.ratio(576),
                "selection": "last prompt token's attention at each stage layer (its own q/k), head mean; positions renumbered"}
