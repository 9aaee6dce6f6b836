"""Analytic prefill FLOPs of the LLM, the vision tower and the projector, from a model config and actual token counts.

One multiply-add counts as 2 FLOPs. Per decoder layer and token: the q/k/v/o projections, the gated MLP
(three matrices) and causal attention (scores and weighted sum over the keys the token sees). Norms,
activations, rotary embeddings and softmax are left out (they are a few percent at most).
"""

from __future__ import annotations

from lmms_eval_redundancy.families.base import patch_grid


def decoder_layer_flops(tokens: int, hidden: int, kv_hidden: int, intermediate: int) -> float:
    """Prefill FLOPs of one causal decoder layer over ``tokens`` tokens."""
    projections = 2 * tokens * hidden * (2 * hidden + 2 * kv_hidden)
    mlp = 2 * tokens * 3 * hidden * intermediate
    attention = 2 * 2 * hidden * tokens * (tokens + 1) / 2  # causal: token i attends to i + 1 keys
    return projections + mlp + attention


def llm_prefill_flops(text_config, tokens_per_layer: list[int]) -> float:
    """Prefill FLOPs of the LLM where layer ``i`` processes ``tokens_per_layer[i]`` tokens (FastV drops some)."""
    hidden = text_config.hidden_size
    heads = text_config.num_attention_heads
    kv_hidden = hidden // heads * (getattr(text_config, "num_key_value_heads", None) or heads)
    return sum(decoder_layer_flops(t, hidden, kv_hidden, text_config.intermediate_size) for t in tokens_per_layer)


def vision_flops(vision_config, tiles: int, layers_used: int) -> float:
    """FLOPs of the vision tower for ``tiles`` views, up to the layer LLaVA reads (bidirectional attention)."""
    hidden, inter = vision_config.hidden_size, vision_config.intermediate_size
    patches = patch_grid(vision_config) ** 2 + int(vision_config.model_type.startswith("clip"))
    per_layer = 2 * patches * 4 * hidden * hidden + 2 * patches * 2 * hidden * inter + 2 * 2 * hidden * patches * patches
    return tiles * layers_used * per_layer


def projector_flops(config, tiles: int) -> float:
    """FLOPs of LLaVA's two-layer projector over the patch features of ``tiles`` views: the vision width (several
    layers' features concatenated, when the model reads several) to the LLM's, then the LLM's to itself."""
    vision, text = config.vision_config, config.text_config
    layers = config.vision_feature_layer
    width = vision.hidden_size * (len(layers) if isinstance(layers, (list, tuple)) else 1)
    keeps_cls = config.vision_feature_select_strategy == "full" and vision.model_type.startswith("clip")
    patches = patch_grid(vision) ** 2 + int(keeps_cls)
    return 2 * tiles * patches * (width * text.hidden_size + text.hidden_size * text.hidden_size)
