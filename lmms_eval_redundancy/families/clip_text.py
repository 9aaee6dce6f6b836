"""The CLIP checkpoint a method reads besides the model (``cdpruner``'s text tower and joint-space map)."""

from __future__ import annotations

import torch

from lmms_eval_redundancy.core.registry import MethodError

CLIP_TEXT_FIX = ("clip_text= must name the CLIP checkpoint of the model's vision tower, a folder or hub id that "
                 "from_pretrained loads (e.g. clip_text=openai/clip-vit-large-patch14-336 for LLaVA-1.5 and LLaVA-NeXT)")


def load_clip_text(source: str, vision_width: int, device) -> tuple:
    """``(text tower, tokenizer, joint-space map)`` of the CLIP checkpoint ``source`` (float32, frozen): the
    ``CLIPTextModelWithProjection`` and its tokenizer, and the post-layernorm and visual projection of its
    ``CLIPVisionModelWithProjection``, checked against the model's vision width."""
    from transformers import (
        AutoConfig,
        AutoTokenizer,
        CLIPTextModelWithProjection,
        CLIPVisionModelWithProjection,
    )

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise MethodError(f"clip_text={source!r} cannot be loaded ({str(error).splitlines()[0]}); {CLIP_TEXT_FIX}") from None
    if config.model_type != "clip":
        raise MethodError(f"clip_text={source!r} is a {config.model_type!r} checkpoint, not a CLIP one; {CLIP_TEXT_FIX}")
    if config.vision_config.hidden_size != vision_width:
        raise MethodError(f"clip_text={source!r} projects {config.vision_config.hidden_size}-wide vision states, but "
                          f"this model's vision tower is {vision_width} wide; {CLIP_TEXT_FIX}")
    try:
        text = load_half(CLIPTextModelWithProjection, source)
        vision = load_half(CLIPVisionModelWithProjection, source)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise MethodError(f"clip_text={source!r} cannot be loaded ({str(error).splitlines()[0]}); {CLIP_TEXT_FIX}") from None
    if text.config.projection_dim != vision.config.projection_dim:
        raise MethodError(f"clip_text={source!r}: its text projection ({text.config.projection_dim}) and visual "
                          f"projection ({vision.config.projection_dim}) differ in width; {CLIP_TEXT_FIX}")
    joint = torch.nn.Sequential(vision.vision_model.post_layernorm, vision.visual_projection)
    return (text.eval().requires_grad_(False).to(device), tokenizer,
            joint.eval().requires_grad_(False).to(device))


def load_half(cls, source: str):
    """The text or vision half ``cls`` of the CLIP checkpoint ``source``, in float32. The other half's weights
    are expected to go unused, so transformers' loading report is silenced; a weight of this half that the
    checkpoint lacks (it would stay random) is refused."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        model, info = cls.from_pretrained(source, dtype=torch.float32, output_loading_info=True)
    finally:
        logging.set_verbosity(verbosity)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise MethodError(f"clip_text={source!r} lacks {len(missing)} weight(s) of its {cls.__name__} (e.g. "
                          f"{missing[0]}); {CLIP_TEXT_FIX}")
    return model
